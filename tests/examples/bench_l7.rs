//! `cargo xtask bench-l7`: the L7 enforcer's throughput and latency against a direct call and
//! against an nginx TLS-terminating, re-originating proxy, all measured in the same run and
//! printed as a Markdown report (ratios included).
//!
//! The upstream is nginx in the inet namespace (`api.bench.test`, certificate from the world's
//! test CA, one worker per core, keep-alive) answering every request with `{"ok":true}`. Every
//! client runs in pod 1 and takes one of three paths to it:
//!
//! 1. direct: a plain process, TLS straight to the upstream;
//! 2. nginx proxy: a plain process, TLS to nginx on the node (pod 1's gateway address, same
//!    certificate, `proxy_ssl_verify on` against the test CA, upstream keep-alive 32,
//!    `worker_processes auto`), which re-originates TLS to the upstream;
//! 3. Aegis: an agent workload (`aegis-agent exec`) whose policy marks `api.bench.test`
//!    `inspect: true`; the kernel redirects its connections to the enforcer, which terminates
//!    TLS with the node CA, decides by policy and re-originates TLS to the upstream.
//!
//! Two requests: `GET /bench` (an allowed read) and `POST /v1/chat/completions` with a small
//! JSON body that passes a parameter constraint (enum, range) and is sanitized by DLP (it holds
//! an e-mail address, which the enforcer redacts; nginx and direct forward it unchanged).
//!
//! Saturation: `wrk -t2 -c32 --latency` (HTTP/1.1 keep-alive), the same with
//! `Connection: close` (a new connection and TLS handshake per request) and
//! `h2load -t2 -c32 -m10` (HTTP/2); percentiles from wrk's own distribution and from h2load's per-request log. Fixed
//! rate: `h2load --rps` (10 connections × 100 requests/s = 1,000 requests/s), over HTTP/1.1
//! (`--h1`) and HTTP/2, percentiles from the per-request log; the three paths alternate for
//! `AEGIS_BENCH_ROUNDS` rounds (3) and each row gives medians, the added p99 paired with the
//! same round's direct run (one run each was too noisy on a two-core VM). CPU: user+system time
//! of the enforcer (the agent process) and of the nginx proxy's processes during each run. Before each
//! measured run the agent must be idle (its log and audit backlog written), so runs do not
//! bleed into each other.
//!
//! Budgets and rate limits: the same enforcer with them off (identity `bench`) and on
//! (`bench-limited`: every GET charged 1 micro-USD and rate-limited, limits that never bite),
//! with the embedded store, then again after restarting the agent on Redis (`redis-server` in
//! the node namespace); off and on alternate `AEGIS_BENCH_ROUNDS` times (3), medians reported.
//!
//! Decision alone: `aegis-agent policy bench` over the shipped example policies' test cases
//! (`policies/`), the regorus evaluation without any I/O.
//!
//! Environment: `AEGIS_AGENT_BIN` (agent binary), `AEGIS_BENCH_SECONDS` (length of each run,
//! default 10), `AEGIS_BENCH_ONLY=saturation|fixed|decision|state` (only that section;
//! `per-call`: only the connection-per-request runs),
//! `AEGIS_BENCH_PERF=DIR` (`perf record -g` of the enforcer or of the nginx proxy during each
//! saturation run through it, into `DIR/<tool>-<aegis-agent|nginx>-<path>.data`; build the agent
//! with frame pointers for useful call graphs), `AEGIS_BENCH_SYSCALLS=1` (`perf stat` counts the system calls and context
//! switches of the enforcer or the nginx proxy during each saturation run; printed per request
//! on stderr).
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aegis_tests::report::{field, median, num_cpus, percentile, uname_r};
use aegis_tests::world::{DnsRecord, World, describe, pod_gateway_v4, workspace_root};

const UPSTREAM: &str = "api.bench.test";
const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const AGENT: Option<(&str, Option<&str>)> = Some(("bench", None));
const FIXED_CLIENTS: u32 = 10;
const FIXED_RPS_PER_CLIENT: u32 = 100;
/// Decisions per test case in `aegis-agent policy bench`.
const DECISIONS: u32 = 1000;

const POLICY: &str = r#"
agent: bench
version: 1
egress:
  - fqdn: api.bench.test
    ports: [443]
    inspect: true
tools:
  - name: bench-api
    host: api.bench.test
    actions:
      - name: read
        method: GET
        path: /bench
      - name: chat
        method: POST
        path: /v1/chat/completions
        decision: sanitize
        sanitize: [email, phone, ssn, card, api_key]
        params:
          model: { required: true, enum: [gpt-4o-mini] }
          max_tokens: { min: 1, max: 4096 }
"#;

/// The bench policy for `bench-limited`: the same tools, every GET priced at 1 micro-USD against
/// a budget that never runs out, and a rate limit that never bites, so the runs measure the
/// cost of keeping the state, not of refusing.
fn limited_policy() -> String {
    let p = POLICY
        .replacen("agent: bench\n", "agent: bench-limited\nbudget: { daily_usd: 1000000, monthly_usd: 1000000 }\nrate_limit: { requests_per_second: 1000000, burst: 1000000 }\n", 1)
        .replacen("        path: /bench\n", "        path: /bench\n        price_usd: 0.000001\n", 1);
    assert!(p.contains("price_usd") && p.contains("agent: bench-limited"));
    p
}

const LIMITED: Option<(&str, Option<&str>)> = Some(("bench-limited", None));
/// Port of the benchmark's Redis (node namespace, loopback).
const REDIS_PORT: u16 = 16379;

const POST_BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":256,"messages":[{"role":"user","content":"Summarise ticket 4711 from jane@example.com: the invoice total looks wrong"}]}"#;

fn main() {
    let seconds: u32 = std::env::var("AEGIS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut world = World::builder()
        .pods(1)
        .min_ttl(300)
        .record(DnsRecord::new(UPSTREAM, Some(UPSTREAM_V4), None, 300))
        .policy("bench.yaml", POLICY)
        .policy("bench-limited.yaml", &limited_policy())
        .build();
    // `AEGIS_BENCH_ONLY=state|saturation|fixed`: only that section.
    let only = std::env::var("AEGIS_BENCH_ONLY").unwrap_or_default();
    let section = |name: &str| only.is_empty() || only == name;
    let dir = world.dir().to_path_buf();
    let (cert, key) = world.server_cert(UPSTREAM);
    let proxy_v4 = pod_gateway_v4(1);
    ok(&world.inet_exec(&[
        "ip",
        "addr",
        "add",
        &format!("{UPSTREAM_V4}/32"),
        "dev",
        "lo",
    ]));

    // === nginx: upstream (inet) and proxy (node) ===
    let upstream_conf = nginx_conf(
        &dir,
        "upstream",
        &format!(
            "server {{\n  listen {UPSTREAM_V4}:443 ssl http2;\n  {tls}\n  location / {{\n    default_type application/json;\n    return 200 '{{\"ok\":true}}';\n  }}\n}}\n",
            tls = tls_directives(&cert, &key),
        ),
    );
    let proxy_conf = nginx_conf(
        &dir,
        "proxy",
        &format!(
            "upstream bench_upstream {{\n  server {UPSTREAM_V4}:443;\n  keepalive 32;\n  keepalive_requests 1000000;\n}}\n\
             server {{\n  listen {proxy_v4}:443 ssl http2;\n  {tls}\n  location / {{\n    proxy_pass https://bench_upstream;\n    proxy_http_version 1.1;\n    proxy_set_header Connection \"\";\n    proxy_set_header Host {UPSTREAM};\n    proxy_ssl_server_name on;\n    proxy_ssl_name {UPSTREAM};\n    proxy_ssl_verify on;\n    proxy_ssl_trusted_certificate {ca};\n    proxy_ssl_session_reuse on;\n  }}\n}}\n",
            tls = tls_directives(&cert, &key),
            ca = world.test_ca().display(),
        ),
    );
    let (inet, node) = (world.inet_ns(), world.node_ns());
    for (ns, name, conf) in [
        (&inet, "nginx-upstream", &upstream_conf),
        (&node, "nginx-proxy", &proxy_conf),
    ] {
        let conf = conf.to_string_lossy().into_owned();
        let prefix = dir.to_string_lossy().into_owned();
        world.spawn_service(
            ns,
            name,
            &[
                "nginx",
                "-p",
                &prefix,
                "-c",
                &conf,
                "-e",
                "stderr",
                "-g",
                "daemon off;",
            ],
        );
    }
    world.start_agent();

    // Every path answers before anything is measured (and the proxy verifies the upstream).
    let test_ca = world.test_ca().to_string_lossy().into_owned();
    let node_ca = world.node_ca().to_string_lossy().into_owned();
    let url = format!("https://{UPSTREAM}/bench");
    let resolve = format!("{UPSTREAM}:443:{proxy_v4}");
    let ready = |agent, ca: &str, extra: &[&str]| {
        aegis_tests::world::wait_until(std::time::Duration::from_secs(10), || {
            let mut argv = vec!["curl", "-sS", "-m", "2", "--cacert", ca];
            argv.extend_from_slice(extra);
            argv.push(&url);
            let out = world.pod_exec(1, agent, &argv);
            out.status.success() && String::from_utf8_lossy(&out.stdout) == r#"{"ok":true}"#
        })
    };
    assert!(
        ready(None, &test_ca, &[]),
        "upstream nginx not answering\n{}",
        logs(&dir)
    );
    assert!(
        ready(None, &test_ca, &["--resolve", &resolve]),
        "nginx proxy not answering\n{}",
        logs(&dir)
    );
    assert!(
        ready(AGENT, &node_ca, &[]),
        "enforcer not answering\n{}",
        world.diagnostics()
    );

    let body = dir.join("body.json");
    fs::write(&body, POST_BODY).expect("write body.json");
    let lua = dir.join("post.lua");
    fs::write(
        &lua,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{POST_BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .expect("write post.lua");

    println!("# Aegis L7 benchmark\n");
    println!(
        "machine: {} cores, kernel {}; {}",
        num_cpus(),
        uname_r(),
        first_line("nginx", &["-v"])
    );
    println!("agent: {}", world.agent_bin().display());
    println!(
        "client, upstream, proxy and enforcer share the machine's cores; {seconds} s per run, one run each\n"
    );

    let proxy_host = proxy_v4.to_string();
    let paths = [
        Route {
            label: "direct to the upstream",
            agent: None,
            host: UPSTREAM,
            cpu: None,
        },
        Route {
            label: "nginx TLS proxy on the node",
            agent: None,
            host: &proxy_host,
            cpu: Some((node.as_str(), "nginx")),
        },
        Route {
            label: "Aegis enforcer (agent workload, redirected in-kernel)",
            agent: AGENT,
            host: UPSTREAM,
            cpu: Some((node.as_str(), "aegis-agent")),
        },
    ];
    let requests = [
        Req {
            label: "GET /bench",
            path: "/bench",
            post: false,
        },
        Req {
            label: "POST /v1/chat/completions (constraint + DLP sanitize)",
            path: "/v1/chat/completions",
            post: true,
        },
    ];
    let bench = Bench {
        world: &world,
        dir: &dir,
        seconds,
        body: body.to_string_lossy().into_owned(),
        lua: lua.to_string_lossy().into_owned(),
    };
    // Warm-up (discarded): DNS learned, connections, caches.
    for p in &paths {
        for r in &requests {
            bench.h2load(p, r, &["-c", "4", "-m", "1", "-D", "2"], "warmup");
        }
    }

    // `AEGIS_BENCH_ONLY=per-call`: only the connection-per-request runs of the saturation
    // section.
    let tools: &[Tool] = if only == "per-call" {
        &[Tool::WrkClose]
    } else {
        &[Tool::Wrk, Tool::WrkClose, Tool::H2load]
    };
    if section("saturation") || only == "per-call" {
        // === saturation ===
        for &tool in tools {
            println!("## {}\n", tool.title(seconds));
            println!(
                "| path | request | requests/s | p50 ms | p99 ms | errors | CPU µs/request (proxy) | ratio to direct |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            let mut ratios = Vec::new();
            for r in &requests {
                let rows: Vec<Run> = paths.iter().map(|p| bench.saturate(tool, p, r)).collect();
                for (p, run) in paths.iter().zip(&rows) {
                    println!(
                        "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {:.2} |",
                        p.label,
                        r.label,
                        run.rps,
                        run.p50_us / 1000.0,
                        run.p99_us / 1000.0,
                        run.errors,
                        run.cpu_us_per_req
                            .map_or_else(|| "–".to_owned(), |c| format!("{c:.0}")),
                        run.rps / rows[0].rps.max(1.0)
                    );
                }
                ratios.push((
                    r.label,
                    rows[2].rps / rows[1].rps.max(1.0),
                    rows[2].rps / rows[0].rps.max(1.0),
                ));
            }
            println!();
            for (label, vs_proxy, vs_direct) in ratios {
                println!(
                    "**{label}: enforcer/nginx-proxy {vs_proxy:.2}, enforcer/direct {vs_direct:.2}**  "
                );
            }
            println!();
        }
    }
    if section("fixed") {
        // === fixed rate ===
        // One 8-second run per path proved too noisy on a shared two-core VM (a path's added p99
        // moved by ±0.3 ms between identical runs): the paths alternate for `rounds` rounds and
        // each row gives the medians, the added p99 paired with the same round's direct run.
        let rate = FIXED_CLIENTS * FIXED_RPS_PER_CLIENT;
        let rounds = bench_rounds();
        for (proto, extra) in [("HTTP/1.1", &["--h1"][..]), ("HTTP/2", &[][..])] {
            let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            args.extend([
                "-c".into(),
                FIXED_CLIENTS.to_string(),
                "-m".into(),
                "1".into(),
                format!("--rps={FIXED_RPS_PER_CLIENT}"),
                "-D".into(),
                seconds.to_string(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            println!(
                "## {proto} at a fixed rate: {rate} requests/s ({FIXED_CLIENTS} connections × {FIXED_RPS_PER_CLIENT}/s, h2load --rps), {rounds} alternating rounds of {seconds} s\n"
            );
            println!(
                "| path | request | requests/s | p50 ms | p99 ms | errors | added p99 over direct ms, median (per round) | inside the enforcer p50 / p99 ms |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for r in &requests {
                // Per path: every round's run, and the enforcer's own latency of every request.
                let mut runs: Vec<Vec<Run>> = paths.iter().map(|_| Vec::new()).collect();
                let mut inside: Vec<Vec<f64>> = paths.iter().map(|_| Vec::new()).collect();
                for _ in 0..rounds {
                    for (i, p) in paths.iter().enumerate() {
                        bench.settle();
                        let before = world.audit_records().len();
                        runs[i].push(bench.h2load(p, r, &args, "fixed"));
                        // The enforcer's own measure of each request (head in → response head
                        // out, upstream included), from its audit records: what the workload
                        // waits beyond it is the network path and TLS.
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        inside[i].extend(
                            world.audit_records()[before..]
                                .iter()
                                .filter_map(|rec| rec["latency_us"].as_f64()),
                        );
                    }
                }
                for (i, p) in paths.iter().enumerate() {
                    let of = |f: fn(&Run) -> f64| {
                        let mut v: Vec<f64> = runs[i].iter().map(f).collect();
                        median(&mut v)
                    };
                    let mut added: Vec<f64> = runs[i]
                        .iter()
                        .zip(&runs[0])
                        .map(|(run, direct)| (run.p99_us - direct.p99_us) / 1000.0)
                        .collect();
                    let per_round: Vec<String> = added.iter().map(|a| format!("{a:+.2}")).collect();
                    let inside = if inside[i].is_empty() {
                        "–".to_owned()
                    } else {
                        format!(
                            "{:.2} / {:.2}",
                            percentile(&mut inside[i], 0.5) / 1000.0,
                            percentile(&mut inside[i], 0.99) / 1000.0
                        )
                    };
                    println!(
                        "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {:+.2} ({}) | {inside} |",
                        p.label,
                        r.label,
                        of(|run| run.rps),
                        of(|run| run.p50_us) / 1000.0,
                        of(|run| run.p99_us) / 1000.0,
                        runs[i].iter().map(|run| run.errors).sum::<u64>(),
                        median(&mut added),
                        per_round.join(", ")
                    );
                }
            }
            println!();
        }
    }
    if section("decision") {
        // === decision ===
        println!(
            "## Policy decision alone (regorus): aegis-agent policy bench policies/ --iterations {DECISIONS}\n"
        );
        let out = std::process::Command::new(world.agent_bin())
            .args(["policy", "bench"])
            .arg(workspace_root().join("policies"))
            .args(["--iterations", &DECISIONS.to_string()])
            .output()
            .expect("run aegis-agent policy bench");
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(summary) if out.status.success() => println!("{summary}\n"),
            _ => println!("`aegis-agent policy bench` failed: {}\n", describe(&out)),
        }
    }

    // === budgets and rate limits ===
    let (body, lua) = (
        body.to_string_lossy().into_owned(),
        lua.to_string_lossy().into_owned(),
    );
    if section("state") {
        state_section(&mut world, &dir, seconds, (&body, &lua), &node);
    }

    // === health ===
    let audit = world.audit_records().len();
    let agent_up = world.agent_running();
    let panics = world
        .agent_log()
        .lines()
        .filter(|l| l.contains("panicked"))
        .count();
    println!(
        "agent still running: {agent_up}; panics in its log: {panics}; audit records written: {audit}"
    );
    if !agent_up || panics > 0 {
        println!("\n```\n{}\n```", world.diagnostics());
    }
}

/// `AEGIS_BENCH_ROUNDS`: how many times the fixed-rate and the budget runs alternate (3).
fn bench_rounds() -> usize {
    std::env::var("AEGIS_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(3)
}

/// Enforcer throughput with budgets and rate limits on (embedded store, then Redis) against the
/// same enforcer process with them off (identity `bench`), in one run: `bench-limited`'s every
/// request is rate-limited and charged (one redb transaction, or two Redis scripts).
fn state_section(world: &mut World, dir: &Path, seconds: u32, files: (&str, &str), node: &str) {
    println!(
        "## Budgets and rate limits on vs off (GET /bench; \"on\": every request rate-limited and charged)\n"
    );
    let rounds = bench_rounds();
    println!(
        "{rounds} alternating runs of each; medians (requests/s of every run in parentheses)\n"
    );
    println!(
        "| state backend | tool | identity | requests/s | p50 ms | p99 ms | errors | CPU µs/request | on/off (medians) | on/off (paired) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let req = Req {
        label: "GET /bench",
        path: "/bench",
        post: false,
    };
    let routes = [
        Route {
            label: "off (bench)",
            agent: AGENT,
            host: UPSTREAM,
            cpu: Some((node, "aegis-agent")),
        },
        Route {
            label: "on (bench-limited)",
            agent: LIMITED,
            host: UPSTREAM,
            cpu: Some((node, "aegis-agent")),
        },
    ];
    let node_ca = world.node_ca().to_string_lossy().into_owned();
    let url = format!("https://{UPSTREAM}/bench");
    for backend in ["embedded", "redis"] {
        if backend == "redis" {
            world.start_redis(REDIS_PORT);
            world.kill_agent();
            world.add_agent_args(&[
                "--state-backend=redis".to_owned(),
                format!("--redis-url=redis://127.0.0.1:{REDIS_PORT}/0"),
            ]);
            world.start_agent();
        }
        for agent in [AGENT, LIMITED] {
            let up = aegis_tests::world::wait_until(std::time::Duration::from_secs(10), || {
                let out = world.pod_exec(
                    1,
                    agent,
                    &["curl", "-sS", "-m", "2", "--cacert", &node_ca, &url],
                );
                out.status.success() && String::from_utf8_lossy(&out.stdout) == r#"{"ok":true}"#
            });
            assert!(
                up,
                "{agent:?} not answering with {backend} state\n{}",
                world.diagnostics()
            );
        }
        let bench = Bench {
            world,
            dir,
            seconds,
            body: files.0.to_owned(),
            lua: files.1.to_owned(),
        };
        for route in &routes {
            bench.h2load(route, &req, &["-c", "4", "-m", "1", "-D", "2"], "warmup");
        }
        for tool in [Tool::Wrk, Tool::H2load] {
            // Off and on alternate, `rounds` times each: the machine's noise hits both alike;
            // medians are reported.
            let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..rounds {
                for (i, route) in routes.iter().enumerate() {
                    runs[i].push(bench.saturate(tool, route, &req));
                }
            }
            let median = |runs: &[Run], f: &dyn Fn(&Run) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(f).collect();
                percentile(&mut v, 0.5)
            };
            let name = match tool {
                Tool::Wrk => "wrk HTTP/1.1",
                Tool::WrkClose => "wrk HTTP/1.1, Connection: close",
                Tool::H2load => "h2load HTTP/2",
            };
            let off_rps = median(&runs[0], &|r| r.rps);
            // Each "on" run against the "off" run just before it: the VM's throughput drifts
            // over minutes, which moves the medians apart; adjacent runs share the drift.
            let mut paired: Vec<f64> = runs[0]
                .iter()
                .zip(&runs[1])
                .map(|(off, on)| on.rps / off.rps.max(1.0))
                .collect();
            let paired = percentile(&mut paired, 0.5);
            for (i, (route, runs)) in routes.iter().zip(&runs).enumerate() {
                let rps = median(runs, &|r| r.rps);
                let all: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.rps)).collect();
                println!(
                    "| {backend} | {name} | {} | {rps:.0} ({}) | {:.2} | {:.2} | {} | {:.0} | {:.2} | {:.2} |",
                    route.label,
                    all.join(", "),
                    median(runs, &|r| r.p50_us) / 1000.0,
                    median(runs, &|r| r.p99_us) / 1000.0,
                    runs.iter().map(|r| r.errors).sum::<u64>(),
                    median(runs, &|r| r.cpu_us_per_req.unwrap_or(f64::NAN)),
                    rps / off_rps.max(1.0),
                    if i == 0 { 1.0 } else { paired }
                );
            }
        }
    }
    println!();
}

/// One way from the pod to the upstream.
struct Route<'a> {
    label: &'a str,
    agent: Option<(&'a str, Option<&'a str>)>,
    /// Host the client connects to (the URL's host; the Host/`:authority` is always the upstream's).
    host: &'a str,
    /// Processes whose CPU time is charged to the path: (namespace, comm).
    cpu: Option<(&'a str, &'a str)>,
}

struct Req<'a> {
    label: &'a str,
    path: &'a str,
    post: bool,
}

#[derive(Clone, Copy)]
enum Tool {
    Wrk,
    /// wrk sending `Connection: close`: a new connection (and TLS handshake) per request, as a
    /// workload that connects per call (curl, `urllib` without a session).
    WrkClose,
    H2load,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Self::Wrk => "wrk",
            Self::WrkClose => "wrk-close",
            Self::H2load => "h2load",
        }
    }

    fn title(self, seconds: u32) -> String {
        match self {
            Self::Wrk => {
                format!("HTTP/1.1 keep-alive at saturation: wrk -t2 -c32 -d{seconds}s --latency")
            }
            Self::WrkClose => format!(
                "HTTP/1.1, a connection per request, at saturation: wrk -t2 -c32 -d{seconds}s --latency -H 'Connection: close'"
            ),
            Self::H2load => format!(
                "HTTP/2 at saturation: h2load -t2 -c32 -m10 -D {seconds} (percentiles from --log-file)"
            ),
        }
    }
}

/// What one run measured.
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    cpu_us_per_req: Option<f64>,
}

struct Bench<'a> {
    world: &'a World,
    dir: &'a Path,
    seconds: u32,
    body: String,
    lua: String,
}

impl Bench<'_> {
    /// Waits (up to 60 s) until the agent is idle — under 5 % of a core over half a second —
    /// so a run does not pay for the previous one's backlog (log lines and audit records still
    /// being written after a saturation run).
    fn settle(&self) {
        let node = self.world.node_ns();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let c0 = ns_cpu_seconds(&node, "aegis-agent");
            std::thread::sleep(std::time::Duration::from_millis(500));
            if ns_cpu_seconds(&node, "aegis-agent") - c0 < 0.025 {
                return;
            }
        }
        eprintln!("bench: the agent did not settle within 60 s");
    }

    /// `AEGIS_BENCH_PERF=DIR`: samples the proxy's processes (`comm` in network namespace `ns`:
    /// the agent, or the nginx proxy's workers) with `perf record` (call graphs) while the run
    /// lasts, into `DIR/NAME.data`; the recorder stops when the guard drops.
    fn profile(&self, (ns, comm): (&str, &str), name: &str) -> Option<Perf> {
        let dir = std::env::var_os("AEGIS_BENCH_PERF")?;
        let pids = ns_pids(ns, comm).join(",");
        fs::create_dir_all(&dir).expect("create AEGIS_BENCH_PERF directory");
        let out = Path::new(&dir).join(format!("{name}.data"));
        let run = perf(&["record", "-q", "-F", "1999", "-g", "-p", &pids], &out)?;
        eprintln!("bench: profiling {comm} into {}", out.display());
        Some(run)
    }

    fn saturate(&self, tool: Tool, p: &Route, r: &Req) -> Run {
        self.settle();
        let cpu0 = p.cpu.map(|(ns, comm)| ns_cpu_seconds(ns, comm));
        let counter = p.cpu.and_then(|(ns, comm)| count_syscalls(ns, comm));
        let _perf = p.cpu.and_then(|cpu| {
            let name = format!("{}-{}-{}", tool.name(), cpu.1, r.path.replace('/', "_"));
            self.profile(cpu, &name)
        });
        let mut run = match tool {
            Tool::Wrk => self.wrk(p, r, false),
            Tool::WrkClose => self.wrk(p, r, true),
            Tool::H2load => self.h2load(
                p,
                r,
                &[
                    "-t",
                    "2",
                    "-c",
                    "32",
                    "-m",
                    "10",
                    "-D",
                    &self.seconds.to_string(),
                ],
                "sat",
            ),
        };
        if let (Some(c0), Some((ns, comm))) = (cpu0, p.cpu) {
            let used = ns_cpu_seconds(ns, comm) - c0;
            let requests = run.rps * f64::from(self.seconds);
            run.cpu_us_per_req = Some(used * 1e6 / requests.max(1.0));
            if let Some((syscalls, switches)) = counter.and_then(SyscallCounter::finish) {
                eprintln!(
                    "bench: {} {} {}: {:.1} system calls, {:.2} context switches per request ({comm})",
                    tool.name(),
                    p.label,
                    r.label,
                    syscalls / requests.max(1.0),
                    switches / requests.max(1.0),
                );
            }
        }
        run
    }

    /// `wrk` through `p`; `close`: a new connection per request (`Connection: close`).
    fn wrk(&self, p: &Route, r: &Req, close: bool) -> Run {
        let url = format!("https://{}{}", p.host, r.path);
        let host = format!("Host: {UPSTREAM}");
        let duration = format!("{}s", self.seconds);
        let mut argv = vec![
            "wrk",
            "-t2",
            "-c32",
            "-d",
            &duration,
            "--latency",
            "-H",
            &host,
        ];
        if close {
            argv.extend(["-H", "Connection: close"]);
        }
        if r.post {
            argv.extend(["-s", &self.lua]);
        }
        argv.push(&url);
        let out = self.world.pod_exec(1, p.agent, &argv);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "wrk failed: {}", describe(&out));
        let pct = |key: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .and_then(|v| duration_us(v.trim()))
                .unwrap_or(f64::NAN)
        };
        let errors = field_u64(&text, "Non-2xx or 3xx responses:")
            + text
                .lines()
                .find_map(|l| l.trim().strip_prefix("Socket errors:"))
                .map_or(0, |s| {
                    s.split(',')
                        .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                        .sum()
                });
        Run {
            rps: field(&text, "Requests/sec:")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0),
            p50_us: pct("50%"),
            p99_us: pct("99%"),
            errors,
            cpu_us_per_req: None,
        }
    }

    /// `h2load` with `args`; requests/s from its summary, percentiles from its per-request log.
    fn h2load(&self, p: &Route, r: &Req, args: &[&str], tag: &str) -> Run {
        let log = self.dir.join(format!("h2load-{tag}.log"));
        let _ = fs::remove_file(&log);
        let url = format!("https://{UPSTREAM}{}", r.path);
        let connect_to = format!("--connect-to={}:443", p.host);
        let log_arg = format!("--log-file={}", log.display());
        let mut argv: Vec<&str> = vec!["h2load", &log_arg];
        if p.host != UPSTREAM {
            argv.push(&connect_to);
        }
        if r.post {
            argv.extend(["-d", &self.body, "-H", "content-type: application/json"]);
        }
        argv.extend_from_slice(args);
        argv.push(&url);
        let out = self.world.pod_exec(1, p.agent, &argv);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "h2load failed: {}", describe(&out));
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|s| s.strip_suffix(" req/s"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        let requests = text
            .lines()
            .find_map(|l| l.strip_prefix("requests: "))
            .unwrap_or_default();
        let count = |what: &str| -> u64 {
            requests
                .split(", ")
                .find_map(|kv| kv.strip_suffix(what)?.trim().parse().ok())
                .unwrap_or(0)
        };
        let non_2xx: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("status codes: "))
            .map_or(0, |s| {
                s.split(", ")
                    .filter(|kv| !kv.ends_with("2xx"))
                    .filter_map(|kv| kv.split_whitespace().next()?.parse::<u64>().ok())
                    .sum()
            });
        let mut lat: Vec<f64> = fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
            .collect();
        Run {
            rps,
            p50_us: percentile(&mut lat, 0.50),
            p99_us: percentile(&mut lat, 0.99),
            errors: count(" failed") + count(" errored") + count(" timeout") + non_2xx,
            cpu_us_per_req: None,
        }
    }
}

/// Writes `<dir>/nginx-<name>.conf`: one worker per core, keep-alive, no access log, temp
/// paths and pid file in `dir`, with `server` (and upstream) blocks inside `http`.
fn nginx_conf(dir: &Path, name: &str, servers: &str) -> PathBuf {
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;\nuser root;\npid {d}/nginx-{name}.pid;\nerror_log stderr warn;\n\
         events {{\n  worker_connections 4096;\n}}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 120s;\n\
         client_body_temp_path {d}/nginx-{name}-body;\n  proxy_temp_path {d}/nginx-{name}-proxy;\n\
         fastcgi_temp_path {d}/nginx-{name}-fastcgi;\n  uwsgi_temp_path {d}/nginx-{name}-uwsgi;\n\
         scgi_temp_path {d}/nginx-{name}-scgi;\n{servers}}}\n"
    );
    let path = dir.join(format!("nginx-{name}.conf"));
    fs::write(&path, conf).expect("write nginx config");
    path
}

fn tls_directives(cert: &Path, key: &Path) -> String {
    format!(
        "ssl_certificate {};\n  ssl_certificate_key {};\n  ssl_session_cache shared:SSL:1m;",
        cert.display(),
        key.display()
    )
}

fn logs(dir: &Path) -> String {
    ["nginx-upstream.log", "nginx-proxy.log"]
        .map(|f| {
            format!(
                "{f}:\n{}",
                fs::read_to_string(dir.join(f)).unwrap_or_default()
            )
        })
        .join("\n")
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", describe(out));
}

/// A running `perf`; dropping it stops it (SIGINT, so perf writes its file).
struct Perf(std::process::Child);

/// Starts `perf ARGS -o OUT`; `None` (and a line on stderr) when it cannot start.
fn perf(args: &[&str], out: &Path) -> Option<Perf> {
    let child = std::process::Command::new("perf")
        .args(args)
        .arg("-o")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("bench: perf {}: {e}", args[0]))
        .ok()?;
    Some(Perf(child))
}

impl Drop for Perf {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// `AEGIS_BENCH_SYSCALLS=1`: a running `perf stat` counting the system calls and context
/// switches of the processes named `comm` in network namespace `ns`.
struct SyscallCounter {
    run: Perf,
    out: PathBuf,
}

fn count_syscalls(ns: &str, comm: &str) -> Option<SyscallCounter> {
    std::env::var_os("AEGIS_BENCH_SYSCALLS")?;
    let pids = ns_pids(ns, comm).join(",");
    let out = std::env::temp_dir().join(format!("aegis-bench-syscalls-{}", std::process::id()));
    let events = "raw_syscalls:sys_enter,context-switches";
    let run = perf(&["stat", "-x", ",", "-e", events, "-p", &pids], &out)?;
    Some(SyscallCounter { run, out })
}

impl SyscallCounter {
    /// Stops counting: (system calls, context switches).
    fn finish(self) -> Option<(f64, f64)> {
        drop(self.run);
        let text = fs::read_to_string(&self.out).ok()?;
        let _ = fs::remove_file(&self.out);
        let count = |event: &str| {
            text.lines()
                .find(|l| l.contains(event))?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        };
        Some((count("raw_syscalls:sys_enter")?, count("context-switches")?))
    }
}

/// The pids of the processes named `comm` in network namespace `ns`.
fn ns_pids(ns: &str, comm: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(str::to_owned)
        .collect()
}

/// User + system CPU seconds of the processes named `comm` in network namespace `ns`.
fn ns_cpu_seconds(ns: &str, comm: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ns_pids(ns, comm)
        .iter()
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After comm: state is field 3; utime and stime are fields 14 and 15.
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / tck
}

/// wrk's durations: `812.00us`, `1.23ms`, `1.02s`, `2.00m`.
fn duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

fn field_u64(out: &str, key: &str) -> u64 {
    field(out, key).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
            t.push_str(&String::from_utf8_lossy(&o.stderr));
            t.lines().next().unwrap_or_default().trim().to_owned()
        })
        .unwrap_or_default()
}
