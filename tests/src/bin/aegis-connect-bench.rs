//! Measures `connect()` cost: opens a TCP listener on `ADDR` (default 127.0.0.1:0), then times
//! `COUNT` rounds of socket + connect + close (RST via `SO_LINGER` 0, so no TIME_WAIT piles
//! up) from the calling process, and prints one JSON line: `{"count":N,"ns_per_connect":X}`.
//!
//! Run it once as an agent workload and once as a plain process to get the overhead of the
//! Aegis connect hooks (`cargo xtask bench`).
//!
//! Usage: `aegis-connect-bench [COUNT] [ADDR]`.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::Instant,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let count: u32 = args
        .next()
        .map_or(20_000, |s| s.parse().expect("COUNT is a number"));
    let addr: SocketAddr = args.next().map_or("127.0.0.1:0".parse().unwrap(), |s| {
        s.parse().expect("ADDR is ip:port")
    });
    let listener = TcpListener::bind(addr).expect("bind listener");
    let target = listener.local_addr().expect("listener address");
    thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    // Warm-up: page in code paths, fill caches.
    for _ in 0..1000 {
        connect_once(target);
    }
    let start = Instant::now();
    for _ in 0..count {
        connect_once(target);
    }
    let elapsed = start.elapsed();
    println!(
        "{{\"count\":{count},\"ns_per_connect\":{:.1}}}",
        elapsed.as_nanos() as f64 / f64::from(count)
    );
}

fn connect_once(target: SocketAddr) {
    // A blocking connect, as most clients do (a non-blocking connect plus poll measures the
    // scheduler more than the connect path).
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
