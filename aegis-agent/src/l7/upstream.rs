//! The upstream side of one workload connection: a small pool of HTTP/1.1 connections to the
//! destination the workload connected to, whose idle connections are kept for the identity's
//! next workload connections to the same destination ([`IdleConns`]): a workload that opens a
//! connection per call (curl, `urllib`) pays the upstream TCP and TLS handshakes once, not per
//! call. Every request is re-originated over HTTP/1.1,
//! whatever the workload spoke (as nginx's `proxy_http_version 1.1`): an HTTP/2 workload's
//! streams each take a connection of the pool, so they stay concurrent, and none of them waits
//! on an upstream HTTP/2 connection's shared framing task (measured in docs/benchmarks.md,
//! "Fixed rate, fifth session": about 0.4 ms of p99 at 1,000 requests/s on two cores).
//!
//! Invariants:
//! - every connection of a pool goes to the same address (the IP and port the kernel recorded
//!   for the workload connection) with the same SNI, verified against the enforcer's upstream
//!   roots: a request never reaches another address than the one its workload connected to;
//! - at most `cap` connections of a pool are open or in use at once; further requests wait for
//!   one to come free;
//! - a connection goes back to the pool only once its response body was received whole (hyper
//!   cannot send the next request on it before); a response dropped midway takes its
//!   connection with it;
//! - an idle connection is only ever reused by the same identity (agent and tenant) for the same
//!   address and SNI, on the same enforcer thread (its connection task runs there): connections
//!   are never shared between identities. It is kept at most [`IDLE_TIMEOUT`], and at most
//!   [`IDLE_PER_KEY`] of them per identity, address, SNI and thread.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    thread::ThreadId,
    time::{Duration, Instant},
};

use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::{
    body::{Body as _, Bytes, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsConnector;

use super::proxy::Body;

/// Time allowed to reach the upstream and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request could not be sent upstream or its response head not received.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0:?} is not a valid TLS server name")]
    Name(String),
    #[error("connecting timed out after {0:?}")]
    Timeout(Duration),
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    #[error("HTTP/1.1 handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Exchange(#[source] hyper::Error),
}

/// Longest an upstream connection is kept idle: under the 60 s after which common upstreams
/// close idle connections (AWS ALB's default idle timeout, nginx's upstream
/// `keepalive_timeout`), so a kept connection is rarely one the upstream is closing; one that
/// it closed meanwhile is caught by [`Pool::send`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept at most per identity, address, SNI and thread (the newest are kept).
pub const IDLE_PER_KEY: usize = 32;

/// Whose idle connections these are: see the module doc.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct IdleKey {
    dest: Arc<Destination>,
    thread: ThreadId,
}

/// An identity's destination: where a pool's connections go, and for whom.
#[derive(Debug, Hash, PartialEq, Eq)]
struct Destination {
    /// The identity, as `agent@tenant`.
    owner: String,
    addr: SocketAddr,
    sni: String,
}

/// One key's idle connections, oldest first, each with when it became idle.
type Kept = Vec<(SendRequest<Body>, Instant)>;

/// Idle upstream connections of every pool of the node, kept for the next workload
/// connections of the same identity to the same destination (see the module doc).
pub struct IdleConns {
    idle: Mutex<HashMap<IdleKey, Kept>>,
    timeout: Duration,
    per_key: usize,
}

// === impl IdleConns ===

impl IdleConns {
    /// Connections kept at most `timeout`, at most `per_key` (≥ 1) of them per key.
    pub fn new(timeout: Duration, per_key: usize) -> IdleConns {
        IdleConns {
            idle: Mutex::new(HashMap::new()),
            timeout,
            per_key: per_key.max(1),
        }
    }

    /// The most recently idle connection of `key` not older than the timeout; older ones are
    /// dropped (closed).
    fn take(&self, key: &IdleKey) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().expect("lock poisoned");
        let conns = idle.get_mut(key)?;
        self.expire(conns, Instant::now());
        let taken = conns.pop();
        if conns.is_empty() {
            idle.remove(key);
        }
        taken.map(|(sender, _)| sender)
    }

    /// Drops (closes) every connection idle past the timeout, of every key: what
    /// [`IdleConns::take`] and [`IdleConns::put`] do for their own key, for keys no longer
    /// used. Run every [`IDLE_TIMEOUT`] by the enforcer.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("lock poisoned");
        idle.retain(|_, conns| {
            self.expire(conns, now);
            !conns.is_empty()
        });
    }

    /// Idle connections kept, of every key.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle
            .lock()
            .expect("lock poisoned")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Keeps `sender` for `key`, dropping that key's connections past the timeout and, past
    /// the bound, its oldest.
    fn put(&self, key: &IdleKey, sender: SendRequest<Body>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("lock poisoned");
        let conns = idle.entry(key.clone()).or_default();
        self.expire(conns, now);
        let over = (conns.len() + 1).saturating_sub(self.per_key);
        conns.drain(..over);
        conns.push((sender, now));
    }

    /// Drops the connections of `conns` idle past the timeout at `now`.
    fn expire(&self, conns: &mut Kept, now: Instant) {
        conns.retain(|(_, since)| now.duration_since(*since) < self.timeout);
    }
}

/// The upstream connections of one workload connection (see the module doc).
pub struct Pool {
    tls: TlsConnector,
    dest: Arc<Destination>,
    idle: Arc<IdleConns>,
    slots: Arc<Semaphore>,
}

// === impl Pool ===

impl Pool {
    /// A pool of at most `cap` (≥ 1) connections to `addr`, TLS by `tls` with SNI `sni` (the
    /// connector's ALPN must offer `http/1.1` only), for identity `owner` (`agent@tenant`),
    /// taking and keeping idle connections in `idle`. Opens nothing until the first request.
    pub fn new(
        tls: TlsConnector,
        sni: String,
        addr: SocketAddr,
        cap: usize,
        owner: String,
        idle: Arc<IdleConns>,
    ) -> Pool {
        Pool {
            tls,
            dest: Arc::new(Destination { owner, addr, sni }),
            idle,
            slots: Arc::new(Semaphore::new(cap.max(1))),
        }
    }

    /// The key of this pool's idle connections on the current thread.
    fn key(&self) -> IdleKey {
        IdleKey {
            dest: self.dest.clone(),
            thread: std::thread::current().id(),
        }
    }

    /// Sends `req` (an HTTP/1.1 request in origin form, with its `Host`) on an idle connection
    /// that is still usable, or on a new one, waiting for a free slot first; returns the
    /// response, whose body gives the connection back to the pool when it has been received
    /// whole. A request that a reused connection closed before writing it (the upstream
    /// closed the idle connection meanwhile) is sent once more on a new connection.
    ///
    /// # Errors
    /// The upstream cannot be reached within [`CONNECT_TIMEOUT`], its certificate is not
    /// valid for the SNI, or the exchange failed before the response head.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let key = self.key();
        let req = match self.take_idle(&key).await {
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.leased(response, sender, permit, key)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => unsent,
                    None => return Err(UpstreamError::Exchange(e.into_error())),
                },
            },
            None => req,
        };
        let mut sender = self.open().await?;
        let response = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Exchange)?;
        Ok(self.leased(response, sender, permit, key))
    }

    /// `response` with a body that holds `sender` and its slot until it is dropped.
    fn leased(
        &self,
        response: Response<Incoming>,
        sender: SendRequest<Body>,
        permit: OwnedSemaphorePermit,
        key: IdleKey,
    ) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let leased = Leased {
            body,
            ended: false,
            lease: Some(Lease {
                sender,
                _permit: permit,
                idle: self.idle.clone(),
                key,
            }),
        };
        Response::from_parts(parts, leased.boxed())
    }

    /// An idle connection that is ready for a request, dropping those the upstream closed.
    async fn take_idle(&self, key: &IdleKey) -> Option<SendRequest<Body>> {
        loop {
            let mut sender = self.idle.take(key)?;
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Opens a connection: TCP to the pool's address, TLS with its SNI (certificate
    /// verified), the HTTP/1.1 handshake; its connection task runs on the current runtime.
    async fn open(&self) -> Result<SendRequest<Body>, UpstreamError> {
        let sni = &self.dest.sni;
        let name =
            ServerName::try_from(sni.clone()).map_err(|_| UpstreamError::Name(sni.clone()))?;
        let connect = async {
            let tcp = TcpStream::connect(self.dest.addr).await?;
            tcp.set_nodelay(true)?;
            self.tls.connect(name, tcp).await
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| UpstreamError::Timeout(CONNECT_TIMEOUT))?
            .map_err(UpstreamError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// A connection in use, its slot in the pool, and where it goes back when idle.
struct Lease {
    sender: SendRequest<Body>,
    _permit: OwnedSemaphorePermit,
    idle: Arc<IdleConns>,
    key: IdleKey,
}

/// A response body read from a leased connection; see [`Pool::send`].
struct Leased {
    body: Incoming,
    /// The body returned its end (`None`): hyper read it whole.
    ended: bool,
    lease: Option<Lease>,
}

// === impl Leased ===

impl hyper::body::Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        // Back into the pool before the slot is freed, so the request waiting for the slot
        // finds it. A body not read whole leaves hyper to close its connection.
        if (self.ended || self.body.is_end_stream()) && !lease.sender.is_closed() {
            lease.idle.put(&lease.key, lease.sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{Empty, Full};
    use rustls::pki_types::CertificateDer;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::l7::ca::NodeCa;

    const NAME: &str = "upstream.test";

    /// A TLS upstream on loopback with a certificate for [`NAME`], counting the connections it
    /// accepts and the requests it holds at once.
    struct Upstream {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        in_flight: Arc<AtomicUsize>,
        most_in_flight: Arc<AtomicUsize>,
        /// Opened (permits added) by the test to let held requests answer.
        gate: Arc<Semaphore>,
        /// [`Serve::CloseAfterOne`]: told by the test to close the connection, and telling it
        /// when it has.
        close: Arc<tokio::sync::Notify>,
        closed: Arc<tokio::sync::Notify>,
        tls: TlsConnector,
        _dir: tempfile::TempDir,
    }

    #[derive(Clone, Copy)]
    enum Serve {
        /// HTTP/1.1 keep-alive (hyper); `/hold` waits for the gate before answering.
        KeepAlive,
        /// One response per connection; then, when the test says so, the connection is closed
        /// without any `Connection: close` having announced it, as an upstream's idle timeout
        /// does: the client finds out only when it reads the close.
        CloseAfterOne,
    }

    async fn upstream(serve: Serve) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            NodeCa::load_or_create(&dir.path().join("ca.crt"), &dir.path().join("ca.key")).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            ca.leaf(NAME).unwrap(),
        )));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.issuer_der())).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            in_flight: Arc::default(),
            most_in_flight: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            close: Arc::default(),
            closed: Arc::default(),
            tls: TlsConnector::from(Arc::new(client)),
            _dir: dir,
        };
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let (accepted, in_flight, most, gate) = (
            up.accepted.clone(),
            up.in_flight.clone(),
            up.most_in_flight.clone(),
            up.gate.clone(),
        );
        let (close, closed) = (up.close.clone(), up.closed.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let (in_flight, most, gate) = (in_flight.clone(), most.clone(), gate.clone());
                let (close, closed) = (close.clone(), closed.clone());
                tokio::spawn(async move {
                    let mut tls = acceptor.accept(tcp).await.unwrap();
                    match serve {
                        Serve::CloseAfterOne => {
                            let mut head = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                                let n = tls.read(&mut buf).await.unwrap();
                                assert!(n > 0, "request head cut short");
                                head.extend_from_slice(&buf[..n]);
                            }
                            tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .unwrap();
                            close.notified().await;
                            tls.shutdown().await.unwrap();
                            drop(tls);
                            closed.notify_one();
                        }
                        Serve::KeepAlive => {
                            let service = hyper::service::service_fn(move |req: Request<_>| {
                                let (in_flight, most, gate) =
                                    (in_flight.clone(), most.clone(), gate.clone());
                                async move {
                                    if req.uri().path() == "/hold" {
                                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                        most.fetch_max(now, Ordering::SeqCst);
                                        gate.acquire().await.unwrap().forget();
                                        in_flight.fetch_sub(1, Ordering::SeqCst);
                                    }
                                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(
                                        req.uri().path().to_owned(),
                                    ))))
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        }
                    }
                });
            }
        });
        up
    }

    /// A pool of `cap` for identity `a@t`, with idle connections of its own.
    fn pool(up: &Upstream, sni: &str, cap: usize) -> Pool {
        let idle = Arc::new(IdleConns::new(IDLE_TIMEOUT, IDLE_PER_KEY));
        pool_in(up, sni, cap, "a@t", &idle)
    }

    fn pool_in(up: &Upstream, sni: &str, cap: usize, owner: &str, idle: &Arc<IdleConns>) -> Pool {
        Pool::new(
            up.tls.clone(),
            sni.into(),
            up.addr,
            cap,
            owner.into(),
            idle.clone(),
        )
    }

    /// Two `/hold` requests at once on `pool` (cap ≥ 2), answered once both are held.
    async fn two_held(up: &Upstream, pool: &Pool) {
        let (held, gate) = (up.in_flight.clone(), up.gate.clone());
        let open_gate = async {
            while held.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gate.add_permits(2);
        };
        let hold = || async { text(pool.send(get("/hold")).await.unwrap()).await };
        let ((), a, b) = tokio::join!(open_gate, hold(), hold());
        assert_eq!([a, b], ["/hold", "/hold"]);
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header(http::header::HOST, NAME)
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    async fn text(response: Response<Body>) -> String {
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let up = upstream(Serve::KeepAlive).await;
        let pool = pool(&up, NAME, 4);
        for path in ["/a", "/b", "/c"] {
            assert_eq!(text(pool.send(get(path)).await.unwrap()).await, path);
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_take_a_connection_each_up_to_the_cap() {
        let up = upstream(Serve::KeepAlive).await;
        let pool = pool(&up, NAME, 2);
        let held = up.in_flight.clone();
        let gate = up.gate.clone();
        let open_gate = async {
            // Both slots held upstream at once: then let every request answer.
            while held.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gate.add_permits(3);
        };
        // Each response is read whole, which frees its connection and slot.
        let hold = || async { text(pool.send(get("/hold")).await.unwrap()).await };
        let ((), a, b, c) = tokio::join!(open_gate, hold(), hold(), hold());
        assert_eq!([a, b, c], ["/hold", "/hold", "/hold"]);
        // The third request waited for a slot and then reused a connection: without the cap
        // it would have opened a third one at once.
        assert_eq!(up.most_in_flight.load(Ordering::SeqCst), 2);
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_not_read_whole_does_not_return_its_connection() {
        let up = upstream(Serve::KeepAlive).await;
        let pool = pool(&up, NAME, 1);
        drop(pool.send(get("/unread")).await.unwrap());
        // The slot is free again (cap 1), but the connection was not reused.
        assert_eq!(text(pool.send(get("/next")).await.unwrap()).await, "/next");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_replaced() {
        let up = upstream(Serve::CloseAfterOne).await;
        let pool = pool(&up, NAME, 1);
        for _ in 0..5 {
            assert_eq!(text(pool.send(get("/")).await.unwrap()).await, "ok");
            // The connection is idle in the pool when the upstream closes it; the next request
            // goes out at once, before the pool's connection task has read the close.
            up.close.notify_one();
            up.closed.notified().await;
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 5);
    }

    /// A workload connection's idle connection serves the same identity's next workload
    /// connection to the same destination, and never another identity's.
    #[tokio::test]
    async fn idle_connections_outlive_their_workload_connection_for_the_same_identity_only() {
        let up = upstream(Serve::KeepAlive).await;
        let idle = Arc::new(IdleConns::new(IDLE_TIMEOUT, IDLE_PER_KEY));
        let first = pool_in(&up, NAME, 1, "a@t", &idle);
        assert_eq!(text(first.send(get("/a")).await.unwrap()).await, "/a");
        drop(first);
        let next = pool_in(&up, NAME, 1, "a@t", &idle);
        assert_eq!(text(next.send(get("/b")).await.unwrap()).await, "/b");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "reused");
        let other = pool_in(&up, NAME, 1, "b@t", &idle);
        assert_eq!(text(other.send(get("/c")).await.unwrap()).await, "/c");
        assert_eq!(
            up.accepted.load(Ordering::SeqCst),
            2,
            "another identity's own"
        );
    }

    #[tokio::test]
    async fn idle_connections_are_kept_for_a_while_and_a_few_at_most() {
        let up = upstream(Serve::KeepAlive).await;
        let idle = Arc::new(IdleConns::new(Duration::from_millis(200), 1));
        let pool = pool_in(&up, NAME, 2, "a@t", &idle);
        // Two connections come back idle; one is kept.
        two_held(&up, &pool).await;
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
        two_held(&up, &pool).await;
        assert_eq!(up.accepted.load(Ordering::SeqCst), 3, "one reused, one new");
        // Past the timeout, the kept one is not used.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(text(pool.send(get("/late")).await.unwrap()).await, "/late");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 4);
        // The sweep closes what no request came to take.
        assert_eq!(idle.len(), 1);
        idle.sweep();
        assert_eq!(idle.len(), 1, "not yet past the timeout");
        tokio::time::sleep(Duration::from_millis(300)).await;
        idle.sweep();
        assert_eq!(idle.len(), 0);
    }

    #[tokio::test]
    async fn an_upstream_with_a_certificate_for_another_name_is_refused() {
        let up = upstream(Serve::KeepAlive).await;
        let pool = pool(&up, "other.test", 1);
        let err = pool.send(get("/")).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Connect(_)), "{err}");
    }
}
