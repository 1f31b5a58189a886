//! The L7 request path, in order: connection (identity from the listener port, original
//! destination from the kernel) → TLS (SNI required, must be an inspected domain of the
//! identity; leaf minted by the node CA) → per request: `Host`/`:authority` must equal the SNI
//! → body read up to the size limit → policy decision → forward (or refuse) → record.
//!
//! Invariants: nothing passes without a decision; any failure refuses (fail closed): non-TLS
//! bytes, a ClientHello without SNI, an SNI the identity does not inspect, a Host that differs
//! from the SNI, a body over the limit. The upstream is reached at the destination the workload
//! connected to (as the kernel recorded it), by name: TLS to it verifies the upstream
//! certificate for the SNI against the configured roots.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use super::{Decider, Decision, DecisionRequest, Verdict, ca::NodeCa, upstream, usage};
use crate::{
    approval::{self, Approval, Approvals, NewApproval, OverrideError, Redeemed},
    audit::{self, AuditLog, OnFull},
    budget::{self, BudgetError},
    egress::Enforcer,
    handover::Listeners,
    identity::Identity,
    killswitch::KillSwitch,
    policy::{Mode, PolicySet},
    state::{Backend, OnUnavailable, Unavailable},
    telemetry::{self, L7Record},
    token::{TokenError, TokenVerifier},
};

/// Time allowed for the client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most upstream connections one workload connection has open at once: an HTTP/1.x workload
/// uses one (it sends a request at a time), an HTTP/2 workload one per stream in flight, up to
/// this; its further streams wait for one to come free. nginx opens one per request in flight
/// without a bound; this bound keeps one workload connection from making the node open
/// hundreds (hyper's server allows 200 concurrent streams).
const UPSTREAM_CONNS_PER_CONN: usize = 16;

/// Most bytes of an unread request body read and dropped before an early refusal
/// ([`refuse_unread`]).
const DISCARD_MAX: usize = 64 * 1024;
/// Longest wait for the rest of an unread request body before an early refusal.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(1);

/// The body type of every request and response the enforcer passes on.
pub(super) type Body = BoxBody<Bytes, hyper::Error>;

/// Settings of the L7 enforcer.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Addresses the per-identity listeners bind (the node's enforcer addresses).
    pub listen: Vec<IpAddr>,
    /// Largest request body accepted, in bytes; larger requests get 413 without being read
    /// whole.
    pub max_body: usize,
    /// What a call gets when the audit queue has no room for its record.
    pub audit_full: OnFull,
    /// Where the listening sockets come from (inherited from a predecessor or bound), and
    /// when to stop and drain.
    pub listeners: Listeners,
}

/// The enforcer: per identity port and listen address, one TLS listener on each of its
/// runtimes (`SO_REUSEPORT`: the kernel spreads connections over them).
#[derive(Clone)]
pub struct L7Proxy {
    shared: Arc<Shared>,
    runtimes: Arc<[tokio::runtime::Handle]>,
}

struct Shared {
    settings: Settings,
    ca: Arc<NodeCa>,
    /// TLS to workloads: one configuration (and session ticket keys) for every connection.
    server_tls: Arc<ServerConfig>,
    /// TLS to upstreams (ALPN `http/1.1` only: every request is re-originated over HTTP/1.1,
    /// see [`upstream`]).
    upstream_tls: TlsConnector,
    /// Idle upstream connections, kept across an identity's workload connections.
    upstream_idle: Arc<upstream::IdleConns>,
    enforcer: Arc<Mutex<Enforcer>>,
    policies: Arc<ArcSwap<PolicySet>>,
    decider: Arc<dyn Decider>,
    audit: AuditLog,
    kill: Arc<KillSwitch>,
    tokens: Option<TokenVerifier>,
    state: Backend,
    approvals: Arc<Approvals>,
    bound: Mutex<HashSet<u16>>,
}

/// Header in which an override token may be presented (see [`crate::approval`]); stripped
/// before forwarding. Workloads need not send it: a retry of the approved request finds its
/// token by itself.
pub const OVERRIDE_HEADER: &str = "x-aegis-override-token";

/// Why a connection or request was refused, and how the client is told.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("no original destination recorded for {peer} (not redirected by the kernel)")]
    NoOrigin { peer: SocketAddr },
    #[error("TLS ClientHello without SNI")]
    NoSni,
    #[error("SNI {sni} is not an inspected domain of this identity")]
    NotInspected { sni: String },
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("Host {host:?} differs from SNI {sni} (domain fronting)")]
    HostMismatch { host: String, sni: String },
    #[error("request body over the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("reading the request body: {0}")]
    Body(String),
    #[error("upstream {upstream}: {message}")]
    Upstream { upstream: String, message: String },
    #[error("policy: {0}")]
    Policy(String),
    #[error("the kill switch of agent {agent} is on")]
    Killed { agent: String },
    #[error("over the policy's rate limit; retry after {retry_after:?}")]
    RateLimited { retry_after: Duration },
    #[error("agent token: {0}")]
    Token(TokenError),
    #[error("{0}")]
    BudgetExceeded(String),
    #[error("{what}: {message} (fail closed)")]
    StateUnavailable { what: &'static str, message: String },
    #[error("{0}")]
    Override(OverrideError),
    #[error("approvals: {0}")]
    Approvals(String),
    #[error(
        "the audit log's queue is full (its writer fell behind); nothing is forwarded unrecorded (fail closed)"
    )]
    AuditUnavailable,
}

impl Refusal {
    /// Stable reason code, as it appears in events.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::NoOrigin { .. } => "no_origin",
            Refusal::NoSni => "no_sni",
            Refusal::NotInspected { .. } => "sni_not_inspected",
            Refusal::Handshake(_) => "tls_handshake_failed",
            Refusal::HostMismatch { .. } => "host_mismatch",
            Refusal::TooLarge { .. } => "body_too_large",
            Refusal::Body(_) => "body_unreadable",
            Refusal::Upstream { .. } => "upstream_failed",
            Refusal::Policy(_) => "policy_error",
            Refusal::Killed { .. } => "kill_switch",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Token(TokenError::Replayed(_)) => "token_replayed",
            Refusal::Token(TokenError::WrongIdentity { .. }) => "token_wrong_identity",
            Refusal::Token(_) => "token_invalid",
            Refusal::BudgetExceeded(_) => "budget_exceeded",
            Refusal::StateUnavailable { .. } => "state_unavailable",
            Refusal::Override(e) => e.reason(),
            Refusal::Approvals(_) => "approvals_unavailable",
            Refusal::AuditUnavailable => "audit_unavailable",
        }
    }

    /// The one place refusals become HTTP responses.
    fn status(&self) -> StatusCode {
        match self {
            Refusal::HostMismatch { .. } => StatusCode::MISDIRECTED_REQUEST,
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Body(_) => StatusCode::BAD_REQUEST,
            Refusal::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Refusal::Policy(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Token(_) => StatusCode::UNAUTHORIZED,
            Refusal::BudgetExceeded(_) => StatusCode::PAYMENT_REQUIRED,
            Refusal::StateUnavailable { .. }
            | Refusal::Approvals(_)
            | Refusal::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

/// Per-connection facts every request of it shares.
struct Conn {
    identity: Identity,
    /// `identity` as `agent@tenant` (its `Display`): the key of its rate-limit bucket and
    /// budget periods, formatted once.
    key: String,
    sni: String,
    /// `sni` as the upstream request's `Host` header value.
    host_header: HeaderValue,
    origin: SocketAddr,
    /// The record fields every request of the connection repeats (identity, SNI, addresses),
    /// formatted once.
    record: L7Record,
    upstream: upstream::Pool,
}

// === impl L7Proxy ===

impl L7Proxy {
    /// An enforcer terminating TLS with `ca`, re-originating TLS verified against
    /// `upstream_roots`, deciding with `decider`, serving connections on `runtimes` (at least
    /// one; one-thread runtimes keep each connection on one thread).
    ///
    /// # Errors
    /// The TLS session ticket keys cannot be generated (no system randomness).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        runtimes: Vec<tokio::runtime::Handle>,
        ca: NodeCa,
        upstream_roots: rustls::RootCertStore,
        enforcer: Arc<Mutex<Enforcer>>,
        policies: Arc<ArcSwap<PolicySet>>,
        decider: Arc<dyn Decider>,
        audit: AuditLog,
        kill: Arc<KillSwitch>,
        tokens: Option<TokenVerifier>,
        state: Backend,
        approvals: Arc<Approvals>,
    ) -> Result<L7Proxy, rustls::Error> {
        let client = |alpn: &[&[u8]]| {
            let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(upstream_roots.clone())
            .with_no_client_auth();
            client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            TlsConnector::from(Arc::new(client))
        };
        let upstream_idle = Arc::new(upstream::IdleConns::new(
            upstream::IDLE_TIMEOUT,
            upstream::IDLE_PER_KEY,
        ));
        if let Some(runtime) = runtimes.first() {
            let idle = Arc::downgrade(&upstream_idle);
            runtime.spawn(async move {
                let mut every = tokio::time::interval(upstream::IDLE_TIMEOUT);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(idle) = idle.upgrade() else { return };
                    idle.sweep();
                }
            });
        }
        let ca = Arc::new(ca);
        let server_tls = ca.server_config()?;
        Ok(L7Proxy {
            shared: Arc::new(Shared {
                settings,
                server_tls: Arc::new(server_tls),
                ca,
                upstream_tls: client(&[b"http/1.1"]),
                upstream_idle,
                enforcer,
                policies,
                decider,
                audit,
                kill,
                tokens,
                state,
                approvals,
                bound: Mutex::new(HashSet::new()),
            }),
            runtimes: runtimes.into(),
        })
    }

    /// Binds the listeners of `identity` on `port` (once) and serves them in background
    /// tasks, one listener per runtime and listen address. Callable from any thread.
    ///
    /// # Errors
    /// A listen address or port cannot be bound.
    pub fn serve_identity(&self, identity: &Identity, port: u16) -> io::Result<()> {
        let mut bound = self.shared.bound.lock().expect("lock poisoned");
        if bound.contains(&port) {
            return Ok(());
        }
        let mut listeners = Vec::new();
        for ip in &self.shared.settings.listen {
            let group = self
                .shared
                .settings
                .listeners
                .tcp_group(SocketAddr::new(*ip, port), self.runtimes.len())?;
            let runtimes = self.runtimes.iter().cycle();
            listeners.extend(runtimes.zip(group));
        }
        for (runtime, listener) in listeners {
            let (shared, identity) = (self.shared.clone(), identity.clone());
            runtime.spawn(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(shared, identity, listener).await,
                    Err(e) => {
                        tracing::error!(target: "aegis::l7", error = %e, "L7 listener not registered");
                    }
                }
            });
        }
        bound.insert(port);
        Ok(())
    }
}

async fn accept_loop(shared: Arc<Shared>, identity: Identity, listener: TcpListener) {
    let mut stopped = std::pin::pin!(shared.settings.listeners.stop_accepting());
    loop {
        // A successor accepts on the same socket once this one stops: nothing queued is lost.
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (shared, identity) = (shared.clone(), identity.clone());
                let listeners = shared.settings.listeners.clone();
                tokio::spawn(listeners.track_connection(async move {
                    if let Err(refusal) = serve_conn(&shared, &identity, stream, peer).await {
                        let record = L7Record {
                            peer: peer.to_string(),
                            ..refusal_record(&identity, &refusal)
                        };
                        emit(&shared, &record, None);
                    }
                }));
            }
            Err(e) => {
                tracing::warn!(target: "aegis::l7", error = %e, "L7 accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connection phase: origin, TLS with SNI checks, then HTTP/1.1 or HTTP/2 by ALPN.
async fn serve_conn(
    shared: &Arc<Shared>,
    identity: &Identity,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), Refusal> {
    // Responses are written whole; Nagle would only hold their tails back.
    let _ = stream.set_nodelay(true);
    let origin = shared
        .enforcer
        .lock()
        .expect("lock poisoned")
        .take_l7_origin(peer);
    let Some(origin) = origin else {
        return Err(Refusal::NoOrigin { peer });
    };
    let origin_addr = SocketAddr::new(
        std::net::Ipv6Addr::from(origin.addr).to_canonical(),
        u16::try_from(origin.port).unwrap_or(0),
    );
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = tokio::time::timeout(HANDSHAKE_TIMEOUT, start)
        .await
        .map_err(|_| Refusal::Handshake(io::ErrorKind::TimedOut.into()))?
        .map_err(Refusal::Handshake)?;
    let sni = match start.client_hello().server_name() {
        None => return Err(Refusal::NoSni),
        Some(name) => name.to_ascii_lowercase(),
    };
    let inspected = shared
        .policies
        .load()
        .for_identity(identity.agent.as_str(), identity.tenant.as_str())
        .is_some_and(|p| p.inspects(&sni));
    if !inspected {
        return Err(Refusal::NotInspected { sni });
    }
    // Minted (or found) here, so a name the CA refuses is reported; the configuration's
    // resolver then finds it cached.
    shared
        .ca
        .leaf(&sni)
        .map_err(|e| Refusal::Handshake(io::Error::other(e)))?;
    let config = shared.server_tls.clone();
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config))
        .await
        .map_err(|_| Refusal::Handshake(io::ErrorKind::TimedOut.into()))?
        .map_err(Refusal::Handshake)?;
    // A DNS name (rustls checked the SNI's syntax) is always a valid header value.
    let host_header = HeaderValue::from_str(&sni)
        .map_err(|e| Refusal::Handshake(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let record = L7Record {
        sni: sni.clone(),
        dst: origin_addr.to_string(),
        peer: peer.to_string(),
        ..identity_record(identity)
    };
    let key = identity.to_string();
    let conn = Arc::new(Conn {
        identity: identity.clone(),
        upstream: upstream::Pool::new(
            shared.upstream_tls.clone(),
            sni.clone(),
            origin_addr,
            UPSTREAM_CONNS_PER_CONN,
            key.clone(),
            shared.upstream_idle.clone(),
        ),
        key,
        sni,
        host_header,
        origin: origin_addr,
        record,
    });
    let draining = shared.settings.listeners.draining();
    let shared = shared.clone();
    let requested = Arc::new(tokio::sync::Notify::new());
    let first_request = requested.clone();
    let service = hyper::service::service_fn(move |req| {
        let (shared, conn) = (shared.clone(), conn.clone());
        first_request.notify_one();
        async move { Ok::<_, hyper::Error>(handle(&shared, &conn, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let mut connection = std::pin::pin!(builder.serve_connection(TokioIo::new(tls), service));
    // Draining (SIGTERM): the request in flight finishes, then the connection closes (HTTP/2:
    // GOAWAY). Not before the first request: a connection that has not sent one yet would be
    // closed under it (hyper-util drops a connection still reading its preface).
    let served = tokio::select! {
        r = connection.as_mut() => r,
        () = async { draining.await; requested.notified().await } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(target: "aegis::l7", %peer, error = %e, "L7 connection ended");
    }
    Ok(())
}

/// Request phase: room for the audit record, Host check, body, decision, forward.
async fn handle(shared: &Shared, conn: &Conn, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let mut record = L7Record {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        ..conn_record(conn)
    };
    // The record's room is taken before anything can take effect: a call is never forwarded
    // and then left unrecorded because the writer fell behind (unless `--audit-full open`).
    let slot = shared.audit.reserve();
    let (response, refusal) = match (&slot, shared.settings.audit_full) {
        (None, OnFull::Closed) => refuse_unread(req.into_body(), Refusal::AuditUnavailable).await,
        _ => decide_and_forward(shared, conn, req, &mut record).await,
    };
    if let Some(refusal) = refusal {
        let refused = refusal_record(&conn.identity, &refusal);
        record.decision = refused.decision;
        record.reason = refused.reason;
    }
    record.status = Some(response.status().as_u16());
    record.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    emit(shared, &record, slot);
    response
}

/// The request phase proper; fills `record` with the decision and returns the response, with
/// the refusal when the enforcer (not the policy) refused.
async fn decide_and_forward(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    record: &mut L7Record,
) -> (Response<Body>, Option<Refusal>) {
    let refuse = |refusal: Refusal| (error_response(&refusal), Some(refusal));
    let (mut parts, body) = req.into_parts();
    // Checked per request: connections opened before the switch was turned on are cut too.
    if shared.kill.is_killed(conn.identity.agent.as_str()) {
        return refuse_unread(
            body,
            Refusal::Killed {
                agent: conn.identity.agent.to_string(),
            },
        )
        .await;
    }
    // Every request counts against the identity's rate, before any work on it.
    let mut would_rate_limit = false;
    let (rate_limit, mode) = shared
        .policies
        .load()
        .for_identity(conn.identity.agent.as_str(), conn.identity.tenant.as_str())
        .map_or((None, Mode::Enforce), |p| (p.rate_limit, p.mode));
    if let Some(limit) = rate_limit {
        match shared.state.take_rate(&conn.key, limit).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if mode == Mode::Shadow => would_rate_limit = true,
            Ok(Err(retry_after)) => {
                return refuse_unread(body, Refusal::RateLimited { retry_after }).await;
            }
            Err(e) => {
                if let Some(refusal) = state_unavailable(shared, conn, "rate limit store", e) {
                    return refuse_unread(body, refusal).await;
                }
            }
        }
    }
    let host = parts
        .uri
        .host()
        .map(str::to_owned)
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.split(':').next().unwrap_or(h).to_owned())
        })
        .unwrap_or_default()
        .to_ascii_lowercase();
    // An agent token, when presented: valid, this workload's, unused; then stripped below.
    if let Some(verifier) = &shared.tokens
        && let Some(value) = parts.headers.get(verifier.header.as_str())
    {
        let claims = match verifier.verify(value.to_str().unwrap_or(""), &conn.identity) {
            Ok(claims) => claims,
            Err(e) => return refuse_unread(body, Refusal::Token(e)).await,
        };
        match shared.state.first_use(&claims.jti, claims.exp).await {
            Ok(true) => {}
            Ok(false) => {
                let replayed = Refusal::Token(TokenError::Replayed(claims.jti));
                return refuse_unread(body, replayed).await;
            }
            Err(e) => {
                if let Some(refusal) = state_unavailable(shared, conn, "token replay store", e) {
                    return refuse_unread(body, refusal).await;
                }
            }
        }
        record.token_jti = Some(claims.jti);
    }
    if host != conn.sni {
        let mismatch = Refusal::HostMismatch {
            host,
            sni: conn.sni.clone(),
        };
        return refuse_unread(body, mismatch).await;
    }
    let limit = shared.settings.max_body;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        // Not read at all: the client is told at once and the connection is not kept.
        return refuse(Refusal::TooLarge { limit });
    }
    if let Some(verifier) = &shared.tokens {
        parts.headers.remove(verifier.header.as_str());
    }
    let override_token = parts
        .headers
        .remove(OVERRIDE_HEADER)
        .map(|v| v.to_str().unwrap_or("").trim().to_owned());
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return refuse(Refusal::TooLarge { limit });
        }
        Err(e) => return refuse(Refusal::Body(e.to_string())),
    };
    let request = DecisionRequest {
        identity: &conn.identity,
        host: &conn.sni,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        body: &body,
    };
    let decision = match shared.decider.decide(&request) {
        Ok(d) => d,
        Err(e) => return refuse(Refusal::Policy(e)),
    };
    record.decision = decision.verdict.name();
    record.would = decision.would.clone();
    record.reason = decision.reason.clone();
    if would_rate_limit {
        record.would = Some("deny".into());
        record.reason = format!("{}; would be rate_limited", record.reason);
    }
    record.tool = decision.tool.clone();
    record.action = decision.action.clone();
    record.policy_version = decision.policy_version;
    record.mode = decision.mode;
    record.estimated_cost_usd = decision.estimated_cost_usd;
    let forward_body = match &decision.verdict {
        Verdict::Allow => body.clone(),
        Verdict::Sanitize {
            body: redacted,
            findings,
        } => {
            record.redactions = *findings;
            Bytes::from(redacted.clone())
        }
        Verdict::Deny => return (decision_response(&decision, None), None),
        Verdict::ApprovalNeeded => {
            match approve(shared, conn, &request, &decision, override_token.as_deref()).await {
                Ok(Approved::Pass(redeemed)) => {
                    record.decision = "allow";
                    record_approval(record, "approved", redeemed);
                    body.clone()
                }
                Ok(Approved::Wait(approval)) => {
                    record.approval_id = Some(approval.id.clone());
                    return (decision_response(&decision, Some(&approval)), None);
                }
                Err(refusal) => return refuse(refusal),
            }
        }
    };
    // Tool-level rate limit, for requests routed to the tool.
    let mut priced = Priced::of(shared, conn, &decision, &forward_body);
    if let Some((key, limit)) = &priced.tool_rate {
        match shared.state.take_rate(key, *limit).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if mode == Mode::Shadow => {
                record.would = Some("deny".into());
                record.reason = format!("{}; would be rate_limited (tool)", record.reason);
            }
            Ok(Err(retry_after)) => return refuse(Refusal::RateLimited { retry_after }),
            Err(e) => {
                if let Some(refusal) = state_unavailable(shared, conn, "rate limit store", e) {
                    return refuse(refusal);
                }
            }
        }
    }
    // A metered LLM call writes a second record (`llm_usage`) when its response ends: its
    // room is taken now, before anything is charged or forwarded.
    let mut usage_slot = None;
    if priced.llm.is_some() {
        usage_slot = shared.audit.reserve();
        if usage_slot.is_none() && shared.settings.audit_full == OnFull::Closed {
            return refuse(Refusal::AuditUnavailable);
        }
    }
    // A priced call is charged to the identity's (and tool's) budget before it leaves: its
    // fixed price, or the reservation bounding an LLM call's cost; refunded if it does not get
    // through, settled to the reported usage when an LLM response ends.
    if priced.llm.is_some() {
        record.estimated_cost_usd = Some(priced.amount as f64 / 1e6);
        record.cost_settled_later = true;
    }
    let mut charged = None;
    if priced.amount > 0 && !priced.periods.is_empty() {
        let amount = priced.amount;
        match shared.state.charge(&priced.periods, amount).await {
            Ok(()) => charged = Some((std::mem::take(&mut priced.periods), amount)),
            Err(e @ BudgetError::Exceeded { .. }) if mode == Mode::Shadow => {
                record.would = Some("deny".into());
                record.reason = format!("{}; would be budget_exceeded: {e}", record.reason);
            }
            Err(
                e @ BudgetError::Exceeded {
                    approval_needed: true,
                    ..
                },
            ) => {
                // Over budget, and the budget asks a human: the exact retry of an approved
                // request is charged past the limit.
                let over = Decision {
                    reason: format!("budget_exceeded: {e}"),
                    ..decision.clone()
                };
                match approve(shared, conn, &request, &over, override_token.as_deref()).await {
                    Ok(Approved::Pass(redeemed)) => {
                        let delta = i64::try_from(amount).unwrap_or(i64::MAX);
                        let forced = shared.state.add(&priced.periods, delta).await;
                        if let Err(e) = forced {
                            if let Some(refusal) = state_unavailable(
                                shared,
                                conn,
                                "budget store",
                                Unavailable(e.to_string()),
                            ) {
                                return refuse(refusal);
                            }
                        } else {
                            charged = Some((std::mem::take(&mut priced.periods), amount));
                        }
                        record_approval(record, "over budget, approved", redeemed);
                    }
                    Ok(Approved::Wait(approval)) => {
                        record.decision = "approval_needed";
                        record.reason = over.reason.clone();
                        record.approval_id = Some(approval.id.clone());
                        return (decision_response(&over, Some(&approval)), None);
                    }
                    Err(refusal) => return refuse(refusal),
                }
            }
            Err(e @ BudgetError::Exceeded { .. }) => {
                return refuse(Refusal::BudgetExceeded(e.to_string()));
            }
            Err(e) => {
                if let Some(refusal) =
                    state_unavailable(shared, conn, "budget store", Unavailable(e.to_string()))
                {
                    return refuse(refusal);
                }
            }
        }
    }
    let length = forward_body.len();
    let mut upstream_req = Request::from_parts(
        parts,
        Full::new(forward_body)
            .map_err(|never| match never {})
            .boxed(),
    );
    strip_hop_by_hop(upstream_req.headers_mut());
    if record.redactions > 0 || declared.is_some() {
        upstream_req
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    match forward(conn, upstream_req).await {
        Ok(resp) => match priced.llm {
            Some(prices) => {
                let metered = meter(shared, conn, record, resp, prices, charged, usage_slot);
                (metered, None)
            }
            None => (resp, None),
        },
        Err(refusal) => {
            if let Some((periods, amount)) = charged {
                let refunded = shared.state.refund(&periods, amount).await;
                if refunded.is_err() {
                    tracing::error!(target: "aegis::l7", identity = %conn.identity, amount_micro_usd = amount, "budget refund failed after an upstream failure");
                }
            }
            refuse(refusal)
        }
    }
}

/// Refuses a request whose body has not been read, after reading and dropping what the client
/// is still sending of it: at most [`DISCARD_MAX`] bytes, for at most [`DISCARD_TIMEOUT`] (as
/// nginx discards the body of a request it answers early). An HTTP/2 stream then ends without
/// the `RST_STREAM(NO_ERROR)` of RFC 9113 §8.1 that some clients (curl 7.88) take for a
/// failed stream while they are still uploading, and an HTTP/1.1 connection stays usable.
/// Past either bound the refusal is sent anyway and the stream is reset (HTTP/2) or the
/// connection closed (HTTP/1.1).
async fn refuse_unread(body: Incoming, refusal: Refusal) -> (Response<Body>, Option<Refusal>) {
    let drain = async {
        let mut body = std::pin::pin!(body);
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > DISCARD_MAX {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, drain).await;
    (error_response(&refusal), Some(refusal))
}

/// What a decided request costs and which limits of its tool apply.
struct Priced {
    /// Micro-USD to charge before forwarding (fixed price or LLM reservation).
    amount: u64,
    /// Budget periods it counts against: the identity's, then the tool's.
    periods: Vec<budget::Period>,
    /// The LLM prices when the cost is token-based (the response is then metered).
    llm: Option<usage::Prices>,
    /// The tool's rate limit, keyed `agent@tenant/tool`.
    tool_rate: Option<(String, crate::policy::RateLimit)>,
}

impl Priced {
    fn of(shared: &Shared, conn: &Conn, decision: &Decision, body: &[u8]) -> Priced {
        let policies = shared.policies.load();
        let identity = conn.key.as_str();
        let policy =
            policies.for_identity(conn.identity.agent.as_str(), conn.identity.tenant.as_str());
        let tool = policy
            .zip(decision.tool.as_deref())
            .and_then(|(p, name)| p.tools.iter().find(|t| t.name.as_str() == name));
        let action = tool
            .zip(decision.action.as_deref())
            .and_then(|(t, name)| t.actions.iter().find(|a| a.name.as_str() == name));
        let now = chrono::Utc::now();
        let periods_of = |key: &str, b: crate::policy::Budget| {
            let mut ps = budget::periods(key, b.daily_usd, b.monthly_usd, now);
            for p in &mut ps {
                p.approval_needed = b.on_exceed == crate::policy::OnExceed::ApprovalNeeded;
            }
            ps
        };
        let mut periods = policy
            .and_then(|p| p.budget)
            .map(|b| periods_of(identity, b))
            .unwrap_or_default();
        if let Some(t) = tool
            && let Some(b) = t.budget
        {
            periods.extend(periods_of(
                &format!("{identity}|tool:{}", t.name.as_str()),
                b,
            ));
        }
        let (amount, llm) = match action.and_then(|a| a.llm.as_ref()) {
            Some(pricing) => {
                let (prices, bound) = usage::reservation(pricing, body);
                (usage::cost_micros(bound, prices), Some(prices))
            }
            None => (
                decision
                    .estimated_cost_usd
                    .filter(|c| *c > 0.0)
                    .map_or(0, budget::micros),
                None,
            ),
        };
        Priced {
            amount,
            periods,
            llm,
            tool_rate: tool.and_then(|t| {
                t.rate_limit
                    .map(|l| (format!("{identity}/{}", t.name.as_str()), l))
            }),
        }
    }
}

/// Wraps an LLM response so that, when it ends, its reported usage settles the reservation
/// (`charged`: periods and reserved micro-USD) and an `llm_usage` audit record is written (in
/// `slot`, when the call has one).
fn meter(
    shared: &Shared,
    conn: &Conn,
    record: &L7Record,
    resp: Response<Body>,
    prices: usage::Prices,
    charged: Option<(Vec<budget::Period>, u64)>,
    slot: Option<audit::Slot>,
) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let reader = usage::UsageReader::new(
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let (store, remote) = (shared.state.budgets.clone(), shared.state.remote);
    let audit = shared.audit.clone();
    let mut settled = UsageRecord {
        kind: "llm_usage",
        agent: conn.identity.agent.to_string(),
        tenant: conn.identity.tenant.to_string(),
        tool: record.tool.clone(),
        action: record.action.clone(),
        input_tokens: None,
        output_tokens: None,
        reserved_usd: charged.as_ref().map(|(_, r)| *r as f64 / 1e6),
        cost_usd: None,
    };
    let settle: usage::Settle = Box::new(move |reported| {
        if let Some(u) = reported {
            let cost = usage::cost_micros(u, prices);
            settled.input_tokens = Some(u.input_tokens);
            settled.output_tokens = Some(u.output_tokens);
            settled.cost_usd = Some(cost as f64 / 1e6);
            crate::metrics::global().llm_settled(
                &settled.agent,
                &settled.tenant,
                cost as f64 / 1e6,
            );
            if let Some((periods, reserved)) = charged {
                let delta = i64::try_from(cost).unwrap_or(i64::MAX)
                    - i64::try_from(reserved).unwrap_or(i64::MAX);
                let write = move || {
                    if let Err(e) = store.add(&periods, delta) {
                        tracing::error!(target: "aegis::l7", error = %e, delta_micro_usd = delta, "settling an LLM call's budget failed; the reservation stays charged");
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) if remote => drop(handle.spawn_blocking(write)),
                    _ => write(),
                }
            }
        } else {
            if let Some(reserved) = settled.reserved_usd {
                crate::metrics::global().llm_settled(&settled.agent, &settled.tenant, reserved);
            }
            tracing::warn!(target: "aegis::l7", agent = %settled.agent, tool = ?settled.tool, "LLM response reported no usage (or ended early); the reservation stays charged");
        }
        match slot {
            Some(slot) => audit.append_in(slot, &settled),
            None => audit.append(&settled),
        }
    });
    Response::from_parts(parts, usage::MeteredBody::new(body, reader, settle).boxed())
}

/// The audit record of an LLM call's settled cost.
#[derive(serde::Serialize)]
struct UsageRecord {
    kind: &'static str,
    agent: String,
    tenant: String,
    tool: Option<String>,
    action: Option<String>,
    /// `None`: the response reported no usage; the reservation stays charged.
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// `None`: no budget applies.
    reserved_usd: Option<f64>,
    cost_usd: Option<f64>,
}

/// A store the request needs is unreachable: the refusal (`--state-unavailable closed`), or
/// `None` with a log line when the operator chose to let such calls through (`open`).
fn state_unavailable(
    shared: &Shared,
    conn: &Conn,
    what: &'static str,
    e: Unavailable,
) -> Option<Refusal> {
    match shared.state.on_unavailable {
        OnUnavailable::Closed => Some(Refusal::StateUnavailable {
            what,
            message: e.to_string(),
        }),
        OnUnavailable::Open => {
            tracing::warn!(target: "aegis::l7", identity = %conn.identity, store = what, error = %e, "state store unavailable; call let through uncounted (--state-unavailable open)");
            None
        }
    }
}

/// How an `approval_needed` request goes on.
enum Approved {
    /// An override token for this very request was spent: forward it.
    Pass(Redeemed),
    /// Filed (or already pending): answer with the approval id.
    Wait(Box<Approval>),
}

/// Spends the override token of an approved copy of `request` (presented in
/// [`OVERRIDE_HEADER`], or held by its approval), or files an approval with the request's
/// parameters redacted by every built-in DLP detector, holding the request open for a
/// decision when `--approval-hold` says so.
async fn approve(
    shared: &Shared,
    conn: &Conn,
    request: &DecisionRequest<'_>,
    decision: &Decision,
    presented: Option<&str>,
) -> Result<Approved, Refusal> {
    let path_and_query = match request.query {
        Some(q) => format!("{}?{q}", request.path),
        None => request.path.to_owned(),
    };
    let hash = approval::request_hash(
        request.method,
        request.host,
        &path_and_query,
        request.content_type,
        request.body,
    );
    let approvals = &shared.approvals;
    if let Some(redeemed) = approvals
        .redeem(&conn.identity, &hash, presented)
        .map_err(Refusal::Override)?
    {
        return Ok(Approved::Pass(redeemed));
    }
    let detectors = crate::dlp::Detectors::all_builtins();
    let params = match detectors.redact_body(request.content_type, request.body) {
        Ok(r) => serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&r.body).into())),
        Err(e) => serde_json::Value::String(format!("(unreadable body: {e})")),
    };
    let query = request.query.map(|q| detectors.redact(q).0);
    let url = match query {
        Some(q) => format!("https://{}{}?{q}", request.host, request.path),
        None => format!("https://{}{}", request.host, request.path),
    };
    let approval = approvals
        .request(NewApproval {
            identity: &conn.identity,
            tool: decision.tool.clone(),
            action: decision.action.clone(),
            method: request.method,
            url,
            params,
            rule: decision.reason.clone(),
            request_hash: hash.clone(),
        })
        .map_err(Refusal::Approvals)?;
    let hold = approvals.settings().hold;
    if !hold.is_zero()
        && approvals.wait(&approval.id, hold).await
        && let Some(redeemed) = approvals
            .redeem(&conn.identity, &hash, None)
            .map_err(Refusal::Override)?
    {
        return Ok(Approved::Pass(redeemed));
    }
    Ok(Approved::Wait(Box::new(approval)))
}

/// Sends the request upstream on the connection's pool (HTTP/1.1, whatever the workload
/// spoke) and returns the response in the workload's HTTP version.
async fn forward(conn: &Conn, mut req: Request<Body>) -> Result<Response<Body>, Refusal> {
    let upstream_err = |message: String| Refusal::Upstream {
        upstream: format!("{} ({})", conn.sni, conn.origin),
        message,
    };
    // The response goes back in the workload's HTTP version, whatever the upstream spoke (an
    // HTTP/1.0 upstream must not make the workload's keep-alive connection close).
    let client_version = req.version();
    if client_version == http::Version::HTTP_2 {
        join_cookies(req.headers_mut());
    }
    *req.version_mut() = http::Version::HTTP_11;
    // HTTP/1.1 needs a Host header (an HTTP/2 request carries :authority instead), and the
    // request target in origin form.
    req.headers_mut()
        .insert(header::HOST, conn.host_header.clone());
    *req.uri_mut() = path_only(req.uri());
    let response = conn
        .upstream
        .send(req)
        .await
        .map_err(|e| upstream_err(e.to_string()))?;
    let (mut parts, body) = response.into_parts();
    parts.version = client_version;
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

/// Joins the `cookie` fields of an HTTP/2 request into one, as RFC 9113 section 8.2.3 asks
/// before it is passed to an HTTP/1.1 connection (RFC 6265 section 5.4: one `Cookie` header).
fn join_cookies(headers: &mut http::HeaderMap) {
    let values = headers.get_all(header::COOKIE);
    if values.iter().nth(1).is_none() {
        return;
    }
    let joined = values
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// `uri` as an HTTP/1.1 request target in origin form (RFC 9112 section 3.2.1): its path and
/// query, or `/`.
fn path_only(uri: &http::Uri) -> http::Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        // Already origin form (every HTTP/1.1 request from a client, not a proxy).
        return uri.clone();
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/"))
}

/// The hop-by-hop headers of RFC 9110 section 7.6.1 (and the obsolete `keep-alive` and
/// `proxy-connection`), removed from everything the enforcer forwards.
const HOP_BY_HOP: [http::HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1): [`HOP_BY_HOP`] and those the
/// `Connection` header names. One pass over the names present; most messages carry none, or
/// only `Connection`.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let mut present: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    if present.is_empty() {
        return;
    }
    if present.contains(&header::CONNECTION) {
        present.extend(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
                .filter_map(|s| http::HeaderName::from_bytes(s.as_bytes()).ok()),
        );
    }
    for name in present {
        headers.remove(name);
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(refusal: &Refusal) -> Response<Body> {
    if let Refusal::BudgetExceeded(message) = refusal {
        return json_response(
            refusal.status(),
            serde_json::json!({"error": "policy_violation", "reason": "BudgetExceeded", "message": message}),
        );
    }
    if let Refusal::RateLimited { retry_after } = refusal {
        // A policy outcome, worded like the other policy refusals (docs/l7.md), with the
        // standard Retry-After in whole seconds (RFC 9110 section 10.2.3).
        let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = json_response(
            refusal.status(),
            serde_json::json!({"error": "policy_violation", "reason": "RateLimited", "retry_after_s": seconds, "message": refusal.to_string()}),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return resp;
    }
    json_response(
        refusal.status(),
        serde_json::json!({"error": "aegis_refused", "reason": refusal.reason(), "message": refusal.to_string()}),
    )
}

/// The documented responses to policy decisions (docs/l7.md).
fn decision_response(d: &Decision, approval: Option<&Approval>) -> Response<Body> {
    match approval {
        Some(a) => json_response(
            StatusCode::FORBIDDEN,
            serde_json::json!({
                "error": "approval_needed", "approval_id": a.id, "expires": a.expires,
                "reason": d.reason, "tool": d.tool, "action": d.action,
                "policy_version": d.policy_version,
            }),
        ),
        _ => json_response(
            StatusCode::FORBIDDEN,
            serde_json::json!({
                "error": "policy_violation", "reason": d.reason, "tool": d.tool, "action": d.action,
                "policy_version": d.policy_version,
            }),
        ),
    }
}

/// The fields every record of a connection shares.
fn conn_record(conn: &Conn) -> L7Record {
    conn.record.clone()
}

/// A record naming only the identity; a decision fills in the rest. Until then it says
/// `deny`: a request that ends before its decision was refused.
fn identity_record(identity: &Identity) -> L7Record {
    L7Record {
        kind: "l7_decision",
        agent: identity.agent.to_string(),
        tenant: identity.tenant.to_string(),
        identity: identity.id(),
        decision: "deny",
        mode: "enforce",
        ..L7Record::default()
    }
}

/// A record of a refusal by the enforcer itself (no policy decision reached).
fn refusal_record(identity: &Identity, refusal: &Refusal) -> L7Record {
    L7Record {
        reason: format!("{}: {refusal}", refusal.reason()),
        ..identity_record(identity)
    }
}

/// Records that a request passed on a redeemed override token: the approver and approval on
/// the record, and `; {how} by {approver} (approval {id})` after the policy's reason.
fn record_approval(record: &mut L7Record, how: &str, redeemed: Redeemed) {
    record.reason = format!(
        "{}; {how} by {} (approval {})",
        record.reason, redeemed.approved_by, redeemed.approval_id
    );
    record.approval_id = Some(redeemed.approval_id);
    record.approved_by = Some(redeemed.approved_by);
}

/// Logs, exports (span) and audits one decision: in `slot` when the call holds one, else if the
/// queue has room.
fn emit(shared: &Shared, record: &L7Record, slot: Option<audit::Slot>) {
    telemetry::l7_decision(record);
    crate::metrics::global().l7_decision(record);
    match slot {
        Some(slot) => shared.audit.append_in(slot, record),
        None => shared.audit.append(record),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn names(h: &http::HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(http::HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = headers(&[
            ("host", "api.example.com"),
            ("connection", "close, X-Debug-Id"),
            ("connection", "x-trace-hop"),
            ("x-debug-id", "1"),
            ("x-trace-hop", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("upgrade", "h2c"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "host"]);

        // Nothing hop-by-hop: left as it was, repeated values included.
        let mut h = headers(&[("host", "a"), ("accept", "x"), ("accept", "y")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["accept", "host"]);
        assert_eq!(h.get_all("accept").iter().count(), 2);
    }

    #[test]
    fn request_targets_are_sent_in_origin_form() {
        for (uri, target) in [
            (
                "https://api.stripe.com/v1/charges?limit=3",
                "/v1/charges?limit=3",
            ),
            ("/v1/charges?limit=3", "/v1/charges?limit=3"),
            ("https://api.stripe.com", "/"),
            ("*", "*"),
        ] {
            let uri: http::Uri = uri.parse().unwrap();
            let out = path_only(&uri);
            assert_eq!(out.to_string(), target, "{uri}");
            assert!(out.scheme().is_none() && out.authority().is_none(), "{uri}");
        }
    }

    #[test]
    fn http2_cookie_fields_are_joined_for_http1() {
        let mut h = headers(&[("cookie", "a=1"), ("accept", "x"), ("cookie", "b=2; c=3")]);
        join_cookies(&mut h);
        let cookies: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        assert_eq!(h.get("accept").unwrap(), "x");

        let mut h = headers(&[("cookie", "a=1")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1"]);
    }
}
