//! Debugging aid: builds a small world (one name, `hello.test` → 198.18.1.10, a policy for
//! `web-agent@acme` allowing it), starts the agent unless `--no-agent`, prints the names to use
//! with `ip netns exec`, and keeps everything up until Enter is pressed.
//!
//! `cargo run -p aegis-tests --example world_shell [-- --no-agent]` (as root).

use std::net::{Ipv4Addr, Ipv6Addr};

use aegis_tests::world::{DnsRecord, HttpServer, World};

fn main() {
    let v4 = Ipv4Addr::new(198, 18, 1, 10);
    let v6: Ipv6Addr = "fd00:ae61:1::10".parse().expect("address");
    let mut world = World::builder()
        .record(DnsRecord::new("hello.test", Some(v4), Some(v6), 30))
        .http_server(HttpServer::new("hello", Some(v4), Some(v6), &[80]))
        .policy(
            "web-agent",
            "agent: web-agent\ntenant: acme\nversion: 1\negress:\n  - fqdn: hello.test\n",
        )
        .build();
    if !std::env::args().any(|a| a == "--no-agent")
        && let Err(e) = world.try_start_agent()
    {
        eprintln!("agent start failed: {e}\n{}", world.agent_log());
    }
    println!("world {} in {}", world.id(), world.dir().display());
    println!(
        "pods: {} {}; node: {}; socket: {}",
        world.pod_ns(1),
        world.pod_ns(2),
        world.node_ns(),
        world.control_socket().display()
    );
    println!("press Enter to tear down");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}
