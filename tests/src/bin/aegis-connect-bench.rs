//! Measures `connect()` cost from the calling process and prints one JSON line:
//! `{"mode":"tcp","count":N,"ns_per_connect":X}`.
//!
//! - `tcp`: a TCP listener on 127.0.0.1 (backlog raised to the kernel's `somaxconn`, so a busy
//!   acceptor never drops SYNs into the 1 s retransmission timer), then `COUNT` rounds of
//!   socket + blocking connect + close with RST (`SO_LINGER` 0, so no TIME_WAIT piles up).
//! - `udp`: `COUNT` rounds of socket + connect + close of a UDP socket to a bound UDP socket:
//!   no handshake, so it isolates the route lookup and the cgroup connect4 hook.
//!
//! Run it once as an agent workload and once as a plain process to get the overhead of the
//! Aegis connect hook (`cargo xtask bench`).
//!
//! Usage: `aegis-connect-bench tcp|udp [COUNT]`.
use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    thread,
    time::Instant,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "tcp".into());
    let count: u32 = args
        .next()
        .map_or(20_000, |s| s.parse().expect("COUNT is a number"));
    let connect: Box<dyn Fn()> = match mode.as_str() {
        "tcp" => {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind listener");
            // SAFETY: valid listening fd; listen(2) on a listening socket only resizes the
            // backlog (capped by net.core.somaxconn).
            assert_eq!(
                unsafe { libc::listen(listener.as_raw_fd(), 65_535) },
                0,
                "listen"
            );
            let target = listener.local_addr().expect("listener address");
            thread::spawn(move || {
                for conn in listener.incoming() {
                    drop(conn);
                }
            });
            Box::new(move || tcp_once(target))
        }
        "udp" => {
            let peer = UdpSocket::bind("127.0.0.1:0").expect("bind UDP peer");
            let target = peer.local_addr().expect("peer address");
            // Keep the peer bound for the whole run.
            std::mem::forget(peer);
            Box::new(move || udp_once(target))
        }
        other => panic!("unknown mode {other:?}: use tcp or udp"),
    };
    // Warm-up: page in code paths, fill caches.
    for _ in 0..1000 {
        connect();
    }
    let start = Instant::now();
    for _ in 0..count {
        connect();
    }
    let elapsed = start.elapsed();
    println!(
        "{{\"mode\":\"{mode}\",\"count\":{count},\"ns_per_connect\":{:.1}}}",
        elapsed.as_nanos() as f64 / f64::from(count)
    );
}

fn tcp_once(target: SocketAddr) {
    // A blocking connect, as most clients do.
    let stream = TcpStream::connect(target).expect("connect");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd owned by `stream`, and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

fn udp_once(target: SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(target).expect("connect");
}
