//! Deny events reach an OpenTelemetry collector: the agent exports each kernel deny as a span
//! over OTLP/gRPC to a receiver this test runs inside the world's node namespace, whether the
//! endpoint comes from `--otlp-endpoint` or from the standard `OTEL_EXPORTER_OTLP_ENDPOINT`.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use common::{OTLP_PORT, attr_str, spawn_receiver};

use aegis_tests::world::{HttpServer, NODE_UPLINK_V4, World, WorldBuilder, describe};

const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);

#[test]
fn kernel_denies_are_exported_as_otlp_spans() {
    let endpoint = format!("http://{NODE_UPLINK_V4}:{OTLP_PORT}");
    kernel_deny_reaches_the_receiver(|b| b.agent_arg("--otlp-endpoint").agent_arg(&endpoint));
}

/// No flag: the standard variable alone turns export on.
#[test]
fn otlp_endpoint_from_the_standard_environment_variable() {
    let endpoint = format!("http://{NODE_UPLINK_V4}:{OTLP_PORT}");
    kernel_deny_reaches_the_receiver(|b| b.agent_env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint));
}

/// The flag wins over the variable: a variable naming a dead endpoint does not divert spans.
#[test]
fn otlp_flag_wins_over_the_environment() {
    let endpoint = format!("http://{NODE_UPLINK_V4}:{OTLP_PORT}");
    kernel_deny_reaches_the_receiver(|b| {
        b.agent_arg("--otlp-endpoint")
            .agent_arg(&endpoint)
            .agent_env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
            .agent_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9")
    });
}

/// A kernel deny, configured for export by `configure`, arrives at the in-process receiver as
/// an `aegis.egress` span with its attributes, and is in the audit log.
fn kernel_deny_reaches_the_receiver(configure: impl FnOnce(WorldBuilder) -> WorldBuilder) {
    let builder = World::builder()
        .pods(1)
        .http_server(HttpServer::new("evil", Some(EVIL), None, &[80]))
        .policy(
            "web.yaml",
            "agent: web-agent\nversion: 4\negress:\n  - fqdn: allowed.test\n",
        )
        .agent_env("OTEL_BSP_SCHEDULE_DELAY", "200");
    let mut world = configure(builder).build();
    let receiver = spawn_receiver(
        &world.node_ns(),
        SocketAddr::new(NODE_UPLINK_V4.into(), OTLP_PORT),
    );
    world.start_agent();

    let out = world.pod_exec(
        1,
        Some(("web-agent", None)),
        &["curl", "-sS", "-m", "5", &format!("http://{EVIL}/")],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl to an unlisted address must fail to connect: {}",
        describe(&out)
    );

    let span = common::wait_for_span(&receiver, "aegis.egress", || world.diagnostics());
    for (key, want) in [
        ("agent", "web-agent"),
        ("tenant", "default"),
        ("verdict", "denied"),
        ("reason", "not_allowed"),
        ("hook", "connect4"),
        ("dst", "198.18.1.20"),
        ("port", "80"),
        ("protocol", "tcp"),
        ("comm", "curl"),
        ("policy_version", "4"),
    ] {
        assert_eq!(
            attr_str(&span, key).as_deref(),
            Some(want),
            "span attribute {key}: {span:?}"
        );
    }
    // The same denial is in the audit log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !world
        .audit_records()
        .iter()
        .any(|r| r["kind"] == "egress_denied" && r["dst"] == "198.18.1.20")
    {
        assert!(
            Instant::now() < deadline,
            "no egress_denied audit record: {:?}",
            world.audit_records()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        span.events.iter().any(|e| e.name.contains("egress denied")),
        "the deny log line is a span event: {span:?}"
    );
}
