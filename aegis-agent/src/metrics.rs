//! Prometheus metrics (OpenMetrics text) and the agent's HTTP endpoints: `/metrics`,
//! `/healthz` (liveness: the process answers) and `/readyz` (readiness: the agent finished
//! start-up).
//!
//! One registry per process ([`global`]): the L7 enforcer, the DNS proxy and the event reader
//! each record with one call at the point where the outcome is known, without a handle threaded
//! through their constructors. Names follow the OpenMetrics conventions: prefix `aegis_`, unit
//! in the name (`_seconds`, `_usd`), counters end in `_total` (the encoder appends it).
//!
//! Invariant: label values are bounded. Identity labels are `agent` and `tenant` (bounded by the
//! node's identities); every other label takes its value from a closed set of codes defined
//! here (anything else is recorded as `other`). No domain, path, address or free-form reason is
//! ever a label: those belong to the logs and the audit log.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{LazyLock, atomic::AtomicU64},
    time::{Duration, Instant},
};

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry, Unit},
};
use tokio::net::TcpListener;

use crate::{identity::Identity, telemetry::EgressRecord, telemetry::L7Record};

/// `Content-Type` of the OpenMetrics text exposition format 1.0.0.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reason codes of L7 decisions that become the `reason` label: the policy's rule kinds
/// (`policy/rego.rs`, `l7/decide.rs`) and the enforcer's own refusals (`l7/proxy.rs`,
/// docs/l7.md). A reason outside this set (a custom Rego rule's text) is counted as `other`.
pub const L7_REASONS: &[&str] = &[
    // Policy decisions.
    "allowed",
    "no_matching_action",
    "constraint_violated",
    "malformed_body",
    "action_denied",
    "approval_required",
    "approval_needed",
    "sanitize",
    "dlp",
    // Refusals by the enforcer.
    "no_origin",
    "no_sni",
    "sni_not_inspected",
    "tls_handshake_failed",
    "host_mismatch",
    "body_too_large",
    "body_unreadable",
    "upstream_failed",
    "policy_error",
    "kill_switch",
    "rate_limited",
    "token_replayed",
    "token_wrong_identity",
    "token_invalid",
    "budget_exceeded",
    "state_unavailable",
    "approvals_unavailable",
    "audit_unavailable",
    "override_invalid",
    "override_used",
    "override_wrong_identity",
    "override_request_mismatch",
    "override_not_approved",
];

/// Values of the `decision` label of L7 decisions: the verdicts, and in shadow mode what
/// enforcement would have done (the request was forwarded).
const L7_DECISIONS: &[&str] = &[
    "allow",
    "sanitize",
    "deny",
    "approval_needed",
    "would_deny",
    "would_sanitize",
    "would_approval_needed",
];

/// Outcome of one DNS query, the `result` label of the DNS metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsResult {
    /// Forwarded; the answer's addresses were allowed in the kernel before it was released.
    Allowed,
    /// Refused by policy (NXDOMAIN or REFUSED).
    Denied,
    /// Shadow mode: would be refused; forwarded without learning.
    WouldDeny,
    /// The upstream resolver failed or timed out (SERVFAIL).
    UpstreamFailed,
    /// Anything else: a malformed query (FORMERR), an opcode other than QUERY (NOTIMP), or the
    /// kernel maps refused the answer's addresses (SERVFAIL).
    Error,
}

impl DnsResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsResult::Allowed => "allowed",
            DnsResult::Denied => "denied",
            DnsResult::WouldDeny => "would_deny",
            DnsResult::UpstreamFailed => "upstream_failed",
            DnsResult::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    agent: String,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct L7Labels {
    agent: String,
    tenant: String,
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelLabels {
    agent: String,
    tenant: String,
    /// `denied` or `would_deny` (shadow mode).
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    agent: String,
    tenant: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type UsdCounter = Counter<f64, AtomicU64>;

/// One exported metric family.
#[derive(Clone, Debug)]
pub struct Descriptor {
    /// The family name as exposed, unit included (`aegis_l7_spend_usd`); counters' samples
    /// add `_total`, histograms' `_bucket`, `_count` and `_sum`.
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Label names, in exposition order.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

impl std::fmt::Display for Descriptor {
    /// `name<TAB>type<TAB>labels (comma-separated, `-` for none)<TAB>help`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels = if self.labels.is_empty() {
            "-".to_owned()
        } else {
            self.labels.join(",")
        };
        write!(f, "{}\t{}\t{labels}\t{}", self.name, self.kind, self.help)
    }
}

/// A registry that also lists what it registers.
#[derive(Default)]
struct Catalogue {
    registry: Registry,
    families: Vec<Descriptor>,
}

impl Catalogue {
    fn add<M: Metric + Clone>(
        &mut self,
        name: &'static str,
        unit: Option<&'static str>,
        labels: &'static [&'static str],
        help: &'static str,
        metric: M,
    ) -> M {
        let kind = match metric.metric_type() {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            MetricType::Info => "info",
            MetricType::Unknown => "unknown",
        };
        self.families.push(Descriptor {
            name: unit.map_or_else(|| name.to_owned(), |u| format!("{name}_{u}")),
            kind,
            labels,
            help,
        });
        match unit {
            None => self.registry.register(name, help, metric.clone()),
            Some("seconds") => {
                self.registry
                    .register_with_unit(name, help, Unit::Seconds, metric.clone());
            }
            Some(other) => {
                self.registry.register_with_unit(
                    name,
                    help,
                    Unit::Other(other.into()),
                    metric.clone(),
                );
            }
        }
        metric
    }
}

/// The agent's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    catalogue: Vec<Descriptor>,
    l7_decisions: Family<L7Labels, Counter>,
    l7_duration: Histogram,
    spend: Family<IdentityLabels, UsdCounter>,
    prevented_spend: Family<IdentityLabels, UsdCounter>,
    kernel_denies: Family<KernelLabels, Counter>,
    dns_queries: Family<DnsLabels, Counter>,
    dns_duration: Family<ResultLabels, Histogram, fn() -> Histogram>,
    approvals_pending: Gauge,
    audit_dropped: Counter,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

// === impl Metrics ===

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric the agent exports, all at zero.
    pub fn new() -> Metrics {
        let mut r = Catalogue::default();
        let l7_decisions = r.add(
            "aegis_l7_decisions",
            None,
            &["agent", "tenant", "decision", "reason"],
            "L7 decisions by identity, decision (allow, sanitize, deny, approval_needed; \
             would_* in shadow mode) and reason code",
            Family::<L7Labels, Counter>::default(),
        );
        // 100 µs to ~13 s: the enforcer's own share is sub-millisecond, the upstream's reply
        // time up to the response headers is included.
        let l7_duration = r.add(
            "aegis_l7_request_duration",
            Some("seconds"),
            &[],
            "Time from an L7 request's arrival to the decision's effect (response headers \
             forwarded, or refusal sent)",
            Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        );
        let spend = r.add(
            "aegis_l7_spend",
            Some("usd"),
            &["agent", "tenant"],
            "Estimated cost of the priced L7 calls forwarded upstream (policy prices)",
            Family::<IdentityLabels, UsdCounter>::default(),
        );
        let prevented_spend = r.add(
            "aegis_l7_prevented_spend",
            Some("usd"),
            &["agent", "tenant"],
            "Estimated cost of the priced L7 calls refused (policy deny, approval needed, \
             budget exceeded)",
            Family::<IdentityLabels, UsdCounter>::default(),
        );
        let kernel_denies = r.add(
            "aegis_kernel_denies",
            None,
            &["agent", "tenant", "verdict", "reason"],
            "Connections, sends and sockets the kernel programs denied (verdict denied) or would \
             have denied in shadow mode (verdict would_deny), by identity and reason code",
            Family::<KernelLabels, Counter>::default(),
        );
        let dns_queries = r.add(
            "aegis_dns_queries",
            None,
            &["agent", "tenant", "result"],
            "DNS queries of agent workloads by identity and result (allowed, denied, \
             would_deny, upstream_failed, error)",
            Family::<DnsLabels, Counter>::default(),
        );
        // 50 µs to ~1.6 s: denials are answered locally, allowed names wait for the upstream.
        let dns_duration = r.add(
            "aegis_dns_answer_duration",
            Some("seconds"),
            &["result"],
            "Time from a DNS query's arrival to its answer's release, by result",
            Family::<ResultLabels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00005, 2.0, 16))
            }),
        );
        let approvals_pending = r.add(
            "aegis_approvals_pending",
            None,
            &[],
            "L7 requests waiting for a human approval",
            Gauge::default(),
        );
        let audit_dropped = r.add(
            "aegis_audit_records_dropped",
            None,
            &[],
            "Audit records dropped because the audit writer's queue was full (a stalled or \
             full disk)",
            Counter::default(),
        );
        Metrics {
            catalogue: r.families,
            registry: r.registry,
            l7_decisions,
            l7_duration,
            spend,
            prevented_spend,
            kernel_denies,
            dns_queries,
            dns_duration,
            approvals_pending,
            audit_dropped,
        }
    }

    /// Every metric family the agent exports (also those without samples yet, which
    /// `/metrics` leaves out).
    pub fn catalogue(&self) -> &[Descriptor] {
        &self.catalogue
    }

    /// The registry in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Records one L7 decision, as the enforcer logs and audits it: the decision counter, the
    /// request duration, and the call's estimated cost as spend (forwarded) or prevented spend
    /// (refused by policy or budget; an upstream failure is neither).
    pub fn l7_decision(&self, r: &L7Record) {
        let identity = IdentityLabels {
            agent: r.agent.clone(),
            tenant: r.tenant.clone(),
        };
        let reason = l7_reason_code(&r.reason);
        let decision = match r.would.as_deref() {
            None => r.decision,
            Some(would) => closed(
                L7_DECISIONS,
                &format!("would_{}", would.strip_prefix("would_").unwrap_or(would)),
            ),
        };
        self.l7_decisions
            .get_or_create(&L7Labels {
                agent: identity.agent.clone(),
                tenant: identity.tenant.clone(),
                decision: closed(L7_DECISIONS, decision),
                reason,
            })
            .inc();
        // A record without a status ended before any response (its connection was refused).
        if r.status.is_some() {
            self.l7_duration.observe(micros_to_seconds(r.latency_us));
        }
        if let Some(cost) = r.estimated_cost_usd.filter(|c| c.is_finite() && *c > 0.0) {
            match r.decision {
                // A token-priced call's spend is its settled cost ([`Metrics::llm_settled`]),
                // not its reservation.
                "allow" | "sanitize" if r.cost_settled_later => {}
                "allow" | "sanitize" => {
                    self.spend.get_or_create(&identity).inc_by(cost);
                }
                "deny" | "approval_needed" if reason != "upstream_failed" => {
                    self.prevented_spend.get_or_create(&identity).inc_by(cost);
                }
                _ => {}
            }
        }
    }

    /// Records one kernel deny event (its audit record).
    pub fn kernel_deny(&self, r: &EgressRecord) {
        self.kernel_denies
            .get_or_create(&KernelLabels {
                agent: r.agent.clone(),
                tenant: r.tenant.clone(),
                verdict: r.verdict,
                reason: r.reason,
            })
            .inc();
    }

    /// Starts timing one DNS query of `identity`; the query is recorded when the returned
    /// guard drops, with the result last set on it ([`DnsResult::Error`] if none was).
    pub fn dns_query<'a>(&'a self, identity: &'a Identity) -> DnsQuery<'a> {
        DnsQuery {
            metrics: self,
            identity,
            started: Instant::now(),
            result: DnsResult::Error,
        }
    }

    /// Adds the settled cost of a token-priced (LLM) call to the identity's spend.
    pub fn llm_settled(&self, agent: &str, tenant: &str, cost_usd: f64) {
        if cost_usd.is_finite() && cost_usd > 0.0 {
            self.spend
                .get_or_create(&IdentityLabels {
                    agent: agent.to_owned(),
                    tenant: tenant.to_owned(),
                })
                .inc_by(cost_usd);
        }
    }

    /// Sets the number of approvals waiting for a human.
    pub fn set_approvals_pending(&self, n: i64) {
        self.approvals_pending.set(n);
    }

    /// Counts one audit record dropped for lack of room in the queue.
    pub fn audit_dropped(&self) {
        self.audit_dropped.inc();
    }
}

/// One DNS query being answered; recorded on drop.
pub struct DnsQuery<'a> {
    metrics: &'a Metrics,
    identity: &'a Identity,
    started: Instant,
    result: DnsResult,
}

impl DnsQuery<'_> {
    /// Sets the query's outcome.
    pub fn set(&mut self, result: DnsResult) {
        self.result = result;
    }
}

impl Drop for DnsQuery<'_> {
    fn drop(&mut self) {
        let result = self.result.as_str();
        self.metrics
            .dns_queries
            .get_or_create(&DnsLabels {
                agent: self.identity.agent.as_str().to_owned(),
                tenant: self.identity.tenant.as_str().to_owned(),
                result,
            })
            .inc();
        self.metrics
            .dns_duration
            .get_or_create(&ResultLabels { result })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// `value` if it is one of `set`, else `other`.
fn closed(set: &[&'static str], value: &str) -> &'static str {
    set.iter()
        .find(|s| **s == value)
        .copied()
        .unwrap_or("other")
}

/// The reason code of an L7 record's reason (`constraint_violated: amount > max 5000`,
/// `budget_exceeded: …`, several joined by `; `): its first code, if it is one of
/// [`L7_REASONS`].
fn l7_reason_code(reason: &str) -> &'static str {
    let first = reason.split([':', ';']).next().unwrap_or("").trim();
    closed(L7_REASONS, first)
}

fn micros_to_seconds(us: u64) -> f64 {
    Duration::from_micros(us).as_secs_f64()
}

// === HTTP endpoints ===

/// Binds the metrics and health endpoint, with `SO_REUSEPORT` so that an agent starting while
/// the one it replaces still runs (a restart hand-over) can bind it too.
///
/// # Errors
/// The address cannot be bound.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Serves `GET /metrics` (the [`global`] registry), `GET /healthz` (200 while the process
/// runs) and `GET /readyz` (200 when `ready()` says so, 503 before) over HTTP/1.1 on
/// `listener`, until the process ends.
pub async fn serve(listener: TcpListener, ready: impl Fn() -> bool + Send + Sync + 'static) {
    let ready = std::sync::Arc::new(ready);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(target: "aegis::metrics", error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(respond(&req, ready())) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(target: "aegis::metrics", %peer, error = %e, "metrics connection ended");
            }
        });
    }
}

/// The response to one request of the endpoint.
fn respond(req: &Request<Incoming>, ready: bool) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    let plain = "text/plain; charset=utf-8";
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            plain,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, global().encode()),
        "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
        "/readyz" if ready => text(StatusCode::OK, plain, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, plain, "not ready\n".into()),
        _ => text(StatusCode::NOT_FOUND, plain, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(decision: &'static str, reason: &str, cost: Option<f64>) -> L7Record {
        L7Record {
            kind: "l7_decision",
            agent: "finance-agent".into(),
            tenant: "acme".into(),
            decision,
            reason: reason.into(),
            estimated_cost_usd: cost,
            status: Some(200),
            latency_us: 1500,
            ..L7Record::default()
        }
    }

    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }

    #[test]
    fn decisions_count_by_reason_code_and_spend_by_outcome() {
        let m = Metrics::new();
        m.l7_decision(&record("allow", "allowed", Some(0.25)));
        m.l7_decision(&record("allow", "allowed", Some(0.5)));
        m.l7_decision(&record(
            "deny",
            "constraint_violated: amount > max 5000; constraint_violated: currency",
            Some(2.0),
        ));
        m.l7_decision(&record(
            "deny",
            "budget_exceeded: day budget exceeded",
            Some(4.0),
        ));
        // Refunded and neither spent nor prevented.
        m.l7_decision(&record(
            "deny",
            "upstream_failed: upstream x: refused",
            Some(8.0),
        ));
        m.l7_decision(&record("deny", "amount looks odd (custom rego rule)", None));
        let text = m.encode();
        let ids = r#"agent="finance-agent",tenant="acme""#;
        for (labels, want) in [
            (r#"decision="allow",reason="allowed""#, 2.0),
            (r#"decision="deny",reason="constraint_violated""#, 1.0),
            (r#"decision="deny",reason="budget_exceeded""#, 1.0),
            (r#"decision="deny",reason="upstream_failed""#, 1.0),
            (r#"decision="deny",reason="other""#, 1.0),
        ] {
            let prefix = format!("aegis_l7_decisions_total{{{ids},{labels}}}");
            assert_eq!(sample(&text, &prefix), Some(want), "{prefix} in\n{text}");
        }
        assert_eq!(
            sample(&text, &format!("aegis_l7_spend_usd_total{{{ids}}}")),
            Some(0.75)
        );
        assert_eq!(
            sample(
                &text,
                &format!("aegis_l7_prevented_spend_usd_total{{{ids}}}")
            ),
            Some(6.0)
        );
        assert_eq!(
            sample(&text, "aegis_l7_request_duration_seconds_count"),
            Some(6.0)
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn shadow_decisions_are_labelled_with_what_would_have_happened() {
        let m = Metrics::new();
        let mut shadow = record("allow", "approval_needed: amount > 5000", Some(1.0));
        shadow.would = Some("would_approval_needed".into());
        m.l7_decision(&shadow);
        // The rate limiter's shadow outcome is worded without the prefix.
        let mut limited = record("allow", "allowed; would be rate_limited", None);
        limited.would = Some("deny".into());
        m.l7_decision(&limited);
        let text = m.encode();
        assert!(
            text.contains(r#"decision="would_approval_needed",reason="approval_needed"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"decision="would_deny",reason="allowed"} 1"#),
            "{text}"
        );
        // Forwarded in shadow mode: spent.
        assert!(
            text.contains(r#"aegis_l7_spend_usd_total{agent="finance-agent",tenant="acme"} 1.0"#),
            "{text}"
        );
    }

    #[test]
    fn dns_queries_record_their_result_on_drop() {
        let m = Metrics::new();
        let id = Identity::new("web-agent", None).unwrap();
        m.dns_query(&id).set(DnsResult::Denied);
        drop(m.dns_query(&id));
        let text = m.encode();
        assert!(
            text.contains(
                r#"aegis_dns_queries_total{agent="web-agent",tenant="default",result="denied"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"aegis_dns_queries_total{agent="web-agent",tenant="default",result="error"} 1"#
            ),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"aegis_dns_answer_duration_seconds_count{result="denied"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn approvals_pending_is_a_gauge() {
        let m = Metrics::new();
        m.set_approvals_pending(3);
        assert!(m.encode().contains("aegis_approvals_pending 3\n"));
    }

    /// The catalogue's names and labels are what `/metrics` shows once every family has a
    /// sample.
    #[test]
    fn catalogue_matches_the_exposition() {
        let m = Metrics::new();
        let id = Identity::new("web-agent", None).unwrap();
        m.l7_decision(&record("allow", "allowed", Some(1.0)));
        m.l7_decision(&record("deny", "allowed", Some(1.0)));
        m.dns_query(&id).set(DnsResult::Allowed);
        m.kernel_deny(&EgressRecord {
            kind: "egress_denied",
            verdict: "denied",
            reason: "not_allowed",
            hook: "connect4",
            agent: "web-agent".into(),
            tenant: "default".into(),
            identity: 1,
            policy_version: 1,
            cgroup_id: 1,
            pid: 1,
            comm: "curl".into(),
            dst: "198.18.1.20".into(),
            port: 80,
            protocol: "tcp".into(),
        });
        let text = m.encode();
        for d in m.catalogue() {
            assert!(
                text.contains(&format!("# TYPE {} {}\n", d.name, d.kind)),
                "{d} not in\n{text}"
            );
            let sample = match d.kind {
                "counter" => format!("{}_total", d.name),
                "histogram" => format!("{}_count", d.name),
                _ => d.name.clone(),
            };
            let line = text
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{sample}{{")) || l.starts_with(&format!("{sample} "))
                })
                .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"));
            let labels: Vec<&str> = line
                .split_once('{')
                .map(|(_, rest)| rest.split_once('}').unwrap().0)
                .into_iter()
                .flat_map(|set| set.split(','))
                .map(|kv| kv.split_once('=').unwrap().0)
                .collect();
            assert_eq!(labels, d.labels, "{line}");
        }
        assert_eq!(m.catalogue().len(), 9);
    }

    #[test]
    fn reason_codes_are_closed() {
        assert_eq!(l7_reason_code("sanitize: ssn, email"), "sanitize");
        assert_eq!(l7_reason_code("no_matching_action"), "no_matching_action");
        assert_eq!(l7_reason_code("example.com/secret: denied"), "other");
        assert_eq!(l7_reason_code(""), "other");
    }
}
