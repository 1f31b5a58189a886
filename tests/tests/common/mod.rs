//! Shared by the integration tests: an in-process OTLP/gRPC trace receiver that runs inside a
//! world's network namespace.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};

/// Port the receiver listens on inside the node namespace.
pub const OTLP_PORT: u16 = 4317;

#[derive(Clone, Default)]
pub struct Receiver {
    pub spans: Arc<Mutex<Vec<Span>>>,
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
pub fn spawn_receiver(ns: &str, addr: SocketAddr) -> Receiver {
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

pub fn attr_str(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The first span named `name` the receiver got, waiting up to 20 s; panics with `context`
/// (e.g. the world's diagnostics) otherwise.
pub fn wait_for_span(receiver: &Receiver, name: &str, context: impl Fn() -> String) -> Span {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == name)
            .cloned();
        if let Some(span) = found {
            return span;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {name} span within 20 s\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
