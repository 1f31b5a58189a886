//! The L7 enforcer end to end: unmodified curl in a pod calls an *inspected* HTTPS domain; the
//! kernel redirects the connection to the enforcer, which terminates TLS with the node CA,
//! decides by policy, and re-originates TLS to the real server (an echo server in the "internet"
//! namespace with its own test certificate).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

mod common;

use aegis_tests::world::{
    DnsRecord, HttpServer, NODE_UPLINK_V4, World, WorldBuilder, describe, wait_until,
};
use serde_json::Value;

const STRIPE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const STRIPE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xae61, 1, 0, 0, 0, 0, 0x10);
const SLACK: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const PLAIN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
const FINANCE: Option<(&str, Option<&str>)> = Some(("finance-agent", None));
const SUPPORT: Option<(&str, Option<&str>)> = Some(("support-agent", None));

const FINANCE_POLICY: &str = r#"
agent: finance-agent
version: 5
egress:
  - fqdn: api.stripe.com
    ports: [443]
    inspect: true
  - fqdn: hooks.slack.com
    ports: [443]
    inspect: true
  - fqdn: plain.example
    ports: [443]
tools:
  - name: stripe-payments
    host: api.stripe.com
    actions:
      - name: create_payment
        method: POST
        path: /v1/payment_intents
        params:
          amount: { required: true, max: 5000 }
      - name: read
        method: GET
        path: /**
  - name: slack
    host: hooks.slack.com
    actions:
      - name: post_message
        method: POST
        path: /services/**
        decision: sanitize
        sanitize: [ssn, email]
"#;

const SUPPORT_POLICY: &str = r#"
agent: support-agent
version: 2
mode: shadow
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
        params:
          amount: { max: 100 }
"#;

fn world() -> World {
    world_with(|b| b)
}

fn world_with(customize: impl FnOnce(WorldBuilder) -> WorldBuilder) -> World {
    let b = World::builder()
        .pods(1)
        .record(DnsRecord::new(
            "api.stripe.com",
            Some(STRIPE),
            Some(STRIPE6),
            60,
        ))
        .record(DnsRecord::new("hooks.slack.com", Some(SLACK), None, 60))
        .record(DnsRecord::new("plain.example", Some(PLAIN), None, 60))
        .http_server(
            HttpServer::new("api.stripe.com", Some(STRIPE), Some(STRIPE6), &[443]).with_tls(),
        )
        .http_server(HttpServer::new("hooks.slack.com", Some(SLACK), None, &[443]).with_tls())
        .http_server(HttpServer::new("plain.example", Some(PLAIN), None, &[443]).with_tls())
        .policy("finance.yaml", FINANCE_POLICY)
        .policy("support.yaml", SUPPORT_POLICY);
    let mut w = customize(b).build();
    w.start_agent();
    w
}

/// curl as `agent` trusting the node CA, returning (exit code, stdout, stderr).
fn curl(
    w: &World,
    agent: Option<(&str, Option<&str>)>,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let ca = w.node_ca().to_string_lossy().into_owned();
    let mut argv = vec!["curl", "-sS", "-m", "10", "--cacert", &ca];
    argv.extend_from_slice(args);
    let out = w.pod_exec(1, agent, &argv);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(text: &str, w: &World) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}\n{}", w.diagnostics()))
}

#[test]
fn allowed_call_passes_through_the_enforcer_with_its_body_intact() {
    let w = world();
    let body = r#"{"amount":1200,"currency":"usd"}"#;
    let (code, out, err) = curl(
        &w,
        FINANCE,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            body,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "curl failed: {err}\n{}", w.diagnostics());
    let echo = json(&out, &w);
    assert_eq!(
        echo["server"], "api.stripe.com",
        "the real upstream answered"
    );
    assert_eq!(echo["body"], body, "the body arrived intact");
    // The connection was intercepted: one audit record names the decision and the original
    // target.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let record = loop {
        let found = w
            .audit_records()
            .into_iter()
            .find(|r| r["kind"] == "l7_decision" && r["action"] == "create_payment");
        if let Some(r) = found {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit record\n{}",
            w.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(record["decision"], "allow", "{record}");
    assert_eq!(record["agent"], "finance-agent");
    assert_eq!(record["tool"], "stripe-payments");
    assert_eq!(record["status"], 200);
    assert_eq!(record["policy_version"], 5);
    let dst = record["dst"].as_str().unwrap_or_default();
    assert!(
        dst == format!("{STRIPE}:443") || dst == format!("[{STRIPE6}]:443"),
        "the record names where the agent was going: {record}"
    );
    // A plain allow is a debug line: at the default level the log has no line for it.
    assert!(
        !w.events()
            .iter()
            .any(|e| e["event"] == "l7_decision" && e["decision"] == "allow"),
        "an allow logged at the default level\n{}",
        w.agent_log()
    );
    assert!(
        record["latency_us"].as_u64().is_some() && record["seq"].as_u64().is_some(),
        "{record}"
    );
    // The log is chained and signed: `audit verify` proves it, and names the edited line of a
    // copy whose allow was turned into a deny.
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = w.verify_audit(&w.audit_log());
    assert!(ok && out.contains("intact"), "{out}");
    let text = std::fs::read_to_string(w.audit_log()).unwrap();
    let (index, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| {
            l.contains("\"action\":\"create_payment\"") && l.contains("\"decision\":\"allow\"")
        })
        .expect("the decision's line");
    let tampered = text.replacen(
        line,
        &line.replace("\"decision\":\"allow\"", "\"decision\":\"deny\""),
        1,
    );
    let copy = w.dir().join("audit-tampered.jsonl");
    std::fs::write(&copy, tampered).unwrap();
    let (ok, out) = w.verify_audit(&copy);
    assert!(
        !ok && out.contains(&format!(":line {}:", index + 1)),
        "{out}"
    );
}

#[test]
fn constraint_violation_is_refused_with_a_json_body_naming_the_rule() {
    let w = world();
    let (code, out, err) = curl(
        &w,
        FINANCE,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"amount":50000}"#,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let (body, status) = out.rsplit_once('\n').expect("status line");
    assert_eq!(status, "403", "{out}");
    let v = json(body, &w);
    assert_eq!(v["error"], "policy_violation", "{v}");
    assert!(
        v["reason"].as_str().unwrap_or_default().contains("amount"),
        "the rule is named: {v}"
    );
    assert_eq!(v["action"], "create_payment");
    assert!(!w.dnsmasq_log().is_empty());
}

#[test]
fn sanitize_redacts_before_the_upstream_sees_it() {
    let w = world();
    let body = r#"{"text":"customer 123-45-6789 wrote from jane@example.com"}"#;
    let (code, out, err) = curl(
        &w,
        FINANCE,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            body,
            "https://hooks.slack.com/services/T1/B2",
        ],
    );
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    let echo = json(&out, &w);
    let seen: Value =
        serde_json::from_str(echo["body"].as_str().unwrap()).expect("upstream got JSON");
    let text = seen["text"].as_str().unwrap();
    assert!(
        !text.contains("123-45-6789") && !text.contains("jane@example.com"),
        "PII reached the upstream: {text}"
    );
    assert!(
        text.contains("[REDACTED:SSN]") && text.contains("[REDACTED:EMAIL]"),
        "{text}"
    );
}

#[test]
fn shadow_mode_forwards_and_records_the_would_be_decision() {
    let w = world();
    let (code, out, err) = curl(
        &w,
        SUPPORT,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"amount":900}"#,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    assert_eq!(
        json(&out, &w)["body"],
        r#"{"amount":900}"#,
        "forwarded unchanged"
    );
    let e = w.wait_for_event("shadow", Duration::from_secs(10), |e| {
        e["event"] == "l7_decision" && e["agent"] == "support-agent"
    });
    assert_eq!(e["would"], "would_deny", "{e}");
    assert_eq!(e["mode"], "shadow");
}

#[test]
fn host_header_must_match_the_sni() {
    let w = world();
    let (code, out, err) = curl(
        &w,
        FINANCE,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "Host: evil.example",
            "https://api.stripe.com/v1/charges",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let (body, status) = out.rsplit_once('\n').expect("status line");
    assert_eq!(status, "421", "{out}");
    assert_eq!(json(body, &w)["reason"], "host_mismatch");
}

#[test]
fn http2_works_through_the_enforcer() {
    let w = world();
    let (code, out, err) = curl(
        &w,
        FINANCE,
        &[
            "--http2",
            "-w",
            "\n%{http_version}",
            "https://api.stripe.com/v1/balance",
        ],
    );
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    let (body, version) = out.rsplit_once('\n').expect("version line");
    assert_eq!(
        version, "2",
        "the client spoke HTTP/2 to the enforcer: {out}"
    );
    assert!(body.contains("hello from api.stripe.com"), "{body}");
}

#[test]
fn http2_streams_of_one_connection_reach_the_upstream_concurrently() {
    // Four streams multiplexed on one HTTP/2 connection to the enforcer; the upstream answers
    // none of them until all four are in at once (504 otherwise). The enforcer re-originates
    // each stream on an HTTP/1.1 connection of its own from the workload connection's pool.
    let w = world();
    let url = "https://api.stripe.com/barrier/h2/4";
    let mut args = vec![
        "--http2",
        "--parallel",
        "--parallel-max",
        "4",
        "-w",
        "%{http_version} %{response_code} %{num_connects}\n",
    ];
    for _ in 0..4 {
        args.extend(["-o", "/dev/null", url]);
    }
    let (code, out, err) = curl(&w, FINANCE, &args);
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 4, "{out}");
    for line in &lines {
        assert_eq!(line[..2], ["2", "200"], "{out}\n{}", w.diagnostics());
    }
    let connects: u32 = lines.iter().map(|l| l[2].parse::<u32>().unwrap()).sum();
    assert_eq!(
        connects, 1,
        "curl multiplexed the four on one connection: {out}"
    );
    // Each stream is decided and audited on its own.
    let audited = || {
        w.audit_records()
            .iter()
            .filter(|r| {
                r["kind"] == "l7_decision" && r["path"] == "/barrier/h2/4" && r["status"] == 200
            })
            .count()
    };
    assert!(
        aegis_tests::world::wait_until(Duration::from_secs(5), || audited() == 4),
        "{} audit records of the four streams\n{}",
        audited(),
        w.diagnostics()
    );
}

#[test]
fn a_body_over_the_limit_is_refused_without_reading_it_whole() {
    let w = world();
    let big = w.dir().join("big.json");
    std::fs::write(&big, vec![b'a'; 10 * 1024 * 1024]).unwrap();
    let data = format!("@{}", big.display());
    let (code, out, err) = curl(
        &w,
        FINANCE,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "--http1.1",
            "--data-binary",
            &data,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with("413"), "{out}");
}

#[test]
fn uninspected_domains_are_not_intercepted_and_plain_tcp_to_inspected_is_refused() {
    let w = world();
    // plain.example is allowed but not inspected: TLS goes straight to the server, whose own
    // certificate the client must trust.
    let cert = w.test_ca().to_string_lossy().into_owned();
    let out = w.pod_exec(
        1,
        FINANCE,
        &[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &cert,
            "https://plain.example/",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from plain.example"));
    // Non-TLS bytes to an inspected destination: refused, not passed through.
    let out = w.pod_exec(
        1,
        FINANCE,
        &["curl", "-sS", "-m", "10", "http://api.stripe.com:443/"],
    );
    assert!(
        !out.status.success(),
        "plain HTTP must not pass: {}",
        describe(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello from"),
        "{}",
        describe(&out)
    );
}

#[test]
fn every_decision_is_exported_as_an_otlp_span() {
    let endpoint = format!("http://{NODE_UPLINK_V4}:{}", common::OTLP_PORT);
    // The receiver runs inside the node namespace, which exists once the world is built; the
    // agent starts after it.
    let mut w = World::builder()
        .pods(1)
        .record(DnsRecord::new("api.stripe.com", Some(STRIPE), None, 60))
        .http_server(HttpServer::new("api.stripe.com", Some(STRIPE), None, &[443]).with_tls())
        .policy("finance.yaml", FINANCE_POLICY)
        .agent_arg("--otlp-endpoint")
        .agent_arg(&endpoint)
        .agent_env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .build();
    let receiver = common::spawn_receiver(
        &w.node_ns(),
        std::net::SocketAddr::new(NODE_UPLINK_V4.into(), common::OTLP_PORT),
    );
    w.start_agent();
    let (code, _, err) = curl(
        &w,
        FINANCE,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"amount":99999}"#,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let span = common::wait_for_span(&receiver, "aegis.l7", || w.diagnostics());
    for (key, want) in [
        ("agent_id", "finance-agent"),
        ("tenant", "default"),
        ("tool", "stripe-payments"),
        ("action", "create_payment"),
        ("decision", "deny"),
        ("policy_version", "5"),
        ("mode", "enforce"),
    ] {
        assert_eq!(
            common::attr_str(&span, key).as_deref(),
            Some(want),
            "span attribute {key}: {span:?}"
        );
    }
    assert!(
        common::attr_str(&span, "reason").is_some_and(|r| r.contains("amount")),
        "{span:?}"
    );
    assert!(common::attr_str(&span, "latency_us").is_some(), "{span:?}");
    // An allow is exported too, with its decision line as the span's event, though that line
    // is below the log's default level.
    let (code, _, err) = curl(
        &w,
        FINANCE,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"amount":1200}"#,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let allow = loop {
        let found = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.name == "aegis.l7" && common::attr_str(s, "decision").as_deref() == Some("allow")
            })
            .cloned();
        if let Some(span) = found {
            break span;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no allow span within 20 s\n{}",
            w.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        allow
            .events
            .iter()
            .any(|e| e.name.contains("L7 allow POST")),
        "{allow:?}"
    );
}

#[test]
fn python_urllib_and_http_client_work_unmodified() {
    let w = world();
    let ca = w.node_ca().to_string_lossy().into_owned();
    let script = r#"
import json, urllib.request, http.client, ssl
req = urllib.request.Request("https://api.stripe.com/v1/payment_intents", data=b'{"amount": 10}',
                             headers={"Content-Type": "application/json"}, method="POST")
print(json.load(urllib.request.urlopen(req, timeout=10))["body"])
conn = http.client.HTTPSConnection("api.stripe.com", timeout=10, context=ssl.create_default_context())
conn.request("POST", "/v1/payment_intents", body='{"amount": 9000}', headers={"Content-Type": "application/json"})
r = conn.getresponse()
print(r.status, json.loads(r.read())["error"])
"#;
    let python = w.python().to_string_lossy().into_owned();
    let cert_env = format!("SSL_CERT_FILE={ca}");
    let out = w.pod_exec(1, FINANCE, &["env", &cert_env, &python, "-c", script]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        w.diagnostics()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [r#"{"amount": 10}"#, "403 policy_violation"],
        "{stdout}"
    );
}

#[test]
fn a_policy_reload_mid_traffic_loses_no_request() {
    let w = world();
    let ca = w.node_ca().to_string_lossy().into_owned();
    // Sequential calls, each on a new connection, until the test has rewritten and reloaded the
    // policy three times (and at least 20): the client runs before, during and after every
    // reload, however fast this machine serves it.
    let stop = w.dir().join("reloads-done");
    let script = r#"
import json, os, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
ok = failed = calls = 0
while calls < 20 or (not os.path.exists(sys.argv[2]) and calls < 5000):
    req = urllib.request.Request("https://api.stripe.com/v1/payment_intents", data=json.dumps({"amount": calls}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        body = json.load(urllib.request.urlopen(req, timeout=10, context=ctx))
        ok += body["body"] == json.dumps({"amount": calls})
    except Exception as e:
        failed += 1
        print("failed", calls, e, file=sys.stderr)
    calls += 1
print(ok, failed, calls)
"#;
    let python = w.python().to_string_lossy().into_owned();
    let stop_arg = stop.to_string_lossy().into_owned();
    let child = w.pod_spawn(
        1,
        FINANCE,
        &[
            python.as_str(),
            "-c",
            script,
            ca.as_str(),
            stop_arg.as_str(),
        ],
    );
    for version in 6..9 {
        std::thread::sleep(Duration::from_millis(300));
        w.write_policy(
            "finance.yaml",
            &FINANCE_POLICY.replace("version: 5", &format!("version: {version}")),
        );
        w.reload_policy();
    }
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&stop, b"").expect("write the stop file");
    let out = child.wait_with_output().expect("client");
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<usize> = stdout
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let [ok, failed, calls] = counts[..] else {
        panic!("client output: {}", describe(&out));
    };
    assert!(
        calls < 5000,
        "the client never saw the stop file: {}",
        describe(&out)
    );
    assert_eq!(
        (ok, failed),
        (calls, 0),
        "every call answered with its body: {}\n{}",
        describe(&out),
        w.diagnostics()
    );
    // The reloads happened while the client ran: decisions carry more than one version (read
    // from the audit log, which has every decision once written: at most 100 ms behind).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let decisions = loop {
        let decisions: Vec<Value> = w
            .audit_records()
            .into_iter()
            .filter(|r| r["kind"] == "l7_decision")
            .collect();
        if decisions.len() >= calls || std::time::Instant::now() > deadline {
            break decisions;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(decisions.len(), calls, "one audit record per call");
    let versions: std::collections::BTreeSet<u64> = decisions
        .iter()
        .filter_map(|r| r["policy_version"].as_u64())
        .collect();
    assert!(
        versions.len() > 1,
        "decisions under one policy version only: {versions:?}"
    );
}

#[test]
fn node_fetch_works_unmodified() {
    let w = world();
    let Ok(node) = which("node") else {
        panic!("node is not installed: `cargo xtask setup` installs nodejs");
    };
    let script = r#"
fetch("https://api.stripe.com/v1/payment_intents", {
  method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify({amount: 42}),
}).then(r => r.json()).then(j => console.log(j.body)).catch(e => { console.error(e); process.exit(1); });
"#;
    let ca = format!("NODE_EXTRA_CA_CERTS={}", w.node_ca().display());
    let out = w.pod_exec(1, FINANCE, &["env", &ca, &node, "-e", script]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        w.diagnostics()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"amount":42}"#
    );
}

fn which(program: &str) -> Result<String, ()> {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map_err(|_| ())?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !path.is_empty() {
        Ok(path)
    } else {
        Err(())
    }
}

#[test]
fn chunked_request_bodies_arrive_whole() {
    let w = world();
    let body = r#"{"amount":700,"currency":"usd"}"#;
    let (code, out, err) = curl(
        &w,
        FINANCE,
        &[
            "--http1.1",
            "-H",
            "content-type: application/json",
            "-H",
            "Transfer-Encoding: chunked",
            "-d",
            body,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    assert_eq!(json(&out, &w)["body"], body, "{out}");
}

/// The kill switch cuts L7 calls on a connection opened before it was turned on (the kernel
/// refuses new connections; the enforcer refuses the next request on the old one).
#[test]
fn kill_switch_refuses_requests_on_open_connections() {
    let w = world();
    let ca = w.node_ca().to_string_lossy().into_owned();
    let (ready, go) = (w.dir().join("l7-ready"), w.dir().join("l7-go"));
    let script = r#"
import json, http.client, os, ssl, sys, time
conn = http.client.HTTPSConnection("api.stripe.com", timeout=10, context=ssl.create_default_context())
def call():
    conn.request("POST", "/v1/payment_intents", body='{"amount": 10, "currency": "usd"}', headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    print(r.status, json.loads(body).get("reason", ""), r.version, flush=True)
call()
open(sys.argv[1], "w").close()
deadline = time.time() + 20
while not os.path.exists(sys.argv[2]) and time.time() < deadline:
    time.sleep(0.02)
call()
"#;
    let python = w.python().to_string_lossy().into_owned();
    let cert_env = format!("SSL_CERT_FILE={ca}");
    let (ready_s, go_s) = (
        ready.to_string_lossy().into_owned(),
        go.to_string_lossy().into_owned(),
    );
    let out = std::thread::scope(|s| {
        let client = s.spawn(|| {
            w.pod_exec(
                1,
                FINANCE,
                &["env", &cert_env, &python, "-c", script, &ready_s, &go_s],
            )
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "first call never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        w.kill_switch("on", "finance-agent");
        std::fs::write(&go, "").unwrap();
        client.join().unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["200  11", "403 kill_switch 11"],
        "{stdout}\n{}\n{}",
        describe(&out),
        w.diagnostics()
    );
}

/// `rate_limit: {requests_per_minute: 1, burst: 3}`: six calls back to back on one keep-alive
/// connection; the first three pass, the rest get 429 with Retry-After and a JSON body.
#[test]
fn rate_limit_passes_the_burst_then_answers_429_with_retry_after() {
    let limited = FINANCE_POLICY.replacen(
        "version: 5\n",
        "version: 5\nrate_limit: { requests_per_minute: 1, burst: 3 }\n",
        1,
    );
    // Written after the default one, under the same file name: it replaces it.
    let w = world_with(|b| b.policy("finance.yaml", &limited));
    let url = "https://api.stripe.com/v1/charges";
    let mut args = vec!["-i"];
    args.extend(std::iter::repeat_n(url, 6));
    let (code, out, err) = curl(&w, FINANCE, &args);
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    // Bodies end without a newline, so a status line may follow one on the same line (curl
    // negotiates HTTP/2 with the enforcer).
    let statuses: Vec<&str> = out
        .split("HTTP/2 ")
        .skip(1)
        .map(|r| r.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        ["200", "200", "200", "429", "429", "429"],
        "{out}"
    );
    // The bucket earns one request a minute: the next passes 60 s after the burst, less the
    // seconds the six calls took (a few, even on a loaded machine).
    let lower = out.to_ascii_lowercase();
    let retry_after: Vec<u64> = lower
        .split("retry-after: ")
        .skip(1)
        .map(|r| r.split_whitespace().next().unwrap_or("").parse().unwrap())
        .collect();
    assert_eq!(retry_after.len(), 3, "{out}");
    assert!(
        retry_after.iter().all(|s| (50..=60).contains(s)),
        "{retry_after:?}\n{out}"
    );
    assert!(out.contains(r#""reason":"RateLimited""#), "{out}");
    assert!(
        out.contains(&format!(r#""retry_after_s":{}"#, retry_after[0])),
        "{out}"
    );
}

/// Agent tokens (`--token-key`): a valid token of the calling workload passes once and is
/// stripped before the upstream; a replay, another agent's token (stolen) and a forged one are
/// refused with 401.
#[test]
fn agent_tokens_are_bound_to_the_workload_used_once_and_stripped() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("token.key");
    let issue = |agent: &str, key: &std::path::Path| {
        let out = std::process::Command::new(aegis_tests::world::agent_bin())
            .args([
                "token",
                "issue",
                "--org",
                "acme-corp",
                "--agent",
                agent,
                "--scope",
                "payments",
                "--key",
            ])
            .arg(key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let mine = issue("finance-agent", &key);
    let stolen = issue("support-agent", &key);
    let forged = issue("finance-agent", &keys.path().join("other.key"));
    let public = keys.path().join("token.key.pub");
    let w = world_with(|b| {
        b.agent_arg("--token-key")
            .agent_arg(&public.to_string_lossy())
    });
    let call = |token: &str| {
        let header = format!("x-aegis-agent-token: {token}");
        let (_, out, err) = curl(
            &w,
            FINANCE,
            &[
                "-H",
                &header,
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"amount": 10}"#,
                "-w",
                "\n%{http_code}",
                "https://api.stripe.com/v1/payment_intents",
            ],
        );
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned(), err)
    };
    let (code, body, err) = call(&mine);
    assert_eq!(code, "200", "{body}{err}\n{}", w.diagnostics());
    assert_eq!(
        json(&body, &w)["agent_token"],
        Value::Null,
        "stripped: {body}"
    );
    for (token, reason) in [
        (&mine, "token_replayed"),
        (&stolen, "token_wrong_identity"),
        (&forged, "token_invalid"),
    ] {
        let (code, body, err) = call(token);
        assert_eq!(code, "401", "{reason}: {body}{err}");
        assert_eq!(json(&body, &w)["reason"], reason, "{body}");
    }
}

/// The finance policy with a budget of 5 USD a day and GETs priced at 1 USD.
fn priced_policy() -> String {
    let priced = FINANCE_POLICY
        .replacen(
            "version: 5\n",
            "version: 5\nbudget: { daily_usd: 5, monthly_usd: 100 }\n",
            1,
        )
        .replacen(
            "        path: /**\n",
            "        path: /**\n        price_usd: 1\n",
            1,
        );
    assert!(priced.contains("price_usd: 1"), "{priced}");
    priced
}

/// Makes `n` concurrent priced calls as finance-agent (Python threads); one `status reason`
/// line per call, sorted.
fn concurrent_priced_calls(w: &World, n: usize) -> String {
    let ca = w.node_ca().to_string_lossy().into_owned();
    let script = r#"
import json, ssl, sys, threading, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile=sys.argv[1])
codes, lock = [], threading.Lock()
def call():
    try:
        code = urllib.request.urlopen("https://api.stripe.com/v1/charges", timeout=20, context=ctx).status
        reason = ""
    except urllib.error.HTTPError as e:
        code, reason = e.code, json.load(e).get("reason", "")
    with lock:
        codes.append((code, reason))
threads = [threading.Thread(target=call) for _ in range(int(sys.argv[2]))]
for t in threads: t.start()
for t in threads: t.join()
for c, r in sorted(codes): print(c, r)
"#;
    let python = w.python().to_string_lossy().into_owned();
    let out = w.pod_exec(1, FINANCE, &[&python, "-c", script, &ca, &n.to_string()]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        w.diagnostics()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (passed, refused with 402 BudgetExceeded) of [`concurrent_priced_calls`]' output.
fn budget_outcome(out: &str) -> (usize, usize) {
    (
        out.lines().filter(|l| l.starts_with("200")).count(),
        out.lines().filter(|l| *l == "402 BudgetExceeded").count(),
    )
}

/// `budget: {daily_usd: 5}` and reads priced at 1 USD: twelve concurrent calls, each on its own
/// connection, spend exactly the budget (five pass, seven get 402 BudgetExceeded), and a
/// restarted agent still knows the budget is spent.
#[test]
fn a_budget_is_never_overspent_by_concurrent_calls_and_survives_a_restart() {
    let mut w = world_with(|b| b.policy("finance.yaml", &priced_policy()));
    let out = concurrent_priced_calls(&w, 12);
    assert_eq!(budget_outcome(&out), (5, 7), "{out}");
    w.kill_agent();
    w.start_agent();
    let out = concurrent_priced_calls(&w, 1);
    assert_eq!(out.trim(), "402 BudgetExceeded", "after a restart: {out}");
}

/// Port of the test Redis in the node namespace.
const REDIS_PORT: u16 = 16379;

#[test]
fn a_budget_in_redis_is_never_overspent_and_outlives_the_agent() {
    let redis_url = format!("--redis-url=redis://127.0.0.1:{REDIS_PORT}/0");
    let mut w = world_with(|b| {
        b.policy("finance.yaml", &priced_policy())
            .agent_arg("--state-backend=redis")
            .agent_arg(&redis_url)
    });
    w.start_redis(REDIS_PORT);
    let out = concurrent_priced_calls(&w, 12);
    assert_eq!(budget_outcome(&out), (5, 7), "{out}");
    // The spend is in Redis, where every node reads it: integer micro-USD per period.
    let day = chrono_day();
    let key = format!("aegis:budget:finance-agent@default|day:{day}");
    let out = w.node_exec(&["redis-cli", "-p", &REDIS_PORT.to_string(), "get", &key]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "5000000",
        "{}",
        describe(&out)
    );
    w.kill_agent();
    w.start_agent();
    let out = concurrent_priced_calls(&w, 1);
    assert_eq!(out.trim(), "402 BudgetExceeded", "after a restart: {out}");
}

/// Today's UTC date, `YYYY-MM-DD` (the budget's day key).
fn chrono_day() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn redis_down_fails_closed_by_default_and_open_when_configured() {
    let redis_url = format!("--redis-url=redis://127.0.0.1:{REDIS_PORT}/0");
    // No Redis at all: priced calls are refused (503), unpriced ones still pass.
    let mut w = world_with(|b| {
        b.policy("finance.yaml", &priced_policy())
            .agent_arg("--state-backend=redis")
            .agent_arg(&redis_url)
    });
    let out = concurrent_priced_calls(&w, 2);
    assert_eq!(
        out.trim(),
        "503 state_unavailable\n503 state_unavailable",
        "{out}"
    );
    let (code, body, err) = curl(
        &w,
        FINANCE,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"amount":100}"#,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        json(&body, &w)["server"],
        "api.stripe.com",
        "unpriced calls need no state"
    );
    // Redis comes up: charging works.
    w.start_redis(REDIS_PORT);
    let out = concurrent_priced_calls(&w, 1);
    assert_eq!(out.trim(), "200", "{out}");
    drop(w);

    // Configured open: the call passes uncounted and the agent says so.
    let w = world_with(|b| {
        b.policy("finance.yaml", &priced_policy())
            .agent_arg("--state-backend=redis")
            .agent_arg(&redis_url)
            .agent_arg("--state-unavailable=open")
    });
    let out = concurrent_priced_calls(&w, 2);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines, ["200", "200"], "{out}");
    assert!(
        w.agent_log().contains("call let through uncounted"),
        "the fail-open pass is logged\n{}",
        w.agent_log()
    );
}

/// A workload that opens a connection per call (each curl is a new process) has its next
/// call re-originated on the upstream connection its previous call left idle; another
/// identity's call to the same upstream gets a connection of its own.
#[test]
fn upstream_connections_outlive_workload_connections_within_one_identity() {
    let w = world();
    let peer = |agent| {
        let (code, out, err) = curl(&w, agent, &["https://api.stripe.com/peer"]);
        assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
        out
    };
    let first = peer(FINANCE);
    assert!(first.contains(':'), "{first}");
    assert_eq!(peer(FINANCE), first, "the same upstream connection");
    // support-agent's policy is in shadow mode: its GET is forwarded (`would_deny`).
    assert_ne!(peer(SUPPORT), first, "never another identity's connection");
}

/// A stalled audit log fills the audit queue (`--audit-queue 2`; the test holds the log's lock,
/// as another writer of the file would): a call finding no room for its record is refused with
/// 503 `audit_unavailable` and never reaches the upstream; once the writer resumes, every call
/// that was forwarded has its record, and calls pass again. With `--audit-full open` the call
/// passes unrecorded, and the agent said at start that it would.
#[test]
fn a_full_audit_queue_refuses_calls_before_they_reach_the_upstream() {
    let w = world_with(|b| b.agent_arg("--audit-queue=2"));
    let (status, body) = fill_audit_queue(&w, || count_call(&w));
    assert_eq!(status, "503", "{body}\n{}", w.diagnostics());
    assert_eq!(json(&body, &w)["reason"], "audit_unavailable", "{body}");
    // The writer has resumed; the refused call never reached the upstream.
    assert_eq!(count_call(&w), ("200".into(), "4".into()));
    assert!(
        wait_until(Duration::from_secs(10), || w
            .agent_log()
            .contains("audit records dropped")),
        "the dropped refusal record is reported\n{}",
        w.diagnostics()
    );
    drop(w);

    let w = world_with(|b| {
        b.agent_arg("--audit-queue=2")
            .agent_arg("--audit-full=open")
    });
    assert!(
        w.agent_log().contains("--audit-full open"),
        "{}",
        w.agent_log()
    );
    let (status, body) = fill_audit_queue(&w, || count_call(&w));
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("200", "4"),
        "passed unrecorded"
    );
}

/// `GET /count/audit` as finance-agent: (HTTP status, body).
fn count_call(w: &World) -> (String, String) {
    let (code, out, err) = curl(
        w,
        FINANCE,
        &["-w", "\n%{http_code}", "https://api.stripe.com/count/audit"],
    );
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    let (body, status) = out.rsplit_once('\n').expect("status line");
    (status.to_owned(), body.to_owned())
}

/// Holds the audit log's lock while three calls fill a queue of 2 (the writer holds the first
/// one's record), runs `then` on the full queue, releases the lock, waits until the three
/// forwarded calls are recorded, and returns what `then` returned.
fn fill_audit_queue<T>(w: &World, then: impl FnOnce() -> T) -> T {
    use std::os::fd::AsRawFd as _;
    let forwarded = |w: &World| {
        w.audit_records()
            .iter()
            .filter(|r| r["path"] == "/count/audit" && r["decision"] == "allow")
            .count()
    };
    let log = std::fs::File::open(w.audit_log()).expect("audit log");
    // SAFETY: flock(2) on a descriptor we own.
    assert_eq!(unsafe { libc::flock(log.as_raw_fd(), libc::LOCK_EX) }, 0);
    // The writer takes the first call's record, then waits for the lock: the next two fill
    // the queue.
    assert_eq!(count_call(w), ("200".into(), "1".into()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count_call(w), ("200".into(), "2".into()));
    assert_eq!(count_call(w), ("200".into(), "3".into()));
    let out = then();
    assert_eq!(forwarded(w), 0, "nothing written while the lock is held");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::flock(log.as_raw_fd(), libc::LOCK_UN) }, 0);
    assert!(
        wait_until(Duration::from_secs(10), || forwarded(w) >= 3),
        "the three forwarded calls' records: {:?}",
        w.audit_records()
    );
    out
}

/// A webhook receiver for the node namespace: appends each POSTed body as a line to a file.
const WEBHOOK_RECEIVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with open(sys.argv[2], "ab") as f:
            f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// The approver token of the approvals API tests (its SHA-256 is in the approvers file).
const APPROVER_TOKEN: &str = "test-approver-token-0123456789";

/// A world whose finance-agent needs approval for payments over 5,000, with the approvals API
/// on `127.0.0.1:9466` (approver `alice`) and a Slack webhook on `127.0.0.1:18080` of the node
/// namespace. Returns the world and the webhook's capture file.
fn approvals_world(extra: &[&str]) -> (World, std::path::PathBuf, tempfile::TempDir) {
    let policy = FINANCE_POLICY.replacen(
        "amount: { required: true, max: 5000 }",
        "amount: { required: true, approval_needed_over: 5000, max: 100000 }",
        1,
    );
    assert!(policy.contains("approval_needed_over"));
    approvals_world_with(&policy, extra)
}

/// [`approvals_world`] with another finance-agent policy.
fn approvals_world_with(
    policy: &str,
    extra: &[&str],
) -> (World, std::path::PathBuf, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let approvers = files.path().join("approvers.yaml");
    let digest = {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(APPROVER_TOKEN.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8_lossy(&out.stdout)[..64].to_owned()
    };
    std::fs::write(
        &approvers,
        format!("approvers:\n  - name: alice\n    token_sha256: {digest}\n"),
    )
    .unwrap();
    let approvers_arg = format!("--approvers={}", approvers.display());
    let mut w = world_with(|b| {
        let mut b = b
            .policy("finance.yaml", policy)
            .agent_arg(&approvers_arg)
            .agent_arg("--approval-webhook=http://127.0.0.1:18080/hook");
        for a in extra {
            b = b.agent_arg(a);
        }
        b
    });
    let captured = w.dir().join("webhook.jsonl");
    let python = w.python().to_string_lossy().into_owned();
    let ns = w.node_ns();
    let capture = captured.to_string_lossy().into_owned();
    w.spawn_service(
        &ns,
        "webhook",
        &[&python, "-c", WEBHOOK_RECEIVER, "18080", &capture],
    );
    (w, captured, files)
}

/// POSTs a payment of `amount` as finance-agent with extra curl `args`; (status, JSON body).
fn pay(w: &World, amount: u32, args: &[&str]) -> (String, Value) {
    let body = format!(r#"{{"amount":{amount},"currency":"usd","note":"ssn 123-45-6789"}}"#);
    let mut argv = vec![
        "-w",
        "\n%{http_code}",
        "-H",
        "content-type: application/json",
        "-d",
        &body,
    ];
    argv.extend_from_slice(args);
    argv.push("https://api.stripe.com/v1/payment_intents");
    let (code, out, err) = curl(w, FINANCE, &argv);
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    let (body, status) = out.rsplit_once('\n').expect("status line");
    (status.to_owned(), json(body, w))
}

/// The approvals API from the node namespace: (status, body).
fn approvals_api(w: &World, method: &str, path: &str, token: Option<&str>) -> (String, String) {
    let url = format!("http://127.0.0.1:9466{path}");
    let auth = token.map(|t| format!("authorization: Bearer {t}"));
    let mut argv = vec![
        "curl",
        "-sS",
        "-m",
        "10",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ];
    if let Some(a) = &auth {
        argv.extend(["-H", a.as_str()]);
    }
    argv.push(&url);
    let out = w.node_exec(&argv);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    (status.to_owned(), body.to_owned())
}

/// Approves or denies (`verb`) approval `id` through the HTTP API as alice: (status, body).
fn decide_by_api(w: &World, id: &str, verb: &str) -> (String, String) {
    approvals_api(
        w,
        "POST",
        &format!("/v1/approvals/{id}/{verb}"),
        Some(APPROVER_TOKEN),
    )
}

#[test]
fn an_approved_call_passes_once_and_only_for_the_exact_request() {
    let (mut w, captured, _files) = approvals_world(&[]);
    // Over 5,000: held for a human; a retry before the decision gets the same approval.
    let (status, v) = pay(&w, 9000, &[]);
    assert_eq!(status, "403", "{v}");
    assert_eq!(v["error"], "approval_needed", "{v}");
    let id = v["approval_id"].as_str().expect("approval id").to_owned();
    let (_, again) = pay(&w, 9000, &[]);
    assert_eq!(
        again["approval_id"],
        id.as_str(),
        "a retry files no second approval"
    );

    // The webhook got a Slack message naming the approval, with the SSN redacted.
    assert!(
        aegis_tests::world::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&captured).is_ok_and(|t| t.contains(&id))
        }),
        "no webhook message\n{}",
        w.diagnostics()
    );
    let messages = std::fs::read_to_string(&captured).unwrap();
    assert_eq!(
        messages.lines().count(),
        1,
        "one message per approval: {messages}"
    );
    let message = json(messages.lines().next().unwrap(), &w);
    let text = message.to_string();
    assert!(
        message["blocks"].is_array() && text.contains("finance-agent"),
        "{text}"
    );
    assert!(
        text.contains("9000") && text.contains("[REDACTED:SSN]"),
        "{text}"
    );
    assert!(
        !text.contains("123-45-6789"),
        "the SSN left the node: {text}"
    );

    // `approvals list` shows it pending; the HTTP API needs an approver's token.
    let socket = w.control_socket().to_string_lossy().into_owned();
    let out = w.agent_cli(&["approvals", "list", "--control-socket", &socket]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && listed.contains(&id) && listed.contains("\"state\":\"pending\""),
        "{}",
        describe(&out)
    );
    let (status, _) = approvals_api(&w, "GET", "/v1/approvals", None);
    assert_eq!(status, "401");
    let (status, _) = approvals_api(&w, "GET", "/v1/approvals", Some("wrong-token"));
    assert_eq!(status, "401");
    let (status, body) = approvals_api(&w, "GET", "/v1/approvals", Some(APPROVER_TOKEN));
    assert!(status == "200" && body.contains(&id), "{status} {body}");

    // Approved from the CLI (the approver is the caller's uid) ...
    let out = w.agent_cli(&["approvals", "approve", &id, "--control-socket", &socket]);
    assert!(out.status.success(), "{}", describe(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = printed
        .lines()
        .find_map(|l| l.strip_prefix("override_token: "))
        .expect("the override token is printed")
        .to_owned();
    // The approval outlives the agent (kill -9 and restart, as in a crash or an upgrade).
    w.kill_agent();
    w.start_agent();
    // ... another body is another request: it needs its own approval.
    let (status, other) = pay(&w, 9001, &[]);
    assert_eq!(
        (status.as_str(), &other["error"]),
        ("403", &Value::from("approval_needed"))
    );
    assert_ne!(other["approval_id"], id.as_str());
    // The exact retry passes once, unchanged by the agent ...
    let (status, echo) = pay(&w, 9000, &[]);
    assert_eq!(status, "200", "{echo}\n{}", w.diagnostics());
    assert!(
        echo["body"].as_str().unwrap_or_default().contains("9000"),
        "{echo}"
    );
    // ... and only once: the next retry needs a new approval, and the spent token, presented
    // explicitly, is refused.
    let (status, next) = pay(&w, 9000, &[]);
    assert_eq!(
        (status.as_str(), &next["error"]),
        ("403", &Value::from("approval_needed"))
    );
    assert_ne!(next["approval_id"], id.as_str());
    let header = format!("x-aegis-override-token: {token}");
    let (status, used) = pay(&w, 9000, &["-H", &header]);
    assert_eq!(
        (status.as_str(), &used["reason"]),
        ("403", &Value::from("override_used")),
        "{used}"
    );

    // Denied through the HTTP API, by alice.
    let other_id = other["approval_id"].as_str().unwrap().to_owned();
    let (status, body) = decide_by_api(&w, &other_id, "deny");
    assert!(
        status == "200" && body.contains("\"state\":\"denied\""),
        "{status} {body}"
    );
    let (status, _) = decide_by_api(&w, &other_id, "approve");
    assert_eq!(status, "409", "a decided approval cannot be decided again");

    // The audit log has the whole story, with the approvers, and still verifies.
    std::thread::sleep(Duration::from_millis(300));
    let records = w.audit_records();
    let find = |kind: &str, state: &str, aid: &str| {
        records.iter().any(|r| {
            r["kind"] == kind && r["approval"]["state"] == state && r["approval"]["id"] == aid
        })
    };
    assert!(find("approval_requested", "pending", &id));
    assert!(find("approval_decided", "approved", &id));
    assert!(find("approval_used", "used", &id));
    assert!(find("approval_decided", "denied", &other_id));
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "approval_decided" && r["approval"]["by"] == "api:alice")
    );
    let passed = records
        .iter()
        .find(|r| {
            r["kind"] == "l7_decision" && r["approval_id"] == id.as_str() && r["status"] == 200
        })
        .unwrap_or_else(|| panic!("no record of the approved call\n{}", w.diagnostics()));
    assert_eq!(passed["approved_by"], "uid:0", "{passed}");
    let (ok, out) = w.verify_audit(&w.audit_log());
    assert!(ok, "{out}");
}

#[test]
fn a_held_request_goes_through_when_approved_meanwhile() {
    let (w, _captured, _files) = approvals_world(&["--approval-hold=20"]);
    let ca = w.node_ca().to_string_lossy().into_owned();
    let body = r#"{"amount":7000,"currency":"usd"}"#;
    let child = w.pod_spawn(
        1,
        FINANCE,
        &[
            "curl",
            "-sS",
            "-m",
            "30",
            "--cacert",
            &ca,
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            "https://api.stripe.com/v1/payment_intents",
        ],
    );
    // The request waits; its approval shows up in the API, and alice approves it.
    let mut id = None;
    assert!(
        aegis_tests::world::wait_until(Duration::from_secs(10), || {
            let (_, listed) = approvals_api(&w, "GET", "/v1/approvals", Some(APPROVER_TOKEN));
            id = serde_json::from_str::<Value>(&listed)
                .ok()
                .and_then(|v| v["approvals"][0]["id"].as_str().map(str::to_owned));
            id.is_some()
        }),
        "no approval filed\n{}",
        w.diagnostics()
    );
    let id = id.unwrap();
    let (status, body_out) = decide_by_api(&w, &id, "approve");
    assert!(
        status == "200" && body_out.contains("override_token"),
        "{status} {body_out}"
    );
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (echo, status) = text.rsplit_once('\n').expect("status line");
    assert_eq!(status, "200", "{text}\n{}", w.diagnostics());
    assert_eq!(json(echo, &w)["body"], body);
}

const OPENAI: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const LLM: Option<(&str, Option<&str>)> = Some(("llm-agent", None));

/// llm-agent: chat completions priced by tokens (inflated prices so costs are visible: 100 and
/// 400 USD per million input and output tokens), 1 USD a day.
const LLM_POLICY: &str = r#"
agent: llm-agent
version: 1
budget: { daily_usd: 1 }
egress:
  - fqdn: api.openai.com
    ports: [443]
    inspect: true
tools:
  - name: openai
    host: api.openai.com
    actions:
      - name: chat_completions
        method: POST
        path: /v1/chat/completions
        llm:
          max_output_tokens: 4096
          models:
            gpt-4o-mini: { input_usd_per_mtok: 100, output_usd_per_mtok: 400 }
"#;

/// A chat request body of exactly `len` bytes (padded in the prompt), with `max_tokens`.
fn chat_body(len: usize, max_tokens: u32, stream: bool, hold_s: f64) -> String {
    let head = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"stream":{stream},"hold_s":{hold_s},"messages":[{{"role":"user","content":""#
    );
    let tail = r#""}]}"#;
    let pad = len - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(pad))
}

#[test]
fn llm_calls_reserve_their_bound_and_settle_to_streamed_usage_without_overspending() {
    let redis_url = format!("--redis-url=redis://127.0.0.1:{REDIS_PORT}/0");
    let mut w = world_with(|b| {
        b.record(DnsRecord::new("api.openai.com", Some(OPENAI), None, 60))
            .http_server(HttpServer::new("api.openai.com", Some(OPENAI), None, &[443]).with_tls())
            .policy("llm.yaml", LLM_POLICY)
            .agent_arg("--state-backend=redis")
            .agent_arg(&redis_url)
    });
    w.start_redis(REDIS_PORT);
    // 400 bytes, max_tokens 400: reserved 400 × 100 + 400 × 400 = 200,000 micro-USD; the fake
    // upstream reports 100 input and 100 output tokens: 50,000.
    let (reserved, actual) = (200_000u64, 50_000u64);
    let ca = w.node_ca().to_string_lossy().into_owned();
    let script = r#"
import json, ssl, sys, threading, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile=sys.argv[1])
body = sys.argv[3].encode()
results, lock = [], threading.Lock()
def call():
    req = urllib.request.Request("https://api.openai.com/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            text = r.read().decode()
            out = (r.status, "usage" if '"completion_tokens": 100' in text else text[:200])
    except urllib.error.HTTPError as e:
        out = (e.code, json.load(e).get("reason", ""))
    except Exception as e:
        out = (0, repr(e))
    with lock:
        results.append(out)
threads = [threading.Thread(target=call) for _ in range(int(sys.argv[2]))]
for t in threads: t.start()
for t in threads: t.join()
for c, r in sorted(results): print(c, r)
"#;
    let python = w.python().to_string_lossy().into_owned();
    let run = |n: &str, body: &str| {
        let out = w.pod_exec(1, LLM, &[&python, "-c", script, &ca, n, body]);
        assert!(
            out.status.success(),
            "{}\n{}",
            describe(&out),
            w.diagnostics()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let spent = || {
        let key = format!("aegis:budget:llm-agent@default|day:{}", chrono_day());
        let out = w.node_exec(&["redis-cli", "-p", &REDIS_PORT.to_string(), "get", &key]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    // Twelve concurrent streamed calls, each holding its reservation for 2 s: only as many as
    // the budget can bound (1,000,000 / 200,000 = 5) go out; every streamed one settles.
    let body = chat_body(400, 400, true, 2.0);
    let out = run("12", &body);
    let passed = out.lines().filter(|l| *l == "200 usage").count();
    let refused = out.lines().filter(|l| *l == "402 BudgetExceeded").count();
    assert_eq!((passed, refused), (5, 7), "{out}\n{}", w.diagnostics());
    // Settled to the reported usage: 5 × 50,000, never above the budget at any time.
    assert!(
        aegis_tests::world::wait_until(Duration::from_secs(5), || spent() == 5 * actual),
        "spent {} after settling, expected {}\n{}",
        spent(),
        5 * actual,
        w.diagnostics()
    );
    // The settled budget has room again: a non-streamed call passes and settles too.
    let out = run("1", &chat_body(400, 400, false, 0.0));
    assert_eq!(out.trim(), "200 usage", "{out}");
    assert!(
        aegis_tests::world::wait_until(Duration::from_secs(5), || spent() == 6 * actual),
        "spent {}",
        spent()
    );
    // Each settlement is audited with the tokens, the reservation and the cost.
    std::thread::sleep(Duration::from_millis(300));
    let usage: Vec<Value> = w
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "llm_usage")
        .collect();
    assert_eq!(usage.len(), 6, "{usage:?}");
    for r in &usage {
        assert_eq!(
            (r["input_tokens"].as_u64(), r["output_tokens"].as_u64()),
            (Some(100), Some(100)),
            "{r}"
        );
        assert_eq!(
            r["reserved_usd"].as_f64(),
            Some(reserved as f64 / 1e6),
            "{r}"
        );
        assert_eq!(r["cost_usd"].as_f64(), Some(actual as f64 / 1e6), "{r}");
    }
}

/// curl as finance-agent; (HTTP status, body).
fn call(w: &World, args: &[&str]) -> (String, String) {
    let mut argv = vec!["-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    let (code, out, err) = curl(w, FINANCE, &argv);
    assert_eq!(code, Some(0), "{err}\n{}", w.diagnostics());
    let (body, status) = out.rsplit_once('\n').expect("status line");
    (status.to_owned(), body.to_owned())
}

#[test]
fn tool_budgets_and_rate_limits_hold_for_their_tool_only() {
    let policy = priced_policy()
        .replacen(
            "budget: { daily_usd: 5, monthly_usd: 100 }",
            "budget: { daily_usd: 100 }",
            1,
        )
        .replacen(
            "  - name: stripe-payments\n    host: api.stripe.com\n",
            "  - name: stripe-payments\n    host: api.stripe.com\n    budget: { daily_usd: 2 }\n",
            1,
        )
        .replacen(
            "  - name: slack\n    host: hooks.slack.com\n",
            "  - name: slack\n    host: hooks.slack.com\n    rate_limit: { requests_per_minute: 2 }\n",
            1,
        );
    assert!(
        policy.contains("daily_usd: 2") && policy.contains("requests_per_minute: 2"),
        "{policy}"
    );
    let w = world_with(|b| b.policy("finance.yaml", &policy));
    let charge = || call(&w, &["https://api.stripe.com/v1/charges"]);
    let statuses: Vec<String> = (0..3).map(|_| charge().0).collect();
    assert_eq!(
        statuses,
        ["200", "200", "402"],
        "the tool's 2 USD, not the agent's 100"
    );
    let (_, body) = charge();
    assert!(
        body.contains("BudgetExceeded") && body.contains("day budget"),
        "{body}"
    );
    let post = || {
        call(
            &w,
            &[
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"text":"hi"}"#,
                "https://hooks.slack.com/services/T1",
            ],
        )
        .0
    };
    let statuses: Vec<String> = (0..3).map(|_| post()).collect();
    assert_eq!(
        statuses,
        ["200", "200", "429"],
        "the slack tool's 2 a minute"
    );
    // The payments tool has no rate limit of its own: still 402 (budget), not 429.
    assert_eq!(charge().0, "402");
}

#[test]
fn over_budget_calls_wait_for_a_human_when_the_budget_says_so() {
    let policy = priced_policy().replacen(
        "budget: { daily_usd: 5, monthly_usd: 100 }",
        "budget: { daily_usd: 1, on_exceed: approval_needed }",
        1,
    );
    let (w, _captured, _files) = approvals_world_with(&policy, &[]);
    let charge = || call(&w, &["https://api.stripe.com/v1/charges"]);
    assert_eq!(charge().0, "200", "within the budget");
    let (status, body) = charge();
    let v = json(&body, &w);
    assert_eq!(
        (status.as_str(), &v["error"]),
        ("403", &Value::from("approval_needed")),
        "{v}"
    );
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("budget_exceeded"),
        "{v}"
    );
    let id = v["approval_id"].as_str().unwrap().to_owned();
    let (status, out) = decide_by_api(&w, &id, "approve");
    assert_eq!(status, "200", "{out}");
    // The approved retry passes once, charged past the limit; the next one asks again.
    assert_eq!(charge().0, "200", "{}", w.diagnostics());
    let (status, body) = charge();
    let v = json(&body, &w);
    assert_eq!(status, "403");
    assert_ne!(v["approval_id"], id.as_str(), "{v}");
}
