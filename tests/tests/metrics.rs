//! The agent's Prometheus endpoint end to end: unmodified clients in a pod cause a kernel deny,
//! DNS answers and refusals, and allowed, denied and over-budget L7 calls; a scrape of
//! `/metrics` over HTTP (parsed strictly as OpenMetrics text) shows each counted under the
//! caller's identity with the right decision, reason and result, the spend and the prevented
//! spend in USD, and both latency histograms. `/healthz` and `/readyz` answer 200 once the agent
//! is ready.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aegis_tests::{
    openmetrics::Exposition,
    world::{DnsRecord, HttpServer, World, describe},
};

const STRIPE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const METRICS: &str = "http://127.0.0.1:9464";

/// Payments cost 1.5 USD and the day's budget is 2 USD: the first passes, the second is over.
const POLICY: &str = r#"
agent: finance-agent
tenant: acme
version: 3
budget: { daily_usd: 2 }
egress:
  - fqdn: api.stripe.com
    ports: [443]
    inspect: true
tools:
  - name: stripe-payments
    host: api.stripe.com
    actions:
      - name: create_payment
        method: POST
        path: /v1/payment_intents
        price_usd: 1.5
        params:
          amount: { required: true, max: 5000 }
"#;

const FINANCE: Option<(&str, Option<&str>)> = Some(("finance-agent", Some("acme")));
const IDENTITY: [(&str, &str); 2] = [("agent", "finance-agent"), ("tenant", "acme")];

/// GETs `path` of the metrics endpoint from the node namespace: (status, content type, body).
fn get(w: &World, path: &str) -> (String, String, String) {
    let out = w.node_exec(&[
        "curl",
        "-sS",
        "-m",
        "5",
        "-w",
        "\n%{http_code} %{content_type}",
        &format!("{METRICS}{path}"),
    ]);
    assert!(out.status.success(), "GET {path}: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').expect("status line");
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    (status.to_owned(), content_type.to_owned(), body.to_owned())
}

fn scrape(w: &World) -> Exposition {
    let (status, content_type, body) = get(w, "/metrics");
    assert_eq!(status, "200", "{body}");
    assert_eq!(
        content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "the OpenMetrics content type"
    );
    Exposition::parse(&body)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics text: {e}\n{body}"))
}

/// Pays `amount` as the finance agent; returns the HTTP status.
fn pay(w: &World, amount: u32) -> String {
    let ca = w.node_ca().to_string_lossy().into_owned();
    let out = w.pod_exec(
        1,
        FINANCE,
        &[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &ca,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "content-type: application/json",
            "-d",
            &format!(r#"{{"amount":{amount}}}"#),
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert!(out.status.success(), "curl: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metrics_count_decisions_denies_dns_and_spend_by_identity() {
    let mut w = World::builder()
        .pods(1)
        .record(DnsRecord::new("api.stripe.com", Some(STRIPE), None, 60))
        .http_server(HttpServer::new("api.stripe.com", Some(STRIPE), None, &[443]).with_tls())
        .http_server(HttpServer::new("evil", Some(EVIL), None, &[80]))
        .policy("finance.yaml", POLICY)
        .build();
    w.start_agent();

    for path in ["/healthz", "/readyz"] {
        let (status, _, body) = get(&w, path);
        assert_eq!(status, "200", "{path} of a ready agent: {body}");
    }
    assert_eq!(get(&w, "/nothing-here").0, "404");
    // Before any traffic nothing is counted.
    let before = scrape(&w);
    assert_eq!(before.samples("aegis_l7_decisions_total", &[]).count(), 0);
    assert_eq!(before.value("aegis_approvals_pending", &[]), Some(0.0));

    // A kernel deny: a connection to an address no DNS answer allowed.
    let out = w.pod_exec(
        1,
        FINANCE,
        &["curl", "-sS", "-m", "5", &format!("http://{EVIL}/")],
    );
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    // DNS: a name the policy does not allow (one A query; glibc's getaddrinfo).
    let out = w.pod_exec(1, FINANCE, &["getent", "ahostsv4", "evil.example"]);
    assert!(!out.status.success(), "{}", describe(&out));
    // L7: allowed and charged; over the constraint; over the budget.
    assert_eq!(pay(&w, 1200), "200");
    assert_eq!(pay(&w, 9000), "403");
    assert_eq!(pay(&w, 100), "402");

    // Deny events reach userspace asynchronously: wait for the kernel's to be counted.
    let kernel = [
        IDENTITY[0],
        IDENTITY[1],
        ("verdict", "denied"),
        ("reason", "not_allowed"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = scrape(&w);
        if m.value("aegis_kernel_denies_total", &kernel).is_some() || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        m.value("aegis_kernel_denies_total", &kernel),
        Some(1.0),
        "one kernel deny: {:?}\n{}",
        m.families.get("aegis_kernel_denies"),
        w.diagnostics()
    );

    let decisions = |decision: &str, reason: &str| {
        m.value(
            "aegis_l7_decisions_total",
            &[
                IDENTITY[0],
                IDENTITY[1],
                ("decision", decision),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(decisions("allow", "allowed"), Some(1.0), "{m:#?}");
    assert_eq!(
        decisions("deny", "constraint_violated"),
        Some(1.0),
        "{m:#?}"
    );
    assert_eq!(decisions("deny", "budget_exceeded"), Some(1.0), "{m:#?}");
    assert_eq!(
        m.samples("aegis_l7_decisions_total", &[]).count(),
        3,
        "nothing else decided: {:?}",
        m.families.get("aegis_l7_decisions")
    );
    // The paid call was spent; the refused ones (constraint, budget) were prevented.
    assert_eq!(m.value("aegis_l7_spend_usd_total", &IDENTITY), Some(1.5));
    assert_eq!(
        m.value("aegis_l7_prevented_spend_usd_total", &IDENTITY),
        Some(3.0)
    );
    assert_eq!(
        m.value("aegis_l7_request_duration_seconds_count", &[]),
        Some(3.0)
    );
    assert_eq!(
        m.value(
            "aegis_l7_request_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        Some(3.0)
    );

    let dns = |result: &str| {
        m.value(
            "aegis_dns_queries_total",
            &[IDENTITY[0], IDENTITY[1], ("result", result)],
        )
        .unwrap_or(0.0)
    };
    assert!(
        dns("denied") >= 1.0,
        "evil.example refused: {:?}",
        m.families.get("aegis_dns_queries")
    );
    assert!(
        dns("allowed") >= 1.0,
        "api.stripe.com answered: {:?}",
        m.families.get("aegis_dns_queries")
    );
    for result in ["allowed", "denied"] {
        let count = m
            .value(
                "aegis_dns_answer_duration_seconds_count",
                &[("result", result)],
            )
            .unwrap_or(0.0);
        assert_eq!(
            count,
            dns(result),
            "one latency observation per {result} query"
        );
    }
    // Every family `aegis-agent metrics` lists is exported now, with the type and labels it
    // lists, and nothing else is.
    let out = w.agent_cli(&["metrics"]);
    assert!(out.status.success(), "{}", describe(&out));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut names = Vec::new();
    for line in listed.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, kind, labels, _help] = fields[..] else {
            panic!("`aegis-agent metrics` line {line:?}");
        };
        names.push(name.to_owned());
        let family = m
            .families
            .get(name)
            .unwrap_or_else(|| panic!("{name} listed, not exported: {m:#?}"));
        assert_eq!(family.kind, kind, "{name}");
        for sample in &family.samples {
            let mut got: Vec<&str> = sample
                .labels
                .keys()
                .map(String::as_str)
                .filter(|l| *l != "le")
                .collect();
            let mut want: Vec<&str> = labels.split(',').filter(|l| *l != "-").collect();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "labels of {sample:?}");
        }
    }
    let exported: Vec<&String> = m.families.keys().collect();
    names.sort();
    assert_eq!(exported, names.iter().collect::<Vec<_>>());
    // Label values are bounded: no domain, address or free-form text anywhere.
    for sample in m.families.values().flat_map(|f| &f.samples) {
        for value in sample.labels.values() {
            assert!(
                !value.contains('.') || sample.name.ends_with("_bucket"),
                "unbounded label value in {sample:?}"
            );
        }
    }
}
