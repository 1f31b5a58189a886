//! Kubernetes end to end, without a cluster: the real agent with `--kubernetes` watches pods on
//! a Kubernetes API emulator (kmock, [`KubeEmulator`]) and enforces on real cgroups laid out
//! as kubelet lays them out (below the world's cgroup root), with real processes in the
//! container cgroups; and policies from a directory updated the way kubelet updates a mounted
//! ConfigMap.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aegis_tests::kube::{KubeEmulator, pod};
use aegis_tests::world::{DnsRecord, HttpServer, World, WorldBuilder, tail, wait_until};
use serde_json::{Value, json};

/// The node the agent runs on, as the API server knows it.
const NODE: &str = "node-a";
/// The bound the issue sets on pod changes reaching the kernel.
const PROMPT: Duration = Duration::from_secs(1);

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, last)
}

/// allowed.test (.10), evil.test (.20), other.test (.30), each with an HTTP server on port 80;
/// web-agent@acme may reach allowed.test, other-agent@acme other.test.
fn world(customize: impl FnOnce(WorldBuilder) -> WorldBuilder) -> World {
    let mut b = World::builder().pods(2);
    for (name, server, last) in [
        ("allowed.test", "allowed", 10),
        ("evil.test", "evil", 20),
        ("other.test", "other", 30),
    ] {
        b = b
            .record(DnsRecord::new(name, Some(v4(last)), None, 30))
            .http_server(HttpServer::new(server, Some(v4(last)), None, &[80]));
    }
    customize(b).build()
}

fn policy(agent: &str, fqdn: &str, version: u32) -> String {
    format!(
        "agent: {agent}\ntenant: acme\nversion: {version}\nmode: enforce\negress:\n  - fqdn: {fqdn}\n"
    )
}

// === a workload ===

/// A long-running python process in a container cgroup, driven one op per stdin line:
/// `resolve NAME` (getaddrinfo, IPv4; remembers the first address) and `get IP|last PORT`
/// (HTTP/1.0 GET /, `body`). Each op prints `{"op", "ok", ..}`; failures carry `error`
/// (exception class), `errno` and `msg`.
const PROBE: &str = r#"
import json, socket, sys
last = {}
for line in sys.stdin:
    f = line.split()
    r = {"op": line.strip()}
    try:
        if f[0] == "resolve":
            addrs = sorted({i[4][0] for i in socket.getaddrinfo(f[1], 80, socket.AF_INET, socket.SOCK_STREAM)})
            last["addr"] = addrs[0]
            r.update(ok=True, addrs=addrs)
        elif f[0] == "get":
            s = socket.create_connection((last["addr"] if f[1] == "last" else f[1], int(f[2])), timeout=5)
            s.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            s.close()
            r.update(ok=True, body=data.split(b"\r\n\r\n", 1)[-1].decode())
        else:
            r.update(ok=False, error="BadOp")
    except Exception as e:
        r.update(ok=False, error=type(e).__name__, errno=getattr(e, "errno", None), msg=str(e))
    print(json.dumps(r), flush=True)
"#;

struct Workload {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Workload {
    /// Starts the probe in pod namespace `k`, inside `cgroup`.
    fn spawn(w: &World, name: &'static str, k: usize, cgroup: &Path) -> Workload {
        let py = w.python().to_string_lossy().into_owned();
        let mut child = w.spawn_in_cgroup(k, cgroup, &[py.as_str(), "-c", PROBE]);
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
        Workload { name, child, lines }
    }

    fn op(&mut self, op: &str) -> Value {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{op}").expect("write to probe");
        stdin.flush().expect("flush probe");
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{}: no answer to {op:?}: {e}", self.name));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe printed {line:?}: {e}"))
    }

    /// Whether `name` resolves and its server answers "hello from `server`".
    fn reaches(&mut self, name: &str, server: &str) -> bool {
        self.op(&format!("resolve {name}"))["ok"] == true
            && self.op("get last 80")["body"] == format!("hello from {server}\n")
    }

    /// Asserts the allowlist of `agent`: `name` resolves and connects, evil.test has no
    /// answer and a connect to its address fails with EPERM.
    #[track_caller]
    fn assert_enforced(&mut self, w: &World, name: &str, server: &str) {
        assert!(
            self.reaches(name, server),
            "{}: {name} should be reachable\n{}",
            self.name,
            w.diagnostics()
        );
        let r = self.op("resolve evil.test");
        assert!(
            r["ok"] == false && r["error"] == "gaierror",
            "{}: evil.test should not resolve: {r}\n{}",
            self.name,
            w.diagnostics()
        );
        let r = self.op(&format!("get {} 80", v4(20)));
        assert!(
            r["ok"] == false && r["errno"] == 1,
            "{}: a connect to evil.test's address should fail with EPERM: {r}\n{}",
            self.name,
            w.diagnostics()
        );
    }

    /// Asserts no enforcement: evil.test resolves and connects.
    #[track_caller]
    fn assert_untouched(&mut self, w: &World) {
        assert!(
            self.reaches("evil.test", "evil"),
            "{}: a process under no identity should reach evil.test\n{}",
            self.name,
            w.diagnostics()
        );
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds (at most 10 s) and asserts it held within [`PROMPT`]; returns
/// the time it took.
#[track_caller]
fn promptly(w: &World, what: &str, since: Instant, mut check: impl FnMut() -> bool) -> Duration {
    let held = wait_until(Duration::from_secs(10), &mut check);
    let took = since.elapsed();
    assert!(
        held,
        "{what}: not within 10 s\n{}",
        tail(&w.agent_log(), 60)
    );
    assert!(
        took <= PROMPT,
        "{what}: took {took:?}, more than {PROMPT:?}\n{}",
        tail(&w.agent_log(), 60)
    );
    eprintln!("{what}: {took:?}");
    took
}

// === pods ===

/// systemd driver, containerd: `kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid_>.slice/cri-containerd-<id>.scope`
/// below the world's kubelet root, written out literally (not computed by the agent's code).
fn systemd_containerd_cgroup(qos: Option<&str>, uid: &str, id: &str) -> String {
    let uid = uid.replace('-', "_");
    match qos {
        Some(q) => format!(
            "kubelet/kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice/cri-containerd-{id}.scope"
        ),
        None => format!("kubelet/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{id}.scope"),
    }
}

fn container_id(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

const AGENT: &str = "aegis.dev/agent";
const TENANT: &str = "aegis.dev/tenant";

fn start_agent_with(w: &mut World, api: &KubeEmulator) {
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let root = format!("{}/kubelet", w.cgroup_root());
    w.add_agent_args(&[
        "--kubernetes",
        "--node-name",
        NODE,
        "--kubeconfig",
        &kubeconfig,
        "--kube-cgroup-root",
        &root,
    ]);
    w.start_agent();
}

/// Labelled pods get their allowlist, unlabelled ones (and pods of other nodes, and pods with
/// an invalid label) are untouched; a pod appearing, a label change and a deletion reach the
/// kernel within a second; an unreachable API server leaves enforcement in place.
#[test]
fn pod_labels_put_pods_under_their_identity_and_changes_apply_within_a_second() {
    let mut w = world(|b| {
        b.policy("web-agent", &policy("web-agent", "allowed.test", 1))
            .policy("other-agent", &policy("other-agent", "other.test", 1))
    });
    let mut api = KubeEmulator::start(&w);

    // Pods known before the agent starts (its first list): one per kind of case.
    let web_uid = "0b7e4c1a-5d2f-4e6a-9b8c-1d2e3f4a5b6c";
    let plain_uid = "1c8f5d2b-6e3a-4f7b-8c9d-2e3f4a5b6c7d";
    let elsewhere_uid = "2d9a6e3c-7f4b-4a8c-9d0e-3f4a5b6c7d8e";
    let bad_uid = "3e0b7f4d-8a5c-4b9d-8e1f-4a5b6c7d8e9f";
    let cases = [
        // (name, uid, QoS, labels, node, container id, cgroup QoS part)
        (
            "web",
            web_uid,
            "Burstable",
            vec![(AGENT, "web-agent"), (TENANT, "acme")],
            NODE,
            1,
            Some("burstable"),
        ),
        (
            "plain",
            plain_uid,
            "BestEffort",
            vec![("app", "plain")],
            NODE,
            2,
            Some("besteffort"),
        ),
        (
            "elsewhere",
            elsewhere_uid,
            "Guaranteed",
            vec![(AGENT, "web-agent"), (TENANT, "acme")],
            "node-b",
            3,
            None,
        ),
        (
            "bad",
            bad_uid,
            "Burstable",
            vec![(AGENT, "Not A Name")],
            NODE,
            4,
            Some("burstable"),
        ),
    ];
    let mut workloads = Vec::new();
    for (name, uid, qos, labels, node, n, qos_part) in &cases {
        let id = container_id(*n);
        let cgroup = w.create_cgroup(&systemd_containerd_cgroup(*qos_part, uid, &id));
        api.create_pod(pod(
            "team",
            name,
            uid,
            node,
            labels,
            qos,
            &format!("containerd://{id}"),
        ));
        let k = if *name == "web" { 1 } else { 2 };
        workloads.push(Workload::spawn(&w, name, k, &cgroup));
    }
    let [web, plain, elsewhere, bad] = &mut workloads[..] else {
        unreachable!()
    };
    start_agent_with(&mut w, &api);

    web.assert_enforced(&w, "allowed.test", "allowed");
    plain.assert_untouched(&w);
    elsewhere.assert_untouched(&w);
    bad.assert_untouched(&w);
    assert!(
        w.agent_log().contains("pod skipped") && w.agent_log().contains("Not A Name"),
        "the invalid label is reported\n{}",
        tail(&w.agent_log(), 40)
    );

    // A pod appearing: its cgroup exists (kubelet made it), then the API server has the pod.
    let new_uid = "4f1c8a5e-9b6d-4c0e-9f2a-5b6c7d8e9fa0";
    let id = container_id(5);
    let cgroup = w.create_cgroup(&systemd_containerd_cgroup(None, new_uid, &id));
    let mut fresh = Workload::spawn(&w, "fresh", 1, &cgroup);
    fresh.assert_untouched(&w);
    let since = Instant::now();
    api.create_pod(pod(
        "team",
        "fresh",
        new_uid,
        NODE,
        &[(AGENT, "other-agent"), (TENANT, "acme")],
        "Guaranteed",
        &format!("containerd://{id}"),
    ));
    promptly(&w, "a new labelled pod enforced", since, || {
        fresh.op("resolve evil.test")["ok"] == false
    });
    fresh.assert_enforced(&w, "other.test", "other");

    // A label change moves the pod to the other identity.
    let since = Instant::now();
    api.patch_pod(
        "team",
        "web",
        json!({"metadata": {"labels": {AGENT: "other-agent"}}}),
    );
    promptly(&w, "a relabelled pod under its new identity", since, || {
        web.op("resolve other.test")["ok"] == true
    });
    web.assert_enforced(&w, "other.test", "other");
    let r = web.op(&format!("get {} 80", v4(10)));
    assert!(
        r["ok"] == false && r["errno"] == 1,
        "the old identity's learned address is not the new one's: {r}"
    );

    // Deleting the pod removes enforcement.
    let since = Instant::now();
    api.delete_pod("team", "web");
    promptly(&w, "a deleted pod's enforcement removed", since, || {
        web.op("resolve evil.test")["ok"] == true
    });
    web.assert_untouched(&w);

    // The API server goes away: the pods it announced stay enforced.
    api.stop();
    let down = wait_until(Duration::from_secs(15), || {
        w.agent_log().contains("API server unreachable")
    });
    assert!(down, "the outage is logged\n{}", tail(&w.agent_log(), 40));
    std::thread::sleep(Duration::from_secs(2));
    fresh.assert_enforced(&w, "other.test", "other");
    plain.assert_untouched(&w);
}

/// The cgroupfs driver with CRI-O, found on disk without configuration; a pod the API server
/// announces before kubelet has made its cgroup is put under its identity once the cgroup
/// appears.
#[test]
fn cgroupfs_layout_is_discovered_and_a_late_cgroup_is_picked_up() {
    let mut w = world(|b| b.policy("web-agent", &policy("web-agent", "allowed.test", 1)));
    let mut api = KubeEmulator::start(&w);
    // kubelet is there (its root cgroup exists), the pod is not yet.
    w.create_cgroup("kubelet/kubepods/besteffort");
    start_agent_with(&mut w, &api);

    let uid = "5a2d9b6f-0c7e-4d1f-8a3b-6c7d8e9fa0b1";
    let id = container_id(6);
    api.create_pod(pod(
        "team",
        "late",
        uid,
        NODE,
        &[(AGENT, "web-agent"), (TENANT, "acme")],
        "Guaranteed",
        &format!("cri-o://{id}"),
    ));
    std::thread::sleep(Duration::from_millis(500));
    let since = Instant::now();
    let cgroup = w.create_cgroup(&format!("kubelet/kubepods/pod{uid}/crio-{id}"));
    let mut late = Workload::spawn(&w, "late", 1, &cgroup);
    promptly(
        &w,
        "a pod whose cgroup appeared late enforced",
        since,
        || late.op("resolve evil.test")["ok"] == false,
    );
    late.assert_enforced(&w, "allowed.test", "allowed");
}

/// Policies in a directory kubelet manages for a ConfigMap volume: loaded through the `..data`
/// symlinks at start, reloaded when kubelet swaps `..data` to a new version (no signal), and
/// kubelet's own `..` entries never read as policies.
#[test]
fn configmap_policy_updates_are_picked_up_on_the_data_swap() {
    let mut w = world(|b| b);
    w.write_configmap_policies(&[("web-agent.yaml", &policy("web-agent", "allowed.test", 1))]);
    w.start_agent();
    let web = Some(("web-agent", Some("acme")));
    let reaches = |w: &World, name: &str| {
        let out = w.pod_exec(
            1,
            web,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                &format!("http://{name}/"),
            ],
        );
        out.status.success()
    };
    assert!(reaches(&w, "allowed.test"), "{}", w.diagnostics());
    assert!(!reaches(&w, "other.test"), "{}", w.diagnostics());

    // kubelet's update: new ..<timestamp> dir, ..data swapped, a key added, the old dir gone.
    w.write_configmap_policies(&[
        ("web-agent.yaml", &policy("web-agent", "other.test", 2)),
        ("other-agent.yaml", &policy("other-agent", "evil.test", 1)),
    ]);
    let reloaded = wait_until(Duration::from_secs(10), || {
        w.agent_log().contains("policies reloaded") && reaches(&w, "other.test")
    });
    assert!(reloaded, "the swap was not picked up\n{}", w.diagnostics());
    assert!(
        !reaches(&w, "allowed.test"),
        "version 2 no longer lists allowed.test"
    );
    let versions = w
        .agent_log()
        .lines()
        .rfind(|l| l.contains("policies reloaded"))
        .unwrap_or_default()
        .to_string();
    assert!(
        versions.contains("web-agent=2") && versions.contains("other-agent=1"),
        "both keys loaded once each, nothing from the .. entries: {versions}"
    );
}

/// An agent restarting while the API server is down keeps the pod identities the previous one
/// pinned (it cannot tell a deleted pod from an unknown one): closed, as while no agent runs
/// (learned addresses stay allowed, others denied, names unanswered), and catches up once the
/// API server answers.
#[test]
fn restart_with_the_api_server_down_keeps_pinned_pod_enforcement() {
    let mut w = world(|b| b.policy("web-agent", &policy("web-agent", "allowed.test", 1)));
    let mut api = KubeEmulator::start(&w);
    let uid = "6b3e0c7a-1d8f-4e2a-9b4c-7d8e9fa0b1c2";
    let id = container_id(7);
    let web = pod(
        "team",
        "web",
        uid,
        NODE,
        &[(AGENT, "web-agent"), (TENANT, "acme")],
        "Burstable",
        &format!("containerd://{id}"),
    );
    let cgroup = w.create_cgroup(&systemd_containerd_cgroup(Some("burstable"), uid, &id));
    api.create_pod(web.clone());
    let mut workload = Workload::spawn(&w, "web", 1, &cgroup);
    start_agent_with(&mut w, &api);
    workload.assert_enforced(&w, "allowed.test", "allowed");

    w.kill_agent();
    api.stop();
    w.start_agent();
    assert!(
        w.agent_log()
            .contains("no pod list from the API server after"),
        "the missing list is reported\n{}",
        tail(&w.agent_log(), 30)
    );
    let r = workload.op(&format!("get {} 80", v4(10)));
    assert_eq!(
        r["body"], "hello from allowed\n",
        "the learned address stays allowed: {r}"
    );
    let r = workload.op(&format!("get {} 80", v4(20)));
    assert!(
        r["ok"] == false && r["errno"] == 1,
        "unlisted addresses stay denied: {r}\n{}",
        w.diagnostics()
    );
    let r = workload.op("resolve evil.test");
    assert_eq!(r["ok"], false, "no name resolves around the agent: {r}");

    // The API server is back (same address, the pod still there): the agent catches up.
    let mut api = KubeEmulator::start(&w);
    api.create_pod(web);
    let listed = wait_until(Duration::from_secs(60), || {
        w.agent_log().matches("pod list received").count() == 2
    });
    assert!(
        listed,
        "no list after the API server came back\n{}",
        tail(&w.agent_log(), 30)
    );
    std::thread::sleep(Duration::from_millis(500));
    workload.assert_enforced(&w, "allowed.test", "allowed");
}
