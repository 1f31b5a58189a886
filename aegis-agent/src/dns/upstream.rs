//! Client of the upstream resolver.
//!
//! UDP queries share a fixed pool of connected sockets, each bound to its own kernel-chosen
//! (random) source port, and are multiplexed by a fresh random 16-bit ID per query; a reply is
//! accepted only if its ID, its source (the connected peer) and its question match (the
//! defences of RFC 5452 section 9). Creating a socket per query would cost six system calls and
//! two epoll registrations per query. TCP (for TCP clients) uses one connection per query.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_proto::op::{Message, MessageType};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::oneshot,
    time::timeout,
};

/// Sockets in the UDP pool.
pub const POOL_SIZE: usize = 16;
/// Largest reply read over UDP (EDNS buffers rarely exceed it).
const MAX_UDP: usize = 4096;
/// Tries at drawing an ID not already in flight on a socket before giving up.
const ID_TRIES: usize = 16;

/// A reply that matched its query.
pub struct Reply {
    pub message: Message,
    pub bytes: Vec<u8>,
}

/// The upstream resolver; see the module docs.
pub struct Upstream {
    addr: SocketAddr,
    timeout: Duration,
    pool: Vec<Arc<Slot>>,
    next: AtomicUsize,
}

struct Slot {
    socket: UdpSocket,
    pending: Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>,
}

impl Upstream {
    /// Opens the UDP pool towards `addr` and starts its readers (must run inside the tokio
    /// runtime).
    ///
    /// # Errors
    /// A socket cannot be opened or connected.
    pub fn new(addr: SocketAddr, timeout: Duration) -> io::Result<Upstream> {
        let bind: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let mut pool = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            let std_socket = std::net::UdpSocket::bind(bind)?;
            std_socket.connect(addr)?;
            std_socket.set_nonblocking(true)?;
            let slot = Arc::new(Slot {
                socket: UdpSocket::from_std(std_socket)?,
                pending: Mutex::new(HashMap::new()),
            });
            tokio::spawn(read_replies(slot.clone()));
            pool.push(slot);
        }
        Ok(Upstream {
            addr,
            timeout,
            pool,
            next: AtomicUsize::new(0),
        })
    }

    /// The upstream's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `query` (whose parsed form is `asked`) over UDP and waits for the matching reply.
    ///
    /// # Errors
    /// Timeout, no free ID, a send failure, or a reply whose question differs.
    pub async fn exchange_udp(&self, query: &[u8], asked: &Message) -> io::Result<Reply> {
        let slot = &self.pool[self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len()];
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut pending = slot.pending.lock().expect("lock poisoned");
            let id = (0..ID_TRIES)
                .map(|_| rand::random::<u16>())
                .find(|id| !pending.contains_key(id));
            let id = id.ok_or_else(|| io::Error::other("no free query ID towards the upstream"))?;
            pending.insert(id, tx);
            id
        };
        let mut out = query.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        let result = async {
            slot.socket.send(&out).await?;
            let bytes = timeout(self.timeout, rx)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream timed out"))?
                .map_err(|_| io::Error::other("upstream reader stopped"))?;
            matching(bytes, id, asked)
                .ok_or_else(|| io::Error::other("upstream reply does not match the query"))
        }
        .await;
        slot.pending.lock().expect("lock poisoned").remove(&id);
        result
    }

    /// Sends `query` over a new TCP connection (RFC 1035 section 4.2.2 framing) and reads the
    /// reply.
    ///
    /// # Errors
    /// Timeout, connection failure, or a reply that does not match.
    pub async fn exchange_tcp(&self, query: &[u8], asked: &Message) -> io::Result<Reply> {
        let id: u16 = rand::random();
        let mut out = query.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        let work = async {
            let mut stream = TcpStream::connect(self.addr).await?;
            let len = u16::try_from(out.len()).map_err(io::Error::other)?;
            stream.write_u16(len).await?;
            stream.write_all(&out).await?;
            let len = stream.read_u16().await?;
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await?;
            matching(buf, id, asked)
                .ok_or_else(|| io::Error::other("upstream reply does not match the query"))
        };
        timeout(self.timeout, work)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream timed out"))?
    }
}

async fn read_replies(slot: Arc<Slot>) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        match slot.socket.recv(&mut buf).await {
            Ok(len) if len >= 2 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if let Some(tx) = slot.pending.lock().expect("lock poisoned").remove(&id) {
                    let _ = tx.send(buf[..len].to_vec());
                }
            }
            Ok(_) => {}
            // ICMP errors (upstream down) surface here; the query times out.
            Err(e) => tracing::debug!(target: "aegis::dns", error = %e, "upstream receive failed"),
        }
    }
}

/// The reply if it answers our query: same ID, a response, the same question.
pub fn matching(bytes: Vec<u8>, id: u16, asked: &Message) -> Option<Reply> {
    let message = Message::from_vec(&bytes).ok()?;
    let same = message.id() == id
        && message.message_type() == MessageType::Response
        && message.queries() == asked.queries();
    same.then_some(Reply { message, bytes })
}
