//! The node's listening sockets (DNS proxy, L7 enforcer, approvals API) and their hand-over
//! from a running agent to its successor, so that an upgrade loses no query and no connection.
//!
//! A successor agent asks the running one for its sockets over the control socket
//! ([`crate::control::take_over`]); the running agent passes them with `SCM_RIGHTS`
//! (unix(7)). Both processes then hold the *same* open file descriptions: a datagram or
//! connection queued on a socket is read by whichever process reads first, and nothing is
//! dropped when the old process closes its copies (unlike separate `SO_REUSEPORT` sockets,
//! whose queues die with their process). Every listener the agent binds goes through
//! [`Listeners`], which uses an inherited socket for the address when it has one.
//!
//! Life of a serving agent's listeners: serving → [`Listeners::stop`] (hand-over committed: no
//! more reads or accepts; the successor reads the same sockets) → [`Listeners::drain`]
//! (SIGTERM: no more accepts; connections finish their request in flight and close; DNS over
//! UDP is still answered if there is no successor) → [`Listeners::drained`] (connections done
//! or the grace period over; then every listener stops and the queries in flight are
//! answered).
//!
//! Invariants: a socket is handed over only while it is open here (the copies passed are
//! `dup`s of sockets in use); inherited sockets are checked (type, listening state, address)
//! from the kernel, not taken on the sender's word.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::{TaskTracker, task_tracker::TrackedFuture},
};

/// Backlog of TCP listeners.
const BACKLOG: i32 = 1024;

/// The agent's listening sockets, with the signals that stop and drain what they serve.
/// Cheap to clone; clones share everything.
#[derive(Clone, Default)]
pub struct Listeners {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Sockets passed by a predecessor and not yet taken by a listener.
    inherited: Mutex<Vec<(Type, SocketAddr, Socket)>>,
    /// A duplicate of every listening socket in use (with its type), for a hand-over.
    open: Mutex<Vec<(Type, Socket)>>,
    stop: CancellationToken,
    drain: CancellationToken,
    /// Connections (L7, DNS over TCP) in flight.
    connections: TaskTracker,
    /// DNS queries over UDP in flight.
    queries: TaskTracker,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("open", &self.inner.open.lock().map_or(0, |o| o.len()))
            .field("stopped", &self.inner.stop.is_cancelled())
            .finish_non_exhaustive()
    }
}

// === impl Listeners ===

impl Listeners {
    /// Keeps the listening UDP and TCP sockets among `fds` (passed by a predecessor) for the
    /// listeners bound later on their addresses; anything else is closed and reported.
    /// Returns how many were kept.
    pub fn inherit(&self, fds: Vec<OwnedFd>) -> usize {
        let mut inherited = self.inner.inherited.lock().expect("lock poisoned");
        for fd in fds {
            let socket = Socket::from(fd);
            match describe(&socket) {
                Ok(Some((ty, addr))) => {
                    // The file description is shared with the predecessor: make sure it does
                    // not block our runtime (it already is non-blocking; this is a no-op).
                    if let Err(e) = socket.set_nonblocking(true) {
                        tracing::warn!(target: "aegis::agent", %addr, error = %e, "inherited socket unusable");
                        continue;
                    }
                    inherited.push((ty, addr, socket));
                }
                Ok(None) => {
                    tracing::warn!(target: "aegis::agent", "inherited descriptor is not a listening UDP or TCP socket; closed");
                }
                Err(e) => {
                    tracing::warn!(target: "aegis::agent", error = %e, "inherited descriptor unreadable; closed");
                }
            }
        }
        inherited.len()
    }

    /// A UDP socket on `addr`: the inherited one, or a newly bound one.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let socket = match self.take(Type::DGRAM, addr).pop() {
            Some(s) => s,
            None => {
                let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
                s.set_nonblocking(true)?;
                s.bind(&addr.into())?;
                s
            }
        };
        self.keep(&socket)?;
        Ok(socket.into())
    }

    /// A TCP listener on `addr` (`SO_REUSEADDR`): the inherited one, or a newly bound one.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn tcp(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let socket = match self.take(Type::STREAM, addr).pop() {
            Some(s) => s,
            None => listener(addr, false)?,
        };
        self.keep(&socket)?;
        Ok(socket.into())
    }

    /// At least `n` TCP listeners on `addr` sharing it with `SO_REUSEPORT` (the kernel spreads
    /// connections over them): every inherited one (a predecessor may have run more of them;
    /// each must be served, or connections the kernel steers to it would wait forever), then
    /// newly bound ones up to `n`.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn tcp_group(&self, addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
        let mut sockets = self.take(Type::STREAM, addr);
        while sockets.len() < n {
            sockets.push(listener(addr, true)?);
        }
        for s in &sockets {
            self.keep(s)?;
        }
        Ok(sockets.into_iter().map(Into::into).collect())
    }

    fn take(&self, ty: Type, addr: SocketAddr) -> Vec<Socket> {
        let mut inherited = self.inner.inherited.lock().expect("lock poisoned");
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *inherited)
            .into_iter()
            .partition(|(t, a, _)| *t == ty && *a == addr);
        *inherited = rest;
        if !mine.is_empty() {
            tracing::debug!(target: "aegis::agent", %addr, count = mine.len(), "using inherited sockets");
        }
        mine.into_iter().map(|(_, _, s)| s).collect()
    }

    fn keep(&self, socket: &Socket) -> io::Result<()> {
        let dup = socket.try_clone()?;
        let ty = socket.r#type()?;
        self.inner
            .open
            .lock()
            .expect("lock poisoned")
            .push((ty, dup));
        Ok(())
    }

    /// Duplicates of every listening socket in use, for a successor.
    ///
    /// # Errors
    /// A descriptor cannot be duplicated (out of descriptors).
    pub fn hand_over(&self) -> io::Result<Vec<OwnedFd>> {
        let open = self.inner.open.lock().expect("lock poisoned");
        open.iter()
            .map(|(_, s)| s.as_fd().try_clone_to_owned())
            .collect()
    }

    /// Stops reading and accepting on every listener (their loops end and close their
    /// copies). Idempotent.
    pub fn stop(&self) {
        self.inner.stop.cancel();
        self.inner.open.lock().expect("lock poisoned").clear();
    }

    /// Resolves when [`Listeners::stop`] is called.
    pub fn stopped(&self) -> WaitForCancellationFutureOwned {
        self.inner.stop.clone().cancelled_owned()
    }

    /// Whether [`Listeners::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    /// Stops accepting connections and asks every tracked connection to finish its request
    /// in flight and close. Datagram listeners go on until [`Listeners::drained`].
    pub fn drain(&self) {
        self.inner.drain.cancel();
        // Closed once their accept loops end: a connection is refused rather than left
        // waiting in a backlog nobody accepts from.
        self.inner
            .open
            .lock()
            .expect("lock poisoned")
            .retain(|(ty, _)| *ty == Type::DGRAM);
    }

    /// Resolves when [`Listeners::drain`] is called.
    pub fn draining(&self) -> WaitForCancellationFutureOwned {
        self.inner.drain.clone().cancelled_owned()
    }

    /// Resolves when connection listeners stop accepting: on [`Listeners::stop`] or
    /// [`Listeners::drain`].
    pub fn stop_accepting(&self) -> impl Future<Output = ()> + Send + 'static {
        let (stop, drain) = (self.stopped(), self.draining());
        async move {
            tokio::select! {
                () = stop => {}
                () = drain => {}
            }
        }
    }

    /// Tracks a connection, so that [`Listeners::drained`] waits for it.
    pub fn track_connection<F: Future>(&self, work: F) -> TrackedFuture<F> {
        self.inner.connections.track_future(work)
    }

    /// Tracks a query, so that [`Listeners::drained`] waits for its answer.
    pub fn track_query<F: Future>(&self, work: F) -> TrackedFuture<F> {
        self.inner.queries.track_future(work)
    }

    /// After [`Listeners::drain`]: waits until every tracked connection is done, then stops
    /// every listener and waits for the queries in flight, all within `grace`. Returns how
    /// many connections and queries were still running when the grace period ended (0: all
    /// done).
    pub async fn drained(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        let (connections, queries) = (&self.inner.connections, &self.inner.queries);
        connections.close();
        let _ = tokio::time::timeout_at(deadline, connections.wait()).await;
        self.stop();
        queries.close();
        let _ = tokio::time::timeout_at(deadline, queries.wait()).await;
        connections.len() + queries.len()
    }
}

/// A non-blocking TCP listener on `addr` with `SO_REUSEADDR`, and `SO_REUSEPORT` if `shared`.
fn listener(addr: SocketAddr, shared: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// The type and local address of a bound UDP socket or listening TCP socket, as the kernel
/// reports them; `None` for anything else.
fn describe(socket: &Socket) -> io::Result<Option<(Type, SocketAddr)>> {
    let ty = socket.r#type()?;
    let Some(addr) = socket.local_addr()?.as_socket() else {
        return Ok(None);
    };
    if addr.port() == 0 {
        return Ok(None);
    }
    Ok(
        if ty == Type::DGRAM || (ty == Type::STREAM && socket.is_listener()?) {
            Some((ty, addr))
        } else {
            None
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// A predecessor's sockets are used for their addresses: a datagram queued on the old
    /// socket before the hand-over is read through the inherited one after the old copy closes.
    #[test]
    fn inherited_socket_keeps_what_was_queued() {
        let old = Listeners::default();
        let socket = old.udp(loopback()).unwrap();
        let addr = socket.local_addr().unwrap();
        let client = std::net::UdpSocket::bind(loopback()).unwrap();
        client.send_to(b"queued", addr).unwrap();

        let new = Listeners::default();
        assert_eq!(new.inherit(old.hand_over().unwrap()), 1);
        old.stop();
        drop(socket);
        drop(old);
        let inherited = new.udp(addr).unwrap();
        let mut buf = [0u8; 16];
        inherited.set_nonblocking(false).unwrap();
        inherited
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (n, _) = inherited.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"queued");
    }

    /// Every inherited member of a `SO_REUSEPORT` group is served, even beyond `n`; missing
    /// ones are bound; the group shares one address.
    #[test]
    fn groups_serve_every_inherited_member() {
        let old = Listeners::default();
        let first = old.tcp_group(loopback(), 1).unwrap();
        let addr = first[0].local_addr().unwrap();
        let more = old.tcp_group(addr, 3).unwrap();
        assert_eq!(more.len(), 3);
        let new = Listeners::default();
        assert_eq!(new.inherit(old.hand_over().unwrap()), 4);
        assert_eq!(new.tcp_group(addr, 2).unwrap().len(), 4);
        assert_eq!(new.tcp_group(addr, 2).unwrap().len(), 2);
    }

    /// Descriptors that are not listening sockets are refused.
    #[test]
    fn non_listeners_are_not_inherited() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let connected = std::net::UdpSocket::bind(loopback()).unwrap();
        let unbound = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let new = Listeners::default();
        let kept = new.inherit(vec![
            OwnedFd::from(file),
            OwnedFd::from(connected),
            OwnedFd::from(unbound),
        ]);
        assert_eq!(kept, 1, "only the bound UDP socket");
    }

    #[tokio::test]
    async fn drained_waits_for_tracked_work_up_to_the_grace() {
        let l = Listeners::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(l.track_connection(async move {
            let _ = rx.await;
        }));
        let (qtx, qrx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(l.track_query(async move {
            let _ = qrx.await;
        }));
        l.drain();
        assert!(
            !l.is_stopped(),
            "datagrams are served while connections drain"
        );
        assert_eq!(l.drained(Duration::from_millis(50)).await, 2);
        assert!(l.is_stopped());
        tx.send(()).unwrap();
        qtx.send(()).unwrap();
        assert_eq!(l.drained(Duration::from_secs(5)).await, 0);
    }
}
