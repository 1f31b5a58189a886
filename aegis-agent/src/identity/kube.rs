//! Pod identities from the Kubernetes API server (`run --kubernetes`).
//!
//! [`KubePods`] watches the pods bound to this node (list + watch with the field selector
//! `spec.nodeName=<node>`, kube-runtime's `watcher` feeding a `reflector` store) and reports,
//! for every pod labelled [`AGENT_LABEL`], the pod's cgroup with the identity
//! (`aegis.dev/agent`, `aegis.dev/tenant` or [`DEFAULT_TENANT`]). A pod without the agent label
//! is not an agent and is never touched; a pod whose label values are not valid names is
//! skipped with a warning (once per pod and values).
//!
//! What is registered: the **pod-level** cgroup, as kubelet lays it out for its cgroup driver
//! ([`CgroupDriver`]) and the pod's QoS class ([`QosClass`]). Programs attached there apply to
//! every cgroup below it (containers, the sandbox, init and ephemeral containers alike), and
//! the kernel finds a process's identity on its own cgroup or its deepest identity-carrying
//! ancestor, so a process in any container cgroup (`cri-containerd-<id>.scope`, `crio-<id>`,
//! ...) resolves to the pod's identity. Container cgroups are deliberately not registered on
//! their own: cgroup links are `BPF_F_ALLOW_MULTI`, so a second attachment below the pod's
//! would run every program twice for the same `connect`. Their paths are computed
//! ([`container_cgroup`]) for logs and tests.
//!
//! Which driver the node uses is discovered on disk (`kubepods.slice` for systemd, `kubepods`
//! for cgroupfs, below the kube cgroup root) on every read, so the agent may start before
//! kubelet. A pod whose cgroup does not exist yet (kubelet has not created it) is left out and
//! looked for again every [`UNRESOLVED_RETRY`] until it appears.
//!
//! Invariants: until the first complete pod list has arrived, [`IdentitySource::cgroups`]
//! fails ("source unreadable": the caller keeps what it had, e.g. the pinned state of an
//! earlier agent); afterwards an unreachable API server leaves the last known pods in force
//! (the watcher retries with backoff and logs each failure) and never tears enforcement down.
//! Every change the watcher sees is signalled on the channel [`KubePods::start`] returns, so
//! the caller can re-read the sources at once instead of waiting for a periodic resync.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{mpsc, watch};

use super::{DEFAULT_TENANT, Identity, IdentityCgroup, IdentityError, IdentitySource};

/// Pod label naming the agent (required: a pod without it is not an agent workload).
pub const AGENT_LABEL: &str = "aegis.dev/agent";
/// Pod label naming the tenant (optional: [`DEFAULT_TENANT`] when absent).
pub const TENANT_LABEL: &str = "aegis.dev/tenant";
/// Annotation of a static pod's mirror on the API server: the UID kubelet runs the pod under
/// (and names its cgroup after), which differs from the mirror's own `metadata.uid`.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// How often a watched agent pod whose cgroup does not exist yet is looked for again.
pub const UNRESOLVED_RETRY: Duration = Duration::from_millis(250);

/// Errors building the API client, naming the kubeconfig at fault.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes client configuration (no --kubeconfig, KUBECONFIG or ~/.kube/config, and not in a pod)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig` (a file path), or else the inferred configuration: `KUBECONFIG`
/// or `~/.kube/config`, then the in-cluster service account (token and CA under
/// `/var/run/secrets/kubernetes.io/serviceaccount`, `KUBERNETES_SERVICE_HOST`/`_PORT`).
///
/// # Errors
/// The kubeconfig cannot be read or used, or no configuration is found.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    // kube's rustls client takes the process-wide crypto provider: ring, as everywhere in Aegis.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_err = |source| KubeError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_err)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_err)?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

// === impl KubePods ===

/// The identity source of pods on this node; see the module docs.
pub struct KubePods {
    store: Store<Pod>,
    node: String,
    /// kubelet's cgroup root: absolute, in the cgroup2 mount.
    root: PathBuf,
    shared: Arc<Shared>,
    /// (pod uid, message) pairs already warned about, so a bad pod warns once, not every read.
    warned: Mutex<HashSet<(String, String)>>,
}

/// State the watcher task and the source share.
struct Shared {
    /// A complete list has arrived at least once (and is in the store).
    listed: watch::Sender<bool>,
    /// The last read left out an agent pod whose cgroup does not exist yet.
    unresolved: AtomicBool,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            listed: watch::Sender::new(false),
            unresolved: AtomicBool::new(false),
        }
    }
}

impl KubePods {
    /// Starts watching the pods bound to `node` and returns the source with a channel that
    /// receives `()` after every change (coalesced: one pending message at most). `root` is
    /// kubelet's cgroup root, an absolute path in the cgroup2 mount (the mount itself on a
    /// standard node).
    ///
    /// Must be called inside a tokio runtime; the watcher runs as a task of it.
    pub fn start(
        client: kube::Client,
        node: String,
        root: PathBuf,
    ) -> (KubePods, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel(1);
        let (store, writer) = reflector::store();
        let shared = Arc::new(Shared::default());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let events = watcher(Api::<Pod>::all(client), config)
            // Only labels, uid, node name, QoS class and container ids are read: drop the rest.
            .modify(slim)
            .reflect(writer)
            // `Init` opens every list attempt, failed ones too; let through, it would reset the
            // backoff each time and retry a down API server every 0.8 s from every node.
            .filter(|e| std::future::ready(!matches!(e, Ok(watcher::Event::Init))))
            .backoff(watcher::DefaultBackoff::default());
        tokio::spawn(watch(events.boxed(), shared.clone(), tx, node.clone()));
        let source = KubePods {
            store,
            node,
            root,
            shared,
            warned: Mutex::new(HashSet::new()),
        };
        (source, rx)
    }

    /// Waits until the first complete pod list has arrived, at most `timeout`; whether it has.
    pub async fn wait_listed(&self, timeout: Duration) -> bool {
        let mut listed = self.shared.listed.subscribe();
        tokio::time::timeout(timeout, listed.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn warn_once(&self, pod: &Pod, message: String) {
        let key = (pod.uid().unwrap_or_default(), message);
        if self.warned.lock().expect("warned lock").insert(key.clone()) {
            tracing::warn!(target: "aegis::identity", source = "kubernetes", pod = %pod_name(pod), error = %key.1, "pod skipped");
        }
    }
}

impl IdentitySource for KubePods {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn cgroups(&self) -> Result<Vec<IdentityCgroup>, IdentityError> {
        if !*self.shared.listed.borrow() {
            return Err(IdentityError::Unavailable {
                what: "kubernetes",
                message: "no complete pod list from the API server yet".into(),
            });
        }
        let driver = CgroupDriver::discover(&self.root);
        let mut found = Vec::new();
        let mut unresolved = false;
        let pods = self.store.state();
        for pod in &pods {
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(&self.node) {
                continue; // the field selector already excludes it; belt and braces
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue; // its containers are gone; kubelet removes the cgroup
            }
            let identity = match pod_identity(pod) {
                Ok(Some(identity)) => identity,
                Ok(None) => continue,
                Err(e) => {
                    self.warn_once(pod, e);
                    continue;
                }
            };
            let uid = match kubelet_uid(pod) {
                Some(uid) if valid_uid(&uid) => uid,
                other => {
                    self.warn_once(pod, format!("pod uid {other:?} is not a UUID"));
                    continue;
                }
            };
            let qos = pod
                .status
                .as_ref()
                .and_then(|s| s.qos_class.as_deref())
                .and_then(QosClass::parse);
            let path = driver.and_then(|driver| {
                // The API server sets status.qosClass on creation; without it, try each class.
                let classes = qos
                    .as_ref()
                    .map_or(&QosClass::ALL[..], std::slice::from_ref);
                classes
                    .iter()
                    .map(|&qos| self.root.join(pod_cgroup(driver, qos, &uid)))
                    .find(|p| p.is_dir())
            });
            let Some(path) = path else {
                unresolved = true;
                tracing::debug!(target: "aegis::identity", pod = %pod_name(pod), driver = ?driver, "agent pod's cgroup not there yet");
                continue;
            };
            if tracing::enabled!(target: "aegis::identity", tracing::Level::DEBUG)
                && let Some(driver) = driver
            {
                let containers: Vec<PathBuf> = container_ids(pod)
                    .filter_map(|id| {
                        Some(self.root.join(container_cgroup(driver, qos?, &uid, &id)))
                    })
                    .collect();
                tracing::debug!(target: "aegis::identity", pod = %pod_name(pod), cgroup = %path.display(), containers = ?containers, "agent pod");
            }
            found.push(IdentityCgroup { path, identity });
        }
        self.shared.unresolved.store(unresolved, Ordering::SeqCst);
        let live: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
        self.warned
            .lock()
            .expect("warned lock")
            .retain(|(uid, _)| live.contains(uid));
        Ok(found)
    }
}

/// Drives the watcher: keeps the store current, signals changes, logs failures, and re-signals
/// while agent pods wait for their cgroup.
async fn watch(
    mut events: futures::stream::BoxStream<'static, Result<watcher::Event<Pod>, watcher::Error>>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<()>,
    node: String,
) {
    let mut failing = false;
    let mut retry = tokio::time::interval(UNRESOLVED_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = retry.tick() => {
                if shared.unresolved.load(Ordering::SeqCst) {
                    let _ = tx.try_send(());
                }
                continue;
            }
        };
        let changed = match event {
            None => {
                tracing::error!(target: "aegis::identity", source = "kubernetes", "pod watch ended; pod identities stay as they are");
                return;
            }
            Some(Err(e)) => {
                // The watcher retries with exponential backoff (0.8 s up to 30 s).
                tracing::warn!(target: "aegis::identity", source = "kubernetes", error = %e, "API server unreachable or refusing; keeping the pod identities in force");
                failing = true;
                false
            }
            Some(Ok(event)) => {
                if failing {
                    tracing::info!(target: "aegis::identity", source = "kubernetes", "API server reachable again");
                    failing = false;
                }
                match event {
                    watcher::Event::InitDone => {
                        if !shared.listed.send_replace(true) {
                            tracing::info!(target: "aegis::identity", source = "kubernetes", node = %node, "pod list received; watching");
                        }
                        true
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => true,
                    watcher::Event::Init | watcher::Event::InitApply(_) => false,
                }
            }
        };
        if changed {
            let _ = tx.try_send(());
        }
    }
}

/// The UID kubelet knows the pod by: a static pod's from [`MIRROR_ANNOTATION`], else its own.
fn kubelet_uid(pod: &Pod) -> Option<String> {
    pod.annotations()
        .get(MIRROR_ANNOTATION)
        .cloned()
        .or_else(|| pod.uid())
}

/// Drops what the source never reads, to keep the store small.
fn slim(pod: &mut Pod) {
    pod.managed_fields_mut().clear();
    pod.annotations_mut().retain(|k, _| k == MIRROR_ANNOTATION);
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        for statuses in [
            &mut status.container_statuses,
            &mut status.init_container_statuses,
            &mut status.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        {
            for s in statuses {
                s.last_state = None;
                s.state = None;
                s.resources = None;
                s.allocated_resources = None;
                s.volume_mounts = None;
                s.image = String::new();
                s.image_id = String::new();
            }
        }
    }
}

fn pod_name(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// The identity a pod's labels give it: `None` without [`AGENT_LABEL`].
///
/// # Errors
/// A label value that is not a valid name (see [`crate::policy::Name`]), naming the label.
pub fn pod_identity(pod: &Pod) -> Result<Option<Identity>, String> {
    let labels = pod.labels();
    let Some(agent) = labels.get(AGENT_LABEL) else {
        return Ok(None);
    };
    let tenant = labels.get(TENANT_LABEL).map(String::as_str);
    Identity::new(agent, tenant).map(Some).map_err(|e| {
        format!(
            "labels {AGENT_LABEL}={agent:?}, {TENANT_LABEL}={:?}: {e}",
            tenant.unwrap_or(DEFAULT_TENANT)
        )
    })
}

/// A pod UID as the API server makes them (RFC 4122 text: hex digits and dashes), which is
/// also what keeps it from naming anything but a pod cgroup.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

// === cgroup layout ===

/// How kubelet names cgroups: its `cgroupDriver` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// systemd slices and scopes: `kubepods.slice/kubepods-burstable.slice/...`.
    Systemd,
    /// Plain directories: `kubepods/burstable/pod<uid>/<container id>`.
    Cgroupfs,
}

impl CgroupDriver {
    /// The driver whose top-level cgroup exists below `root` (systemd first), if any.
    pub fn discover(root: &Path) -> Option<CgroupDriver> {
        if root.join("kubepods.slice").is_dir() {
            Some(CgroupDriver::Systemd)
        } else if root.join("kubepods").is_dir() {
            Some(CgroupDriver::Cgroupfs)
        } else {
            None
        }
    }
}

/// A pod's QoS class (`status.qosClass`), which picks its parent cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    /// Directly below `kubepods`.
    Guaranteed,
    /// Below `kubepods/burstable`.
    Burstable,
    /// Below `kubepods/besteffort`.
    BestEffort,
}

impl QosClass {
    /// Every class, in the order a pod without `status.qosClass` is looked for.
    pub const ALL: [QosClass; 3] = [
        QosClass::Burstable,
        QosClass::BestEffort,
        QosClass::Guaranteed,
    ];

    /// Parses the API value (`Guaranteed`, `Burstable`, `BestEffort`).
    pub fn parse(s: &str) -> Option<QosClass> {
        match s {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    /// The class's name in cgroup names (none for Guaranteed, which has no QoS cgroup).
    fn slug(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// A container runtime, from the scheme of a status `containerID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerRuntime {
    /// `containerd://<id>`.
    Containerd,
    /// `cri-o://<id>`.
    CriO,
    /// `docker://<id>` (cri-dockerd).
    Docker,
}

/// A container of a pod, from `status.containerStatuses[].containerID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerId {
    pub runtime: ContainerRuntime,
    /// The runtime's id: lowercase hex.
    pub id: String,
}

impl ContainerId {
    /// Parses `<runtime>://<hex id>`; `None` for other runtimes or ids that are not hex.
    pub fn parse(s: &str) -> Option<ContainerId> {
        let (scheme, id) = s.split_once("://")?;
        let runtime = match scheme {
            "containerd" => ContainerRuntime::Containerd,
            "cri-o" => ContainerRuntime::CriO,
            "docker" => ContainerRuntime::Docker,
            _ => return None,
        };
        let hex = !id.is_empty() && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        hex.then(|| ContainerId {
            runtime,
            id: id.to_owned(),
        })
    }
}

/// The ids of a pod's started containers (regular, init and ephemeral).
pub fn container_ids(pod: &Pod) -> impl Iterator<Item = ContainerId> + '_ {
    let status = pod.status.as_ref();
    [
        status.and_then(|s| s.container_statuses.as_ref()),
        status.and_then(|s| s.init_container_statuses.as_ref()),
        status.and_then(|s| s.ephemeral_container_statuses.as_ref()),
    ]
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|s| ContainerId::parse(s.container_id.as_deref()?))
}

/// A pod's cgroup relative to kubelet's cgroup root, as kubelet's cgroup manager names it
/// (kubernetes `pkg/kubelet/cm/cgroup_manager_linux.go`, `pod_container_manager_linux.go`):
///
/// | driver | Guaranteed | Burstable (BestEffort alike) |
/// |---|---|---|
/// | systemd | `kubepods.slice/kubepods-pod<uid_>.slice` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
/// | cgroupfs | `kubepods/pod<uid>` | `kubepods/burstable/pod<uid>` |
///
/// `<uid_>` is the UID with `-` replaced by `_` (systemd reserves `-` for the slice hierarchy).
pub fn pod_cgroup(driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    match (driver, qos.slug()) {
        (CgroupDriver::Systemd, qos) => {
            let uid = uid.replace('-', "_");
            let mut path = PathBuf::from("kubepods.slice");
            match qos {
                Some(q) => {
                    path.push(format!("kubepods-{q}.slice"));
                    path.push(format!("kubepods-{q}-pod{uid}.slice"));
                }
                None => path.push(format!("kubepods-pod{uid}.slice")),
            }
            path
        }
        (CgroupDriver::Cgroupfs, qos) => {
            let mut path = PathBuf::from("kubepods");
            path.extend(qos);
            path.push(format!("pod{uid}"));
            path
        }
    }
}

/// A container's cgroup relative to kubelet's cgroup root: the pod's ([`pod_cgroup`]), then
/// the runtime's name for it. systemd: `cri-containerd-<id>.scope` (containerd),
/// `crio-<id>.scope` (CRI-O), `docker-<id>.scope`; cgroupfs: `<id>` (containerd, docker),
/// `crio-<id>` (CRI-O).
pub fn container_cgroup(
    driver: CgroupDriver,
    qos: QosClass,
    uid: &str,
    container: &ContainerId,
) -> PathBuf {
    let id = &container.id;
    let name = match (driver, container.runtime) {
        (CgroupDriver::Systemd, ContainerRuntime::Containerd) => {
            format!("cri-containerd-{id}.scope")
        }
        (CgroupDriver::Systemd, ContainerRuntime::CriO) => format!("crio-{id}.scope"),
        (CgroupDriver::Systemd, ContainerRuntime::Docker) => format!("docker-{id}.scope"),
        (CgroupDriver::Cgroupfs, ContainerRuntime::CriO) => format!("crio-{id}"),
        (CgroupDriver::Cgroupfs, ContainerRuntime::Containerd | ContainerRuntime::Docker) => {
            id.clone()
        }
    };
    pod_cgroup(driver, qos, uid).join(name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{ContainerStatus, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    const UID: &str = "7b3e1f2a-94c1-4d4e-8a59-1c2d3e4f5a6b";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn cgroup_paths_for_every_driver_runtime_and_qos() {
        use CgroupDriver::*;
        use ContainerRuntime::*;
        use QosClass::*;
        let u = "7b3e1f2a_94c1_4d4e_8a59_1c2d3e4f5a6b";
        let cases = [
            (
                Systemd,
                Containerd,
                Guaranteed,
                format!("kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
            ),
            (
                Systemd,
                Containerd,
                Burstable,
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
                ),
            ),
            (
                Systemd,
                Containerd,
                BestEffort,
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"
                ),
            ),
            (
                Systemd,
                CriO,
                Guaranteed,
                format!("kubepods.slice/kubepods-pod{u}.slice/crio-{ID}.scope"),
            ),
            (
                Systemd,
                CriO,
                Burstable,
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{ID}.scope"
                ),
            ),
            (
                Systemd,
                CriO,
                BestEffort,
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{ID}.scope"
                ),
            ),
            (
                Systemd,
                Docker,
                Guaranteed,
                format!("kubepods.slice/kubepods-pod{u}.slice/docker-{ID}.scope"),
            ),
            (
                Systemd,
                Docker,
                Burstable,
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/docker-{ID}.scope"
                ),
            ),
            (
                Systemd,
                Docker,
                BestEffort,
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{ID}.scope"
                ),
            ),
            (
                Cgroupfs,
                Containerd,
                Guaranteed,
                format!("kubepods/pod{UID}/{ID}"),
            ),
            (
                Cgroupfs,
                Containerd,
                Burstable,
                format!("kubepods/burstable/pod{UID}/{ID}"),
            ),
            (
                Cgroupfs,
                Containerd,
                BestEffort,
                format!("kubepods/besteffort/pod{UID}/{ID}"),
            ),
            (
                Cgroupfs,
                CriO,
                Guaranteed,
                format!("kubepods/pod{UID}/crio-{ID}"),
            ),
            (
                Cgroupfs,
                CriO,
                Burstable,
                format!("kubepods/burstable/pod{UID}/crio-{ID}"),
            ),
            (
                Cgroupfs,
                CriO,
                BestEffort,
                format!("kubepods/besteffort/pod{UID}/crio-{ID}"),
            ),
            (
                Cgroupfs,
                Docker,
                Guaranteed,
                format!("kubepods/pod{UID}/{ID}"),
            ),
            (
                Cgroupfs,
                Docker,
                Burstable,
                format!("kubepods/burstable/pod{UID}/{ID}"),
            ),
            (
                Cgroupfs,
                Docker,
                BestEffort,
                format!("kubepods/besteffort/pod{UID}/{ID}"),
            ),
        ];
        for (driver, runtime, qos, want) in cases {
            let container = ContainerId {
                runtime,
                id: ID.into(),
            };
            let got = container_cgroup(driver, qos, UID, &container);
            assert_eq!(got, PathBuf::from(&want), "{driver:?} {runtime:?} {qos:?}");
            assert_eq!(
                pod_cgroup(driver, qos, UID),
                *got.parent().unwrap(),
                "the pod cgroup is the container's parent"
            );
        }
    }

    #[test]
    fn container_ids_parse_known_runtimes_only() {
        assert_eq!(
            ContainerId::parse(&format!("containerd://{ID}")),
            Some(ContainerId {
                runtime: ContainerRuntime::Containerd,
                id: ID.into()
            })
        );
        assert_eq!(
            ContainerId::parse("cri-o://abc123").map(|c| c.runtime),
            Some(ContainerRuntime::CriO)
        );
        assert_eq!(
            ContainerId::parse("docker://abc").map(|c| c.runtime),
            Some(ContainerRuntime::Docker)
        );
        assert_eq!(ContainerId::parse("containerd://../../etc"), None);
        assert_eq!(ContainerId::parse("containerd://"), None);
        assert_eq!(ContainerId::parse("rkt://abc"), None);
        assert_eq!(ContainerId::parse("abc"), None);
    }

    fn pod(labels: &[(&str, &str)], qos: &str, node: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some(UID.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                qos_class: Some(qos.into()),
                phase: Some("Running".into()),
                container_statuses: Some(vec![ContainerStatus {
                    container_id: Some(format!("containerd://{ID}")),
                    name: "main".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn identity_comes_from_labels() {
        let p = pod(
            &[(AGENT_LABEL, "finance-agent"), (TENANT_LABEL, "acme")],
            "Burstable",
            "n",
        );
        assert_eq!(
            pod_identity(&p),
            Ok(Some(Identity::new("finance-agent", Some("acme")).unwrap()))
        );
        let p = pod(&[(AGENT_LABEL, "finance-agent")], "Burstable", "n");
        assert_eq!(
            pod_identity(&p).unwrap().unwrap().tenant.as_str(),
            DEFAULT_TENANT
        );
        let p = pod(&[("app", "web"), (TENANT_LABEL, "acme")], "Burstable", "n");
        assert_eq!(pod_identity(&p), Ok(None), "no agent label: not an agent");
        let p = pod(&[(AGENT_LABEL, "Bad Name")], "Burstable", "n");
        let e = pod_identity(&p).unwrap_err();
        assert!(e.contains(AGENT_LABEL) && e.contains("Bad Name"), "{e}");
    }

    /// The source end to end below the watcher: a store holding pods, cgroups on disk.
    #[test]
    fn source_reports_existing_pod_cgroups_of_agent_pods_on_its_node() {
        let root = tempfile::tempdir().unwrap();
        let (store, mut writer) = reflector::store::<Pod>();
        let shared = Arc::new(Shared::default());
        let source = KubePods {
            store,
            node: "n1".into(),
            root: root.path().to_owned(),
            shared: shared.clone(),
            warned: Mutex::new(HashSet::new()),
        };
        assert!(
            matches!(source.cgroups(), Err(IdentityError::Unavailable { .. })),
            "unreadable before the first list"
        );

        let agent = pod(&[(AGENT_LABEL, "a")], "Burstable", "n1");
        let mut plain = pod(&[("app", "x")], "Burstable", "n1");
        plain.metadata.name = Some("plain".into());
        plain.metadata.uid = Some("11111111-2222-3333-4444-555555555555".into());
        let mut elsewhere = pod(&[(AGENT_LABEL, "a")], "Burstable", "n2");
        elsewhere.metadata.name = Some("elsewhere".into());
        elsewhere.metadata.uid = Some("66666666-2222-3333-4444-555555555555".into());
        let mut bad = pod(&[(AGENT_LABEL, "no/slash")], "Burstable", "n1");
        bad.metadata.name = Some("bad".into());
        bad.metadata.uid = Some("77777777-2222-3333-4444-555555555555".into());
        writer.apply_watcher_event(&watcher::Event::Init);
        for p in [&agent, &plain, &elsewhere, &bad] {
            writer.apply_watcher_event(&watcher::Event::InitApply(p.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        shared.listed.send_replace(true);

        // No kubepods cgroup yet (kubelet not started): nothing, and a retry is wanted.
        assert_eq!(source.cgroups().unwrap(), vec![]);
        assert!(shared.unresolved.load(Ordering::SeqCst));

        for p in [&agent, &plain, &elsewhere, &bad] {
            let dir = root.path().join(pod_cgroup(
                CgroupDriver::Systemd,
                QosClass::Burstable,
                p.metadata.uid.as_deref().unwrap(),
            ));
            std::fs::create_dir_all(dir).unwrap();
        }
        let want = vec![IdentityCgroup {
            path: root.path().join(format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                UID.replace('-', "_")
            )),
            identity: Identity::new("a", None).unwrap(),
        }];
        assert_eq!(source.cgroups().unwrap(), want);
        assert!(!shared.unresolved.load(Ordering::SeqCst));
        assert_eq!(
            source.warned.lock().unwrap().len(),
            1,
            "the bad label warned"
        );

        // A relabel is seen on the next read; deletion removes the pod.
        let relabelled = pod(
            &[(AGENT_LABEL, "b"), (TENANT_LABEL, "t")],
            "Burstable",
            "n1",
        );
        writer.apply_watcher_event(&watcher::Event::Apply(relabelled.clone()));
        assert_eq!(
            source.cgroups().unwrap()[0].identity,
            Identity::new("b", Some("t")).unwrap()
        );
        writer.apply_watcher_event(&watcher::Event::Delete(relabelled));
        assert_eq!(source.cgroups().unwrap(), vec![]);
    }

    #[test]
    fn drivers_are_discovered_on_disk() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(CgroupDriver::discover(root.path()), None);
        std::fs::create_dir(root.path().join("kubepods")).unwrap();
        assert_eq!(
            CgroupDriver::discover(root.path()),
            Some(CgroupDriver::Cgroupfs)
        );
        std::fs::create_dir(root.path().join("kubepods.slice")).unwrap();
        assert_eq!(
            CgroupDriver::discover(root.path()),
            Some(CgroupDriver::Systemd)
        );
    }

    #[test]
    fn static_pods_are_found_by_their_kubelet_uid() {
        let mut p = pod(&[(AGENT_LABEL, "a")], "Guaranteed", "n");
        assert_eq!(kubelet_uid(&p).as_deref(), Some(UID));
        let hash = "6b1ae3a7a5b0d32e4c6f3c9a9b7e5d21";
        p.metadata.annotations = Some(
            [
                (MIRROR_ANNOTATION.to_string(), hash.to_string()),
                ("other".to_string(), "x".to_string()),
            ]
            .into(),
        );
        slim(&mut p);
        assert_eq!(
            p.annotations().len(),
            1,
            "only the mirror annotation is kept"
        );
        assert_eq!(kubelet_uid(&p).as_deref(), Some(hash));
    }

    #[test]
    fn uids_that_could_escape_are_refused() {
        assert!(valid_uid(UID));
        assert!(!valid_uid("../x"));
        assert!(!valid_uid(""));
    }
}
