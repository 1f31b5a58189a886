//! Agent upgrades and restarts under load (docs/upgrade.md): an unmodified client loop in an
//! agent pod runs across two in-place upgrades (old process → new process, the old one then
//! SIGTERMed, as a DaemonSet rolling update with `maxSurge` does) and counts every outcome.
//! Allowed calls (getaddrinfo + HTTP, HTTPS through the L7 enforcer, raw DNS bursts) must never
//! fail, unlisted ones must never pass, and streams opened before an upgrade must complete.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::Duration;

use aegis_tests::world::{DnsRecord, HttpServer, World};
use serde_json::Value;

const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const API: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
const LOOP_AGENT: Option<(&str, Option<&str>)> = Some(("loop-agent", None));

const POLICY: &str = r#"
agent: loop-agent
version: 1
egress:
  - fqdn: allowed.test
    ports: [80]
  - fqdn: api.test
    ports: [443]
    inspect: true
tools:
  - name: api
    host: api.test
    actions:
      - name: read
        method: GET
        path: /**
      - name: chat
        method: POST
        path: /v1/chat/completions
"#;

/// The client loop. Until the file `argv[1]` exists, threads repeat:
/// - `allowed`: getaddrinfo(allowed.test) (one UDP attempt: a lost query is a failure), then
///   a new TCP connection and GET / (body checked);
/// - `l7`: the same for https://api.test/ (inspected: through the L7 enforcer; node CA
///   `argv[2]` trusted);
/// - `dns`: bursts of 16 raw A queries for allowed.test sent at once to the pod's resolver
///   (the kernel steers them to the agent), each answered with NOERROR and an address, or
///   counted `lost` after 3 s (bursts keep queries queued on the proxy socket at every moment);
/// - `unlisted`: getaddrinfo(evil.test) must fail and a direct connect to its address must
///   fail with EPERM;
/// - once, at the start: a streamed POST (HTTP/1.1 chunked, `hold_s` seconds long) directly to
///   allowed.test and one through the enforcer to api.test, read to the end.
///
/// Prints `{"warm": true}` once every loop has succeeded once, then a summary line at the end:
/// counts per `<loop>_<outcome>` and the first errors.
const LOOP: &str = r#"
import json, os, random, socket, ssl, struct, sys, threading, time
stop_file, ca, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
lock = threading.Lock()
counts, errors, streams, warm = {}, [], {}, set()
def count(key, err=None):
    with lock:
        counts[key] = counts.get(key, 0) + 1
        if err is not None and len(errors) < 20:
            errors.append("%s at %.3f: %s: %s" % (key, time.time(), type(err).__name__, err))
def stopped():
    return os.path.exists(stop_file)
ctx = ssl.create_default_context(cafile=ca)
def connect(host, port, tls):
    ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    s = socket.create_connection((ip, port), timeout=10)
    return ctx.wrap_socket(s, server_hostname=host) if tls else s
def read_all(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
def get(name, host, port, tls, expect):
    while not stopped():
        try:
            s = connect(host, port, tls)
            s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
            data = read_all(s)
            s.close()
            if not (data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0] and data.endswith(expect)):
                raise ValueError(repr(data[-120:]))
            count(name + "_ok")
            warm.add(name)
        except Exception as e:
            count(name + "_failed", e)
        time.sleep(0.02)
def query(qid, name):
    q = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", 1, 1)
def resolver():
    for line in open("/etc/resolv.conf"):
        f = line.split()
        if f[:1] == ["nameserver"]:
            return f[1]
def dns():
    server = resolver()
    while not stopped():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ids = set(random.sample(range(65536), 16))
        for i in ids:
            s.sendto(query(i, "allowed.test"), (server, 53))
        deadline = time.time() + 3
        while ids and time.time() < deadline:
            s.settimeout(max(0.01, deadline - time.time()))
            try:
                data, _ = s.recvfrom(4096)
            except socket.timeout:
                break
            qid, flags, _, an = struct.unpack(">HHHH", data[:8])
            if qid in ids:
                ids.discard(qid)
                if flags & 0xF == 0 and an >= 1:
                    count("dns_answered")
                else:
                    count("dns_bad", ValueError("rcode %d, %d answers" % (flags & 0xF, an)))
        for _ in ids:
            count("dns_lost", TimeoutError("no answer within 3 s"))
        s.close()
        warm.add("dns")
        time.sleep(0.005)
def unlisted():
    while not stopped():
        try:
            socket.getaddrinfo("evil.test", 80, socket.AF_INET, socket.SOCK_STREAM)
            count("unlisted_resolved", ValueError("evil.test resolved"))
        except socket.gaierror:
            count("unlisted_dns_denied")
        try:
            socket.create_connection(("198.18.1.20", 80), timeout=5).close()
            count("unlisted_connected", ValueError("connected to evil"))
        except PermissionError:
            count("unlisted_connect_denied")
        except Exception as e:
            count("unlisted_connect_other", e)
        warm.add("unlisted")
        time.sleep(0.02)
def stream(name, host, port, tls):
    r = {"ok": False, "started": time.time()}
    streams[name] = r
    try:
        s = connect(host, port, tls)
        body = json.dumps({"stream": True, "hold_s": hold, "max_tokens": 8}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        data = read_all(s)
        s.close()
        r["status"] = data.split(b"\r\n")[0].decode("latin-1")
        r["ok"] = b" 200 " in data.split(b"\r\n")[0] and b"[DONE]" in data
        r["tail"] = data[-80:].decode("latin-1")
    except Exception as e:
        r["error"] = "%s: %s" % (type(e).__name__, e)
    r["ended"] = time.time()
threads = [threading.Thread(target=f, args=a) for f, a in [
    (stream, ("direct", "allowed.test", 80, False)),
    (stream, ("l7", "api.test", 443, True)),
    (get, ("allowed", "allowed.test", 80, False, b"hello from allowed\n")),
    (get, ("l7", "api.test", 443, True, b"hello from api.test\n")),
    (dns, ()),
    (unlisted, ()),
]]
for t in threads:
    t.start()
while warm != {"allowed", "l7", "dns", "unlisted"} and not stopped():
    time.sleep(0.05)
print(json.dumps({"warm": True, "at": time.time()}), flush=True)
for t in threads:
    t.join()
print(json.dumps({"counts": counts, "errors": errors, "streams": streams}), flush=True)
"#;

fn world() -> World {
    World::builder()
        .pods(1)
        .record(DnsRecord::new("allowed.test", Some(ALLOWED), None, 30))
        .record(DnsRecord::new("evil.test", Some(EVIL), None, 30))
        .record(DnsRecord::new("api.test", Some(API), None, 30))
        .http_server(HttpServer::new("allowed", Some(ALLOWED), None, &[80]))
        .http_server(HttpServer::new("evil", Some(EVIL), None, &[80]))
        .http_server(HttpServer::new("api.test", Some(API), None, &[443]).with_tls())
        .policy("loop.yaml", POLICY)
        // One UDP attempt per lookup: a query lost during an upgrade fails the lookup
        // instead of hiding behind glibc's retry.
        .resolv_options("timeout:3 attempts:1")
        .build()
}

/// Counts of the loop's summary under `key` (0 when absent).
fn n(summary: &Value, key: &str) -> u64 {
    summary["counts"][key].as_u64().unwrap_or(0)
}

/// Agent log lines (JSON, all runs) whose message contains `text`.
fn log_lines(w: &World, text: &str) -> Vec<Value> {
    w.agent_log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

#[test]
fn upgrades_lose_no_query_and_no_connection() {
    let mut w = world();
    w.start_agent();
    let first = w.agent_pid().expect("agent running");
    let stop = w.dir().join("loop.stop");
    let py = w.python().to_string_lossy().into_owned();
    let ca = w.node_ca().to_string_lossy().into_owned();
    let stop_arg = stop.to_string_lossy().into_owned();
    let mut client = w.pod_spawn(
        1,
        LOOP_AGENT,
        &[py.as_str(), "-c", LOOP, &stop_arg, &ca, "12"],
    );
    let stdout = client.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let warm = lines.recv_timeout(Duration::from_secs(30));
    assert!(
        warm.as_deref().is_ok_and(|l| l.contains("\"warm\"")),
        "the client loop did not get going: {warm:?}\n{}",
        w.diagnostics()
    );

    // Upgrade 1, with the streams in flight: the old process drains on SIGTERM.
    std::thread::sleep(Duration::from_secs(2));
    w.upgrade_agent();
    let second = w.agent_pid().expect("agent running");
    assert_ne!(first, second);
    std::thread::sleep(Duration::from_secs(2));
    let (status, took) = w.retire_agent(Duration::from_secs(40));
    assert!(status.success(), "old agent {first} exited with {status}");
    // Upgrade 2: the successor hands over what it inherited.
    std::thread::sleep(Duration::from_secs(2));
    w.upgrade_agent();
    std::thread::sleep(Duration::from_secs(2));
    let (status2, _) = w.retire_agent(Duration::from_secs(40));
    assert!(
        status2.success(),
        "old agent {second} exited with {status2}"
    );
    std::thread::sleep(Duration::from_secs(3));

    std::fs::write(&stop, b"").expect("write the stop file");
    let summary = lines
        .recv_timeout(Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("no summary from the client loop: {e}"));
    let _ = client.wait();
    let summary: Value =
        serde_json::from_str(&summary).unwrap_or_else(|e| panic!("summary {summary:?}: {e}"));
    eprintln!("client loop across two upgrades: {summary}");
    let what = format!(
        "{summary:#}\nfirst agent drained in {took:?}\n{}",
        w.diagnostics()
    );

    // Zero failures for allowed calls, zero successes for unlisted ones.
    for key in [
        "allowed_failed",
        "l7_failed",
        "dns_lost",
        "dns_bad",
        "unlisted_resolved",
        "unlisted_connected",
        "unlisted_connect_other",
    ] {
        assert_eq!(n(&summary, key), 0, "{key}: {what}");
    }
    // Enough of each, over the ~15 s the loop ran, for those zeros to mean something.
    for (key, min) in [
        ("allowed_ok", 50),
        ("l7_ok", 20),
        ("dns_answered", 1000),
        ("unlisted_dns_denied", 50),
        ("unlisted_connect_denied", 50),
    ] {
        assert!(n(&summary, key) >= min, "{key} under {min}: {what}");
    }
    // Streams opened before the first upgrade, still sending during both, completed: the
    // direct one needs no agent once the kernel allowed it; the one through the enforcer was
    // served to its end by the first agent, which waited for it on SIGTERM.
    for name in ["direct", "l7"] {
        let s = &summary["streams"][name];
        assert_eq!(s["ok"], true, "stream {name}: {what}");
    }
    let l7 = &summary["streams"]["l7"];
    assert!(
        took >= Duration::from_secs(2),
        "the first agent exited {took:?} after SIGTERM, before its stream ended ({l7}): {what}"
    );

    // Each successor took sockets over and each predecessor confirmed the hand-over.
    let taking = log_lines(&w, "taking over from the running agent");
    assert_eq!(taking.len(), 2, "{what}");
    assert!(
        taking.iter().all(|l| l["sockets"].as_u64() >= Some(4)),
        "{taking:?}"
    );
    assert_eq!(
        log_lines(&w, "handed over: the new agent serves").len(),
        2,
        "{what}"
    );
    assert!(log_lines(&w, "drain timeout").is_empty(), "{what}");
    // Three processes appended to one audit log, two of them at once: still one valid chain.
    let (valid, report) = w.verify_audit(&w.audit_log());
    assert!(valid, "audit log after the upgrades: {report}");
}

/// A workload driven one line at a time (`resolve NAME` or `connect IP`), printing one
/// result line each: the address, the body, or `<exception> <errno>`.
const PROBE: &str = r#"
import socket, sys
for line in sys.stdin:
    op, arg = line.split()
    try:
        if op == "resolve":
            print(socket.getaddrinfo(arg, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0], flush=True)
        else:
            s = socket.create_connection((arg, 80), timeout=5)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            print(data.split(b"\r\n\r\n", 1)[-1].decode().strip(), flush=True)
    except Exception as e:
        print("%s %s" % (type(e).__name__, getattr(e, "errno", "")), flush=True)
"#;

/// [`PROBE`] running as the loop agent in pod 1: one request line in, one answer line out.
struct Probe {
    child: std::process::Child,
    input: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Probe {
    fn spawn(w: &World, python: &str) -> Probe {
        let mut child = w.pod_spawn(1, LOOP_AGENT, &[python, "-c", PROBE]);
        let input = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Probe {
            child,
            input,
            lines,
        }
    }

    /// Sends `line` and waits (30 s at most) for the answer.
    fn ask(&mut self, w: &World, line: &str) -> String {
        use std::io::Write as _;
        writeln!(self.input, "{line}").expect("write to the probe");
        self.input.flush().expect("flush the probe");
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no answer to {line:?}: {e}\n{}", w.diagnostics()))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_stops_without_detaching_and_a_restart_adopts() {
    let mut w = world();
    w.start_agent();
    let py = w.python().to_string_lossy().into_owned();
    let mut probe = Probe::spawn(&w, &py);
    let mut op = |w: &World, line: String| probe.ask(w, &line);
    let allowed = ALLOWED.to_string();
    let evil = EVIL.to_string();
    assert_eq!(op(&w, "resolve allowed.test".into()), allowed);

    let (status, _) = w.stop_agent(Duration::from_secs(30));
    assert!(status.success(), "agent exited with {status}");
    assert!(
        !log_lines(&w, "agent stopped; kernel enforcement stays").is_empty(),
        "{}",
        w.diagnostics()
    );
    // Stopped: the links are still pinned and the kernel enforces with the pinned maps.
    let links = w.bpffs_dir().join("links");
    let pinned = std::fs::read_dir(&links).map_or(0, |d| d.count());
    assert!(
        pinned >= 1,
        "no pinned links left under {}",
        links.display()
    );
    assert_eq!(
        op(&w, format!("connect {allowed}")),
        "hello from allowed",
        "learned address while stopped"
    );
    assert_eq!(
        op(&w, format!("connect {evil}")),
        "PermissionError 1",
        "unlisted address while stopped"
    );
    assert!(
        op(&w, "resolve evil.test".into()).starts_with("gaierror"),
        "unlisted name while stopped"
    );

    // A plain restart adopts the pins and serves the same workload again.
    w.start_agent();
    assert_eq!(op(&w, "resolve allowed.test".into()), allowed);
    assert_eq!(op(&w, format!("connect {allowed}")), "hello from allowed");
    assert_eq!(op(&w, format!("connect {evil}")), "PermissionError 1");
}

/// Answers every control request with the error an agent that predates the hand-over gives
/// for an unknown op (its socket replaces the real agent's at the control path).
const OLD_CONTROL: &str = r#"
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path + ".old")
s.listen(16)
os.rename(path + ".old", path)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b'{"result":"error","message":"bad request: unknown variant `handover`"}\n')
    c.close()
"#;

/// An agent that does not hand over (an older version) holds the DNS ports: the new agent
/// cannot serve those identities yet and must leave them enforced by the kernel as they were
/// (never drop them), then take them over once the old agent has exited.
#[test]
fn upgrade_from_an_agent_without_hand_over_stays_enforced() {
    let mut w = world();
    w.start_agent();
    let py = w.python().to_string_lossy().into_owned();
    let mut probe = Probe::spawn(&w, &py);
    let mut op = |w: &World, line: String| probe.ask(w, &line);
    let allowed = ALLOWED.to_string();
    let evil = EVIL.to_string();
    assert_eq!(op(&w, "resolve allowed.test".into()), allowed);

    let socket = w.control_socket().to_string_lossy().into_owned();
    let mut old_control = std::process::Command::new(&py)
        .args(["-c", OLD_CONTROL, &socket])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the old control socket");
    let mut ready = String::new();
    BufReader::new(old_control.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut ready)
        .expect("old control socket up");
    w.upgrade_agent();
    let _ = old_control.kill();
    let _ = old_control.wait();
    let refused = log_lines(&w, "the running agent does not hand over");
    assert_eq!(refused.len(), 1, "{}", w.diagnostics());

    // Both agents run; the new one cannot bind the identity's DNS port. The workload stays
    // enforced (served by the old agent), nothing was dropped.
    assert!(
        log_lines(&w, "dropped stale identity cgroup").is_empty(),
        "{}",
        w.diagnostics()
    );
    assert_eq!(op(&w, format!("connect {evil}")), "PermissionError 1");
    assert!(op(&w, "resolve evil.test".into()).starts_with("gaierror"));
    assert_eq!(op(&w, "resolve allowed.test".into()), allowed);

    // The old agent exits: the kernel enforces alone until the new agent's resync takes the
    // identity over (within 10 s), and the workload is served again.
    let (status, _) = w.retire_agent(Duration::from_secs(40));
    assert!(status.success(), "old agent exited with {status}");
    assert_eq!(op(&w, format!("connect {evil}")), "PermissionError 1");
    let mut served = false;
    for _ in 0..30 {
        if op(&w, "resolve allowed.test".into()) == allowed {
            served = true;
            break;
        }
        assert_eq!(op(&w, format!("connect {evil}")), "PermissionError 1");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        served,
        "the new agent never served the identity\n{}",
        w.diagnostics()
    );
    assert_eq!(op(&w, format!("connect {allowed}")), "hello from allowed");
    assert!(op(&w, "resolve evil.test".into()).starts_with("gaierror"));
}
