//! Deny events reach an OpenTelemetry collector: the agent exports each kernel deny as a span
//! over OTLP/gRPC to a receiver this test runs inside the world's node namespace.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use aegis_tests::world::{HttpServer, NODE_UPLINK_V4, World, describe};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};

const OTLP_PORT: u16 = 4317;
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves OTLP on `addr` inside network namespace `ns` (the thread joins it before binding).
fn spawn_receiver(ns: &str, addr: SocketAddr) -> Receiver {
    let receiver = Receiver::default();
    let served = receiver.clone();
    let netns = File::open(format!("/run/netns/{ns}")).expect("open netns");
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns only changes this thread's network namespace.
        assert_eq!(
            unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .expect("bind OTLP receiver");
            ready_tx.send(()).unwrap();
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(served))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("OTLP receiver");
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver did not start");
    receiver
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

fn attr_str(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[test]
fn kernel_denies_are_exported_as_otlp_spans() {
    let endpoint = format!("http://{NODE_UPLINK_V4}:{OTLP_PORT}");
    let mut world = World::builder()
        .pods(1)
        .http_server(HttpServer::new("evil", Some(EVIL), None, &[80]))
        .policy(
            "web.yaml",
            "agent: web-agent\nversion: 4\negress:\n  - fqdn: allowed.test\n",
        )
        .agent_arg("--otlp-endpoint")
        .agent_arg(&endpoint)
        .agent_env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .build();
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

    let deadline = Instant::now() + Duration::from_secs(20);
    let span = loop {
        let found = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == "aegis.egress")
            .cloned();
        if let Some(span) = found {
            break span;
        }
        assert!(
            Instant::now() < deadline,
            "no aegis.egress span within 20 s\n{}",
            world.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
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
    assert!(
        span.events.iter().any(|e| e.name.contains("egress denied")),
        "the deny log line is a span event: {span:?}"
    );
}
