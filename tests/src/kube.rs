//! A Kubernetes API server for tests: PyPI `kmock`'s `KubernetesEmulator` (an in-memory API
//! server that serves list and watch of the objects it holds), run in a [`World`]'s node
//! namespace where the agent can reach it, plus a kubeconfig pointing at it.
//!
//! The emulator keeps objects as they are sent and ignores selectors, so every pod created
//! here carries `metadata.resourceVersion` (kube's watcher resumes from it), a fresh one per
//! change. Pods are created, patched (JSON merge patch) and deleted through the emulator's own
//! HTTP API (`POST`/`PATCH`/`DELETE` on `/api/v1/namespaces/<ns>/pods`), which is what turns
//! them into the `ADDED`/`MODIFIED`/`DELETED` watch events the agent sees.
//!
//! kmock lives in a virtualenv made by `cargo xtask setup` ([`KMOCK_PYTHON`]).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::world::{World, cmdline};

/// The interpreter of the virtualenv holding kmock (`cargo xtask setup` makes it);
/// `$AEGIS_KMOCK_PYTHON` overrides it.
pub const KMOCK_PYTHON: &str = "/opt/aegis-tests/kmock/bin/python";
/// Port the emulator listens on, on 127.0.0.1 in the node namespace.
pub const API_PORT: u16 = 6443;
/// How long a request to the emulator may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the emulator on `127.0.0.1:<port>` and forwards requests read from stdin (one JSON
/// object per line: method, path, body) to it, answering each with `{"status": N, "body": ..}`.
/// It exits when stdin closes.
const EMULATOR: &str = r#"
import asyncio, json, sys
import kmock

async def main():
    emulator = kmock.KubernetesEmulator()
    emulator.resources['v1/pods'] = kmock.ResourceInfo(namespaced=True, kind='Pod')
    async with emulator, kmock.Server(emulator, host='127.0.0.1', port=int(sys.argv[1])) as server:
        print(json.dumps({"url": str(server.url)}), flush=True)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while line := await stdin.readline():
            req = json.loads(line)
            headers = {"Content-Type": req.get("content_type", "application/json")}
            async with server.client.request(req["method"], req["path"], json=req.get("body"), headers=headers) as resp:
                print(json.dumps({"status": resp.status, "body": await resp.text()}), flush=True)

asyncio.run(main())
"#;

/// The running emulator; killed on drop.
pub struct KubeEmulator {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    kubeconfig: PathBuf,
    resource_version: u64,
}

impl KubeEmulator {
    /// Starts the emulator in `world`'s node namespace and writes `<world dir>/kubeconfig`.
    ///
    /// # Panics
    /// If kmock is not installed (run `cargo xtask setup`) or the emulator does not start.
    pub fn start(world: &World) -> KubeEmulator {
        let python = std::env::var("AEGIS_KMOCK_PYTHON").unwrap_or_else(|_| KMOCK_PYTHON.into());
        assert!(
            std::path::Path::new(&python).exists(),
            "{python} missing: run `cargo xtask setup` (it installs kmock in a virtualenv)"
        );
        let script = world.dir().join("kube_emulator.py");
        std::fs::write(&script, EMULATOR).expect("write the emulator script");
        let log = std::fs::File::create(world.dir().join("kube_emulator.log")).expect("log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &world.node_ns(), &python])
            .arg(&script)
            .arg(API_PORT.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", cmdline(&cmd)));
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
        let kubeconfig = world.dir().join("kubeconfig");
        let emulator = KubeEmulator {
            child: Some(child),
            lines,
            kubeconfig,
            resource_version: 0,
        };
        let ready = emulator.answer("start-up", Duration::from_secs(30));
        let url = ready["url"].as_str().expect("url").to_string();
        std::fs::write(
            &emulator.kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\n\
                 users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: emulator\n    user: test\n\
                 current-context: test\n"
            ),
        )
        .expect("write kubeconfig");
        emulator
    }

    /// The kubeconfig naming the emulator (for `aegis-agent run --kubeconfig`).
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// Creates `pod` (a Pod object; namespace from its metadata), giving it a fresh
    /// `metadata.resourceVersion`.
    ///
    /// # Panics
    /// If the emulator refuses it.
    pub fn create_pod(&mut self, mut pod: Value) {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .expect("metadata.namespace")
            .to_string();
        pod["metadata"]["resourceVersion"] = json!(self.next_version());
        self.request(
            "POST",
            &format!("/api/v1/namespaces/{ns}/pods"),
            Some(pod),
            None,
        );
    }

    /// Applies a JSON merge patch (RFC 7386) to pod `ns/name`, with a fresh resource version.
    ///
    /// # Panics
    /// If the emulator refuses it.
    pub fn patch_pod(&mut self, ns: &str, name: &str, mut patch: Value) {
        patch["metadata"]["resourceVersion"] = json!(self.next_version());
        self.request(
            "PATCH",
            &format!("/api/v1/namespaces/{ns}/pods/{name}"),
            Some(patch),
            Some("application/merge-patch+json"),
        );
    }

    /// Deletes pod `ns/name`.
    ///
    /// # Panics
    /// If the emulator refuses it.
    pub fn delete_pod(&mut self, ns: &str, name: &str) {
        self.request(
            "DELETE",
            &format!("/api/v1/namespaces/{ns}/pods/{name}"),
            None,
            None,
        );
    }

    /// Stops the emulator: from now on the API server is unreachable.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Value>,
        content_type: Option<&str>,
    ) {
        let mut req = json!({"method": method, "path": path, "body": body});
        if let Some(ct) = content_type {
            req["content_type"] = json!(ct);
        }
        let child = self.child.as_mut().expect("emulator running");
        let stdin = child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{req}").expect("write to the emulator");
        stdin.flush().expect("flush the emulator's stdin");
        let answer = self.answer(&format!("{method} {path}"), REQUEST_TIMEOUT);
        let status = answer["status"].as_u64().unwrap_or(0);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: emulator answered {answer}"
        );
    }

    fn answer(&self, what: &str, timeout: Duration) -> Value {
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!("kube emulator gave no answer to {what}: {e} (see kube_emulator.log)")
        });
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("kube emulator printed {line:?}: {e}"))
    }
}

impl Drop for KubeEmulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pod object bound to `node`, with `labels`, QoS class `qos` and one running container
/// `container_id` (`containerd://<hex>` or `cri-o://<hex>`).
pub fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: &[(&str, &str)],
    qos: &str,
    container_id: &str,
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "agent:latest"}]},
        "status": {
            "phase": "Running",
            "qosClass": qos,
            "containerStatuses": [{
                "name": "main", "image": "agent:latest", "imageID": "", "ready": true,
                "restartCount": 0, "containerID": container_id,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
            }]
        }
    })
}
