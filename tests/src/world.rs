//! A disposable "small world" of network namespaces in which the real `aegis-agent` enforces
//! egress for real workloads, used by the root-only integration tests and by the demo.
//!
//! Every world has its own id, `aeg` + the creating pid modulo 10000 (four digits) + a per-process
//! counter, e.g. `aeg04211`, and every name it creates carries that id:
//!
//! ```text
//!   pod <id>p1 ──┐ 198.19.1.2/24  fd00:ae61:10:1::2/64   (resolv.conf: nameserver 198.18.0.53)
//!   pod <id>p2 ──┤ 198.19.2.2/24  fd00:ae61:10:2::2/64
//!                │
//!   node <id>n   ├─ podK: 198.19.K.1/24, fd00:ae61:10:K::1/64     ip_forward=1 (v4 and v6)
//!                ├─ lo: 198.19.255.53/32, fd00:ae61:ff::53/128 (the agent's DNS proxy)
//!                └─ up0: 198.18.0.1/24, fd00:ae61::1/64; routes to the servers via inet
//!                   │
//!   inet <id>i   eth0: 198.18.0.2/24, fd00:ae61::2/64, dnsmasq on 198.18.0.53 and fd00:ae61::53
//!                lo: HTTP and UDP echo servers in 198.18.1.0/24 and fd00:ae61:1::/64
//! ```
//!
//! The agent runs in the node namespace (entered with `nsenter`, so it sees the real cgroup2 and
//! bpffs mounts) with its pins under `/sys/fs/bpf/aegis-<id>`, its exec cgroups under
//! `<cgroup2>/aegis-<id>` and its control socket at `/run/aegis-<id>.sock`.
//!
//! Invariants: the root network namespace is never changed (no links, routes or sysctls: veths
//! are created directly inside their namespaces); everything a world creates is recorded on the
//! [`World`] before it is used, so `Drop` removes exactly that, even after a failed build, and
//! reports (but does not stop at) each cleanup error; a world whose creator crashed is found
//! through its owner file under [`STATE_DIR`] and removed by [`World::cleanup_stale`].

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Address of the agent's DNS proxy on the node (`--dns-address`).
pub const DNS_PROXY_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 53);
/// IPv6 address of the agent's DNS proxy on the node (`--dns-address6`).
pub const DNS_PROXY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xae61, 0xff, 0, 0, 0, 0, 0x53);
/// Address of the upstream resolver (dnsmasq in the inet namespace). Pods' `resolv.conf` names
/// it directly, so only in-kernel steering sends an agent workload's DNS to the agent.
pub const UPSTREAM_DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
/// IPv6 address of the upstream resolver.
pub const UPSTREAM_DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xae61, 0, 0, 0, 0, 0, 0x53);
/// The node's address on the node–inet link.
pub const NODE_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's IPv6 address on the node–inet link.
pub const NODE_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xae61, 0, 0, 0, 0, 0, 1);
/// The inet namespace's address on the node–inet link.
pub const INET_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The inet namespace's IPv6 address on the node–inet link.
pub const INET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xae61, 0, 0, 0, 0, 0, 2);
/// Where server addresses must live: 198.18.1.0/24 (network address, prefix length).
pub const SERVER_NET_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 1, 0), 24);
/// Where IPv6 server addresses must live: fd00:ae61:1::/64.
pub const SERVER_NET_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0xae61, 1, 0, 0, 0, 0, 0), 64);
/// Most pods a world can have (pod K uses 198.19.K.0/24; 198.19.255.0 is the node's).
pub const MAX_PODS: usize = 200;
/// Directory of owner files (`<id>.pid`: "pid starttime") that tell live worlds from stale ones.
pub const STATE_DIR: &str = "/run/aegis-tests";
/// First characters of every world id.
pub const PREFIX: &str = "aeg";

/// How long [`World::start_agent`] waits for `aegis-agent status` to succeed.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`World::pod_exec`] and friends let a command run before killing it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(1);

/// IPv4 address of pod `k` (1-based): 198.19.k.2.
pub fn pod_addr_v4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, k as u8, 2)
}

/// IPv4 address of the node's end of pod `k`'s link, the pod's gateway: 198.19.k.1.
pub fn pod_gateway_v4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, k as u8, 1)
}

/// IPv6 address of pod `k` (1-based): fd00:ae61:10:k::2.
pub fn pod_addr_v6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xae61, 0x10, k as u16, 0, 0, 0, 2)
}

/// IPv6 gateway of pod `k`: fd00:ae61:10:k::1.
pub fn pod_gateway_v6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xae61, 0x10, k as u16, 0, 0, 0, 1)
}

/// The `aegis-agent` binary the harness runs: `$AEGIS_AGENT_BIN` if set, else
/// `<workspace root>/target/debug/aegis-agent`.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("AEGIS_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("target/debug/aegis-agent"),
    }
}

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

// === Records and servers ===

/// A DNS name served by the world's dnsmasq (`--host-record`), with at least one address.
#[derive(Clone, Debug)]
pub struct DnsRecord {
    /// Fully qualified name without the trailing dot, e.g. `allowed.test`.
    pub name: String,
    /// Answer for A queries (none: NODATA).
    pub v4: Option<Ipv4Addr>,
    /// Answer for AAAA queries (none: NODATA).
    pub v6: Option<Ipv6Addr>,
    /// TTL of the answers, in seconds.
    pub ttl: u32,
}

impl DnsRecord {
    /// A record for `name` with the given addresses and TTL (seconds).
    pub fn new(name: &str, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>, ttl: u32) -> Self {
        Self {
            name: name.to_string(),
            v4,
            v6,
            ttl,
        }
    }
}

/// A CNAME served by dnsmasq (`--cname`): `name` is an alias of `target`, which must itself be a
/// [`DnsRecord`] or another `Cname` of the same world.
#[derive(Clone, Debug)]
pub struct Cname {
    /// The alias, e.g. `www.chain.test`.
    pub name: String,
    /// The canonical name it points to, e.g. `edge.cdn.test`.
    pub target: String,
    /// TTL of the CNAME record, in seconds.
    pub ttl: u32,
}

impl Cname {
    /// `name` CNAME `target` with a TTL in seconds.
    pub fn new(name: &str, target: &str, ttl: u32) -> Self {
        Self {
            name: name.to_string(),
            target: target.to_string(),
            ttl,
        }
    }
}

/// An HTTP server in the inet namespace: answers any GET on every (address, port) pair with
/// `200` and the body `hello from <name>\n`.
#[derive(Clone, Debug)]
pub struct HttpServer {
    /// Name put in the response body.
    pub name: String,
    /// IPv4 address, inside [`SERVER_NET_V4`].
    pub v4: Option<Ipv4Addr>,
    /// IPv6 address, inside [`SERVER_NET_V6`].
    pub v6: Option<Ipv6Addr>,
    /// TCP ports to listen on.
    pub ports: Vec<u16>,
    /// Serve HTTPS with a certificate for `name` signed by the world's test CA ([`World::test_ca`]).
    pub tls: bool,
}

impl HttpServer {
    /// A server named `name` on the given addresses and TCP ports.
    pub fn new(name: &str, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>, ports: &[u16]) -> Self {
        Self {
            name: name.to_string(),
            v4,
            v6,
            ports: ports.to_vec(),
            tls: false,
        }
    }

    /// Serves HTTPS instead of HTTP, with a P-256 certificate for the server's `name` signed by
    /// the world's test CA ([`World::test_ca`]; made with the `openssl` CLI).
    pub fn with_tls(mut self) -> Self {
        self.tls = true;
        self
    }
}

/// Error building or driving a [`World`]: what failed, with the command line and its output.
#[derive(Debug)]
pub struct WorldError(String);

impl fmt::Display for WorldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorldError {}

fn err(msg: impl Into<String>) -> WorldError {
    WorldError(msg.into())
}

// === impl WorldBuilder ===

/// Describes a world before it exists; [`WorldBuilder::build`] creates it. The agent is not
/// started by `build`: call [`World::start_agent`].
#[derive(Clone, Debug)]
pub struct WorldBuilder {
    pods: usize,
    records: Vec<DnsRecord>,
    cnames: Vec<Cname>,
    servers: Vec<HttpServer>,
    udp_echo: Vec<SocketAddr>,
    policies: Vec<(String, String)>,
    resolv_options: String,
    min_ttl: u32,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    agent_caps: Option<Vec<String>>,
}

impl Default for WorldBuilder {
    fn default() -> Self {
        Self {
            pods: 2,
            records: Vec::new(),
            cnames: Vec::new(),
            servers: Vec::new(),
            udp_echo: Vec::new(),
            policies: Vec::new(),
            resolv_options: "timeout:2 attempts:2".to_string(),
            min_ttl: 1,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            agent_caps: None,
        }
    }
}

impl WorldBuilder {
    /// Number of pod namespaces (default 2, at most [`MAX_PODS`]).
    pub fn pods(mut self, n: usize) -> Self {
        self.pods = n;
        self
    }

    /// Adds a DNS record served by dnsmasq.
    pub fn record(mut self, r: DnsRecord) -> Self {
        self.records.push(r);
        self
    }

    /// Adds a CNAME served by dnsmasq.
    pub fn cname(mut self, c: Cname) -> Self {
        self.cnames.push(c);
        self
    }

    /// Adds an HTTP server in the inet namespace.
    pub fn http_server(mut self, s: HttpServer) -> Self {
        self.servers.push(s);
        self
    }

    /// Adds a UDP echo server (replies with the datagram it received) at `addr`, whose IP must
    /// be inside [`SERVER_NET_V4`] or [`SERVER_NET_V6`].
    pub fn udp_echo(mut self, addr: SocketAddr) -> Self {
        self.udp_echo.push(addr);
        self
    }

    /// Writes `yaml` as policy file `name` (`.yaml` appended unless present) before the agent
    /// first starts.
    pub fn policy(mut self, name: &str, yaml: &str) -> Self {
        self.policies.push((name.to_string(), yaml.to_string()));
        self
    }

    /// The `options` line of the pods' `resolv.conf` (default `timeout:2 attempts:2`); use
    /// `timeout:1 attempts:1` where a test waits for a resolution to fail.
    pub fn resolv_options(mut self, opts: &str) -> Self {
        self.resolv_options = opts.to_string();
        self
    }

    /// The agent's `--min-ttl` in seconds (default 1).
    pub fn min_ttl(mut self, secs: u32) -> Self {
        self.min_ttl = secs;
        self
    }

    /// An extra argument appended to `aegis-agent run`.
    pub fn agent_arg(mut self, arg: &str) -> Self {
        self.agent_args.push(arg.to_string());
        self
    }

    /// Runs the agent with only these capabilities (`setpriv` bounding set, names as
    /// capabilities(7) without `CAP_`, e.g. `BPF`), like a container that drops all others. The
    /// world then creates the agent's `--cgroup-root` directory itself, as root, the way an
    /// owner-writable cgroup2 root lets the agent do on a node.
    pub fn agent_capabilities(mut self, caps: &[&str]) -> Self {
        self.agent_caps = Some(caps.iter().map(|c| c.to_ascii_lowercase()).collect());
        self
    }

    /// An environment variable for the agent process (e.g. `RUST_LOG`).
    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.push((key.to_string(), value.to_string()));
        self
    }

    /// Creates the world (namespaces, links, addresses, routes, dnsmasq, servers, policies) and
    /// waits until dnsmasq and the servers listen.
    ///
    /// # Panics
    /// If not root, a prerequisite is missing, or any step fails: the message says which and
    /// shows the failing command's output. Whatever was created is removed first.
    pub fn build(self) -> World {
        match self.try_build() {
            Ok(w) => w,
            Err(e) => panic!("building the test world failed: {e}"),
        }
    }

    /// Like [`WorldBuilder::build`], returning the error instead of panicking.
    pub fn try_build(self) -> Result<World, WorldError> {
        check_prerequisites()?;
        self.validate()?;
        World::cleanup_stale();
        let python = find_python()?;
        let (id, state_file) = claim_id()?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .map_err(|e| err(format!("creating temp dir: {e}")))?;
        let dir = tmp.path().to_path_buf();
        let mut world = World {
            id,
            pods: self.pods,
            dir: dir.clone(),
            tmp: Some(tmp),
            agent_bin: agent_bin(),
            python,
            min_ttl: self.min_ttl,
            agent_args: self.agent_args.clone(),
            agent_env: self.agent_env.clone(),
            agent_caps: self.agent_caps.clone(),
            namespaces: Vec::new(),
            etc_netns: Vec::new(),
            services: Vec::new(),
            agent: None,
            retiring: Vec::new(),
            agent_ever_started: false,
            state_file,
            cgroups: Vec::new(),
        };
        fs::create_dir_all(world.policy_dir()).map_err(|e| err(format!("policy dir: {e}")))?;
        for (name, yaml) in &self.policies {
            world.try_write_policy(name, yaml)?;
        }
        world.create_network(&self)?;
        world.start_dnsmasq(&self)?;
        world.start_servers(&self)?;
        Ok(world)
    }

    fn validate(&self) -> Result<(), WorldError> {
        if self.pods == 0 || self.pods > MAX_PODS {
            return Err(err(format!(
                "pods must be 1..={MAX_PODS}, not {}",
                self.pods
            )));
        }
        for s in &self.servers {
            if let Some(a) = s.v4 {
                check_server_ip(IpAddr::V4(a), &s.name)?;
            }
            if let Some(a) = s.v6 {
                check_server_ip(IpAddr::V6(a), &s.name)?;
            }
            if s.v4.is_none() && s.v6.is_none() {
                return Err(err(format!("HTTP server {} has no address", s.name)));
            }
        }
        for u in &self.udp_echo {
            check_server_ip(u.ip(), "UDP echo")?;
        }
        for r in &self.records {
            if r.v4.is_none() && r.v6.is_none() {
                return Err(err(format!("DNS record {} has no address", r.name)));
            }
        }
        Ok(())
    }
}

fn check_server_ip(ip: IpAddr, what: &str) -> Result<(), WorldError> {
    let ok = match ip {
        IpAddr::V4(a) => a.octets()[..3] == SERVER_NET_V4.0.octets()[..3],
        IpAddr::V6(a) => a.segments()[..4] == SERVER_NET_V6.0.segments()[..4],
    };
    if ok {
        Ok(())
    } else {
        Err(err(format!(
            "{what}: address {ip} is outside the server networks 198.18.1.0/24 and fd00:ae61:1::/64"
        )))
    }
}

// === impl World ===

/// A running small world; see the module docs for its layout. Dropping it kills every process
/// it started (and every process left in its namespaces), runs `aegis-agent uninstall`, and
/// deletes its namespaces, `/etc/netns` entries, socket and owner file. Its temp dir (logs,
/// policies, scripts) is kept, and its path printed, when the thread is panicking.
pub struct World {
    id: String,
    pods: usize,
    dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    agent_bin: PathBuf,
    python: PathBuf,
    min_ttl: u32,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    agent_caps: Option<Vec<String>>,
    namespaces: Vec<String>,
    etc_netns: Vec<PathBuf>,
    services: Vec<(&'static str, Child)>,
    agent: Option<Child>,
    /// Agents an upgrade replaced, still running until [`World::retire_agent`].
    retiring: Vec<Child>,
    agent_ever_started: bool,
    state_file: PathBuf,
    /// cgroups made by [`World::create_cgroup`], removed (processes killed) on drop.
    cgroups: Vec<PathBuf>,
}

impl World {
    /// Starts describing a world with the defaults of [`WorldBuilder`].
    pub fn builder() -> WorldBuilder {
        WorldBuilder::default()
    }

    /// This world's id, the prefix of all its names (e.g. `aeg04211`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Name of the node namespace, where the agent runs.
    pub fn node_ns(&self) -> String {
        format!("{}n", self.id)
    }

    /// Name of the inet namespace (dnsmasq, servers).
    pub fn inet_ns(&self) -> String {
        format!("{}i", self.id)
    }

    /// Name of pod `k`'s namespace (1-based).
    ///
    /// # Panics
    /// If `k` is 0 or above the world's pod count.
    pub fn pod_ns(&self, k: usize) -> String {
        assert!(
            k >= 1 && k <= self.pods,
            "pod index {k} out of 1..={}",
            self.pods
        );
        format!("{}p{k}", self.id)
    }

    /// Number of pods.
    pub fn pod_count(&self) -> usize {
        self.pods
    }

    /// The world's temp dir: logs, scripts, policies.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's `--policies` directory.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// The agent's `--bpffs` pin directory.
    pub fn bpffs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/aegis-{}", self.id))
    }

    /// The agent's `--cgroup-root` name (below the cgroup2 mount).
    pub fn cgroup_root(&self) -> String {
        format!("aegis-{}", self.id)
    }

    /// The agent's `--control-socket` path.
    pub fn control_socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/aegis-{}.sock", self.id))
    }

    /// The `aegis-agent` binary this world runs.
    pub fn agent_bin(&self) -> &Path {
        &self.agent_bin
    }

    /// Absolute path of the python3 interpreter (resolved once, so `comm` is `python3`).
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// The `--min-ttl` the agent runs with, in seconds.
    pub fn min_ttl(&self) -> u32 {
        self.min_ttl
    }

    // --- agent ---

    /// Starts `aegis-agent run` in the node namespace and waits (up to
    /// [`AGENT_READY_TIMEOUT`]) until `aegis-agent status` succeeds. Output is appended to
    /// `agent.stdout` / `agent.stderr` in [`World::dir`], across restarts.
    ///
    /// # Panics
    /// If the agent is already running, exits, or is not ready in time; the message includes
    /// the agent's log.
    pub fn start_agent(&mut self) {
        if let Err(e) = self.try_start_agent() {
            panic!("{e}\n--- agent log ---\n{}", tail(&self.agent_log(), 100));
        }
    }

    /// Like [`World::start_agent`], returning the error (without the log) instead.
    pub fn try_start_agent(&mut self) -> Result<(), WorldError> {
        if self.agent.is_some() {
            return Err(err("agent already running"));
        }
        let child = self.spawn_agent()?;
        self.wait_agent_ready(child)
    }

    /// Upgrades the agent in place: starts a second `aegis-agent run` (same arguments) while
    /// the first runs, and waits until the new process answers `status` as ready (it has then
    /// taken the old one's sockets over, see docs/upgrade.md). The old process keeps running
    /// until [`World::retire_agent`] (as a DaemonSet's old pod does until it is deleted).
    ///
    /// # Panics
    /// If no agent runs, or the new one exits or is not ready in time.
    pub fn upgrade_agent(&mut self) {
        let old = self.agent.take().expect("upgrade_agent: no agent running");
        let new = self.spawn_agent().unwrap_or_else(|e| panic!("{e}"));
        self.retiring.push(old);
        if let Err(e) = self.wait_agent_ready(new) {
            panic!("{e}\n--- agent log ---\n{}", tail(&self.agent_log(), 100));
        }
    }

    /// Sends SIGTERM to the oldest agent an upgrade replaced and waits (up to `timeout`) for it
    /// to exit; returns its exit status and how long it took.
    ///
    /// # Panics
    /// If there is none, or it is still running after `timeout` (it is then killed).
    pub fn retire_agent(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        assert!(!self.retiring.is_empty(), "retire_agent: no replaced agent");
        let child = self.retiring.remove(0);
        terminate(child, timeout)
    }

    /// Sends SIGTERM to the agent (a graceful stop: it drains, detaches nothing) and waits (up
    /// to `timeout`) for it to exit; returns its exit status and how long it took.
    ///
    /// # Panics
    /// If no agent runs, or it is still running after `timeout` (it is then killed).
    pub fn stop_agent(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let child = self.agent.take().expect("stop_agent: no agent running");
        terminate(child, timeout)
    }

    /// The status the agent at the control socket reports (`aegis-agent status`: `ready`,
    /// `pid`, counts), if one answers.
    pub fn agent_status(&self) -> Option<serde_json::Value> {
        let mut status = Command::new(&self.agent_bin);
        status
            .arg("status")
            .arg("--control-socket")
            .arg(self.control_socket());
        let out = run_with_timeout(&mut status, Duration::from_secs(5)).ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The pid of the running agent process started by this world.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    fn spawn_agent(&mut self) -> Result<Child, WorldError> {
        if !self.agent_bin.exists() {
            return Err(err(format!(
                "agent binary {} does not exist (build it, or set AEGIS_AGENT_BIN)",
                self.agent_bin.display()
            )));
        }
        ensure_bpffs()?;
        let stdout = append_file(&self.dir.join("agent.stdout"))?;
        let stderr = append_file(&self.dir.join("agent.stderr"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node_ns()));
        if let Some(caps) = &self.agent_caps {
            let cgroup2 = cgroup2_mount().ok_or_else(|| err("no cgroup2 mount"))?;
            let root = cgroup2.join(self.cgroup_root());
            std::fs::create_dir_all(&root)
                .map_err(|e| err(format!("creating {}: {e}", root.display())))?;
            let bounding: String = caps.iter().map(|c| format!(",+{c}")).collect();
            cmd.args([
                "setpriv",
                &format!("--bounding-set=-all{bounding}"),
                "--inh-caps=-all",
            ]);
        }
        cmd.arg(&self.agent_bin)
            .arg("run")
            .arg("--policies")
            .arg(self.policy_dir())
            .args(["--dns-address", &DNS_PROXY_V4.to_string()])
            .args(["--dns-address6", &DNS_PROXY_V6.to_string()])
            .args(["--l7-address6", &DNS_PROXY_V6.to_string()])
            .args(["--dns-upstream", &format!("{UPSTREAM_DNS_V4}:53")])
            .arg("--bpffs")
            .arg(self.bpffs_dir())
            .args(["--cgroup-root", &self.cgroup_root()])
            .arg("--control-socket")
            .arg(self.control_socket())
            .args(["--min-ttl", &self.min_ttl.to_string()])
            .args(["--log-format", "json"])
            .arg("--audit-log")
            .arg(self.dir.join("audit.jsonl"))
            .arg("--audit-key")
            .arg(self.dir.join("audit.key"))
            .arg("--kill-switch-file")
            .arg(self.dir.join("kill-switch.json"))
            .arg("--state-db")
            .arg(self.dir.join("state.redb"))
            .arg("--approval-key")
            .arg(self.dir.join("approval.key"))
            .arg("--approvals-db")
            .arg(self.dir.join("approvals.redb"))
            .arg("--ca-cert")
            .arg(self.node_ca())
            .arg("--ca-key")
            .arg(self.dir.join("node-ca.key"));
        let bundle = self.dir.join("tls").join("bundle.pem");
        if bundle.exists() {
            cmd.arg("--upstream-ca").arg(bundle);
        }
        cmd.args(&self.agent_args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawning {}: {e}", cmdline(&cmd))))?;
        self.agent_ever_started = true;
        Ok(child)
    }

    /// Makes `child` the world's agent and waits until the control socket reports it (its pid)
    /// ready.
    fn wait_agent_ready(&mut self, child: Child) -> Result<(), WorldError> {
        let pid = child.id();
        self.agent = Some(child);
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Some(child) = self.agent.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.agent = None;
                return Err(err(format!("agent exited during startup with {status}")));
            }
            if let Some(status) = self.agent_status()
                && status["ready"] == true
                && status["pid"] == pid
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "agent not ready after {}s (`aegis-agent status` kept failing)",
                    AGENT_READY_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts a throwaway `redis-server` (no persistence) on `127.0.0.1:port` in the node
    /// namespace and waits until it answers `PING`.
    ///
    /// # Panics
    /// If it does not answer within 10 s.
    pub fn start_redis(&mut self, port: u16) {
        let (ns, port) = (self.node_ns(), port.to_string());
        self.spawn_service(
            &ns,
            "redis",
            &[
                "redis-server",
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        );
        assert!(
            wait_until(Duration::from_secs(10), || {
                self.node_exec(&["redis-cli", "-p", &port, "ping"])
                    .stdout
                    .starts_with(b"PONG")
            }),
            "redis-server did not start\n{}",
            self.diagnostics()
        );
    }

    /// Appends arguments to `aegis-agent run` for the next start (for values known only once
    /// the world exists, such as paths in [`World::dir`]).
    pub fn add_agent_args<S: AsRef<str>>(&mut self, args: &[S]) {
        self.agent_args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
    }

    /// Whether the agent process started by this world is still running.
    pub fn agent_running(&mut self) -> bool {
        match self.agent.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the agent with SIGKILL (no graceful shutdown: pinned programs stay attached) and
    /// reaps it. Does nothing if it is not running.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGHUP to the agent (policy reload). Returns at once: poll for the effect.
    ///
    /// # Panics
    /// If the agent is not running.
    pub fn reload_policy(&self) {
        let child = self
            .agent
            .as_ref()
            .expect("reload_policy: agent not running");
        // SAFETY: kill(2) with a pid we spawned and still hold (not yet reaped).
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(rc, 0, "kill(SIGHUP): {}", std::io::Error::last_os_error());
    }

    /// Replaces the whole policy dir's content with `files` (name, YAML) the way kubelet updates
    /// a mounted ConfigMap (its `AtomicWriter`): the files go into a new `..<timestamp>`
    /// directory, a `..data_tmp` symlink to it is renamed over `..data`, each name is a symlink
    /// to `..data/<name>` (created when new, removed when gone), and the old directory is
    /// deleted. Plain files in the dir are left alone.
    ///
    /// # Panics
    /// On I/O errors.
    pub fn write_configmap_policies(&self, files: &[(&str, &str)]) {
        use std::os::unix::fs::symlink;
        let dir = self.policy_dir();
        let data = dir.join("..data");
        let old = fs::read_link(&data).ok();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970");
        let fresh = format!("..{}.{:09}", stamp.as_secs(), stamp.subsec_nanos());
        let io = |what: &str, path: &Path, e: std::io::Error| {
            panic!("configmap {what} {}: {e}", path.display())
        };
        fs::create_dir(dir.join(&fresh)).unwrap_or_else(|e| io("mkdir", &dir.join(&fresh), e));
        for (name, yaml) in files {
            let path = dir.join(&fresh).join(name);
            fs::write(&path, yaml).unwrap_or_else(|e| io("write", &path, e));
        }
        let tmp = dir.join("..data_tmp");
        symlink(&fresh, &tmp).unwrap_or_else(|e| io("symlink", &tmp, e));
        fs::rename(&tmp, &data).unwrap_or_else(|e| io("rename", &data, e));
        for (name, _) in files {
            let link = dir.join(name);
            if fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(name), &link)
                    .unwrap_or_else(|e| io("symlink", &link, e));
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
                if is_link && !name.starts_with("..") && !files.iter().any(|(n, _)| *n == name) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if let Some(old) = old {
            let _ = fs::remove_dir_all(dir.join(old));
        }
    }

    /// Writes policy file `name` (`.yaml` appended unless it ends in `.yaml`/`.yml`) into the
    /// policy dir atomically (write elsewhere, then rename), so the agent never reads half a file.
    ///
    /// # Panics
    /// On I/O errors.
    pub fn write_policy(&self, name: &str, yaml: &str) {
        self.try_write_policy(name, yaml)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_write_policy(&self, name: &str, yaml: &str) -> Result<(), WorldError> {
        let file = policy_file_name(name);
        let staged = self.dir.join(format!(".staged-{file}"));
        fs::write(&staged, yaml).map_err(|e| err(format!("writing {}: {e}", staged.display())))?;
        let dst = self.policy_dir().join(&file);
        fs::rename(&staged, &dst).map_err(|e| err(format!("renaming to {}: {e}", dst.display())))
    }

    /// Removes policy file `name` (same naming as [`World::write_policy`]); missing is fine.
    pub fn remove_policy(&self, name: &str) {
        let _ = fs::remove_file(self.policy_dir().join(policy_file_name(name)));
    }

    /// Everything the agent printed so far (all runs): stdout, then stderr after a marker line.
    pub fn agent_log(&self) -> String {
        let out = fs::read_to_string(self.dir.join("agent.stdout")).unwrap_or_default();
        let errs = fs::read_to_string(self.dir.join("agent.stderr")).unwrap_or_default();
        format!("{out}\n--- agent stderr ---\n{errs}")
    }

    /// The agent's JSON log lines (stdout, all runs) whose `target` is `aegis::event`, in order.
    /// Lines that are not JSON are skipped.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let out = fs::read_to_string(self.dir.join("agent.stdout")).unwrap_or_default();
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("target").and_then(|t| t.as_str()) == Some("aegis::event"))
            .collect()
    }

    /// Waits up to `timeout` for an event matching `pred` and returns it.
    ///
    /// # Panics
    /// On timeout, with `what` and the events seen so far.
    pub fn wait_for_event(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            if Instant::now() > deadline {
                let evs: Vec<String> = self.events().iter().map(|e| e.to_string()).collect();
                panic!(
                    "no event {what} within {}s; events so far:\n{}\n--- agent log tail ---\n{}",
                    timeout.as_secs(),
                    evs.join("\n"),
                    tail(&self.agent_log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `aegis-agent audit verify FILE --key <world>/audit.key.pub`: (success, stdout).
    pub fn verify_audit(&self, file: &Path) -> (bool, String) {
        let out = Command::new(self.agent_bin())
            .args(["audit", "verify"])
            .arg(file)
            .arg("--key")
            .arg(self.dir.join("audit.key.pub"))
            .output()
            .expect("run aegis-agent audit verify");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Runs `aegis-agent kill-switch STATE --agent AGENT` against this world's agent, asserts
    /// it succeeded, and returns how long the command took.
    pub fn kill_switch(&self, state: &str, agent: &str) -> Duration {
        let started = std::time::Instant::now();
        let out = Command::new(self.agent_bin())
            .args(["kill-switch", state, "--agent", agent, "--control-socket"])
            .arg(self.control_socket())
            .output()
            .expect("run aegis-agent kill-switch");
        assert!(
            out.status.success(),
            "kill-switch {state}: {}",
            describe(&out)
        );
        started.elapsed()
    }

    /// The audit log's path.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// The agent's audit records (`--audit-log`), parsed, in file order.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// dnsmasq's query log (`--log-queries`), for debugging.
    pub fn dnsmasq_log(&self) -> String {
        fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }

    /// A short diagnostic dump (agent log tail, dnsmasq log tail) for assertion messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- agent log (tail) ---\n{}\n--- dnsmasq log (tail) ---\n{}",
            tail(&self.agent_log(), 40),
            tail(&self.dnsmasq_log(), 20)
        )
    }

    // --- running commands ---

    /// A command running `argv` in pod `k`'s namespace via `ip netns exec` (which also
    /// bind-mounts the pod's `resolv.conf`). With `agent = Some((name, tenant))` it runs as that
    /// identity through `aegis-agent exec --agent name [--tenant t] --control-socket .. -- argv`;
    /// with `None` it is an ordinary (non-agent) process. Stdin is null; set stdio as needed.
    pub fn pod_command<S: AsRef<OsStr>>(
        &self,
        k: usize,
        agent: Option<(&str, Option<&str>)>,
        argv: &[S],
    ) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(self.pod_ns(k));
        if let Some((name, tenant)) = agent {
            cmd.arg(&self.agent_bin).args(["exec", "--agent", name]);
            if let Some(t) = tenant {
                cmd.args(["--tenant", t]);
            }
            cmd.arg("--control-socket")
                .arg(self.control_socket())
                .arg("--");
        }
        cmd.args(argv).stdin(Stdio::null());
        cmd
    }

    /// Runs [`World::pod_command`] to completion and returns its output. A command still
    /// running after [`EXEC_TIMEOUT`] is killed (its status then shows the signal).
    ///
    /// # Panics
    /// If the command cannot be spawned.
    pub fn pod_exec<S: AsRef<OsStr>>(
        &self,
        k: usize,
        agent: Option<(&str, Option<&str>)>,
        argv: &[S],
    ) -> Output {
        let mut cmd = self.pod_command(k, agent, argv);
        run_with_timeout(&mut cmd, EXEC_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Spawns [`World::pod_command`] without waiting, with stdin, stdout and stderr piped (for
    /// long-running workloads, e.g. across agent restarts). The caller owns the child; anything
    /// still running in the pod is killed when the world drops.
    ///
    /// # Panics
    /// If the command cannot be spawned.
    pub fn pod_spawn<S: AsRef<OsStr>>(
        &self,
        k: usize,
        agent: Option<(&str, Option<&str>)>,
        argv: &[S],
    ) -> Child {
        let mut cmd = self.pod_command(k, agent, argv);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", cmdline(&cmd)))
    }

    /// Runs `argv` in the node namespace (`ip netns exec`; its `resolv.conf` also names
    /// dnsmasq) and returns its output, killing it after [`EXEC_TIMEOUT`].
    pub fn node_exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Output {
        self.ns_exec(&self.node_ns(), argv)
    }

    /// Runs `argv` in the inet namespace and returns its output.
    pub fn inet_exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Output {
        self.ns_exec(&self.inet_ns(), argv)
    }

    fn ns_exec<S: AsRef<OsStr>>(&self, ns: &str, argv: &[S]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null());
        run_with_timeout(&mut cmd, EXEC_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates cgroup `rel` (with its parents) below this world's cgroup root
    /// ([`World::cgroup_root`]), e.g. a kubelet layout under `kubelet/`; it is removed, with
    /// any process in it, when the world drops. Returns its absolute path.
    ///
    /// # Panics
    /// Without a cgroup2 mount, or if the directory cannot be made.
    pub fn create_cgroup(&mut self, rel: &str) -> PathBuf {
        let mount = cgroup2_mount().expect("a cgroup2 mount");
        let root = mount.join(self.cgroup_root());
        let path = root.join(rel);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        // Record the topmost new directory below the root once; its removal takes the rest.
        let top = root.join(
            Path::new(rel)
                .components()
                .next()
                .expect("non-empty cgroup path"),
        );
        if !self.cgroups.contains(&top) {
            self.cgroups.push(top);
        }
        path
    }

    /// Spawns `argv` in pod `k`'s namespace as a process of `cgroup` (an absolute path; the
    /// process moves itself there before `exec`, as a container runtime places a container's
    /// first process), with stdin, stdout and stderr piped. Anything still running is killed
    /// when the world drops.
    ///
    /// # Panics
    /// If the command cannot be spawned.
    pub fn spawn_in_cgroup<S: AsRef<OsStr>>(&self, k: usize, cgroup: &Path, argv: &[S]) -> Child {
        // The move happens before `ip netns exec`, whose fresh /sys hides the cgroup2 mount.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
            .arg(cgroup)
            .args(["ip", "netns", "exec"])
            .arg(self.pod_ns(k))
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", cmdline(&cmd)))
    }

    /// Runs `aegis-agent` with `args` (in the root namespace) and returns its output.
    pub fn agent_cli<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = Command::new(&self.agent_bin);
        cmd.args(args).stdin(Stdio::null());
        run_with_timeout(&mut cmd, EXEC_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    // --- building ---

    fn add_netns(&mut self, name: String) -> Result<(), WorldError> {
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        // DAD off before any link exists, so every address is usable at once; lo up.
        nsenter_sh(
            &name,
            "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
             echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad && \
             echo 0 > /proc/sys/net/ipv6/conf/default/dad_transmits",
        )?;
        ip(&name, &["link", "set", "lo", "up"])
    }

    fn create_network(&mut self, b: &WorldBuilder) -> Result<(), WorldError> {
        let node = self.node_ns();
        let inet = self.inet_ns();
        self.add_netns(node.clone())?;
        self.add_netns(inet.clone())?;
        for k in 1..=self.pods {
            self.add_netns(self.pod_ns(k))?;
        }
        nsenter_sh(
            &node,
            "echo 1 > /proc/sys/net/ipv4/ip_forward && \
             echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
        )?;

        // Node: DNS proxy addresses on lo (the VM kernels we run on may lack the dummy driver;
        // routed traffic to a lo address is delivered locally all the same).
        ip(
            &node,
            &["addr", "add", &format!("{DNS_PROXY_V4}/32"), "dev", "lo"],
        )?;
        ip(
            &node,
            &[
                "-6",
                "addr",
                "add",
                &format!("{DNS_PROXY_V6}/128"),
                "dev",
                "lo",
                "nodad",
            ],
        )?;

        // Node <-> inet.
        run(Command::new("ip").args([
            "link", "add", "up0", "netns", &node, "type", "veth", "peer", "name", "eth0", "netns",
            &inet,
        ]))?;
        ip(
            &node,
            &["addr", "add", &format!("{NODE_UPLINK_V4}/24"), "dev", "up0"],
        )?;
        ip(
            &node,
            &[
                "-6",
                "addr",
                "add",
                &format!("{NODE_UPLINK_V6}/64"),
                "dev",
                "up0",
                "nodad",
            ],
        )?;
        ip(&node, &["link", "set", "up0", "up"])?;
        ip(
            &inet,
            &["addr", "add", &format!("{INET_V4}/24"), "dev", "eth0"],
        )?;
        ip(
            &inet,
            &[
                "addr",
                "add",
                &format!("{UPSTREAM_DNS_V4}/24"),
                "dev",
                "eth0",
            ],
        )?;
        ip(
            &inet,
            &[
                "-6",
                "addr",
                "add",
                &format!("{INET_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip(
            &inet,
            &[
                "-6",
                "addr",
                "add",
                &format!("{UPSTREAM_DNS_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip(&inet, &["link", "set", "eth0", "up"])?;
        ip(
            &inet,
            &[
                "route",
                "add",
                "default",
                "via",
                &NODE_UPLINK_V4.to_string(),
            ],
        )?;
        ip(
            &inet,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &NODE_UPLINK_V6.to_string(),
            ],
        )?;
        let (net4, len4) = SERVER_NET_V4;
        let (net6, len6) = SERVER_NET_V6;
        ip(
            &node,
            &[
                "route",
                "add",
                &format!("{net4}/{len4}"),
                "via",
                &INET_V4.to_string(),
            ],
        )?;
        ip(
            &node,
            &[
                "-6",
                "route",
                "add",
                &format!("{net6}/{len6}"),
                "via",
                &INET_V6.to_string(),
            ],
        )?;

        // Inet: server addresses on lo.
        let mut addrs: Vec<IpAddr> = Vec::new();
        for s in &b.servers {
            addrs.extend(s.v4.map(IpAddr::V4));
            addrs.extend(s.v6.map(IpAddr::V6));
        }
        addrs.extend(b.udp_echo.iter().map(|a| a.ip()));
        addrs.sort();
        addrs.dedup();
        for a in addrs {
            match a {
                IpAddr::V4(a) => ip(&inet, &["addr", "add", &format!("{a}/32"), "dev", "lo"])?,
                IpAddr::V6(a) => ip(
                    &inet,
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{a}/128"),
                        "dev",
                        "lo",
                        "nodad",
                    ],
                )?,
            }
        }

        // Pods.
        let resolv = format!(
            "nameserver {UPSTREAM_DNS_V4}\noptions {}\n",
            b.resolv_options
        );
        for k in 1..=self.pods {
            let pod = self.pod_ns(k);
            let link = format!("pod{k}");
            run(Command::new("ip").args([
                "link", "add", &link, "netns", &node, "type", "veth", "peer", "name", "eth0",
                "netns", &pod,
            ]))?;
            ip(
                &node,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", pod_gateway_v4(k)),
                    "dev",
                    &link,
                ],
            )?;
            ip(
                &node,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", pod_gateway_v6(k)),
                    "dev",
                    &link,
                    "nodad",
                ],
            )?;
            ip(&node, &["link", "set", &link, "up"])?;
            ip(
                &pod,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", pod_addr_v4(k)),
                    "dev",
                    "eth0",
                ],
            )?;
            ip(
                &pod,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", pod_addr_v6(k)),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            ip(&pod, &["link", "set", "eth0", "up"])?;
            ip(
                &pod,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &pod_gateway_v4(k).to_string(),
                ],
            )?;
            ip(
                &pod,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &pod_gateway_v6(k).to_string(),
                ],
            )?;
            self.write_etc_netns(&pod, &resolv)?;
        }
        // The node's own commands (node_exec) resolve straight from dnsmasq too.
        self.write_etc_netns(
            &node,
            &format!(
                "nameserver {UPSTREAM_DNS_V4}\noptions {}\n",
                b.resolv_options
            ),
        )?;
        Ok(())
    }

    fn write_etc_netns(&mut self, ns: &str, resolv: &str) -> Result<(), WorldError> {
        let d = PathBuf::from(format!("/etc/netns/{ns}"));
        fs::create_dir_all(&d).map_err(|e| err(format!("creating {}: {e}", d.display())))?;
        self.etc_netns.push(d.clone());
        fs::write(d.join("resolv.conf"), resolv)
            .map_err(|e| err(format!("writing {}/resolv.conf: {e}", d.display())))
    }

    fn start_dnsmasq(&mut self, b: &WorldBuilder) -> Result<(), WorldError> {
        let log = self.dir.join("dnsmasq.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.inet_ns(), "dnsmasq"])
            .args([
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--keep-in-foreground",
            ])
            .args([
                "--bind-interfaces",
                "--user=root",
                "--group=root",
                "--log-queries",
            ])
            .arg(format!("--listen-address={UPSTREAM_DNS_V4}"))
            .arg(format!("--listen-address={UPSTREAM_DNS_V6}"))
            .arg(format!("--log-facility={}", log.display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("dnsmasq.pid").display()
            ));
        for r in &b.records {
            let mut spec = r.name.clone();
            if let Some(a) = r.v4 {
                spec.push_str(&format!(",{a}"));
            }
            if let Some(a) = r.v6 {
                spec.push_str(&format!(",{a}"));
            }
            spec.push_str(&format!(",{}", r.ttl));
            cmd.arg(format!("--host-record={spec}"));
        }
        for c in &b.cnames {
            cmd.arg(format!("--cname={},{},{}", c.name, c.target, c.ttl));
        }
        let stderr = append_file(&self.dir.join("dnsmasq.stderr"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawning {}: {e}", cmdline(&cmd))))?;
        self.services.push(("dnsmasq", child));
        self.wait_service("dnsmasq", Duration::from_secs(10), || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("started, version")
        })
    }

    /// The node CA certificate the agent terminates TLS with (generated on the agent's first
    /// start), for clients' `--cacert` / `SSL_CERT_FILE`.
    pub fn node_ca(&self) -> PathBuf {
        self.dir.join("node-ca.crt")
    }

    /// The world's test CA (PEM), which signs every TLS server's certificate: what clients
    /// that reach the servers directly pass as `--cacert`, and what the agent verifies
    /// upstream servers against (`--upstream-ca`).
    pub fn test_ca(&self) -> PathBuf {
        self.dir.join("tls").join("test-ca.crt")
    }

    /// A server certificate for `name` signed by the test CA (made like the TLS servers'),
    /// for servers a test or bench runs itself; returns (certificate, key) PEM paths. Call it
    /// before [`World::start_agent`] so the agent verifies upstreams against the test CA.
    ///
    /// # Panics
    /// If `openssl` fails.
    pub fn server_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        self.make_cert(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Spawns `argv` in namespace `ns` (`ip netns exec`) as a service of the world: stdin null,
    /// stdout and stderr appended to `<name>.log` in [`World::dir`]; killed and reaped when the
    /// world drops. Returns at once: wait for readiness yourself.
    ///
    /// # Panics
    /// If the command cannot be spawned.
    pub fn spawn_service<S: AsRef<OsStr>>(&mut self, ns: &str, name: &'static str, argv: &[S]) {
        let log =
            append_file(&self.dir.join(format!("{name}.log"))).unwrap_or_else(|e| panic!("{e}"));
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("dup: {e}"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", cmdline(&cmd)));
        self.services.push((name, child));
    }

    /// Makes the test CA (once) and a certificate for `name` signed by it, with `name` as
    /// subject alternative name; returns (certificate, key).
    fn make_cert(&self, name: &str) -> Result<(PathBuf, PathBuf), WorldError> {
        let tls = self.dir.join("tls");
        fs::create_dir_all(&tls).map_err(|e| err(format!("tls dir: {e}")))?;
        let (ca, ca_key) = (self.test_ca(), tls.join("test-ca.key"));
        let p256 = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        if !ca.exists() {
            run(Command::new("openssl")
                .args(["req", "-x509"])
                .args(p256)
                .args(["-days", "2", "-subj", "/CN=Aegis test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca))?;
        }
        let (cert, key, csr, ext) = (
            tls.join(format!("{name}.crt")),
            tls.join(format!("{name}.key")),
            tls.join(format!("{name}.csr")),
            tls.join(format!("{name}.ext")),
        );
        run(Command::new("openssl")
            .args(["req", "-new"])
            .args(p256)
            .args(["-subj", &format!("/CN={name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr))?;
        fs::write(
            &ext,
            format!("subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"),
        )
        .map_err(|e| err(format!("{}: {e}", ext.display())))?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial"])
            .arg(format!("0x{:x}", rand_serial(name)))
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&cert))?;
        // The agent verifies upstream servers against the test CA.
        fs::copy(&ca, tls.join("bundle.pem")).map_err(|e| err(format!("bundle.pem: {e}")))?;
        Ok((cert, key))
    }

    fn start_servers(&mut self, b: &WorldBuilder) -> Result<(), WorldError> {
        if b.servers.is_empty() && b.udp_echo.is_empty() {
            return Ok(());
        }
        let script = self.dir.join("servers.py");
        fs::write(&script, SERVERS_PY).map_err(|e| err(format!("writing servers.py: {e}")))?;
        let ready = self.dir.join("servers.ready");
        let mut http = Vec::new();
        for s in &b.servers {
            let tls = if s.tls {
                let (cert, key) = self.make_cert(&s.name)?;
                serde_json::json!({"cert": cert, "key": key})
            } else {
                serde_json::Value::Null
            };
            for ip in s.v4.map(IpAddr::V4).into_iter().chain(s.v6.map(IpAddr::V6)) {
                for &port in &s.ports {
                    http.push(serde_json::json!({
                        "name": s.name, "addr": ip.to_string(), "port": port, "tls": tls,
                    }));
                }
            }
        }
        let udp: Vec<_> = b
            .udp_echo
            .iter()
            .map(|a| serde_json::json!({"addr": a.ip().to_string(), "port": a.port()}))
            .collect();
        let config = serde_json::json!({"http": http, "udp_echo": udp, "ready": ready});
        let config_path = self.dir.join("servers.json");
        fs::write(&config_path, config.to_string())
            .map_err(|e| err(format!("servers.json: {e}")))?;
        let log = append_file(&self.dir.join("servers.log"))?;
        let log2 = log.try_clone().map_err(|e| err(format!("dup: {e}")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.inet_ns()])
            .arg(&self.python)
            .arg(&script)
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawning {}: {e}", cmdline(&cmd))))?;
        self.services.push(("servers", child));
        self.wait_service("servers", Duration::from_secs(20), || ready.exists())
    }

    fn wait_service(
        &mut self,
        name: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), WorldError> {
        let deadline = Instant::now() + timeout;
        let logs = |dir: &Path| {
            ["dnsmasq.stderr", "dnsmasq.log", "servers.log"]
                .map(|f| {
                    format!(
                        "{f}:\n{}",
                        fs::read_to_string(dir.join(f)).unwrap_or_default()
                    )
                })
                .join("\n")
        };
        while !ready() {
            if let Some((_, child)) = self.services.iter_mut().find(|(n, _)| *n == name)
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(err(format!(
                    "{name} exited with {status}\n{}",
                    logs(&self.dir)
                )));
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "{name} not ready after {}s\n{}",
                    timeout.as_secs(),
                    logs(&self.dir)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    // --- cleanup ---

    /// Removes what crashed earlier runs left behind: for every world id (namespaces under
    /// `/run/netns`, `/etc/netns` dirs, owner files, pin dirs, sockets, exec cgroup roots
    /// matching `aeg<digits>`) whose owner file is missing or names a dead process, kills the
    /// processes in its namespaces, runs `aegis-agent uninstall` (falling back to removing pins
    /// and cgroups by hand) and deletes the rest. Live worlds, of this or other processes, are
    /// left alone. Errors are printed, not returned.
    pub fn cleanup_stale() {
        let mut ids = std::collections::BTreeSet::new();
        let scan = |dir: &str,
                    strip: &dyn Fn(&str) -> Option<String>,
                    ids: &mut std::collections::BTreeSet<String>| {
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if let Some(id) = e.file_name().to_str().and_then(strip) {
                        ids.insert(id);
                    }
                }
            }
        };
        scan("/run/netns", &|n| ns_world_id(n), &mut ids);
        scan("/etc/netns", &|n| ns_world_id(n), &mut ids);
        scan(
            STATE_DIR,
            &|n| {
                n.strip_suffix(".pid")
                    .filter(|i| is_world_id(i))
                    .map(String::from)
            },
            &mut ids,
        );
        scan(
            "/sys/fs/bpf",
            &|n| {
                n.strip_prefix("aegis-")
                    .filter(|i| is_world_id(i))
                    .map(String::from)
            },
            &mut ids,
        );
        scan(
            "/run",
            &|n| {
                n.strip_prefix("aegis-")
                    .and_then(|s| s.strip_suffix(".sock"))
                    .filter(|i| is_world_id(i))
                    .map(String::from)
            },
            &mut ids,
        );
        if let Some(cg) = cgroup2_mount() {
            scan(
                &cg.to_string_lossy(),
                &|n| {
                    n.strip_prefix("aegis-")
                        .filter(|i| is_world_id(i))
                        .map(String::from)
                },
                &mut ids,
            );
        }
        for id in ids {
            if owner_alive(&id) {
                continue;
            }
            eprintln!("aegis-tests: removing stale world {id}");
            remove_world(&id, &agent_bin(), true);
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // 1. The agents, then every process in our namespaces (workloads, dnsmasq, servers).
        self.kill_agent();
        for mut child in self.retiring.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            kill_netns_pids(ns);
        }
        for (name, child) in &mut self.services {
            let _ = child.kill();
            if let Err(e) = child.wait() {
                eprintln!("aegis-tests: reaping {name}: {e}");
            }
        }
        // 2. cgroups the test made, with what is left in them.
        for cg in self.cgroups.iter().rev() {
            remove_cgroup_tree(cg);
        }
        // 3. Pins and exec cgroups (uninstall), namespaces, /etc/netns, socket, owner file.
        remove_world(&self.id, &self.agent_bin, self.agent_ever_started);
        for d in &self.etc_netns {
            if d.exists()
                && let Err(e) = fs::remove_dir_all(d)
            {
                eprintln!("aegis-tests: removing {}: {e}", d.display());
            }
        }
        let _ = fs::remove_file(&self.state_file);
        if std::thread::panicking()
            && let Some(tmp) = self.tmp.take()
        {
            let path = tmp.keep();
            eprintln!(
                "aegis-tests: world {} failed; logs kept in {}",
                self.id,
                path.display()
            );
        }
    }
}

/// Removes everything named after world `id`. Assumes its processes may still be alive in its
/// namespaces and kills them first.
fn remove_world(id: &str, agent_bin: &Path, run_uninstall: bool) {
    let namespaces: Vec<String> = fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| ns_world_id(n).as_deref() == Some(id))
                .collect()
        })
        .unwrap_or_default();
    for ns in &namespaces {
        kill_netns_pids(ns);
    }
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/aegis-{id}"));
    let cg_root = format!("aegis-{id}");
    let cg_dir = cgroup2_mount().map(|m| m.join(&cg_root));
    let leftovers = || bpffs.exists() || cg_dir.as_ref().is_some_and(|d| d.exists());
    if run_uninstall || leftovers() {
        if agent_bin.exists() {
            let mut cmd = Command::new(agent_bin);
            cmd.arg("uninstall")
                .arg("--bpffs")
                .arg(&bpffs)
                .args(["--cgroup-root", &cg_root]);
            match run_with_timeout(&mut cmd, Duration::from_secs(30)) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!("aegis-tests: {} failed:\n{}", cmdline(&cmd), describe(&out)),
                Err(e) => eprintln!("aegis-tests: {e}"),
            }
        } else if leftovers() {
            eprintln!(
                "aegis-tests: {} missing; removing pins and cgroups by hand",
                agent_bin.display()
            );
        }
        // Whatever uninstall left (or could not run): remove by hand and say so.
        if bpffs.exists() {
            eprintln!(
                "aegis-tests: {} still exists after uninstall; removing",
                bpffs.display()
            );
            if let Err(e) = fs::remove_dir_all(&bpffs) {
                eprintln!("aegis-tests: removing {}: {e}", bpffs.display());
            }
        }
        if let Some(d) = cg_dir.as_ref().filter(|d| d.exists()) {
            eprintln!(
                "aegis-tests: {} still exists after uninstall; removing",
                d.display()
            );
            remove_cgroup_tree(d);
        }
    }
    for ns in &namespaces {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
            eprintln!("aegis-tests: {e}");
        }
    }
    if let Ok(rd) = fs::read_dir("/etc/netns") {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_str().and_then(ns_world_id).as_deref() == Some(id)
                && let Err(err) = fs::remove_dir_all(e.path())
            {
                eprintln!("aegis-tests: removing {}: {err}", e.path().display());
            }
        }
    }
    let _ = fs::remove_file(format!("/run/aegis-{id}.sock"));
    let _ = fs::remove_file(Path::new(STATE_DIR).join(format!("{id}.pid")));
}

/// Kills (SIGKILL) every process in namespace `ns` and waits up to 5 s for them to go.
fn kill_netns_pids(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = match Command::new("ip").args(["netns", "pids", ns]).output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok())
                .collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("aegis-tests: processes {pids:?} still in {ns} after SIGKILL");
            return;
        }
        for p in pids {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Depth-first: kill the processes of each cgroup (`cgroup.kill`), then rmdir it, retrying
/// while busy (processes not yet reaped).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return,
            Err(e) => {
                eprintln!("aegis-tests: rmdir {}: {e}", dir.display());
                return;
            }
        }
    }
}

// === helpers ===

/// `aeg` followed by digits only.
fn is_world_id(s: &str) -> bool {
    s.strip_prefix(PREFIX)
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The world id of a namespace name (`<id>n`, `<id>i`, `<id>p<k>`), if it is one.
fn ns_world_id(ns: &str) -> Option<String> {
    if let Some(id) = ns.strip_suffix('n').or_else(|| ns.strip_suffix('i')) {
        return is_world_id(id).then(|| id.to_string());
    }
    let (id, k) = ns.rsplit_once('p')?;
    (!k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) && is_world_id(id))
        .then(|| id.to_string())
}

fn proc_starttime(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after comm start at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that created world `id` is still alive (same pid and start time).
fn owner_alive(id: &str) -> bool {
    let Ok(s) = fs::read_to_string(Path::new(STATE_DIR).join(format!("{id}.pid"))) else {
        return false;
    };
    let mut it = s.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (
        it.next().map(str::parse::<u32>),
        it.next().map(str::parse::<u64>),
    ) else {
        return false;
    };
    proc_starttime(pid) == Some(start)
}

/// Picks a fresh id and creates its owner file exclusively (the file is the claim).
fn claim_id() -> Result<(String, PathBuf), WorldError> {
    fs::create_dir_all(STATE_DIR).map_err(|e| err(format!("creating {STATE_DIR}: {e}")))?;
    let pid = std::process::id();
    let start = proc_starttime(pid).ok_or_else(|| err("reading own /proc/self/stat"))?;
    for _ in 0..1000 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{:04}{n}", pid % 10000);
        let path = Path::new(STATE_DIR).join(format!("{id}.pid"));
        if Path::new(&format!("/run/netns/{id}n")).exists() {
            continue;
        }
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(format!("{pid} {start}\n").as_bytes())
                    .map_err(|e| err(format!("writing {}: {e}", path.display())))?;
                return Ok((id, path));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(format!("creating {}: {e}", path.display()))),
        }
    }
    Err(err("no free world id"))
}

fn check_prerequisites() -> Result<(), WorldError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(err(
            "the Aegis integration tests need root (network namespaces, cgroups, eBPF); \
             run them as root, e.g. through `cargo xtask test`",
        ));
    }
    let missing: Vec<&str> = ["ip", "nsenter", "dnsmasq", "curl", "python3"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "missing prerequisites: {} (install iproute2, util-linux, dnsmasq-base, curl, python3; \
             `cargo xtask setup` does it)",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Finds `name` in `$PATH` or the sbin directories (dnsmasq lives in /usr/sbin).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The real python3 executable (not a pyenv shim), so workloads' `comm` is `python3`.
fn find_python() -> Result<PathBuf, WorldError> {
    let out = run(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]))?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if p.is_file() {
        Ok(p)
    } else {
        Err(err(format!("python3 reports executable {p:?}, not a file")))
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (as `cargo xtask setup` does).
fn ensure_bpffs() -> Result<(), WorldError> {
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        eprintln!("aegis-tests: mounting bpffs at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next() == Some("cgroup2") {
                Some(PathBuf::from(pre.split_whitespace().nth(4)?))
            } else {
                None
            }
        })
}

fn policy_file_name(name: &str) -> String {
    if name.ends_with(".yaml") || name.ends_with(".yml") {
        name.to_string()
    } else {
        format!("{name}.yaml")
    }
}

fn append_file(path: &Path) -> Result<fs::File, WorldError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| err(format!("opening {}: {e}", path.display())))
}

fn ip(ns: &str, args: &[&str]) -> Result<(), WorldError> {
    run(Command::new("ip").args(["-n", ns]).args(args)).map(|_| ())
}

fn nsenter_sh(ns: &str, script: &str) -> Result<(), WorldError> {
    run(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["sh", "-c", script]))
    .map(|_| ())
}

/// Runs `cmd` to completion; an error (with the command line and output) unless it succeeds.
fn run(cmd: &mut Command) -> Result<Output, WorldError> {
    let out = run_with_timeout(cmd, EXEC_TIMEOUT)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(err(format!(
            "`{}` failed: {}",
            cmdline(cmd),
            describe(&out)
        )))
    }
}

/// Runs `cmd` with stdout and stderr captured; kills it (SIGKILL) once `timeout` has passed.
///
/// # Errors
/// Only if the command cannot be spawned; a timed-out command returns its (signal) status.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, WorldError> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| err(format!("spawning `{}`: {e}", cmdline(cmd))))?;
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() > deadline => {
                eprintln!(
                    "aegis-tests: `{}` still running after {}s; killing it",
                    cmdline(cmd),
                    timeout.as_secs()
                );
                let _ = child.kill();
                break child.wait().map_err(|e| err(format!("wait: {e}")))?;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(err(format!("wait: {e}"))),
        }
    };
    // A grandchild may hold the pipes open; don't wait for it forever.
    let join = |t: std::thread::JoinHandle<Vec<u8>>| {
        let end = Instant::now() + Duration::from_secs(5);
        while !t.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            t.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    Ok(Output {
        status,
        stdout: join(t_out),
        stderr: join(t_err),
    })
}

/// The command line of `cmd`, for messages.
pub fn cmdline(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Status, stdout and stderr of `out`, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit: (status, time taken).
///
/// # Panics
/// If it is still running after `timeout` (it is then killed and reaped).
pub fn terminate(mut child: Child, timeout: Duration) -> (ExitStatus, Duration) {
    let started = Instant::now();
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return (status, started.elapsed());
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pid {} still running {}s after SIGTERM",
                child.id(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A certificate serial that differs per name (x509 requires unique serials per issuer).
fn rand_serial(name: &str) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(name.as_bytes());
    h.finish() >> 1
}

/// The servers process: HTTP (any GET → 200 "hello from <name>", but `/barrier/<key>/<n>`:
/// 200 once n requests for the key are in at once, 504 if not within 5 s; `/count/<key>`: 200
/// with how many requests for the key this server has received, this one included; `/peer`:
/// the client's `address:port`, keeping the connection open) and UDP echo, on the
/// addresses in the JSON config given as argv[1]; touches the config's `ready` path once every
/// socket is bound.
const SERVERS_PY: &str = r#"
import json, socket, socketserver, ssl, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

cfg = json.load(open(sys.argv[1]))

barriers = {}
barriers_lock = threading.Lock()
counts = {}

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        if self.path.startswith("/barrier/"):
            return self.barrier()
        if self.path == "/peer":
            # GET /peer: the client's address and port, on a kept-alive HTTP/1.1 connection,
            # so a client sees whether two requests came over one connection.
            self.protocol_version = "HTTP/1.1"
            self.close_connection = False
            body = ("%s:%d" % self.client_address[:2]).encode()
        elif self.path.startswith("/count/"):
            # GET /count/<key>: how many requests for <key> arrived, so a client sees whether
            # a refused request reached the server.
            with barriers_lock:
                counts[self.path] = counts.get(self.path, 0) + 1
                body = b"%d" % counts[self.path]
        else:
            body = ("hello from %s\n" % self.server.aegis_name).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def barrier(self):
        # GET /barrier/<key>/<n>: 200 once n requests for <key> are in at the same time, 504 if
        # they are not within 5 s; so a client sees whether its requests reached the server
        # concurrently.
        _, _, key, n = self.path.split("/")
        with barriers_lock:
            barrier = barriers.setdefault(key, threading.Barrier(int(n), timeout=5))
        try:
            barrier.wait()
            status, body = 200, b"all in\n"
        except threading.BrokenBarrierError:
            status, body = 504, b"not all in\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        # Echo what arrived, so tests can see what the upstream received (e.g. redactions).
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        if self.path == "/v1/chat/completions":
            return self.llm(body)
        out = json.dumps({"server": self.server.aegis_name, "method": "POST", "path": self.path,
                          "content_type": self.headers.get("Content-Type"), "body": body,
                          "agent_token": self.headers.get("X-Aegis-Agent-Token")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def llm(self, body):
        # An OpenAI-style chat completion reporting usage: input tokens = request bytes // 4,
        # output tokens = max_tokens // 4; streamed as Server-Sent Events over `hold_s` seconds
        # when the request says `"stream": true` (usage in the last chunk, then [DONE]).
        req = json.loads(body)
        usage = {"prompt_tokens": len(body.encode()) // 4, "completion_tokens": req.get("max_tokens", 0) // 4}
        if not req.get("stream"):
            out = json.dumps({"object": "chat.completion", "choices": [{"message": {"content": "ok"}}], "usage": usage}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        # Chunked, as the real APIs stream (a close-delimited body would end without a TLS
        # close_notify, which the enforcer rightly treats as truncation).
        self.protocol_version = "HTTP/1.1"
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        def chunk(text):
            data = text.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        chunks = 4
        for i in range(chunks):
            chunk("data: %s\n\n" % json.dumps({"choices": [{"delta": {"content": "part%d" % i}}], "usage": None}))
            time.sleep(float(req.get("hold_s", 0)) / chunks)
        chunk("data: %s\n\ndata: [DONE]\n\n" % json.dumps({"choices": [], "usage": usage}))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s -> %s\n" % (self.client_address[0], self.server.aegis_name, fmt % args))
        sys.stderr.flush()

class Base(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    def server_bind(self):
        # HTTPServer.server_bind does a reverse lookup (getfqdn) per server: skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

class V4(Base):
    address_family = socket.AF_INET

class V6(Base):
    address_family = socket.AF_INET6

for s in cfg["http"]:
    cls = V6 if ":" in s["addr"] else V4
    srv = cls((s["addr"], s["port"]), Handler)
    srv.aegis_name = s["name"]
    if s["tls"]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(s["tls"]["cert"], s["tls"]["key"])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

def echo(sock):
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)

for u in cfg["udp_echo"]:
    fam = socket.AF_INET6 if ":" in u["addr"] else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    sock.bind((u["addr"], u["port"]))
    threading.Thread(target=echo, args=(sock,), daemon=True).start()

open(cfg["ready"], "w").write("ready\n")
print("servers ready", flush=True)
threading.Event().wait()
"#;
