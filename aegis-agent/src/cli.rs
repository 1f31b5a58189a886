//! Command-line interface: `aegis-agent run | exec | status | policy check|compile|test |
//! uninstall`.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand};

use crate::{dns::DenyRcode, telemetry::LogFormat};

/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/aegis/agent.sock";
/// Default pin directory (below the node's bpffs mount).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/aegis";
/// Default directory below the cgroup2 mount for cgroups Aegis creates.
pub const DEFAULT_CGROUP_ROOT: &str = "aegis";

/// Aegis: kernel-enforced egress allowlists for AI-agent workloads.
#[derive(Debug, Parser)]
#[command(name = "aegis-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load the kernel programs, enforce policies, serve DNS.
    Run(Box<RunArgs>),
    /// Run a command as an agent workload, in a cgroup the running agent enforces.
    Exec(ExecArgs),
    /// Print the running agent's status; exits 0 when it is ready.
    Status(SocketArgs),
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Agent identity tokens (JWT, EdDSA).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Cut an agent (or every agent) off: every connect, send and L7 call denied, within a
    /// second, until turned off; survives agent restarts.
    KillSwitch(KillSwitchArgs),
    /// Human approval of `approval_needed` calls: list, approve (prints the one-time override
    /// token), deny.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Remove everything Aegis pinned and the cgroups it created (stop the agent first).
    Uninstall(UninstallArgs),
    /// List the metric families the agent exports on `--metrics-address`, one per line:
    /// name, type, labels, help (tab-separated).
    Metrics,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Print every approval (pending first is not implied: newest first), one JSON per line.
    List(SocketArgs),
    /// Approve a pending approval; its request passes once, on the workload's next retry.
    Approve(ApprovalDecideArgs),
    /// Deny a pending approval.
    Deny(ApprovalDecideArgs),
}

#[derive(Debug, Args)]
pub struct ApprovalDecideArgs {
    /// The approval id (from the 403 answer, the webhook message or `approvals list`).
    pub id: String,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Debug, Args)]
pub struct KillSwitchArgs {
    /// `on` or `off`.
    pub state: OnOff,
    /// The agent name (every tenant).
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    pub agent: Option<String>,
    /// Every agent on the node.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
}

/// A switch position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a signed token (creating the key, and `<key>.pub`, if absent).
    Issue {
        /// Ed25519 private key (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        org: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The agent name the token vouches for (`agent_id`).
        #[arg(long)]
        agent: String,
        /// A scope; repeat for several.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Lifetime in seconds (at most a day).
        #[arg(long, default_value_t = 300)]
        ttl_seconds: u64,
    },
    /// Verify a token's signature and expiry; print its claims (exit 2 when invalid).
    Verify {
        token: String,
        /// Ed25519 public key (PEM SubjectPublicKeyInfo).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log's hash chain and batch signatures; exits 0 when the whole file is
    /// intact, 2 naming the first broken line otherwise.
    Verify {
        /// The audit log (`--audit-log` of `run`).
        file: PathBuf,
        /// The node's audit public key (PEM, written next to `--audit-key` as `<key>.pub`).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct SocketArgs {
    /// Control socket of the running agent.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory of policy files (`*.yaml`).
    #[arg(long, default_value = "policies")]
    pub policies: PathBuf,
    /// Static identity file mapping cgroup paths to identities.
    #[arg(long)]
    pub identities: Option<PathBuf>,
    /// Take identities from this node's pods on the Kubernetes API server: a pod labelled
    /// `aegis.dev/agent` (and optionally `aegis.dev/tenant`) is put under that identity
    /// (docs/kubernetes.md, "Pod identities").
    #[arg(long)]
    pub kubernetes: bool,
    /// This node's name on the API server (pods with this `spec.nodeName` are watched); in a
    /// DaemonSet, `NODE_NAME` from the downward API. Required with `--kubernetes`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig file for the API server (default: `KUBECONFIG`, `~/.kube/config`, then the
    /// pod's service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's cgroup root, relative to the cgroup2 mount (kubelet's `cgroupRoot`); the
    /// systemd (`kubepods.slice`) or cgroupfs (`kubepods`) layout is discovered below it.
    #[arg(long, default_value = "/")]
    pub kube_cgroup_root: PathBuf,
    /// IPv4 address agent workloads' DNS is steered to; the proxy listens there. From a pod's
    /// network namespace it must be an address of the node the pod can reach.
    #[arg(long, default_value = "127.0.0.1")]
    pub dns_address: Ipv4Addr,
    /// IPv6 address of the DNS proxy; without it, DNS over IPv6 is denied.
    #[arg(long)]
    pub dns_address6: Option<Ipv6Addr>,
    /// Upstream resolver (default: the first nameserver of /etc/resolv.conf, port 53).
    #[arg(long)]
    pub dns_upstream: Option<SocketAddr>,
    /// Upstream timeout, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub dns_timeout_ms: u64,
    /// First per-identity DNS proxy port.
    #[arg(long, default_value_t = 15300)]
    pub dns_port_base: u16,
    /// Answer for denied names.
    #[arg(long, value_enum, default_value_t = DenyRcode::Nxdomain)]
    pub dns_deny_rcode: DenyRcode,
    /// IPv4 address TLS calls to inspected domains are redirected to; the L7 enforcer listens
    /// there (default: the DNS proxy address).
    #[arg(long)]
    pub l7_address: Option<Ipv4Addr>,
    /// IPv6 address of the L7 enforcer; without it, IPv6 calls to inspected domains are denied.
    #[arg(long)]
    pub l7_address6: Option<Ipv6Addr>,
    /// First per-identity L7 enforcer port.
    #[arg(long, default_value_t = 15400)]
    pub l7_port_base: u16,
    /// Node CA certificate (PEM); generated with its key on first start if neither exists.
    #[arg(long, default_value = "/var/lib/aegis/ca.crt")]
    pub ca_cert: PathBuf,
    /// Node CA private key (PEM, mode 0600).
    #[arg(long, default_value = "/var/lib/aegis/ca.key")]
    pub ca_key: PathBuf,
    /// PEM bundle of roots for verifying upstream servers (default: the system's roots).
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// Audit log: one JSON line per decision, append-only.
    #[arg(long, default_value = "/var/log/aegis/audit.jsonl")]
    pub audit_log: PathBuf,
    /// Ed25519 key signing the audit log's batches (PKCS#8 PEM); created with its public key
    /// (`<path>.pub`) if absent.
    #[arg(long, default_value = "/var/lib/aegis/audit.key")]
    pub audit_key: PathBuf,
    /// Audit records queued for the writer at most (records; the disk's slack).
    #[arg(long, default_value_t = crate::audit::DEFAULT_QUEUE, value_parser = clap::value_parser!(usize))]
    pub audit_queue: usize,
    /// What an L7 call gets when its audit record finds the queue full (the disk stalls):
    /// `closed` refuses it (503 `audit_unavailable`), `open` lets it through unrecorded and counts
    /// the dropped record.
    #[arg(long, value_enum, default_value_t = crate::audit::OnFull::Closed)]
    pub audit_full: crate::audit::OnFull,
    /// Saved kill switch state (`aegis-agent kill-switch`); read at start.
    #[arg(long, default_value = "/var/lib/aegis/kill-switch.json")]
    pub kill_switch_file: PathBuf,
    /// Embedded state (redb): budgets spent per identity and period.
    #[arg(long, default_value = "/var/lib/aegis/state.redb")]
    pub state_db: PathBuf,
    /// Public key (PEM) of agent identity tokens; when set, a token presented in
    /// `--token-header` is verified, bound to the calling workload's identity, used once, and
    /// stripped before forwarding (an invalid one is refused with 401).
    #[arg(long)]
    pub token_key: Option<PathBuf>,
    /// Header carrying agent tokens (`authorization` takes `Bearer <jwt>`; that header is then
    /// stripped, so do not pick it when upstream APIs need their own).
    #[arg(long, default_value = "x-aegis-agent-token")]
    pub token_header: String,
    /// Where budgets, rate-limit buckets and spent token ids live: `embedded` (this node:
    /// `--state-db` and memory) or `redis` (shared by every node, `--redis-url`).
    #[arg(long, value_enum, default_value_t = crate::state::BackendKind::Embedded)]
    pub state_backend: crate::state::BackendKind,
    /// Redis of `--state-backend redis` (`redis://[user:password@]host:port/db`).
    #[arg(long, required_if_eq("state_backend", "redis"))]
    pub redis_url: Option<String>,
    /// Connect/read/write timeout of each Redis operation, milliseconds.
    #[arg(long, default_value_t = 250)]
    pub redis_timeout_ms: u64,
    /// What a call needing an unreachable state store gets: `closed` refuses it (503), `open`
    /// lets it through uncounted and logs it.
    #[arg(long, value_enum, default_value_t = crate::state::OnUnavailable::Closed)]
    pub state_unavailable: crate::state::OnUnavailable,
    /// Ed25519 key (PKCS#8 PEM) signing approvals' one-time override tokens; created with
    /// `<path>.pub` on first start.
    #[arg(long, default_value = "/var/lib/aegis/approval.key")]
    pub approval_key: PathBuf,
    /// Where approvals are kept across restarts (redb, mode 0600: holds unspent override
    /// tokens).
    #[arg(long, default_value = "/var/lib/aegis/approvals.redb")]
    pub approvals_db: PathBuf,
    /// Seconds an approval request waits for a human before it expires.
    #[arg(long, default_value_t = 3600)]
    pub approval_ttl: u64,
    /// Seconds an override token stays usable once approved.
    #[arg(long, default_value_t = 600)]
    pub approval_token_ttl: u64,
    /// Seconds an `approval_needed` request is held open waiting for the decision (0: answer
    /// at once with the approval id; the workload retries).
    #[arg(long, default_value_t = 0)]
    pub approval_hold: u64,
    /// Webhook announcing new approvals (Slack incoming webhook or Teams connector URL).
    #[arg(long)]
    pub approval_webhook: Option<String>,
    /// Message shape of `--approval-webhook`.
    #[arg(long, value_enum, default_value_t = crate::approval::webhook::Format::Slack)]
    pub approval_webhook_format: crate::approval::webhook::Format,
    /// Approvers of the approvals HTTP API (YAML: `approvers: [{name, token_sha256}]`); the
    /// API is off without it.
    #[arg(long)]
    pub approvers: Option<PathBuf>,
    /// Address of the approvals HTTP API.
    #[arg(long, default_value = "127.0.0.1:9466")]
    pub approvals_listen: SocketAddr,
    /// Largest request body the L7 enforcer accepts, in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Floor, in seconds, on how long a learned address stays allowed.
    #[arg(long, default_value_t = 5)]
    pub min_ttl: u64,
    /// Most addresses one identity may have learned at once (oldest-expiring evicted first).
    #[arg(long, default_value_t = 4096)]
    pub max_learned: usize,
    /// On SIGTERM, how long open connections get to finish their request in flight, in
    /// seconds (keep it under the pod's `terminationGracePeriodSeconds`, 30 by default).
    #[arg(long, default_value_t = 25)]
    pub drain_timeout: u64,
    /// File created while this agent process is ready and serving, removed once it hands over
    /// or stops. Point a pod's readiness probe at it (in the container's own filesystem): the
    /// control socket is shared with the other pod during an upgrade, so `aegis-agent status`
    /// may answer for the other process.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Pin directory on bpffs.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Directory below the cgroup2 mount for cgroups Aegis creates.
    #[arg(long, default_value = DEFAULT_CGROUP_ROOT)]
    pub cgroup_root: PathBuf,
    /// Control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint for spans (e.g. http://127.0.0.1:4317). Without it, spans are
    /// exported when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is
    /// set (the flag wins over both); off when none is.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus, OpenMetrics text),
    /// `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub metrics_address: SocketAddr,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Agent name of the workload.
    #[arg(long)]
    pub agent: String,
    /// Tenant of the workload (default: `default`).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Control socket of the running agent.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory; errors name file, line and field.
    Check {
        /// Directory of policy files.
        dir: PathBuf,
    },
    /// Compile a policy directory's L7 policies to a Rego bundle (readable; one module per
    /// policy, a shared library, and the directory's raw `*.rego` modules under `ext/`).
    Compile {
        /// Directory of policy files.
        dir: PathBuf,
        /// Output directory (default: DIR/compiled); its `*.rego` files are replaced.
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Run the data-driven test cases of DIR/tests/*.yaml against DIR's policies; exit 2 on a
    /// failure.
    Test {
        /// Directory of policy files.
        dir: PathBuf,
    },
    /// Time the policy decision of every test case in DIR/tests/ (p50/p99 over ITERATIONS
    /// decisions each). Build with `--release` for meaningful numbers.
    Bench {
        /// Directory of policy files.
        dir: PathBuf,
        /// Decisions timed per case.
        #[arg(long, default_value_t = 2000)]
        iterations: u32,
    },
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Pin directory on bpffs.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Directory below the cgroup2 mount for cgroups Aegis created.
    #[arg(long, default_value = DEFAULT_CGROUP_ROOT)]
    pub cgroup_root: PathBuf,
}
