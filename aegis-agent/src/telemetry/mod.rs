//! Logs, deny events and OpenTelemetry export.
//!
//! Every log line is one JSON object on stdout (or human-readable text), fields flattened at
//! the top level. Decisions use the target `aegis::event` and an `event` field
//! (`egress_denied`, `dns_denied`, `dns_allowed`); the shapes are documented in
//! `docs/events.md`. When an OTLP endpoint is configured, each event is also exported as an
//! OpenTelemetry span (`aegis.egress`) carrying the same attributes, with the log line as a span
//! event. OTLP is off by default; [`otlp_target`] says when it is on (`--otlp-endpoint`, else the
//! standard `OTEL_EXPORTER_OTLP_*` environment variables).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aegis_common::{
    AF_INET, AF_INET6, DenyEvent, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6,
    HOOK_SOCK_CREATE, REASON_EXPIRED, REASON_KILLED, REASON_NO_DNS_PROXY, REASON_NO_L7_ENFORCER,
    REASON_NOT_ALLOWED, REASON_PACKET_SOCKET, REASON_PORT_NOT_ALLOWED, REASON_RAW_SOCKET,
    REASON_UDP_TO_INSPECTED, SOCK_DGRAM, SOCK_RAW, SOCK_STREAM, VERDICT_DENIED, VERDICT_WOULD_DENY,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::{FilterExt as _, filter_fn},
    layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

use crate::identity::Identity;

/// Target of decision events.
pub const EVENT_TARGET: &str = "aegis::event";

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {source}")]
    Otlp {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
    #[error("{var}={value}: only the `grpc` OTLP protocol is supported")]
    Protocol { var: &'static str, value: String },
    #[error("{var}={value}: only `otlp` (or `none`) span exporters are supported")]
    Exporter { var: &'static str, value: String },
}

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OtlpTarget {
    /// The `--otlp-endpoint` flag.
    Flag(String),
    /// The endpoint named by the environment (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`), which the OTLP exporter reads itself, along with
    /// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` and `_HEADERS`.
    Env { var: &'static str, endpoint: String },
}

/// Whether, and where, spans are exported, from the `--otlp-endpoint` flag and the
/// OpenTelemetry environment variables read through `env` (the OpenTelemetry specification's
/// "OTLP Exporter Configuration" and "General SDK Configuration"):
///
/// - the flag, when given, wins: export to it;
/// - else export when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is
///   set (non-empty; the first wins), unless `OTEL_SDK_DISABLED=true` or
///   `OTEL_TRACES_EXPORTER=none`;
/// - else no export.
///
/// # Errors
/// `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` names a protocol other than `grpc`, or
/// `OTEL_TRACES_EXPORTER` an exporter other than `otlp`/`none`, while export is on: the agent
/// refuses to start rather than silently export nowhere.
pub fn otlp_target(
    flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpTarget>, TelemetryError> {
    let var = |name: &'static str| env(name).filter(|v| !v.trim().is_empty());
    let target = match flag.filter(|f| !f.is_empty()) {
        Some(endpoint) => OtlpTarget::Flag(endpoint.to_owned()),
        None => {
            let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let exporter = var("OTEL_TRACES_EXPORTER");
            if disabled
                || exporter
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case("none"))
            {
                return Ok(None);
            }
            let from_env = [
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ]
            .into_iter()
            .find_map(|name| var(name).map(|endpoint| (name, endpoint)));
            let Some((var_name, endpoint)) = from_env else {
                return Ok(None);
            };
            if let Some(value) = exporter.filter(|e| !e.eq_ignore_ascii_case("otlp")) {
                return Err(TelemetryError::Exporter {
                    var: "OTEL_TRACES_EXPORTER",
                    value,
                });
            }
            OtlpTarget::Env {
                var: var_name,
                endpoint,
            }
        }
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = var(name) {
            if value != "grpc" {
                return Err(TelemetryError::Protocol { var: name, value });
            }
            break;
        }
    }
    Ok(Some(target))
}

/// Keeps the log writer and the OTLP pipeline alive; flushes both on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _log_writer: tracing_appender::non_blocking::WorkerGuard,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("aegis-agent: flushing OTLP spans: {e}");
        }
    }
}

/// Installs the global subscriber: logs in `format` (level from `RUST_LOG`, default `info`)
/// and span export over OTLP/gRPC to `otlp_endpoint` or, without it, to the endpoint the
/// `OTEL_EXPORTER_OTLP_*` environment names ([`otlp_target`]). Must run inside the tokio
/// runtime when OTLP is on.
///
/// # Errors
/// The OTLP environment is unusable, the exporter cannot be built or a subscriber is already
/// installed.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let target = otlp_target(otlp_endpoint, |name| std::env::var(name).ok())?;
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Lines go to stdout from a writer thread of their own, so a request never waits on the
    // write(2) (or on another thread holding stdout). Not lossy: when the queue (128,000 lines)
    // is full, logging waits rather than dropping a decision event.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("aegis-log")
        .finish(std::io::stdout());
    // The decision spans (`aegis.l7`, `aegis.egress`) exist for OTLP export; their events carry
    // the same fields, so log lines leave them out (which spares formatting every span's fields
    // once more per request, and makes the spans free when OTLP is off).
    let lines = || filter().and(filter_fn(|m| !(m.is_span() && m.target() == EVENT_TARGET)));
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(lines())
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(lines())
            .boxed(),
    };
    let (otel, provider) = match target {
        None => (None, None),
        Some(target) => {
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            let (builder, endpoint) = match target {
                OtlpTarget::Flag(endpoint) => (builder.with_endpoint(&endpoint), endpoint),
                // The exporter reads the endpoint variables itself, in the same order.
                OtlpTarget::Env { var, endpoint } => (builder, format!("{endpoint} (from {var})")),
            };
            let exporter = builder
                .build()
                .map_err(|source| TelemetryError::Otlp { endpoint, source })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("aegis-agent").build())
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("aegis-agent"))
                .with_filter(filter_fn(|m| m.target() == EVENT_TARGET));
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(Telemetry {
        provider,
        _log_writer: guard,
    })
}

/// Name of a `REASON_*` code, as it appears in events.
pub fn reason_name(code: u32) -> &'static str {
    match code {
        REASON_NOT_ALLOWED => "not_allowed",
        REASON_EXPIRED => "ttl_expired",
        REASON_PORT_NOT_ALLOWED => "port_not_allowed",
        REASON_RAW_SOCKET => "raw_socket",
        REASON_PACKET_SOCKET => "packet_socket",
        REASON_NO_DNS_PROXY => "no_dns_proxy",
        REASON_NO_L7_ENFORCER => "no_l7_enforcer",
        REASON_UDP_TO_INSPECTED => "udp_to_inspected",
        REASON_KILLED => "killed",
        _ => "unknown",
    }
}

fn hook_name(code: u32) -> &'static str {
    match code {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_SOCK_CREATE => "sock_create",
        _ => "unknown",
    }
}

fn protocol_name(sock_type: u32, protocol: u16) -> String {
    match (sock_type, protocol) {
        (SOCK_STREAM, _) => "tcp".into(),
        (SOCK_DGRAM, _) => "udp".into(),
        (SOCK_RAW, p) => format!("raw/{p}"),
        (t, p) => format!("type{t}/{p}"),
    }
}

/// The destination of a kernel event, if it has one.
pub fn event_destination(ev: &DenyEvent) -> Option<IpAddr> {
    if ev.hook == HOOK_SOCK_CREATE {
        return None;
    }
    match ev.family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3],
        ))),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(ev.addr);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// One L7 decision, as logged, exported as a span (`aegis.l7`) and written to the audit log.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct L7Record {
    /// Always `l7_decision`.
    pub kind: &'static str,
    pub agent: String,
    pub tenant: String,
    pub identity: u32,
    /// The TLS server name (empty when the connection failed before the ClientHello).
    pub sni: String,
    /// Where the workload was connecting (the kernel's record), `ip:port`.
    pub dst: String,
    /// The workload's address as the enforcer saw it, `ip:port`.
    pub peer: String,
    pub method: String,
    pub path: String,
    /// `allow`, `deny`, `sanitize`, `approval_needed`.
    pub decision: &'static str,
    /// Shadow mode: `would_deny`, `would_sanitize`, ...
    pub would: Option<String>,
    pub reason: String,
    pub tool: Option<String>,
    pub action: Option<String>,
    pub policy_version: u32,
    /// `enforce` or `shadow`.
    pub mode: &'static str,
    pub estimated_cost_usd: Option<f64>,
    /// DLP matches redacted before forwarding.
    pub redactions: usize,
    /// `jti` of the agent token the request presented and that was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_jti: Option<String>,
    /// The approval this request filed or, when it passed on an override token, spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// Who approved it (`uid:0`, `api:alice`), when it passed on an override token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// Token-priced (LLM): `estimated_cost_usd` is the reservation; the spend is settled when
    /// the response ends (`llm_usage` record).
    #[serde(skip)]
    pub cost_settled_later: bool,
    /// HTTP status returned to the workload.
    pub status: Option<u16>,
    /// Time from the request's arrival to the decision's effect (forwarded response headers or
    /// refusal), microseconds.
    pub latency_us: u64,
}

/// Logs and exports one L7 decision: a span (`aegis.l7`, exported when OTLP is on) and a line
/// at WARN (deny, approval needed, any shadow-mode `would`), INFO (sanitize) or DEBUG (allow).
pub fn l7_decision(r: &L7Record) {
    let span = tracing::info_span!(
        target: EVENT_TARGET, "aegis.l7",
        agent_id = r.agent.as_str(), tenant = r.tenant.as_str(), tool = r.tool.as_deref(), action = r.action.as_deref(),
        decision = r.decision, would = r.would.as_deref(), reason = r.reason.as_str(), policy_version = r.policy_version,
        mode = r.mode, estimated_cost = r.estimated_cost_usd, latency_us = r.latency_us, sni = r.sni.as_str(), dst = r.dst.as_str(),
        method = r.method.as_str(), path = r.path.as_str(), status = r.status
    );
    let _enter = span.enter();
    let level_warn = matches!(r.decision, "deny" | "approval_needed") || r.would.is_some();
    // A plain allow is a debug line (`RUST_LOG=aegis::event=debug`), like DNS's `dns_allowed`:
    // the audit log and the span hold every decision; the log is for what needs reading.
    let level_debug = r.decision == "allow" && r.would.is_none();
    macro_rules! emit {
        ($lvl:ident) => {
            tracing::$lvl!(
                target: EVENT_TARGET, event = "l7_decision", agent = r.agent.as_str(), tenant = r.tenant.as_str(), identity = r.identity,
                sni = r.sni.as_str(), dst = r.dst.as_str(), method = r.method.as_str(), path = r.path.as_str(), decision = r.decision,
                would = r.would.as_deref(), reason = r.reason.as_str(), tool = r.tool.as_deref(), action = r.action.as_deref(),
                policy_version = r.policy_version, mode = r.mode, estimated_cost_usd = r.estimated_cost_usd,
                redactions = r.redactions, status = r.status, latency_us = r.latency_us,
                "L7 {} {} {}{}: {}", r.decision, r.method, r.sni, r.path, r.reason
            )
        };
    }
    if level_warn {
        emit!(warn);
    } else if level_debug {
        emit!(debug);
    } else {
        emit!(info);
    }
}

/// One kernel denial, as logged and written to the audit log.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EgressRecord {
    /// Always `egress_denied`.
    pub kind: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub hook: &'static str,
    pub agent: String,
    pub tenant: String,
    pub identity: u32,
    pub policy_version: u32,
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: String,
    pub dst: String,
    pub port: u16,
    pub protocol: String,
}

/// Logs (and exports) one kernel deny event. `who` is the identity registered for the event's
/// numeric identity, if any; `policy_version` the version in force.
pub fn kernel_event(ev: &DenyEvent, who: Option<&Identity>, policy_version: u32) -> EgressRecord {
    let comm_len = ev
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(ev.comm.len());
    let comm = String::from_utf8_lossy(&ev.comm[..comm_len]);
    let verdict = match ev.verdict {
        VERDICT_DENIED => "denied",
        VERDICT_WOULD_DENY => "would_deny",
        _ => "unknown",
    };
    let agent = who.map_or("unknown", |i| i.agent.as_str());
    let tenant = who.map_or("unknown", |i| i.tenant.as_str());
    let dst = event_destination(ev)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let reason = reason_name(ev.reason);
    let hook = hook_name(ev.hook);
    let protocol = protocol_name(ev.sock_type, ev.protocol);
    let span = tracing::warn_span!(
        target: EVENT_TARGET, "aegis.egress",
        agent, tenant, identity = ev.identity, policy_version, verdict, reason, hook,
        dst = %dst, port = ev.port, protocol = %protocol, pid = ev.pid, comm = %comm, cgroup_id = ev.cgroup_id
    );
    let _enter = span.enter();
    tracing::warn!(
        target: EVENT_TARGET, event = "egress_denied", verdict, reason, hook, agent, tenant,
        identity = ev.identity, policy_version, cgroup_id = ev.cgroup_id, pid = ev.pid, comm = %comm,
        family = ev.family, dst = %dst, port = ev.port, protocol = %protocol,
        "egress {verdict}: {comm} ({agent}@{tenant}) to {dst}:{} ({reason})", ev.port
    );
    EgressRecord {
        kind: "egress_denied",
        verdict,
        reason,
        hook,
        agent: agent.to_owned(),
        tenant: tenant.to_owned(),
        identity: ev.identity,
        policy_version,
        cgroup_id: ev.cgroup_id,
        pid: ev.pid,
        comm: comm.into_owned(),
        dst,
        port: ev.port,
        protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(family: u32, addr: [u8; 16]) -> DenyEvent {
        DenyEvent {
            ts_ns: 0,
            cgroup_id: 1,
            identity: 2,
            pid: 3,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            verdict: VERDICT_DENIED,
            reason: REASON_NOT_ALLOWED,
            hook: HOOK_CONNECT6,
            family,
            addr,
            port: 443,
            protocol: 6,
            sock_type: SOCK_STREAM,
        }
    }

    #[test]
    fn mapped_v6_destinations_read_as_ipv4() {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&[198, 18, 1, 9]);
        assert_eq!(
            event_destination(&event(AF_INET6, a)),
            Some(IpAddr::from([198, 18, 1, 9]))
        );
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[198, 18, 1, 10]);
        assert_eq!(
            event_destination(&event(AF_INET, v4)),
            Some(IpAddr::from([198, 18, 1, 10]))
        );
    }

    #[test]
    fn otlp_export_follows_the_flag_then_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let flag = Some(OtlpTarget::Flag("http://flag:4317".into()));
        assert_eq!(otlp_target(None, env(&[])).unwrap(), None);
        assert_eq!(
            otlp_target(
                Some("http://flag:4317"),
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")])
            )
            .unwrap(),
            flag
        );
        assert_eq!(
            otlp_target(
                None,
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")])
            )
            .unwrap(),
            Some(OtlpTarget::Env {
                var: "OTEL_EXPORTER_OTLP_ENDPOINT",
                endpoint: "http://env:4317".into()
            })
        );
        assert_eq!(
            otlp_target(
                None,
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
                ])
            )
            .unwrap(),
            Some(OtlpTarget::Env {
                var: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                endpoint: "http://traces:4317".into()
            })
        );
        // Empty means unset; the SDK switches and `none` turn the environment's export off.
        assert_eq!(
            otlp_target(None, env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])).unwrap(),
            None
        );
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let vars: &'static [_] = Box::leak(Box::new([
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                off,
            ]));
            assert_eq!(otlp_target(None, env(vars)).unwrap(), None, "{off:?}");
        }
        // What this build cannot do is refused, not ignored.
        let err = otlp_target(
            None,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"),
            "{err}"
        );
        assert!(
            otlp_target(
                Some("http://flag:4317"),
                env(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")])
            )
            .is_err()
        );
        assert!(
            otlp_target(
                None,
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                    ("OTEL_TRACES_EXPORTER", "zipkin")
                ])
            )
            .is_err()
        );
        // The signal-specific protocol wins over the general one.
        assert!(
            otlp_target(
                None,
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
                ])
            )
            .is_ok()
        );
    }

    #[test]
    fn codes_have_names() {
        assert_eq!(reason_name(REASON_EXPIRED), "ttl_expired");
        assert_eq!(hook_name(HOOK_SOCK_CREATE), "sock_create");
        assert_eq!(protocol_name(SOCK_RAW, 1), "raw/1");
    }
}
