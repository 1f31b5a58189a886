//! `aegis-agent run`: the node daemon.
//!
//! Start-up order matters for fail-closed behaviour: policies are validated first (a broken
//! directory stops start-up while the pinned state of an earlier agent keeps enforcing), then
//! the programs are loaded over the pinned maps, identity cgroups are (re)registered with their
//! DNS listeners bound before the kernel steers to them, and only then is the agent "ready".
//! Stopping the agent leaves the kernel enforcing; `aegis-agent uninstall` removes it.
//!
//! Upgrade (docs/upgrade.md): when an agent already runs, the new one takes its listening
//! sockets over the control socket before loading anything ([`control::take_over`]); the old
//! one stops changing node state from then on, so the new one adopts a state nobody else
//! writes. Once the new agent serves every identity and owns the control socket it commits:
//! the old one stops reading the (shared) sockets and, on SIGTERM, drains what it has in
//! flight and exits, detaching nothing.

use std::{
    collections::HashSet,
    fs,
    net::{IpAddr, SocketAddr},
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc, Mutex, RwLock, RwLockReadGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use arc_swap::ArcSwap;
use notify::Watcher as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    approval::{self, Approvals, webhook::Webhook},
    audit::{AuditLog, OnFull, chain::AuditKey},
    budget::RedbStore,
    cgroup,
    cli::RunArgs,
    control::{self, HANDING_OVER, Handler, Reply},
    dns::{self, DnsProxy},
    ebpf::{self, AsyncEventReader, Datapath, Links},
    egress::{self, Enforcer},
    handover::Listeners,
    identity::{ExecCgroups, Identity, IdentityCgroup, IdentitySource, StaticFile, kube::KubePods},
    killswitch::{KillSwitch, Target},
    l7::{self, ca::NodeCa, decide::PolicyDecider, proxy::L7Proxy},
    metrics,
    policy::{L7Engine, PolicySet},
    state, telemetry,
    token::{self, TokenVerifier},
};

/// How often expired addresses and finished exec cgroups are cleaned up.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Every this many housekeeping ticks, identity sources are read again.
const RESYNC_TICKS: u32 = 10;
/// An exec cgroup younger than this is never collected (its process may not be in it yet).
const EXEC_GRACE: Duration = Duration::from_secs(5);
/// How long start-up waits for the first pod list from the API server (`--kubernetes`).
const KUBE_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The DNS proxy runs on a runtime of its own, one thread: an answer then never waits for a
/// wake-up on another core (which measured as the difference between matching a no-cache
/// dnsmasq forwarder's latency and exceeding it, docs/benchmarks.md) nor behind L7 work. The
/// L7 enforcer runs on one-thread runtimes of its own, one per core ([`l7_runtimes`]). The
/// control socket and events use a multi-threaded runtime (one worker per core); slow, blocking
/// work (attaching programs, reloads, cgroup clean-up) runs on its blocking pool.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<ExitCode> {
    let _telemetry = telemetry::init(args.log_format, args.otlp_endpoint.as_deref())?;
    if let Some(path) = &args.ready_file {
        // Left by a crashed run: not ready until this run says so.
        let _ = fs::remove_file(path);
    }
    let cgroup2 = cgroup::cgroup2_mount()?;
    let policies = PolicySet::load_dir(&args.policies)
        .map_err(|e| anyhow!("policies rejected, not starting:\n{e}"))?;
    let upstream = match args.dns_upstream {
        Some(u) => u,
        None => resolv_conf_upstream(Path::new("/etc/resolv.conf"))
            .context("no --dns-upstream given and no nameserver in /etc/resolv.conf")?,
    };
    if policies.is_empty() {
        tracing::warn!(target: "aegis::policy", dir = %args.policies.display(), "no policies: every agent workload is denied all egress");
    }
    let l7_engine =
        L7Engine::build(&policies).map_err(|e| anyhow!("policies rejected, not starting:\n{e}"))?;
    // Before the kernel is touched: a bad Kubernetes configuration stops start-up here.
    let (kube, mut kube_changes) = match kube_pods(&args, &cgroup2).await? {
        Some((source, changes)) => (Some(source), Some(changes)),
        None => (None, None),
    };
    // An agent already running (an upgrade): take its listening sockets, so no query or
    // connection is lost. It changes no node state until we commit, or exit (which aborts).
    let listeners = Listeners::default();
    let mut predecessor = control::take_over(&args.control_socket)?;
    if let Some(p) = &mut predecessor {
        let inherited = listeners.inherit(std::mem::take(&mut p.fds));
        tracing::info!(target: "aegis::agent", pid = p.pid, sockets = inherited, "taking over from the running agent");
    }
    let ca = NodeCa::load_or_create(&args.ca_cert, &args.ca_key)?;
    let audit = AuditLog::open(
        &args.audit_log,
        AuditKey::load_or_create(&args.audit_key)?,
        args.audit_queue,
    )?;
    if args.audit_full == OnFull::Open {
        tracing::warn!(target: "aegis::agent", "--audit-full open: L7 calls whose audit record finds the queue full pass unrecorded (fail open)");
    }
    let upstream_roots = upstream_roots(args.upstream_ca.as_deref())?;
    let approvals_store = approval::store::ApprovalStore::open(&args.approvals_db)
        .map_err(|e| anyhow!("--approvals-db: {e}"))?;
    let approvals = Arc::new(
        Approvals::new(
            approval::Settings {
                ttl: Duration::from_secs(args.approval_ttl),
                token_ttl: Duration::from_secs(args.approval_token_ttl),
                hold: Duration::from_secs(args.approval_hold),
            },
            approval::load_key(&args.approval_key)?,
            audit.clone(),
            match &args.approval_webhook {
                None => None,
                Some(url) => Some(
                    Webhook::start(url, args.approval_webhook_format, upstream_roots.clone())
                        .map_err(|e| anyhow!("--approval-webhook: {e}"))?,
                ),
            },
            Some(approvals_store),
        )
        .map_err(|e| anyhow!("--approvals-db: {e}"))?,
    );
    if let Some(path) = &args.approvers {
        let approvers = approval::api::load_approvers(path)?;
        let listener = listeners
            .tcp(args.approvals_listen)
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("binding the approvals API on {}", args.approvals_listen))?;
        tracing::info!(target: "aegis::approval", address = %args.approvals_listen, approvers = approvers.len(), "approvals API listening");
        let serve = approval::api::serve(listener, approvals.clone(), approvers.into());
        let stopped = listeners.stop_accepting();
        tokio::spawn(async move {
            tokio::select! {
                () = serve => {}
                () = stopped => {}
            }
        });
    }
    let l7_addr4 = args.l7_address.unwrap_or(args.dns_address);
    let (datapath, links, events, logger) = Datapath::load(&args.bpffs)?;
    let settings = egress::Settings {
        dns4: args.dns_address,
        dns6: args.dns_address6,
        dns_port_base: args.dns_port_base,
        l7_addr4: Some(l7_addr4),
        l7_addr6: args.l7_address6,
        l7_port_base: args.l7_port_base,
        min_ttl: Duration::from_secs(args.min_ttl),
        cgroup2: cgroup2.clone(),
    };
    let kill = Arc::new(KillSwitch::load(&args.kill_switch_file)?);
    let on = kill.state();
    if on.all || !on.agents.is_empty() {
        tracing::warn!(target: "aegis::event", event = "kill_switch", all = on.all, agents = ?on.agents, "kill switches on from the saved state");
    }
    let enforcer = Arc::new(Mutex::new(Enforcer::new(
        datapath,
        settings,
        args.max_learned,
        kill.clone(),
    )?));
    let policies = Arc::new(ArcSwap::from_pointee(policies));
    let mut listen = vec![IpAddr::V4(args.dns_address)];
    listen.extend(args.dns_address6.map(IpAddr::V6));
    let dns_settings = dns::Settings {
        listen,
        upstream,
        upstream_timeout: Duration::from_millis(args.dns_timeout_ms),
        deny_rcode: args.dns_deny_rcode,
        listeners: listeners.clone(),
    };
    let decider = Arc::new(PolicyDecider::new(l7_engine, policies.clone()));
    let mut l7_listen = vec![IpAddr::V4(l7_addr4)];
    l7_listen.extend(args.l7_address6.map(IpAddr::V6));
    let l7 = L7Proxy::new(
        l7::proxy::Settings {
            listen: l7_listen,
            max_body: args.max_body,
            audit_full: args.audit_full,
            listeners: listeners.clone(),
        },
        l7_runtimes()?,
        ca,
        upstream_roots,
        enforcer.clone(),
        policies.clone(),
        decider.clone(),
        audit.clone(),
        kill.clone(),
        match &args.token_key {
            None => None,
            Some(path) => Some(TokenVerifier::new(
                token::decoding_key(path)?,
                &args.token_header,
            )),
        },
        state_backend(&args)?,
        approvals.clone(),
    )
    .context("L7 enforcer TLS")?;
    let node = Arc::new(Node {
        approvals,
        l7,
        decider,
        audit,
        dns: DnsProxy::new(
            dns_settings,
            enforcer.clone(),
            policies.clone(),
            dns_runtime()?,
        )
        .context("opening the DNS upstream sockets")?,
        enforcer,
        links: Mutex::new(links),
        policies,
        policy_dir: args.policies.clone(),
        exec: ExecCgroups::new(cgroup2.join(&args.cgroup_root).join("exec")),
        static_file: args
            .identities
            .clone()
            .map(|p| StaticFile::new(p, cgroup2.clone())),
        kube,
        sync_lock: Mutex::new(()),
        stale_dropped: AtomicBool::new(false),
        ready: AtomicBool::new(false),
        frozen: RwLock::new(false),
        ready_file: args.ready_file.clone(),
        listeners,
        kill,
    });
    let ready = Arc::downgrade(&node);
    let metrics_listener = metrics::bind(args.metrics_address)
        .with_context(|| format!("binding the metrics endpoint {}", args.metrics_address))?;
    tokio::spawn(metrics::serve(metrics_listener, move || {
        ready
            .upgrade()
            .is_some_and(|n| n.ready.load(Ordering::SeqCst))
    }));
    cgroup::create(node.exec.dir())?;
    node.sync();

    let control = control::bind(&args.control_socket)
        .with_context(|| format!("binding {}", args.control_socket.display()))?;
    tokio::spawn(control::serve(control, node.clone()));
    tokio::spawn(report_events(events.into_async()?, node.clone()));
    if let Some(logger) = logger {
        tokio::spawn(ebpf::forward_kernel_logs(logger));
    }
    tokio::spawn(housekeeping(node.clone()));

    let (reload_tx, mut reload_rx) = mpsc::channel::<()>(1);
    let _watcher = watch_policies(&args.policies, reload_tx)?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    if let Some(p) = predecessor {
        let pid = p.pid;
        match p.commit() {
            Ok(()) => {
                tracing::info!(target: "aegis::agent", pid, "the previous agent handed over; it drains and exits on SIGTERM");
                // What it learned between our adoption and the commit (answers in flight
                // after the commit come with the next resync).
                node.enforcer().readopt_learned();
            }
            Err(e) => {
                tracing::warn!(target: "aegis::agent", pid, error = %e, "the previous agent did not confirm the hand-over (its sockets are served here)")
            }
        }
    }
    node.ready.store(true, Ordering::SeqCst);
    if let Some(path) = &node.ready_file {
        fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing --ready-file {}", path.display()))?;
    }
    tracing::info!(
        target: "aegis::agent", bpffs = %args.bpffs.display(), cgroup2 = %cgroup2.display(),
        policies = node.policies.load().len(), upstream = %upstream, dns = %args.dns_address,
        "agent ready"
    );
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!(target: "aegis::agent", "SIGHUP: reloading policies and identities");
                blocking(&node, |node| {
                    if let Some(_writer) = node.writer() {
                        node.reload_policies();
                        node.sync();
                    }
                })
                .await;
            }
            Some(()) = next_change(&mut kube_changes) => {
                blocking(&node, |node| {
                    if let Some(_writer) = node.writer() {
                        node.sync();
                    }
                })
                .await;
            }
            Some(()) = reload_rx.recv() => {
                // Editors write in several steps: let the directory settle.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while reload_rx.try_recv().is_ok() {}
                blocking(&node, |node| {
                    if let Some(_writer) = node.writer() {
                        node.reload_policies();
                    }
                })
                .await;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // Nothing is detached or unpinned: the kernel keeps enforcing with the pinned maps.
    node.not_ready();
    tracing::info!(target: "aegis::agent", handed_over = node.listeners.is_stopped(), "agent stopping: draining connections (DNS answered meanwhile unless handed over)");
    node.listeners.drain();
    let cut = node
        .listeners
        .drained(Duration::from_secs(args.drain_timeout))
        .await;
    if cut > 0 {
        tracing::warn!(target: "aegis::agent", connections = cut, grace_s = args.drain_timeout, "drain timeout: cutting what is still open");
    }
    tracing::info!(target: "aegis::agent", "agent stopped; kernel enforcement stays in place until `aegis-agent uninstall`");
    Ok(ExitCode::SUCCESS)
}

/// Starts the DNS proxy's runtime on a thread of its own and returns its handle.
fn dns_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    thread_runtime("aegis-dns".into())
}

/// Starts a one-thread runtime on a thread named `name` and returns its handle.
fn thread_runtime(name: String) -> anyhow::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// The L7 enforcer's runtimes: one thread each, one per core (thread per core, as nginx runs a
/// worker per core). A connection lives on one of them from accept to close, its upstream
/// connection included, so a request never waits for a wake-up on another core: on this
/// machine kind such wake-ups cost more than the request's own CPU (docs/benchmarks.md).
fn l7_runtimes() -> anyhow::Result<Vec<tokio::runtime::Handle>> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (0..cores)
        .map(|i| thread_runtime(format!("aegis-l7-{i}")))
        .collect()
}

/// Roots for verifying upstream servers: a PEM bundle, or the system's.
fn upstream_roots(bundle: Option<&Path>) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = match bundle {
        Some(path) => CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading {}", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {}", path.display()))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        anyhow::bail!("no usable upstream root certificate ({ignored} unparsable)");
    }
    Ok(roots)
}

/// The first `nameserver` of a resolv.conf(5), on port 53.
fn resolv_conf_upstream(path: &Path) -> Option<SocketAddr> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next()? == "nameserver").then_some(())?;
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, aegis_common::DNS_PORT))
    })
}

/// The pod identity source (`--kubernetes`) and its change signal, after waiting (at most
/// [`KUBE_LIST_TIMEOUT`]) for the first pod list; `None` without `--kubernetes`.
async fn kube_pods(
    args: &RunArgs,
    cgroup2: &Path,
) -> anyhow::Result<Option<(KubePods, mpsc::Receiver<()>)>> {
    if !args.kubernetes {
        return Ok(None);
    }
    let node = args
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .context("--kubernetes needs the node's name: --node-name or NODE_NAME (downward API `spec.nodeName`)")?;
    let client = crate::identity::kube::client(args.kubeconfig.as_deref()).await?;
    let root = args
        .kube_cgroup_root
        .strip_prefix("/")
        .unwrap_or(&args.kube_cgroup_root);
    let (source, changes) = KubePods::start(client, node.clone(), cgroup2.join(root));
    if !source.wait_listed(KUBE_LIST_TIMEOUT).await {
        tracing::error!(target: "aegis::identity", source = "kubernetes", node = %node, "no pod list from the API server after {}s; starting without pod identities (the pinned state of an earlier agent stays), they follow when it answers", KUBE_LIST_TIMEOUT.as_secs());
    }
    Ok(Some((source, changes)))
}

/// The next change signal of an optional source; never ready without one.
async fn next_change(changes: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends a reload request whenever a file in the policy directory changes.
fn watch_policies(dir: &Path, tx: mpsc::Sender<()>) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

/// Shared state of the running agent.
struct Node {
    /// Map state; the DNS path takes this lock on every answer, so nothing slow runs under it.
    enforcer: Arc<Mutex<Enforcer>>,
    /// Program links; attaching and detaching can take milliseconds.
    links: Mutex<Links>,
    policies: Arc<ArcSwap<PolicySet>>,
    policy_dir: PathBuf,
    dns: DnsProxy,
    l7: L7Proxy,
    decider: Arc<PolicyDecider>,
    audit: AuditLog,
    exec: ExecCgroups,
    static_file: Option<StaticFile>,
    kube: Option<KubePods>,
    /// Held while the set of registered cgroups is reconciled or an exec cgroup is placed:
    /// a sync working from an older read of the sources must not unregister what another
    /// registered meanwhile (pod events, the periodic resync and `exec` run concurrently).
    sync_lock: Mutex<()>,
    /// [`Node::drop_stale`] has run (after the first read of every source).
    stale_dropped: AtomicBool,
    ready: AtomicBool,
    /// Set while a successor takes over: node state (identities, links, policies in the
    /// kernel) is then left alone, so the successor adopts a state nobody else changes.
    frozen: RwLock<bool>,
    /// `--ready-file`.
    ready_file: Option<PathBuf>,
    listeners: Listeners,
    kill: Arc<KillSwitch>,
    approvals: Arc<Approvals>,
}

// === impl Node ===

impl Node {
    fn enforcer(&self) -> std::sync::MutexGuard<'_, Enforcer> {
        self.enforcer.lock().expect("enforcer lock poisoned")
    }

    fn not_ready(&self) {
        self.ready.store(false, Ordering::SeqCst);
        if let Some(path) = &self.ready_file {
            let _ = fs::remove_file(path);
        }
    }

    /// Leave to change node state, held while changing it; `None` once a successor takes over
    /// (a hand-over waits for the changes in progress to end).
    fn writer(&self) -> Option<RwLockReadGuard<'_, bool>> {
        let frozen = self.frozen.read().expect("frozen lock poisoned");
        (!*frozen).then_some(frozen)
    }

    /// Binds the identity's DNS listeners, then registers the cgroup (so the kernel never
    /// steers DNS to a port nobody listens on).
    fn ensure_registered(&self, cg: &IdentityCgroup) -> anyhow::Result<u64> {
        let cgroup_id = cgroup::cgroup_id(&cg.path)?;
        if self.enforcer().is_registered(cgroup_id, &cg.identity) {
            return Ok(cgroup_id);
        }
        // Registered under another identity (a relabelled pod): the links are ours already.
        let relabelled = self.enforcer().cgroups().contains_key(&cgroup_id);
        let port = self.enforcer().port_for(&cg.identity)?;
        self.dns
            .serve_identity(&cg.identity, port)
            .with_context(|| format!("binding the DNS proxy port {port} of {}", cg.identity))?;
        let l7_port = self.enforcer().l7_port(port);
        if let Some(l7_port) = l7_port {
            self.l7
                .serve_identity(&cg.identity, l7_port)
                .with_context(|| {
                    format!("binding the L7 enforcer port {l7_port} of {}", cg.identity)
                })?;
        }
        let adopted = self.links().attach(&cg.path, cgroup_id)?;
        self.enforcer().register(cg, &self.policies.load())?;
        if adopted && !relabelled {
            tracing::info!(target: "aegis::identity", cgroup_id, "adopted the pinned links of an earlier agent");
        }
        Ok(cgroup_id)
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().expect("links lock poisoned")
    }

    /// Takes a cgroup out of enforcement: identity first (under the map lock), then the
    /// program links (under their own lock, as detaching can be slow).
    fn unregister(&self, cgroup_id: u64) -> anyhow::Result<()> {
        self.enforcer().unregister(cgroup_id)?;
        self.links().detach(cgroup_id)?;
        Ok(())
    }

    /// Registers every cgroup the sources report and unregisters those they no longer do. A
    /// source that cannot be read keeps its cgroups as they were. Returns whether every source
    /// was read, and the ids of every cgroup the sources report, registered or not.
    fn sync_identities(&self) -> (bool, HashSet<u64>) {
        let mut sources: Vec<&dyn IdentitySource> = vec![&self.exec];
        if let Some(s) = &self.static_file {
            sources.push(s);
        }
        if let Some(s) = &self.kube {
            sources.push(s);
        }
        let mut wanted = HashSet::new();
        let mut reported = HashSet::new();
        let mut failed_sources = false;
        for source in sources {
            match source.cgroups() {
                Ok(cgroups) => {
                    for cg in cgroups {
                        reported.extend(cgroup::cgroup_id(&cg.path).ok());
                        match self.ensure_registered(&cg) {
                            Ok(id) => {
                                wanted.insert(id);
                            }
                            Err(e) => {
                                tracing::warn!(target: "aegis::identity", source = source.name(), cgroup = %cg.path.display(), error = %format!("{e:#}"), "cannot register identity cgroup")
                            }
                        }
                    }
                }
                Err(e) => {
                    failed_sources = true;
                    tracing::error!(target: "aegis::identity", source = source.name(), error = %e, "identity source unreadable; keeping its cgroups");
                }
            }
        }
        if failed_sources {
            return (false, reported);
        }
        let gone: Vec<u64> = self
            .enforcer()
            .cgroups()
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for id in gone {
            if let Err(e) = self.unregister(id) {
                tracing::warn!(target: "aegis::identity", cgroup_id = id, error = %e, "cannot unregister cgroup");
            }
        }
        (true, reported)
    }

    /// [`Node::sync_identities`], then, the first time every source could be read,
    /// [`Node::drop_stale`] (an unreachable API server must not take enforcement away from the
    /// pods an earlier agent registered), and once every reported cgroup is registered, the
    /// kernel's level mask follows the registered cgroups alone (until then it keeps the levels
    /// an earlier agent set, which the cgroups not yet registered may need). Callers hold
    /// [`Node::writer`] (or run before any hand-over can start).
    fn sync(&self) {
        let _reconciling = self.sync_lock.lock().expect("sync lock poisoned");
        let (all_read, reported) = self.sync_identities();
        if all_read && !self.stale_dropped.swap(true, Ordering::SeqCst) {
            self.drop_stale(&reported);
        }
        if !self.stale_dropped.load(Ordering::SeqCst) {
            return;
        }
        let mut enforcer = self.enforcer();
        if reported
            .iter()
            .all(|id| enforcer.cgroups().contains_key(id))
            && let Err(e) = enforcer.adoption_done()
        {
            tracing::warn!(target: "aegis::identity", error = %e, "cannot update the cgroup level mask");
        }
    }

    /// Drops kernel identity entries and links of cgroups no source reports (left by an
    /// earlier agent for cgroups that are gone). A cgroup a source reports but that could not
    /// be registered (e.g. its DNS port still held by an agent that does not hand over) keeps
    /// the earlier agent's entry and links: dropping them would let it out unenforced.
    fn drop_stale(&self, reported: &HashSet<u64>) {
        let mut stale: HashSet<u64> = self.enforcer().stale_kernel_cgroups().into_iter().collect();
        let attached = self.links().attached_cgroups();
        stale.extend(
            attached
                .into_iter()
                .filter(|id| !self.enforcer().cgroups().contains_key(id)),
        );
        stale.retain(|id| !reported.contains(id));
        for id in stale {
            let dropped = self.enforcer().drop_stale(id).map_err(anyhow::Error::from);
            match dropped.and_then(|()| Ok(self.links().detach(id)?)) {
                Ok(()) => {
                    tracing::info!(target: "aegis::identity", cgroup_id = id, "dropped stale identity cgroup")
                }
                Err(e) => {
                    tracing::warn!(target: "aegis::identity", cgroup_id = id, error = %e, "cannot drop stale identity cgroup")
                }
            }
        }
    }

    /// Loads the policy directory; a clean load is applied to the kernel and swapped in, a
    /// broken one is reported and the policies in force stay.
    fn reload_policies(&self) {
        let loaded = PolicySet::load_dir(&self.policy_dir)
            .and_then(|set| L7Engine::build(&set).map(|engine| (set, engine)));
        let (new, engine) = match loaded {
            Ok(built) => built,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(target: "aegis::policy", file = %e.file.display(), line = e.line, column = e.column, error = %e.message, "{e}");
                }
                tracing::error!(target: "aegis::policy", errors = errors.0.len(), "policy reload rejected; the policies in force stay");
                return;
            }
        };
        if let Err(e) = self.enforcer().apply_policies(&new) {
            tracing::error!(target: "aegis::policy", error = %e, "applying the new policies to the kernel failed; retrying on the next change");
            return;
        }
        let versions: Vec<String> = new
            .iter()
            .map(|p| format!("{}={}", p.agent, p.version))
            .collect();
        self.policies.store(Arc::new(new));
        self.decider.replace(engine);
        tracing::info!(target: "aegis::policy", versions = ?versions, "policies reloaded");
    }

    /// Removes exec cgroups whose processes have all exited.
    fn collect_exec_cgroups(&self) {
        let candidates: Vec<(u64, PathBuf)> = self
            .enforcer()
            .cgroups()
            .iter()
            .filter(|(_, r)| r.path.starts_with(self.exec.dir()) && r.since.elapsed() > EXEC_GRACE)
            .map(|(id, r)| (*id, r.path.clone()))
            .collect();
        let done = candidates
            .into_iter()
            .filter(|(_, path)| !cgroup::is_populated(path).unwrap_or(false));
        for (id, path) in done {
            if let Err(e) = self.unregister(id) {
                tracing::warn!(target: "aegis::identity", cgroup_id = id, error = %e, "cannot unregister finished exec cgroup");
                continue;
            }
            if let Err(e) = cgroup::remove(&path, Duration::from_secs(1)) {
                tracing::warn!(target: "aegis::identity", cgroup = %path.display(), error = %e, "cannot remove finished exec cgroup");
            }
        }
    }
}

impl Handler for Node {
    fn exec(&self, pid: u32, agent: &str, tenant: Option<&str>) -> Result<Reply, String> {
        let _writer = self.writer().ok_or(HANDING_OVER)?;
        let identity = Identity::new(agent, tenant)?;
        let path = self.exec.path_for(&identity, pid);
        let _placing = self.sync_lock.lock().expect("sync lock poisoned");
        cgroup::create(&path).map_err(|e| e.to_string())?;
        let cg = IdentityCgroup {
            path: path.clone(),
            identity: identity.clone(),
        };
        let placed = self
            .ensure_registered(&cg)
            .and_then(|_| Ok(cgroup::move_process(&path, pid)?));
        if let Err(e) = placed {
            if let Ok(id) = cgroup::cgroup_id(&path) {
                let _ = self.unregister(id);
            }
            let _ = cgroup::remove(&path, Duration::from_secs(1));
            return Err(format!("{e:#}"));
        }
        let policies = self.policies.load();
        let policy_version = policies
            .for_identity(identity.agent.as_str(), identity.tenant.as_str())
            .map(|p| p.version);
        tracing::info!(target: "aegis::identity", pid, identity = %identity, cgroup = %path.display(), policy_version, "exec workload placed");
        Ok(Reply::Exec {
            cgroup: path,
            identity: identity.id(),
            policy_version,
        })
    }

    fn status(&self) -> Reply {
        let enforcer = self.enforcer();
        Reply::Status {
            ready: self.ready.load(Ordering::SeqCst),
            pid: std::process::id(),
            cgroups: enforcer.cgroups().len(),
            policies: self.policies.load().len(),
            learned: enforcer.learned_total(),
        }
    }

    fn kill_switch(
        &self,
        on: bool,
        agent: Option<&str>,
        uid: u32,
        pid: Option<u32>,
    ) -> Result<Reply, String> {
        let _writer = self.writer().ok_or(HANDING_OVER)?;
        let target = match agent {
            None => Target::All,
            Some(a) => Target::Agent(Identity::new(a, None)?.agent.to_string()),
        };
        let state = self.kill.set(&target, on).map_err(|e| e.to_string())?;
        // The enforcer reads the switch per request already; the kernel gets the flag now.
        let policies = self.policies.load_full();
        self.enforcer()
            .apply_policies(&policies)
            .map_err(|e| format!("kill switch saved, but the kernel maps were not updated: {e}"))?;
        let record = KillSwitchRecord {
            kind: "kill_switch",
            on,
            target: target.to_string(),
            by_uid: uid,
            by_pid: pid,
        };
        tracing::warn!(target: "aegis::event", event = "kill_switch", on, target = %record.target, by_uid = uid, by_pid = pid, "kill switch {} for {}", if on { "on" } else { "off" }, record.target);
        self.audit.append(&record);
        Ok(Reply::KillSwitch {
            all: state.all,
            agents: state.agents.iter().cloned().collect(),
        })
    }

    fn approvals(&self) -> Reply {
        Reply::Approvals {
            pending: self.approvals.pending(),
            approvals: self
                .approvals
                .list()
                .iter()
                .filter_map(|a| serde_json::to_value(a).ok())
                .collect(),
        }
    }

    fn handover(&self, uid: u32) -> Result<Vec<OwnedFd>, String> {
        // The control socket is mode 0600: only root or the agent's own user reach it.
        let own = fs::metadata("/proc/self").map_or(0, |m| m.uid());
        if uid != 0 && uid != own {
            return Err(format!("uid {uid} may not take over the agent's sockets"));
        }
        if self.listeners.is_stopped() {
            return Err("this agent already handed over or is stopping".into());
        }
        let mut frozen = self.frozen.write().expect("frozen lock poisoned");
        if *frozen {
            return Err("a hand-over is already in progress".into());
        }
        let fds = self.listeners.hand_over().map_err(|e| e.to_string())?;
        *frozen = true;
        tracing::info!(target: "aegis::agent", sockets = fds.len(), "handing over to a new agent process: node state frozen until it commits");
        Ok(fds)
    }

    fn handover_end(&self, committed: bool) {
        if committed {
            self.not_ready();
            self.listeners.stop();
            tracing::info!(target: "aegis::agent", "handed over: the new agent serves the sockets; this one finishes what it has in flight and waits for SIGTERM");
        } else {
            *self.frozen.write().expect("frozen lock poisoned") = false;
            tracing::warn!(target: "aegis::agent", "hand-over aborted by the new agent; serving on");
        }
    }

    /// The approver recorded is the caller's uid (the socket is root-only; the HTTP API
    /// names its approvers, see [`approval::api`]).
    fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        reason: Option<&str>,
        uid: u32,
    ) -> Result<Reply, String> {
        let (approval, override_token) = self
            .approvals
            .decide(id, approve, &format!("uid:{uid}"), reason)
            .map_err(|e| e.to_string())?;
        Ok(Reply::ApprovalDecided {
            approval: serde_json::to_value(&approval).map_err(|e| e.to_string())?,
            override_token,
        })
    }
}

/// The state stores `--state-backend` names.
fn state_backend(args: &RunArgs) -> anyhow::Result<state::Backend> {
    let on_unavailable = args.state_unavailable;
    if on_unavailable == state::OnUnavailable::Open {
        tracing::warn!(target: "aegis::agent", "--state-unavailable open: calls needing an unreachable state store pass uncounted (fail open)");
    }
    Ok(match args.state_backend {
        state::BackendKind::Embedded => state::Backend {
            budgets: Arc::new(RedbStore::open(&args.state_db)?),
            rates: Arc::new(l7::limits::RateLimits::default()),
            replay: Arc::new(token::MemoryReplay::default()),
            remote: false,
            on_unavailable,
        },
        state::BackendKind::Redis => {
            let url = args
                .redis_url
                .clone()
                .context("--state-backend redis needs --redis-url")?;
            let redis = Arc::new(state::redis::RedisState::new(&state::redis::Settings {
                url,
                timeout: Duration::from_millis(args.redis_timeout_ms),
            })?);
            match redis.ping() {
                Ok(()) => tracing::info!(target: "aegis::agent", "state in Redis"),
                Err(e) => {
                    tracing::error!(target: "aegis::agent", error = %e, mode = ?on_unavailable, "Redis unreachable at start; calls needing state follow --state-unavailable until it is back");
                }
            }
            state::Backend {
                budgets: redis.clone(),
                rates: redis.clone(),
                replay: redis,
                remote: true,
                on_unavailable,
            }
        }
    })
}

/// The audit record of a kill switch change.
#[derive(serde::Serialize)]
struct KillSwitchRecord {
    kind: &'static str,
    on: bool,
    target: String,
    by_uid: u32,
    by_pid: Option<u32>,
}

async fn report_events(mut reader: AsyncEventReader, node: Arc<Node>) {
    loop {
        let events = match reader.next_batch().await {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(target: "aegis::agent", error = %e, "deny event ring unreadable; events stop (enforcement does not)");
                return;
            }
        };
        let policies = node.policies.load();
        for ev in events {
            let who = node.enforcer().identity(ev.identity).cloned();
            let version = who
                .as_ref()
                .and_then(|i| policies.for_identity(i.agent.as_str(), i.tenant.as_str()))
                .map_or(0, |p| p.version);
            let record = telemetry::kernel_event(&ev, who.as_ref(), version);
            metrics::global().kernel_deny(&record);
            node.audit.append(&record);
        }
    }
}

/// Runs `work` on the blocking pool and waits for it, keeping the async thread free.
async fn blocking(node: &Arc<Node>, work: impl FnOnce(&Node) + Send + 'static) {
    let node = node.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || work(&node)).await {
        tracing::error!(target: "aegis::agent", error = %e, "background task failed");
    }
}

async fn housekeeping(node: Arc<Node>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    let mut n = 0u32;
    loop {
        tick.tick().await;
        n = n.wrapping_add(1);
        let resync = n.is_multiple_of(RESYNC_TICKS);
        blocking(&node, move |node| {
            let Some(_writer) = node.writer() else {
                return;
            };
            if let Err(e) = node.enforcer().expire() {
                tracing::warn!(target: "aegis::agent", error = %e, "cannot remove expired addresses");
            }
            node.collect_exec_cgroups();
            // Expires approvals nobody decided in time (and updates the pending gauge).
            node.approvals.pending();
            if resync {
                node.enforcer().readopt_learned();
                node.sync();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_the_first_nameserver() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        fs::write(
            &path,
            "# comment\nsearch example\nnameserver fd00::53\nnameserver 10.0.0.1\n",
        )
        .unwrap();
        assert_eq!(
            resolv_conf_upstream(&path),
            Some("[fd00::53]:53".parse().unwrap())
        );
        fs::write(&path, "options ndots:2\n").unwrap();
        assert_eq!(resolv_conf_upstream(&path), None);
    }
}
