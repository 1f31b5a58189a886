//! `cargo xtask bench`: kernel connect() overhead and DNS proxy latency/throughput, each against
//! a baseline measured in the same run, printed as a Markdown report (ratios included).
//!
//! 1. connect(): `aegis-connect-bench` (TCP and UDP) in a pod namespace, as an agent workload (Aegis hooks
//!    attached, destination allowed by a CIDR rule) and as a plain process, alternating rounds;
//!    medians compared.
//! 2. DNS: `dnsperf` from a pod namespace against (a) the upstream dnsmasq directly, (b) a
//!    no-cache dnsmasq forwarder on the node (`--cache-size=0 --server=upstream`), (c) the Aegis
//!    proxy (the pod runs as an agent workload; its queries are steered in the kernel). Once at
//!    a fixed rate (latency percentiles from `dnsperf -v`), once at saturation (queries/s).
//!
//! Environment: `AEGIS_AGENT_BIN` (agent binary), `AEGIS_CONNECT_BENCH_BIN` (connect bench
//! binary), `AEGIS_BENCH_SECONDS` (length of each DNS run, default 5).
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
};

use aegis_tests::report::{field, median, num_cpus, percentile, uname_r};
use aegis_tests::world::{DnsRecord, NODE_UPLINK_V4, UPSTREAM_DNS_V4, World, workspace_root};

const NAMES: usize = 200;
const CONNECT_ROUNDS: usize = 7;
const CONNECTS_PER_ROUND: &str = "20000";
const FIXED_QPS: &str = "2000";
const DNS_ROUNDS: usize = 3;

fn main() {
    let seconds: String = std::env::var("AEGIS_BENCH_SECONDS").unwrap_or_else(|_| "5".into());
    let connect_bin = std::env::var_os("AEGIS_CONNECT_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/aegis-connect-bench"));

    let mut builder = World::builder().pods(1).min_ttl(300).policy(
        "bench.yaml",
        "agent: bench\nversion: 1\negress:\n  - fqdn: \"*.bench.test\"\n  - cidr: 127.0.0.0/8\n",
    );
    let names: Vec<String> = (0..NAMES).map(|i| format!("n{i}.bench.test")).collect();
    for (i, name) in names.iter().enumerate() {
        let addr = Ipv4Addr::new(198, 18, 2, (i % 250 + 1) as u8);
        builder = builder.record(DnsRecord::new(name, Some(addr), None, 300));
    }
    let mut world = builder.build();
    world.start_agent();

    println!("# Aegis benchmark\n");
    println!("machine: {} cores, kernel {}", num_cpus(), uname_r());
    println!("agent: {}\n", world.agent_bin().display());

    // === connect() ===
    let bin = connect_bin.to_string_lossy().into_owned();
    for (mode, what) in [
        ("tcp", "TCP connect() to a listener (handshake included)"),
        (
            "udp",
            "UDP connect() (no handshake: route lookup + hook only)",
        ),
    ] {
        let mut plain = Vec::new();
        let mut hooked = Vec::new();
        for _ in 0..CONNECT_ROUNDS {
            plain.push(connect_ns(&world, None, &bin, mode));
            hooked.push(connect_ns(&world, Some(("bench", None)), &bin, mode));
        }
        let (p, h) = (median(&mut plain), median(&mut hooked));
        println!(
            "## {what}, from a pod namespace: {CONNECT_ROUNDS} alternating rounds of {CONNECTS_PER_ROUND}\n"
        );
        println!("| | ns per connect (median) |\n|---|---|");
        println!("| plain process (no Aegis hooks) | {p:.0} |");
        println!("| agent workload (Aegis connect4 + allowlist lookup) | {h:.0} |");
        println!(
            "\n**ratio agent/plain: {:.3}** (overhead {:+.1}%)\n",
            h / p,
            (h / p - 1.0) * 100.0
        );
    }

    // === DNS ===
    let queries = world.dir().join("queries.txt");
    let text: String = names.iter().map(|n| format!("{n} A\n")).collect();
    std::fs::write(&queries, text).expect("write query file");
    let queries = queries.to_string_lossy().into_owned();

    let mut forwarder = Command::new("ip")
        .args([
            "netns",
            "exec",
            &world.node_ns(),
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
        ])
        .args([
            "--cache-size=0",
            &format!("--server={UPSTREAM_DNS_V4}"),
            &format!("--listen-address={NODE_UPLINK_V4}"),
        ])
        .args(["--bind-interfaces", "--port=53", "--pid-file="])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the dnsmasq forwarder");
    std::thread::sleep(std::time::Duration::from_millis(500));

    let upstream = UPSTREAM_DNS_V4.to_string();
    let node = NODE_UPLINK_V4.to_string();
    let targets = [
        Target {
            label: "direct to upstream dnsmasq",
            server: &upstream,
            agent: None,
        },
        Target {
            label: "no-cache dnsmasq forwarder on the node",
            server: &node,
            agent: None,
        },
        Target {
            label: "Aegis DNS proxy (agent workload, steered in-kernel)",
            server: &upstream,
            agent: Some(("bench", None)),
        },
    ];
    for t in &targets {
        // Warm-up (discarded): first packets pay for neighbour discovery, page faults, caches.
        t.dnsperf(&world, &["-d", &queries, "-l", "2", "-Q", FIXED_QPS]);
    }

    // Rounds interleave the targets so that noise of the (virtual) machine hits all alike;
    // each row is the median over rounds.
    println!(
        "## DNS at a fixed rate: {FIXED_QPS} queries/s, {DNS_ROUNDS} interleaved rounds of {seconds} s, {NAMES} names (dnsperf -Q {FIXED_QPS})\n"
    );
    let mut rows: Vec<(Vec<f64>, Vec<f64>, u64)> = vec![(Vec::new(), Vec::new(), 0); targets.len()];
    for _ in 0..DNS_ROUNDS {
        for (t, row) in targets.iter().zip(rows.iter_mut()) {
            let out = t.dnsperf(
                &world,
                &["-d", &queries, "-l", &seconds, "-Q", FIXED_QPS, "-v"],
            );
            let mut lat: Vec<f64> = out
                .lines()
                .filter_map(|l| l.strip_prefix("> NOERROR "))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|s| s * 1e6)
                .collect();
            row.0.push(percentile(&mut lat, 0.50));
            row.1.push(percentile(&mut lat, 0.99));
            row.2 += field(&out, "Queries lost:")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        }
    }
    println!("| path | p50 µs | p99 µs | lost |\n|---|---|---|---|");
    let mut p99s = Vec::new();
    for (t, (mut p50, mut p99, lost)) in targets.iter().zip(rows) {
        let (p50, p99) = (median(&mut p50), median(&mut p99));
        println!("| {} | {p50:.0} | {p99:.0} | {lost} |", t.label);
        p99s.push(p99);
    }
    println!(
        "\nadded p99 over direct: forwarder {:+.0} µs, Aegis {:+.0} µs\n",
        p99s[1] - p99s[0],
        p99s[2] - p99s[0]
    );

    println!(
        "## DNS at saturation: {DNS_ROUNDS} interleaved rounds of {seconds} s, 4 clients, 100 outstanding queries each (dnsperf -c 4 -q 100)\n"
    );
    let mut qps: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for _ in 0..DNS_ROUNDS {
        for (t, q) in targets.iter().zip(qps.iter_mut()) {
            let out = t.dnsperf(
                &world,
                &["-d", &queries, "-l", &seconds, "-c", "4", "-q", "100"],
            );
            q.push(
                field(&out, "Queries per second:")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0.0),
            );
        }
    }
    println!("| path | queries/s | ratio to direct |\n|---|---|---|");
    let medians: Vec<f64> = qps.iter_mut().map(|q| median(q)).collect();
    for (t, m) in targets.iter().zip(&medians) {
        println!("| {} | {m:.0} | {:.2} |", t.label, m / medians[0].max(1.0));
    }
    let _ = forwarder.kill();
    let _ = forwarder.wait();
}

fn connect_ns(world: &World, agent: Option<(&str, Option<&str>)>, bin: &str, mode: &str) -> f64 {
    let out = world.pod_exec(1, agent, &[bin, mode, CONNECTS_PER_ROUND]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "connect bench failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("bench prints JSON");
    v["ns_per_connect"].as_f64().expect("ns_per_connect")
}

/// A DNS path to measure: `dnsperf -s server` from pod 1, as `agent` or as a plain process.
struct Target<'a> {
    label: &'a str,
    server: &'a str,
    agent: Option<(&'a str, Option<&'a str>)>,
}

impl Target<'_> {
    fn dnsperf(&self, world: &World, args: &[&str]) -> String {
        let mut argv = vec!["dnsperf", "-s", self.server];
        argv.extend_from_slice(args);
        let out = world.pod_exec(1, self.agent, &argv);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "dnsperf failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}
