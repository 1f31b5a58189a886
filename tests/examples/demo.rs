//! `cargo xtask demo`: Aegis denying an unlisted domain in the kernel while an allowlisted one
//! works, with unmodified `curl`, in a throw-away world of network namespaces.
//!
//! The world: an "internet" namespace with a DNS server (dnsmasq) and HTTPS servers for
//! `api.stripe.com`, `hooks.slack.com` and `evil.example`; a node namespace running the agent
//! with the example policies of `policies/`; a pod namespace whose workloads run through
//! `aegis-agent exec`. Exits non-zero if Aegis does not behave as shown. Everything (namespaces,
//! cgroups, pins, processes) is removed at the end, and the demo checks that it was.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{ExitCode, Output},
};

use aegis_tests::world::{DnsRecord, HttpServer, World, cgroup2_mount, workspace_root};

const STRIPE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const STRIPE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xae61, 1, 0, 0, 0, 0, 0x10);
const SLACK: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 66);
const FINANCE: Option<(&str, Option<&str>)> = Some(("finance-agent", None));

fn main() -> ExitCode {
    let mut builder = World::builder()
        .pods(1)
        .record(DnsRecord::new(
            "api.stripe.com",
            Some(STRIPE),
            Some(STRIPE6),
            60,
        ))
        .record(DnsRecord::new("hooks.slack.com", Some(SLACK), None, 60))
        .record(DnsRecord::new("evil.example", Some(EVIL), None, 60))
        .http_server(
            HttpServer::new("api.stripe.com", Some(STRIPE), Some(STRIPE6), &[443]).with_tls(),
        )
        .http_server(HttpServer::new("hooks.slack.com", Some(SLACK), None, &[443]).with_tls())
        .http_server(HttpServer::new("evil.example", Some(EVIL), None, &[443]).with_tls());
    let policy_dir = workspace_root().join("policies");
    for entry in fs::read_dir(&policy_dir).expect("read policies/") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            builder = builder.policy(&name, &fs::read_to_string(&path).expect("read policy"));
        }
    }

    step("Building the world: internet (DNS + HTTPS servers), node (agent), pod (workloads)");
    let mut world = builder.build();
    world.start_agent();
    let (id, bpffs, cgroups) = (
        world.id().to_owned(),
        world.bpffs_dir(),
        cgroup2_mount()
            .expect("cgroup2 mounted")
            .join(world.cgroup_root()),
    );
    println!(
        "   agent running with the policies of {}",
        policy_dir.display()
    );
    println!(
        "   finance-agent may reach api.stripe.com:443 and *.slack.com:443, both inspected (policies/finance-agent.yaml)"
    );

    let mut ok = true;
    // Inspected domains are answered by the L7 enforcer with the node CA; others by the
    // servers themselves, whose certificates the world's test CA signs.
    let node_ca = world.node_ca().to_string_lossy().into_owned();
    let evil_ca = world.test_ca().to_string_lossy().into_owned();
    let evil_pin = format!("evil.example:443:{EVIL}");
    let json = ["-H", "content-type: application/json"];
    let pay = |body: &str| -> Vec<String> {
        [
            "curl",
            "-sS",
            "-m",
            "10",
            "-w",
            "\n(HTTP %{http_code})",
            "--cacert",
            &node_ca,
        ]
        .iter()
        .map(ToString::to_string)
        .chain(json.iter().map(ToString::to_string))
        .chain(
            ["-d", body, "https://api.stripe.com/v1/payment_intents"]
                .iter()
                .map(ToString::to_string),
        )
        .collect()
    };

    step(
        "1. finance-agent pays 1,200 USD: POST https://api.stripe.com/v1/payment_intents (within its limit)",
    );
    println!(
        "   the kernel redirects the TLS connection to the L7 enforcer, which decides and forwards"
    );
    let out = world.pod_exec(1, FINANCE, &pay(r#"{"amount":1200,"currency":"usd"}"#));
    ok &= expect(&out, true, "(HTTP 200)");

    step("2. finance-agent pays 50,000 USD (over 5,000: a human must approve)");
    let out = world.pod_exec(1, FINANCE, &pay(r#"{"amount":50000,"currency":"usd"}"#));
    ok &= expect(&out, true, "approval_needed");

    step("3. finance-agent pays 500,000 USD (over the 100,000 maximum: refused)");
    let out = world.pod_exec(1, FINANCE, &pay(r#"{"amount":500000,"currency":"usd"}"#));
    ok &= expect(&out, true, "policy_violation");

    step("4. finance-agent posts a receipt with an SSN and an email to Slack (sanitized)");
    let out = world.pod_exec(
        1,
        FINANCE,
        &[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &node_ca,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"text":"refund for 123-45-6789, jane@example.com"}"#,
            "https://hooks.slack.com/services/T1/B2",
        ],
    );
    ok &= expect(&out, true, "[REDACTED:SSN]");

    step("5. finance-agent: curl https://evil.example/ (not in its policy: DNS answers NXDOMAIN)");
    let out = world.pod_exec(
        1,
        FINANCE,
        &[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &evil_ca,
            "https://evil.example/",
        ],
    );
    ok &= expect(&out, false, "Could not resolve host");

    step(&format!(
        "6. finance-agent: curl straight to evil.example's address {EVIL} (the kernel says EPERM)"
    ));
    let out = world.pod_exec(
        1,
        FINANCE,
        &[
            "curl",
            "-v",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &evil_ca,
            "--resolve",
            &evil_pin,
            "https://evil.example/",
        ],
    );
    ok &= expect(&out, false, "Operation not permitted");

    step("7. the same call from a process that is not an agent workload (untouched by Aegis)");
    let out = world.pod_exec(
        1,
        None,
        &[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            &evil_ca,
            "--resolve",
            &evil_pin,
            "https://evil.example/",
        ],
    );
    ok &= expect(&out, true, "hello from evil.example");

    step(
        "Decisions the SOC receives (JSON lines on the agent's stdout; also OTLP spans and the audit log):",
    );
    let _ = world.wait_for_event("egress_denied", std::time::Duration::from_secs(5), |e| {
        e["event"] == "egress_denied"
    });
    for e in world.events().iter().filter(|e| {
        matches!(
            e["event"].as_str(),
            Some("egress_denied" | "dns_denied" | "l7_decision")
        )
    }) {
        println!("   {e}");
    }

    step("Cleaning up");
    drop(world);
    let leftovers: Vec<String> = [
        Path::new("/run/netns").join(format!("{id}n")),
        Path::new("/run/netns").join(format!("{id}i")),
        Path::new("/run/netns").join(format!("{id}p1")),
        bpffs,
        cgroups,
    ]
    .into_iter()
    .filter(|p| p.exists())
    .map(|p| p.display().to_string())
    .collect();
    if leftovers.is_empty() {
        println!("   no namespace, cgroup, pin or process left behind");
    } else {
        println!("   LEFT BEHIND: {leftovers:?}");
        ok = false;
    }

    if ok {
        println!(
            "\nDemo passed: allowed calls worked, L7 policy held the 50,000 payment for approval and refused the 500,000 one, PII was redacted, and the unlisted domain was refused by DNS and by the kernel."
        );
        ExitCode::SUCCESS
    } else {
        println!("\nDemo FAILED: see the steps marked FAIL above.");
        ExitCode::FAILURE
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

/// Prints what the client printed and whether it matched the expectation.
fn expect(out: &Output, success: bool, needle: &str) -> bool {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown: Vec<&str> = stdout
        .lines()
        .chain(
            stderr
                .lines()
                .filter(|l| !l.starts_with(['*', '>', '<', '{', '}'])),
        )
        .chain(
            stderr
                .lines()
                .filter(|l| l.contains("Operation not permitted")),
        )
        .collect();
    for line in shown.iter().take(6) {
        println!("   | {line}");
    }
    let good =
        out.status.success() == success && (stdout.contains(needle) || stderr.contains(needle));
    println!(
        "   {} (exit {}, expected {})",
        if good { "OK" } else { "FAIL" },
        out.status.code().map_or("signal".into(), |c| c.to_string()),
        if success { "success" } else { "failure" }
    );
    good
}
