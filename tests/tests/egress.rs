//! Egress enforcement end to end: the real agent in a [`World`], unmodified clients (curl,
//! python's socket module and getaddrinfo) going through the real kernel path.
//!
//! Every test builds its own world from [`std_world`] (the same names and servers everywhere),
//! writes the policies it needs, starts the agent and asserts outcomes a user would see: exit
//! codes, `EPERM`, response bodies, and the agent's JSON events.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Output};
use std::sync::mpsc;
use std::time::Duration;

use aegis_tests::world::{
    Cname, DnsRecord, HttpServer, World, WorldBuilder, describe, wait_until, workspace_root,
};
use serde_json::Value;

/// The identity most tests run workloads as.
const WEB: Option<(&str, Option<&str>)> = Some(("web-agent", Some("acme")));
/// A second identity, with a policy that does not list `allowed.test`.
const OTHER: Option<(&str, Option<&str>)> = Some(("other-agent", Some("acme")));
/// How long to wait for an event to reach the log.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, last)
}

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xae61, 1, 0, 0, 0, 0, last)
}

/// The names and servers every test shares (TTL 30 s unless said otherwise):
///
/// | name | address (v4 / v6) | server, ports |
/// |---|---|---|
/// | allowed.test | .10 / ::10 | "allowed", 80 and 8080 |
/// | evil.test | .20 / ::20 | "evil", 80 |
/// | wild.test, a.wild.test, x.y.wild.test | .30, .31, .32 | "wild", "a-wild", "x-y-wild" |
/// | www.chain.test → CNAME edge.cdn.test | .40 / ::40 | "edge" |
/// | ttl.test (TTL 2 s) | .50 / ::50 | "ttl" |
/// | (no name) | .60 | "cidr"; UDP echo at 198.18.1.61:9999 |
/// | long.test (TTL 300 s) | .70 / ::70 | "long" |
/// | hot.test | .80 / ::80 | "hot" |
fn std_world(customize: impl FnOnce(WorldBuilder) -> WorldBuilder) -> World {
    let mut b = World::builder().pods(2);
    let named: &[(&str, &str, u8, u32, &[u16])] = &[
        ("allowed.test", "allowed", 10, 30, &[80, 8080]),
        ("evil.test", "evil", 20, 30, &[80]),
        ("wild.test", "wild", 30, 30, &[80]),
        ("a.wild.test", "a-wild", 31, 30, &[80]),
        ("x.y.wild.test", "x-y-wild", 32, 30, &[80]),
        ("edge.cdn.test", "edge", 40, 30, &[80]),
        ("ttl.test", "ttl", 50, 2, &[80]),
        ("long.test", "long", 70, 300, &[80]),
        ("hot.test", "hot", 80, 30, &[80]),
    ];
    for &(name, server, last, ttl, ports) in named {
        let (a, aaaa) = (v4(last), v6(last as u16));
        b = b
            .record(DnsRecord::new(name, Some(a), Some(aaaa), ttl))
            .http_server(HttpServer::new(server, Some(a), Some(aaaa), ports));
    }
    b = b
        .cname(Cname::new("www.chain.test", "edge.cdn.test", 30))
        .http_server(HttpServer::new("cidr", Some(v4(60)), None, &[80]))
        .udp_echo(SocketAddr::new(v4(61).into(), 9999));
    customize(b).build()
}

/// A policy file for `agent@tenant` with the given `egress:` list items (YAML lines, each
/// starting with "- ") and optional extra top-level YAML.
fn policy(agent: &str, tenant: &str, egress: &[&str], extra: &str) -> String {
    let mut y = format!("agent: {agent}\ntenant: {tenant}\nversion: 1\nmode: enforce\negress:\n");
    if egress.is_empty() {
        y = y.replace("egress:\n", "egress: []\n");
    }
    for e in egress {
        y.push_str(&format!("  {e}\n"));
    }
    y.push_str(extra);
    y
}

// === clients ===

/// A python client: each op prints one JSON line `{"op":..,"ok":bool,..}`; failures carry
/// `error` (exception class), `errno` and `msg`. Ops:
/// `resolve NAME [4|6]` (getaddrinfo; remembers the first address of the family asked, v4 by
/// default), `http IP|last PORT` (TCP connect, GET /, `body`), `udp_sendto IP PORT`,
/// `udp_connect IP PORT` (connect + send), `udp_echo IP PORT` (sendto + recvfrom, `data`),
/// `raw` (AF_INET/SOCK_RAW/ICMP socket), `sleep SECS`. `--stdin` reads ops line by line.
const PROBE: &str = r#"
import json, socket, sys, time
last = {}
def do(op):
    f = op.split()
    cmd, a = f[0], f[1:]
    r = {"op": op}
    try:
        if cmd == "resolve":
            fam = {"4": socket.AF_INET, "6": socket.AF_INET6}.get(a[1] if len(a) > 1 else "", socket.AF_UNSPEC)
            addrs = sorted({i[4][0] for i in socket.getaddrinfo(a[0], 80, fam, socket.SOCK_STREAM)})
            v4 = [x for x in addrs if ":" not in x]
            last["addr"] = v4[0] if v4 else addrs[0]
            r.update(ok=True, addrs=addrs)
        elif cmd == "http":
            ip = last["addr"] if a[0] == "last" else a[0]
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(10)
            r["addr"] = ip
            s.connect((ip, int(a[1])))
            s.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            s.close()
            r.update(ok=True, body=data.split(b"\r\n\r\n", 1)[-1].decode())
        elif cmd in ("udp_sendto", "udp_connect", "udp_echo"):
            ip, port = a[0], int(a[1])
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            if cmd == "udp_connect":
                r["stage"] = "connect"
                s.connect((ip, port))
                r["stage"] = "send"
                s.send(b"ping")
            else:
                s.sendto(b"ping-aegis", (ip, port))
            if cmd == "udp_echo":
                data, _ = s.recvfrom(1024)
                r["data"] = data.decode()
            s.close()
            r["ok"] = True
        elif cmd == "raw":
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
            r["ok"] = True
        elif cmd == "sleep":
            time.sleep(float(a[0]))
            r["ok"] = True
        else:
            r.update(ok=False, error="BadOp")
    except Exception as e:
        r.update(ok=False, error=type(e).__name__, errno=getattr(e, "errno", None), msg=str(e))
    print(json.dumps(r), flush=True)
if sys.argv[1:] == ["--stdin"]:
    for line in sys.stdin:
        if line.strip():
            do(line.strip())
else:
    for op in sys.argv[1:]:
        do(op)
"#;

/// Runs PROBE with `ops` in pod `k` as `ident` and returns one result per op.
fn probe(w: &World, k: usize, ident: Option<(&str, Option<&str>)>, ops: &[&str]) -> Vec<Value> {
    let py = w.python().to_string_lossy().into_owned();
    let mut argv = vec![py.as_str(), "-c", PROBE];
    argv.extend_from_slice(ops);
    let out = w.pod_exec(k, ident, &argv);
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        results.len(),
        ops.len(),
        "probe {ops:?} as {ident:?} printed {} results\n{}\n{}",
        results.len(),
        describe(&out),
        w.diagnostics()
    );
    results
}

/// A long-running PROBE (`--stdin`) driven one op at a time, e.g. across agent restarts.
struct Probe {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Probe {
    fn spawn(w: &World, k: usize, ident: Option<(&str, Option<&str>)>) -> Self {
        let py = w.python().to_string_lossy().into_owned();
        let mut child = w.pod_spawn(k, ident, &[py.as_str(), "-c", PROBE, "--stdin"]);
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn op(&mut self, op: &str) -> Value {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{op}").expect("write to probe");
        stdin.flush().expect("flush probe");
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("probe gave no answer to {op:?}: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe printed {line:?}: {e}"))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl with a bounded run time; `-v` so that connect errors show the errno text.
fn curl(w: &World, k: usize, ident: Option<(&str, Option<&str>)>, args: &[&str]) -> Output {
    let mut argv = vec!["curl", "-sS", "-v", "--max-time", "15"];
    argv.extend_from_slice(args);
    w.pod_exec(k, ident, &argv)
}

fn body(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_curl_body(w: &World, out: &Output, expected: &str, what: &str) {
    assert!(
        out.status.success() && body(out) == expected,
        "{what}: expected body {expected:?}\n{}\n{}",
        describe(out),
        w.diagnostics()
    );
}

#[track_caller]
fn assert_curl_no_answer(w: &World, out: &Output, what: &str) {
    assert!(
        out.status.code() == Some(6) && stderr(out).contains("Could not resolve host"),
        "{what}: expected curl exit 6 (Could not resolve host)\n{}\n{}",
        describe(out),
        w.diagnostics()
    );
}

#[track_caller]
fn assert_curl_eperm(w: &World, out: &Output, what: &str) {
    assert!(
        out.status.code() == Some(7) && stderr(out).contains("Operation not permitted"),
        "{what}: expected curl exit 7 with \"Operation not permitted\"\n{}\n{}",
        describe(out),
        w.diagnostics()
    );
}

#[track_caller]
fn assert_ok(w: &World, r: &Value) {
    assert_eq!(r["ok"], true, "expected success: {r}\n{}", w.diagnostics());
}

#[track_caller]
fn assert_eperm(w: &World, r: &Value) {
    assert!(
        r["ok"] == false && r["error"] == "PermissionError" && r["errno"] == 1,
        "expected PermissionError (EPERM): {r}\n{}",
        w.diagnostics()
    );
}

/// getaddrinfo failed (no answer, NXDOMAIN or refused: anything but addresses).
#[track_caller]
fn assert_no_answer(w: &World, r: &Value) {
    assert!(
        r["ok"] == false && r["error"] == "gaierror",
        "expected the name not to resolve: {r}\n{}",
        w.diagnostics()
    );
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Names compare without their trailing dot.
fn same_name(v: &Value, name: &str) -> bool {
    s(v).trim_end_matches('.') == name
}

/// Waits for the `egress_denied` event for (agent, dst, port) and returns it.
fn denied_event(w: &World, agent: &str, dst: &str, port: u16) -> Value {
    w.wait_for_event(
        &format!("egress_denied {agent} -> {dst}:{port}"),
        EVENT_TIMEOUT,
        |e| {
            e["event"] == "egress_denied"
                && e["agent"] == agent
                && e["dst"] == dst
                && e["port"] == port
        },
    )
}

/// Asserts the fields of an event (`expected` as JSON values).
#[track_caller]
fn assert_fields(e: &Value, expected: &[(&str, Value)]) {
    for (k, v) in expected {
        assert_eq!(&e[*k], v, "event field {k:?} in {e}");
    }
}

fn started(customize: impl FnOnce(WorldBuilder) -> WorldBuilder) -> World {
    let mut w = std_world(customize);
    w.start_agent();
    w
}

fn web_policy(egress: &[&str]) -> impl FnOnce(WorldBuilder) -> WorldBuilder {
    let yaml = policy("web-agent", "acme", egress, "");
    move |b| b.policy("web-agent", &yaml)
}

// === tests ===

#[test]
fn allowlisted_domain_reachable_over_ipv4_and_ipv6() {
    let w = started(web_policy(&["- fqdn: allowed.test"]));
    let out = curl(&w, 1, WEB, &["-4", "http://allowed.test/"]);
    assert_curl_body(&w, &out, "hello from allowed\n", "curl -4 allowed.test");
    let out = curl(&w, 1, WEB, &["-6", "http://allowed.test/"]);
    assert_curl_body(&w, &out, "hello from allowed\n", "curl -6 allowed.test");
    // What DNS opened is in the audit trail, once per address: A and AAAA answers.
    for addr in [v4(10).to_string(), v6(10).to_string()] {
        let e = w.wait_for_event(&format!("egress_learned {addr}"), EVENT_TIMEOUT, |e| {
            e["event"] == "egress_learned"
                && same_name(&e["qname"], "allowed.test")
                && e["addrs"]
                    .as_str()
                    .is_some_and(|a| a.contains(&format!("\"{addr}\"")))
        });
        assert_fields(&e, &[("agent", "web-agent".into())]);
    }
}

#[test]
fn unlisted_domain_gets_no_answer_and_direct_ip_is_eperm() {
    let w = started(web_policy(&["- fqdn: allowed.test"]));
    let r = probe(
        &w,
        1,
        WEB,
        &[
            "resolve evil.test",
            "http 198.18.1.20 80",
            "http fd00:ae61:1::20 80",
        ],
    );
    assert_no_answer(&w, &r[0]);
    assert_eperm(&w, &r[1]);
    assert_eperm(&w, &r[2]);
    let out = curl(&w, 1, WEB, &["http://evil.test/"]);
    assert_curl_no_answer(&w, &out, "curl evil.test");
    let out = curl(&w, 1, WEB, &["http://198.18.1.20/"]);
    assert_curl_eperm(&w, &out, "curl 198.18.1.20");

    let e = denied_event(&w, "web-agent", "198.18.1.20", 80);
    assert_fields(
        &e,
        &[
            ("tenant", "acme".into()),
            ("reason", "not_allowed".into()),
            ("verdict", "denied".into()),
            ("hook", "connect4".into()),
            ("protocol", "tcp".into()),
        ],
    );
    // The python probe denied first, so its event is the first for this destination.
    assert_eq!(s(&e["comm"]), "python3", "comm in {e}");
    let e = denied_event(&w, "web-agent", "fd00:ae61:1::20", 80);
    assert_fields(
        &e,
        &[
            ("reason", "not_allowed".into()),
            ("hook", "connect6".into()),
        ],
    );
    w.wait_for_event("egress_denied by curl", EVENT_TIMEOUT, |e| {
        e["event"] == "egress_denied" && e["dst"] == "198.18.1.20" && e["comm"] == "curl"
    });
    let e = w.wait_for_event("dns_denied evil.test", EVENT_TIMEOUT, |e| {
        e["event"] == "dns_denied" && same_name(&e["qname"], "evil.test")
    });
    assert_fields(
        &e,
        &[("agent", "web-agent".into()), ("tenant", "acme".into())],
    );
}

#[test]
fn wildcard_allows_subdomains_not_the_apex() {
    let w = started(web_policy(&["- fqdn: \"*.wild.test\""]));
    let out = curl(&w, 1, WEB, &["http://a.wild.test/"]);
    assert_curl_body(&w, &out, "hello from a-wild\n", "a.wild.test");
    let out = curl(&w, 1, WEB, &["http://x.y.wild.test/"]);
    assert_curl_body(&w, &out, "hello from x-y-wild\n", "x.y.wild.test");
    let out = curl(&w, 1, WEB, &["http://wild.test/"]);
    assert_curl_no_answer(&w, &out, "wild.test (apex)");
    let r = probe(&w, 1, WEB, &["http 198.18.1.30 80"]);
    assert_eperm(&w, &r[0]);
}

#[test]
fn cname_chain_allowed_through_the_alias_only() {
    let w = started(web_policy(&["- fqdn: www.chain.test"]));
    let out = curl(&w, 1, WEB, &["http://www.chain.test/"]);
    assert_curl_body(&w, &out, "hello from edge\n", "www.chain.test via CNAME");
    let out = curl(&w, 1, WEB, &["-6", "http://www.chain.test/"]);
    assert_curl_body(
        &w,
        &out,
        "hello from edge\n",
        "www.chain.test via CNAME, IPv6",
    );
    let r = probe(&w, 1, WEB, &["resolve edge.cdn.test"]);
    assert_no_answer(&w, &r[0]);
    w.wait_for_event("dns_denied edge.cdn.test", EVENT_TIMEOUT, |e| {
        e["event"] == "dns_denied" && same_name(&e["qname"], "edge.cdn.test")
    });
}

#[test]
fn ttl_expiry_closes_the_door() {
    let w = started(web_policy(&["- fqdn: ttl.test"]));
    assert_eq!(w.min_ttl(), 1);
    // Record TTL 2 s; 5 s later the learned address must have expired.
    let r = probe(
        &w,
        1,
        WEB,
        &[
            "resolve ttl.test 4",
            "http last 80",
            "sleep 5",
            "http last 80",
        ],
    );
    assert_ok(&w, &r[0]);
    assert_ok(&w, &r[1]);
    assert_eq!(r[1]["addr"], "198.18.1.50", "{}", r[1]);
    assert_eq!(r[1]["body"], "hello from ttl\n");
    assert_eperm(&w, &r[3]);
    let e = denied_event(&w, "web-agent", "198.18.1.50", 80);
    assert_fields(&e, &[("reason", "ttl_expired".into())]);
}

#[test]
fn one_identitys_lookup_does_not_open_the_door_for_another() {
    let w = started(|b| {
        b.policy(
            "web-agent",
            &policy("web-agent", "acme", &["- fqdn: allowed.test"], ""),
        )
        .policy(
            "other-agent",
            &policy("other-agent", "acme", &["- fqdn: hot.test"], ""),
        )
    });
    let r = probe(&w, 1, WEB, &["resolve allowed.test 4", "http last 80"]);
    assert_ok(&w, &r[0]);
    assert_eq!(r[1]["body"], "hello from allowed\n", "{}", r[1]);
    // Same pod, and another pod: the other identity's direct connect is refused.
    for k in [1, 2] {
        let r = probe(
            &w,
            k,
            OTHER,
            &["http 198.18.1.10 80", "http fd00:ae61:1::10 80"],
        );
        assert_eperm(&w, &r[0]);
        assert_eperm(&w, &r[1]);
    }
    let e = denied_event(&w, "other-agent", "198.18.1.10", 80);
    assert_fields(
        &e,
        &[("reason", "not_allowed".into()), ("tenant", "acme".into())],
    );
    // Same agent name, another tenant: no policy, so nothing is open to it either.
    let r = probe(
        &w,
        1,
        Some(("web-agent", Some("globex"))),
        &["http 198.18.1.10 80"],
    );
    assert_eperm(&w, &r[0]);
    // And the original identity still gets through.
    let r = probe(&w, 2, WEB, &["resolve allowed.test 4", "http last 80"]);
    assert_eq!(r[1]["body"], "hello from allowed\n", "{}", r[1]);
}

#[test]
fn non_agent_processes_are_unaffected() {
    let w = started(web_policy(&["- fqdn: allowed.test"]));
    // Sanity: the agent enforces in this world.
    let r = probe(&w, 1, WEB, &["http 198.18.1.20 80"]);
    assert_eperm(&w, &r[0]);
    // A plain process in the same pod resolves straight from dnsmasq and reaches evil.test.
    let r = probe(&w, 1, None, &["resolve evil.test", "http last 80", "raw"]);
    assert_ok(&w, &r[0]);
    assert_eq!(r[1]["body"], "hello from evil\n", "{}", r[1]);
    assert_ok(&w, &r[2]);
    let out = curl(&w, 1, None, &["http://evil.test/"]);
    assert_curl_body(&w, &out, "hello from evil\n", "non-agent curl evil.test");
    let out = curl(&w, 1, None, &["-6", "http://evil.test/"]);
    assert_curl_body(&w, &out, "hello from evil\n", "non-agent curl -6 evil.test");
    // So does the node itself.
    let out = w.node_exec(&["curl", "-sS", "--max-time", "15", "http://evil.test/"]);
    assert_curl_body(&w, &out, "hello from evil\n", "node curl evil.test");
    assert!(
        !w.events()
            .iter()
            .any(|e| e["event"] == "egress_denied" && e["agent"] != "web-agent"),
        "a non-agent process produced a deny event: {:?}",
        w.events()
    );
}

#[test]
fn udp_to_unlisted_denied_and_cidr_allowed() {
    let w = started(web_policy(&["- cidr: 198.18.1.61/32"]));
    let r = probe(
        &w,
        1,
        WEB,
        &[
            "udp_sendto 198.18.1.99 443",
            "udp_connect 198.18.1.99 443",
            "udp_echo 198.18.1.61 9999",
        ],
    );
    assert_eperm(&w, &r[0]);
    assert_eperm(&w, &r[1]);
    assert_ok(&w, &r[2]);
    assert_eq!(r[2]["data"], "ping-aegis");
    let e = denied_event(&w, "web-agent", "198.18.1.99", 443);
    assert_fields(
        &e,
        &[("protocol", "udp".into()), ("reason", "not_allowed".into())],
    );
    assert!(
        e["hook"] == "sendmsg4" || e["hook"] == "connect4",
        "hook should be sendmsg4 (or connect4 for connected UDP): {e}"
    );
    w.wait_for_event("egress_denied sendmsg4", EVENT_TIMEOUT, |e| {
        e["event"] == "egress_denied" && e["dst"] == "198.18.1.99" && e["hook"] == "sendmsg4"
    });
}

#[test]
fn raw_sockets_denied_unless_policy_allows() {
    let w = started(|b| {
        b.policy(
            "web-agent",
            &policy("web-agent", "acme", &["- fqdn: allowed.test"], ""),
        )
        .policy(
            "raw-agent",
            &policy("raw-agent", "acme", &[], "sockets:\n  raw: allow\n"),
        )
    });
    let r = probe(&w, 1, WEB, &["raw"]);
    assert_eperm(&w, &r[0]);
    let e = w.wait_for_event("egress_denied raw_socket", EVENT_TIMEOUT, |e| {
        e["event"] == "egress_denied" && e["reason"] == "raw_socket"
    });
    assert_fields(
        &e,
        &[
            ("hook", "sock_create".into()),
            ("agent", "web-agent".into()),
        ],
    );
    let r = probe(&w, 1, Some(("raw-agent", Some("acme"))), &["raw"]);
    assert_ok(&w, &r[0]);
}

#[test]
fn fqdn_rule_with_ports_allows_only_those_ports() {
    let w = started(web_policy(&["- fqdn: allowed.test\n    ports: [80]"]));
    let out = curl(&w, 1, WEB, &["http://allowed.test/"]);
    assert_curl_body(&w, &out, "hello from allowed\n", "allowed.test:80");
    let out = curl(&w, 1, WEB, &["http://allowed.test:8080/"]);
    assert_curl_eperm(&w, &out, "allowed.test:8080");
    let e = denied_event(&w, "web-agent", "198.18.1.10", 8080);
    assert_fields(&e, &[("reason", "port_not_allowed".into())]);
    // The server does listen on 8080: a plain process gets through.
    let out = curl(&w, 1, None, &["http://allowed.test:8080/"]);
    assert_curl_body(
        &w,
        &out,
        "hello from allowed\n",
        "non-agent allowed.test:8080",
    );
}

#[test]
fn literal_cidr_allows_without_dns() {
    let w = started(web_policy(&["- cidr: 198.18.1.60/32"]));
    let out = curl(&w, 1, WEB, &["http://198.18.1.60/"]);
    assert_curl_body(&w, &out, "hello from cidr\n", "cidr 198.18.1.60");
    let r = probe(&w, 1, WEB, &["http 198.18.1.20 80"]);
    assert_eperm(&w, &r[0]);
}

#[test]
fn agent_restart_fails_closed_and_recovers() {
    let mut w = started(|b| {
        web_policy(&["- fqdn: long.test", "- fqdn: allowed.test"])(b)
            .resolv_options("timeout:1 attempts:1")
    });
    let mut p = Probe::spawn(&w, 1, WEB);
    let r = p.op("resolve long.test 4");
    assert_ok(&w, &r);
    let r = p.op("http last 80");
    assert_eq!(r["body"], "hello from long\n", "{r}");

    w.kill_agent();
    // Down: the kernel programs stay attached and fail closed.
    assert_eperm(&w, &p.op("http 198.18.1.20 80"));
    assert_no_answer(&w, &p.op("resolve allowed.test"));
    let r = p.op("http 198.18.1.70 80");
    assert_eq!(
        r["body"], "hello from long\n",
        "learned IP (TTL 300) while the agent is down: {r}"
    );

    w.start_agent();
    let r = probe(
        &w,
        1,
        WEB,
        &[
            "resolve allowed.test 4",
            "http last 80",
            "http 198.18.1.20 80",
        ],
    );
    assert_eq!(r[1]["body"], "hello from allowed\n", "{}", r[1]);
    assert_eperm(&w, &r[2]);
    let out = curl(&w, 2, WEB, &["http://evil.test/"]);
    assert_curl_no_answer(&w, &out, "evil.test after restart");
    // The workload that lived through the restart is still confined and served.
    assert_eperm(&w, &p.op("http 198.18.1.20 80"));
    let r = p.op("resolve allowed.test 4");
    assert_ok(&w, &r);
    let r = p.op("http last 80");
    assert_eq!(r["body"], "hello from allowed\n", "{r}");
}

#[test]
fn malformed_policy_is_rejected_and_old_policy_kept() {
    let w = started(web_policy(&["- fqdn: allowed.test"]));
    w.write_policy(
        "zz-broken",
        "agent: broken-agent\nversion: 1\negress:\n  - fqdn: [unclosed\n",
    );
    w.reload_policy();
    let reported = wait_until(Duration::from_secs(20), || {
        names_file_and_line(&w.agent_log(), "zz-broken.yaml")
    });
    assert!(
        reported,
        "agent did not log an error naming zz-broken.yaml:<line>\n{}",
        w.diagnostics()
    );
    let out = curl(&w, 1, WEB, &["http://allowed.test/"]);
    assert_curl_body(
        &w,
        &out,
        "hello from allowed\n",
        "allowed.test after a rejected reload",
    );
    let out = curl(&w, 1, WEB, &["http://evil.test/"]);
    assert_curl_no_answer(&w, &out, "evil.test after a rejected reload");
    let r = probe(&w, 1, WEB, &["http 198.18.1.20 80"]);
    assert_eperm(&w, &r[0]);
    let out = w.agent_cli(&[
        "status",
        "--control-socket",
        &w.control_socket().to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "agent not healthy after a rejected reload: {}",
        describe(&out)
    );
}

/// Whether `log` has `file` followed by `:<digit>`.
fn names_file_and_line(log: &str, file: &str) -> bool {
    log.match_indices(file).any(|(i, _)| {
        let rest = &log[i + file.len()..];
        rest.starts_with(':') && rest[1..].starts_with(|c: char| c.is_ascii_digit())
    })
}

/// A CLI command writing into a pipe nobody reads (`aegis-agent metrics | head` once `head`
/// is gone) ends of SIGPIPE, quietly, instead of panicking on the write.
#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    use std::os::{fd::FromRawFd as _, unix::process::ExitStatusExt as _};
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two descriptors; the read end is closed at once, the write end
    // handed to the child as its stdout (and owned by the Stdio from here).
    let stdout = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        std::process::Stdio::from(std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    };
    let out = std::process::Command::new(aegis_tests::world::agent_bin())
        .arg("metrics")
        .stdout(stdout)
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn policy_check_reports_file_and_line() {
    let bin = aegis_tests::world::agent_bin();
    assert!(
        bin.exists(),
        "{} missing: build aegis-agent first",
        bin.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("good.yaml"),
        policy("good-agent", "acme", &["- fqdn: allowed.test"], ""),
    )
    .unwrap();
    // Line 4: an unknown top-level field.
    std::fs::write(
        dir.path().join("typo.yaml"),
        "agent: typo-agent\nversion: 1\nmode: enforce\negres:\n  - fqdn: allowed.test\n",
    )
    .unwrap();
    let out = std::process::Command::new(&bin)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "policy check of a broken dir: {}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains("typo.yaml:4"),
        "expected typo.yaml:4 in stderr: {}",
        describe(&out)
    );

    std::fs::remove_file(dir.path().join("typo.yaml")).unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "agent: x\negress:\n  - fqdn: [unclosed\n",
    )
    .unwrap();
    let out = std::process::Command::new(&bin)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "policy check of a YAML syntax error: {}",
        describe(&out)
    );
    assert!(
        names_file_and_line(&stderr(&out), "broken.yaml"),
        "expected broken.yaml:<line>: {}",
        describe(&out)
    );

    let examples = workspace_root().join("policies");
    let out = std::process::Command::new(&bin)
        .args(["policy", "check"])
        .arg(&examples)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "policy check {}: {}",
        examples.display(),
        describe(&out)
    );
}

#[test]
fn hot_reload_adds_a_domain() {
    let w = started(web_policy(&["- fqdn: allowed.test"]));
    let r = probe(&w, 1, WEB, &["resolve hot.test"]);
    assert_no_answer(&w, &r[0]);
    w.write_policy(
        "web-agent",
        &policy(
            "web-agent",
            "acme",
            &["- fqdn: allowed.test", "- fqdn: hot.test"],
            "",
        ),
    );
    w.reload_policy();
    let resolvable = wait_until(Duration::from_secs(20), || {
        probe(&w, 1, WEB, &["resolve hot.test"])[0]["ok"] == true
    });
    assert!(
        resolvable,
        "hot.test never became resolvable after reload\n{}",
        w.diagnostics()
    );
    let out = curl(&w, 1, WEB, &["http://hot.test/"]);
    assert_curl_body(&w, &out, "hello from hot\n", "hot.test after reload");
    let out = curl(&w, 1, WEB, &["http://allowed.test/"]);
    assert_curl_body(
        &w,
        &out,
        "hello from allowed\n",
        "allowed.test after reload",
    );
}

#[test]
fn malformed_dns_packets_are_refused_and_the_proxy_keeps_answering() {
    let mut w = started(web_policy(&["- fqdn: allowed.test"]));
    // Garbage, a truncated header, a response instead of a query, and an oversized label,
    // all sent to port 53 (the kernel steers them to the proxy), then a real lookup.
    let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
bad = [b"\xff" * 40, b"\x12", struct.pack(">HHHHHH", 7, 0x8180, 1, 0, 0, 0) + b"\x07allowed\x04test\x00\x00\x01\x00\x01",
       struct.pack(">HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x7f" + b"a" * 127 + b"\x00\x00\x01\x00\x01"]
answers = []
for pkt in bad:
    s.sendto(pkt, ("198.18.0.53", 53))
    try:
        data, _ = s.recvfrom(4096)
        answers.append("rcode=%d" % (data[3] & 0xf) if len(data) >= 4 else "short")
    except socket.timeout:
        answers.append("none")
print(" ".join(answers))
print(socket.getaddrinfo("allowed.test", 80, socket.AF_INET)[0][4][0])
"#;
    let py = w.python().to_string_lossy().into_owned();
    let out = w.pod_exec(1, WEB, &[py.as_str(), "-c", script]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        w.diagnostics()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    // Garbage with an ID gets FORMERR (1); a 1-byte packet gets nothing; a response is ignored;
    // an over-long label is a malformed name: FORMERR.
    assert_eq!(lines[0], "rcode=1 none none rcode=1", "{stdout}");
    assert_eq!(
        lines[1],
        v4(10).to_string(),
        "the proxy still answers: {stdout}"
    );
    assert!(w.agent_running(), "the agent survived\n{}", w.diagnostics());
}

#[test]
fn kill_switch_cuts_an_agent_off_within_a_second_and_survives_a_restart() {
    let mut w = started(web_policy(&["- fqdn: allowed.test"]));
    let out = curl(&w, 1, WEB, &["-4", "http://allowed.test/"]);
    assert_curl_body(&w, &out, "hello from allowed\n", "before the switch");

    // On: the command returns once the kernel has the flag, well within a second, and from
    // then on the allowed address and DNS itself are refused.
    let took = w.kill_switch("on", "web-agent");
    assert!(
        took < Duration::from_secs(1),
        "kill-switch on took {took:?}"
    );
    let r = probe(&w, 1, WEB, &["http 198.18.1.10 80", "resolve allowed.test"]);
    assert_eperm(&w, &r[0]);
    assert_no_answer(&w, &r[1]);
    let e = denied_event(&w, "web-agent", "198.18.1.10", 80);
    assert_fields(
        &e,
        &[("reason", "killed".into()), ("verdict", "denied".into())],
    );
    // Recorded in the audit log, with who turned it on.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = w.audit_records();
        if let Some(r) = records.iter().find(|r| r["kind"] == "kill_switch") {
            assert_eq!(r["on"], true, "{r}");
            assert_eq!(r["target"], "agent web-agent", "{r}");
            assert_eq!(r["by_uid"], 0, "{r}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no kill_switch audit record"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A restarted agent starts with the switch on.
    w.kill_agent();
    w.start_agent();
    let r = probe(&w, 1, WEB, &["http 198.18.1.10 80"]);
    assert_eperm(&w, &r[0]);

    // Off: reachable again.
    w.kill_switch("off", "web-agent");
    let out = curl(&w, 1, WEB, &["-4", "http://allowed.test/"]);
    assert_curl_body(&w, &out, "hello from allowed\n", "after the switch is off");
}
