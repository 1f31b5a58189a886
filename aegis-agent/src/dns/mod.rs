//! The node's DNS proxy. The kernel steers every DNS query of an agent workload (UDP and TCP
//! port 53, whatever resolver it names) to the proxy port of the workload's identity, so the
//! port the query arrives on says who asks: an agent cannot claim another's identity.
//!
//! For each query: names the identity's policy does not allow are answered NXDOMAIN (or
//! REFUSED) and reported; allowed names are forwarded to the upstream resolver, the addresses of
//! the answer's CNAME chain are written into the identity's allowlist in the kernel, and only
//! then is the answer released. If the kernel write fails the client gets SERVFAIL, never an
//! answer it could not use. Malformed queries get FORMERR (or nothing when not even the header
//! parses); nothing a client sends can stop the proxy.
//!
//! Wire format: hickory-proto (RFC 1035; TCP framing RFC 1035 section 4.2.2 / RFC 7766).

mod upstream;

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};

use crate::{
    egress::Enforcer,
    handover::Listeners,
    identity::Identity,
    metrics::{self, DnsResult},
    policy::{Mode, PolicySet, Ports},
};

/// Queries answered at once per listener; beyond, UDP queries are dropped (clients retry)
/// rather than letting a flood grow memory without bound.
const MAX_IN_FLIGHT: usize = 4096;
/// How long a TCP client may stay idle between queries (RFC 7766 section 6.2.3 suggests
/// seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Answer to names a policy denies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DenyRcode {
    /// NXDOMAIN (RFC 1035): the name does not exist for this workload.
    Nxdomain,
    /// REFUSED (RFC 1035): the server will not answer.
    Refused,
}

/// Settings of the proxy.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Addresses the per-identity listeners bind (the node's DNS proxy addresses).
    pub listen: Vec<IpAddr>,
    /// Upstream resolver.
    pub upstream: SocketAddr,
    /// How long to wait for the upstream.
    pub upstream_timeout: Duration,
    pub deny_rcode: DenyRcode,
    /// Where the listening sockets come from (inherited from a predecessor or bound), and
    /// when to stop serving them.
    pub listeners: Listeners,
}

/// The proxy: one UDP and one TCP listener per identity port and listen address.
#[derive(Clone)]
pub struct DnsProxy {
    shared: Arc<Shared>,
}

struct Shared {
    /// The runtime the proxy's tasks run on (its own thread: no DNS answer waits behind L7
    /// work).
    runtime: tokio::runtime::Handle,
    settings: Settings,
    upstream: upstream::Upstream,
    enforcer: Arc<Mutex<Enforcer>>,
    policies: Arc<ArcSwap<PolicySet>>,
    bound: Mutex<HashSet<u16>>,
}

/// What the policy says about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Allow(Ports),
    Deny,
    /// Shadow mode: would be denied; forwarded without learning its addresses.
    WouldDeny,
}

// === impl DnsProxy ===

impl DnsProxy {
    /// A proxy that learns into `enforcer` under the policies in `policies`, running its tasks
    /// on `runtime`.
    ///
    /// # Errors
    /// The upstream sockets cannot be opened.
    pub fn new(
        settings: Settings,
        enforcer: Arc<Mutex<Enforcer>>,
        policies: Arc<ArcSwap<PolicySet>>,
        runtime: tokio::runtime::Handle,
    ) -> io::Result<DnsProxy> {
        let upstream = {
            let _in_runtime = runtime.enter();
            upstream::Upstream::new(settings.upstream, settings.upstream_timeout)?
        };
        Ok(DnsProxy {
            shared: Arc::new(Shared {
                runtime,
                settings,
                upstream,
                enforcer,
                policies,
                bound: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Binds the listeners of `identity` on `port` (once; later calls return at once) and
    /// serves them in background tasks on the proxy's runtime (callable from any thread).
    ///
    /// # Errors
    /// A listen address or port cannot be bound.
    pub fn serve_identity(&self, identity: &Identity, port: u16) -> io::Result<()> {
        let mut bound = self.shared.bound.lock().expect("lock poisoned");
        if bound.contains(&port) {
            return Ok(());
        }
        let _in_runtime = self.shared.runtime.enter();
        let listeners = &self.shared.settings.listeners;
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for ip in &self.shared.settings.listen {
            let addr = SocketAddr::new(*ip, port);
            udp.push(UdpSocket::from_std(listeners.udp(addr)?)?);
            tcp.push(TcpListener::from_std(listeners.tcp(addr)?)?);
        }
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        for socket in udp {
            tokio::spawn(serve_udp(
                self.shared.clone(),
                identity.clone(),
                Arc::new(socket),
                limit.clone(),
            ));
        }
        for listener in tcp {
            tokio::spawn(serve_tcp(
                self.shared.clone(),
                identity.clone(),
                listener,
                limit.clone(),
            ));
        }
        bound.insert(port);
        Ok(())
    }
}

async fn serve_udp(
    shared: Arc<Shared>,
    identity: Identity,
    socket: Arc<UdpSocket>,
    limit: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; 65_535];
    let mut stopped = std::pin::pin!(shared.settings.listeners.stopped());
    loop {
        // A successor reads the same socket once this one stops: nothing queued is lost.
        let received = tokio::select! {
            biased;
            () = &mut stopped => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (len, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target: "aegis::dns", error = %e, "DNS receive failed");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(target: "aegis::dns", %peer, "DNS query dropped: too many in flight");
            continue;
        };
        let query = buf[..len].to_vec();
        let (shared, identity, socket) = (shared.clone(), identity.clone(), socket.clone());
        let listeners = shared.settings.listeners.clone();
        tokio::spawn(listeners.track_query(async move {
            if let Some(reply) = answer(&shared, &identity, &query, Transport::Udp).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                tracing::debug!(target: "aegis::dns", %peer, error = %e, "DNS reply not sent");
            }
            drop(permit);
        }));
    }
}

async fn serve_tcp(
    shared: Arc<Shared>,
    identity: Identity,
    listener: TcpListener,
    limit: Arc<Semaphore>,
) {
    let mut stopped = std::pin::pin!(shared.settings.listeners.stop_accepting());
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target: "aegis::dns", error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (shared, identity, limit) = (shared.clone(), identity.clone(), limit.clone());
        let listeners = shared.settings.listeners.clone();
        tokio::spawn(listeners.track_connection(async move {
            if let Err(e) = serve_tcp_conn(&shared, &identity, stream, &limit).await {
                tracing::debug!(target: "aegis::dns", %peer, error = %e, "DNS TCP connection ended");
            }
        }));
    }
}

async fn serve_tcp_conn(
    shared: &Shared,
    identity: &Identity,
    mut stream: TcpStream,
    limit: &Semaphore,
) -> io::Result<()> {
    let mut draining = std::pin::pin!(shared.settings.listeners.draining());
    loop {
        // Between queries a draining agent closes the connection (RFC 7766 section 6.2.3:
        // clients retry on a new one, which the successor accepts).
        let len = tokio::select! {
            biased;
            () = &mut draining => return Ok(()),
            len = timeout(TCP_IDLE, stream.read_u16()) => len,
        };
        let Ok(len) = len else {
            return Ok(());
        };
        let len = match len {
            Ok(len) => usize::from(len),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut query = vec![0u8; len];
        timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| io::ErrorKind::TimedOut)??;
        let _permit = limit.acquire().await.map_err(io::Error::other)?;
        if let Some(reply) = answer(shared, identity, &query, Transport::Tcp).await {
            let len = u16::try_from(reply.len())
                .map_err(|_| io::Error::other("reply over 65535 bytes"))?;
            stream.write_u16(len).await?;
            stream.write_all(&reply).await?;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// Answers one query of `identity`; `None` when nothing should be sent back.
async fn answer(
    shared: &Shared,
    identity: &Identity,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let mut measured = metrics::global().dns_query(identity);
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(target: "aegis::dns", %identity, error = %e, "malformed DNS query");
            // FORMERR needs at least the ID (RFC 1035 section 4.1.1).
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            return error_reply(id, None, ResponseCode::FormErr);
        }
    };
    if request.message_type() != MessageType::Query {
        return None;
    }
    if request.op_code() != OpCode::Query {
        return error_reply(request.id(), None, ResponseCode::NotImp);
    }
    let [question] = request.queries() else {
        return error_reply(request.id(), None, ResponseCode::FormErr);
    };
    let qname = normalize(question.name());
    let policies = shared.policies.load();
    let policy = policies.for_identity(identity.agent.as_str(), identity.tenant.as_str());
    let verdict = match policy.and_then(|p| p.fqdn_ports(&qname)) {
        Some(ports) => Verdict::Allow(ports),
        None if policy.is_some_and(|p| p.mode == Mode::Shadow) => Verdict::WouldDeny,
        None => Verdict::Deny,
    };
    let policy_version = policy.map_or(0, |p| p.version);
    let qtype = question.query_type();
    if verdict == Verdict::Deny {
        let rcode = match shared.settings.deny_rcode {
            DenyRcode::Nxdomain => ResponseCode::NXDomain,
            DenyRcode::Refused => ResponseCode::Refused,
        };
        tracing::warn!(
            target: "aegis::event", event = "dns_denied", verdict = "denied", agent = %identity.agent,
            tenant = %identity.tenant, identity = identity.id(), policy_version, qname = %qname,
            qtype = %qtype, rcode = %rcode, "DNS query denied"
        );
        measured.set(DnsResult::Denied);
        return error_reply(request.id(), Some(question.clone()), rcode);
    }

    let exchanged = match transport {
        Transport::Udp => shared.upstream.exchange_udp(query, &request).await,
        Transport::Tcp => shared.upstream.exchange_tcp(query, &request).await,
    };
    let reply = match exchanged {
        Ok(reply) => reply,
        Err(e) => {
            tracing::warn!(target: "aegis::dns", %identity, qname = %qname, upstream = %shared.upstream.addr(), error = %e, "upstream DNS failed");
            measured.set(DnsResult::UpstreamFailed);
            return error_reply(request.id(), Some(question.clone()), ResponseCode::ServFail);
        }
    };
    let mut reply_bytes = reply.bytes;
    let addrs = chain_addresses(&reply.message, question.name());
    match verdict {
        Verdict::Allow(ports) => {
            let learned = if addrs.is_empty() {
                Ok(Vec::new())
            } else {
                let inspect = policy.is_some_and(|p| p.inspects(&qname));
                shared.enforcer.lock().expect("lock poisoned").learn(
                    identity.id(),
                    &qname,
                    &ports,
                    inspect,
                    &addrs,
                )
            };
            let added = match learned {
                Ok(added) => added,
                Err(e) => {
                    tracing::error!(target: "aegis::dns", %identity, qname = %qname, error = %e, "cannot allow answer addresses in the kernel");
                    return error_reply(
                        request.id(),
                        Some(question.clone()),
                        ResponseCode::ServFail,
                    );
                }
            };
            measured.set(DnsResult::Allowed);
            let ttl = addrs.iter().map(|(_, t)| *t).min();
            if !added.is_empty() {
                // The audit trail of what DNS opened: once per address and identity.
                tracing::info!(
                    target: "aegis::event", event = "egress_learned", agent = %identity.agent, tenant = %identity.tenant,
                    identity = identity.id(), policy_version, qname = %qname,
                    addrs = ?added.iter().map(ToString::to_string).collect::<Vec<_>>(), ttl, "egress opened by DNS"
                );
            }
            tracing::debug!(
                target: "aegis::event", event = "dns_allowed", agent = %identity.agent, tenant = %identity.tenant,
                identity = identity.id(), policy_version, qname = %qname, qtype = %qtype,
                addrs = ?addrs.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>(), ttl, "DNS answer allowed"
            );
        }
        Verdict::WouldDeny | Verdict::Deny => {
            measured.set(DnsResult::WouldDeny);
            tracing::warn!(
                target: "aegis::event", event = "dns_denied", verdict = "would_deny", agent = %identity.agent,
                tenant = %identity.tenant, identity = identity.id(), policy_version, qname = %qname,
                qtype = %qtype, "DNS query would be denied (shadow mode)"
            );
        }
    }
    // The upstream saw our ID; the client expects its own.
    reply_bytes[..2].copy_from_slice(&request.id().to_be_bytes());
    Some(reply_bytes)
}

/// `name` lowercase, without the root dot.
fn normalize(name: &Name) -> String {
    let s = name.to_lowercase().to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_owned()
}

fn error_reply(id: u16, question: Option<Query>, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(id, OpCode::Query, rcode);
    m.set_recursion_desired(true).set_recursion_available(true);
    if let Some(q) = question {
        m.add_query(q);
    }
    m.to_vec().ok()
}

/// The addresses (with TTLs) an answer gives for `qname`: A and AAAA records owned by the
/// name or by a name its CNAME chain leads to. Records for other names are ignored, so an
/// upstream cannot open the door to an unrelated address by stuffing the answer section.
fn chain_addresses(reply: &Message, qname: &Name) -> Vec<(IpAddr, u32)> {
    let mut names = vec![qname.to_lowercase()];
    // A chain longer than the answer is impossible; bound the walk by the record count.
    for _ in 0..reply.answers().len() {
        let mut grew = false;
        for r in reply.answers() {
            if let RData::CNAME(target) = r.data() {
                let target = target.0.to_lowercase();
                if names.contains(&r.name().to_lowercase()) && !names.contains(&target) {
                    names.push(target);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    reply
        .answers()
        .iter()
        .filter(|r| names.contains(&r.name().to_lowercase()))
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
