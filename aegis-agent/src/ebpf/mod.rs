#![expect(
    unsafe_code,
    reason = "statfs, mount, clock_gettime, ring buffer reads and AsyncFd registration"
)]

//! The kernel side as seen from userspace: loads the embedded object, pins maps and links under
//! bpffs, attaches the programs to identity cgroups, and reads and writes the maps. The only
//! module that imports aya.
//!
//! Invariants:
//! - Maps are pinned by name under `<pin dir>/` and links under `<pin dir>/links/<cgroup id>/`,
//!   so enforcement outlives the agent process. A new agent reuses the pinned maps and adopts
//!   pinned links instead of attaching twice; only [`uninstall`] removes them.
//! - Map layouts are fixed by `aegis-common`; a layout change bumps the map name's version.

use std::{
    fs, io,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aegis_common::{
    ALL_MAPS, ALL_PROGRAMS, Cidr4Data, Cidr6Data, DenyEvent, Egress4Key, Egress6Key, EgressValue,
    IdentityValue, L7Orig, MAP_CIDR4, MAP_CIDR6, MAP_CONFIG, MAP_EVENTS, MAP_FQDN4, MAP_FQDN6,
    MAP_IDENTITY, MAP_L7_PEER, NodeConfig, PeerKey,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, Program, ProgramError, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use ipnet::IpNet;

/// The kernel object built by `build.rs` from `aegis-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aegis"));

/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of the kernel datapath, with the object or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the kernel programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the kernel object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the kernel object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The maps the agent writes. Map operations are single system calls; the DNS path takes
/// this (behind the enforcer's lock) on every answer, so nothing slow lives here.
pub struct Datapath {
    identity: HashMap<MapData, u64, IdentityValue>,
    config: Array<MapData, NodeConfig>,
    fqdn4: HashMap<MapData, Egress4Key, EgressValue>,
    fqdn6: HashMap<MapData, Egress6Key, EgressValue>,
    cidr4: LpmTrie<MapData, Cidr4Data, EgressValue>,
    cidr6: LpmTrie<MapData, Cidr6Data, EgressValue>,
    l7_peer: HashMap<MapData, PeerKey, L7Orig>,
}

/// The loaded programs and their pinned cgroup links. Attaching and detaching can take
/// milliseconds (the kernel recomputes the cgroup subtree's program arrays), so this is kept
/// apart from [`Datapath`].
pub struct Links {
    bpf: Ebpf,
    pin_dir: PathBuf,
}

/// Reader of the deny event ring buffer; poll its fd, then drain with [`EventReader::drain`].
pub struct EventReader {
    ring: RingBuf<MapData>,
}

/// Reader of kernel-side logs (aya-log); poll its fd, then call `flush`.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

// === impl Datapath ===

impl Datapath {
    /// Loads and verifies every program, reusing maps pinned under `pin_dir` (created, and
    /// bpffs mounted at its parent if needed).
    ///
    /// # Errors
    /// bpffs cannot be mounted, the verifier rejects a program, or a map is missing.
    pub fn load(
        pin_dir: &Path,
    ) -> Result<(Datapath, Links, EventReader, Option<KernelLogger>), DatapathError> {
        ensure_bpffs(pin_dir.parent().unwrap_or(Path::new("/sys/fs/bpf")))?;
        let links = pin_dir.join("links");
        fs::create_dir_all(&links).map_err(io_err(&links))?;

        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(DatapathError::Load)?;
        // Kernel-side logs are a diagnostic: their absence never stops enforcement.
        let logger = aya_log::EbpfLogger::init_with_logger(&mut bpf, log::logger()).ok();
        for name in ALL_PROGRAMS {
            let program = bpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?;
            let loaded = match program {
                Program::CgroupSockAddr(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                Program::SockOps(p) => p.load(),
                _ => return Err(DatapathError::MissingProgram(name)),
            };
            loaded.map_err(|source| DatapathError::Program { name, source })?;
        }
        for name in ALL_MAPS {
            if bpf.map(name).is_none() {
                return Err(DatapathError::MissingMap(name));
            }
        }
        let take = |bpf: &mut Ebpf, name: &'static str| {
            bpf.take_map(name).ok_or(DatapathError::MissingMap(name))
        };
        let events = RingBuf::try_from(take(&mut bpf, MAP_EVENTS)?).map_err(map_err(MAP_EVENTS))?;
        let datapath = Datapath {
            identity: HashMap::try_from(take(&mut bpf, MAP_IDENTITY)?)
                .map_err(map_err(MAP_IDENTITY))?,
            config: Array::try_from(take(&mut bpf, MAP_CONFIG)?).map_err(map_err(MAP_CONFIG))?,
            fqdn4: HashMap::try_from(take(&mut bpf, MAP_FQDN4)?).map_err(map_err(MAP_FQDN4))?,
            fqdn6: HashMap::try_from(take(&mut bpf, MAP_FQDN6)?).map_err(map_err(MAP_FQDN6))?,
            cidr4: LpmTrie::try_from(take(&mut bpf, MAP_CIDR4)?).map_err(map_err(MAP_CIDR4))?,
            cidr6: LpmTrie::try_from(take(&mut bpf, MAP_CIDR6)?).map_err(map_err(MAP_CIDR6))?,
            l7_peer: HashMap::try_from(take(&mut bpf, MAP_L7_PEER)?)
                .map_err(map_err(MAP_L7_PEER))?,
        };
        let links = Links {
            bpf,
            pin_dir: pin_dir.to_owned(),
        };
        Ok((datapath, links, EventReader { ring: events }, logger))
    }
}

// === impl Links ===

impl Links {
    fn link_dir(&self, cgroup_id: u64) -> PathBuf {
        self.pin_dir.join("links").join(cgroup_id.to_string())
    }

    /// Attaches every program to the cgroup at `path` and pins the links. Pinned links found
    /// for the cgroup (left by an earlier agent) are adopted instead. Returns whether the
    /// links were adopted.
    ///
    /// # Errors
    /// The cgroup cannot be opened, or the kernel refuses an attachment or a pin.
    pub fn attach(&mut self, path: &Path, cgroup_id: u64) -> Result<bool, DatapathError> {
        let dir = self.link_dir(cgroup_id);
        if ALL_PROGRAMS
            .iter()
            .all(|p| PinnedLink::from_pin(dir.join(p)).is_ok())
        {
            return Ok(true);
        }
        // A partial set (a crash mid-attach) is replaced whole.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let cgroup = fs::File::open(path).map_err(io_err(path))?;
        for name in ALL_PROGRAMS {
            let program = self
                .bpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?;
            let prog_err = |source| DatapathError::Program { name, source };
            let link: FdLink = match program {
                Program::CgroupSockAddr(p) => {
                    let id = p
                        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                        .map_err(prog_err)?;
                    let link = p.take_link(id).map_err(prog_err)?;
                    FdLink::try_from(link).map_err(|e| DatapathError::Pin {
                        path: dir.clone(),
                        message: e.to_string(),
                    })?
                }
                Program::CgroupSock(p) => attach_sock(p, &cgroup).map_err(prog_err)?,
                Program::SockOps(p) => attach_sockops(p, &cgroup).map_err(prog_err)?,
                _ => return Err(DatapathError::MissingProgram(name)),
            };
            let pin = dir.join(name);
            link.pin(&pin).map_err(|e| DatapathError::Pin {
                path: pin.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(false)
    }

    /// Detaches the programs from a cgroup by removing its pinned links.
    pub fn detach(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        let dir = self.link_dir(cgroup_id);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Io {
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// cgroup ids that have pinned links.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        let dir = self.pin_dir.join("links");
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

// === impl Datapath (maps) ===

impl Datapath {
    /// Takes the original destination of a connection redirected to the L7 enforcer, by the
    /// connection's peer address as the enforcer sees it (the record is removed: each
    /// connection is looked up once).
    pub fn take_l7_origin(&mut self, peer: std::net::SocketAddr) -> Option<L7Orig> {
        let addr = match peer.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let key = PeerKey {
            addr,
            port: u32::from(peer.port()),
        };
        let orig = self.l7_peer.get(&key, 0).ok()?;
        let _ = self.l7_peer.remove(&key);
        Some(orig)
    }

    /// Maps `cgroup_id` to an identity.
    pub fn set_identity(
        &mut self,
        cgroup_id: u64,
        value: IdentityValue,
    ) -> Result<(), DatapathError> {
        self.identity
            .insert(cgroup_id, value, 0)
            .map_err(map_err(MAP_IDENTITY))
    }

    /// Removes the identity of `cgroup_id` (a missing entry is not an error).
    pub fn remove_identity(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        ignore_missing(self.identity.remove(&cgroup_id)).map_err(map_err(MAP_IDENTITY))
    }

    /// Every (cgroup id, identity) in the kernel map.
    pub fn identities(&self) -> Vec<(u64, IdentityValue)> {
        self.identity.iter().filter_map(Result::ok).collect()
    }

    /// The node configuration in the (pinned) map: an earlier agent's, until written.
    pub fn config(&self) -> Option<NodeConfig> {
        self.config.get(&0, 0).ok()
    }

    /// Writes the node configuration.
    pub fn set_config(&mut self, config: NodeConfig) -> Result<(), DatapathError> {
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Allows `identity` to reach `addr` as described by `value` (a learned address).
    pub fn set_learned(
        &mut self,
        identity: u32,
        addr: IpAddr,
        value: EgressValue,
    ) -> Result<(), DatapathError> {
        match addr {
            IpAddr::V4(a) => self
                .fqdn4
                .insert(
                    Egress4Key {
                        identity,
                        addr: a.octets(),
                    },
                    value,
                    0,
                )
                .map_err(map_err(MAP_FQDN4)),
            IpAddr::V6(a) => self
                .fqdn6
                .insert(
                    Egress6Key {
                        identity,
                        addr: a.octets(),
                    },
                    value,
                    0,
                )
                .map_err(map_err(MAP_FQDN6)),
        }
    }

    /// Removes a learned address (a missing entry is not an error).
    pub fn remove_learned(&mut self, identity: u32, addr: IpAddr) -> Result<(), DatapathError> {
        match addr {
            IpAddr::V4(a) => ignore_missing(self.fqdn4.remove(&Egress4Key {
                identity,
                addr: a.octets(),
            }))
            .map_err(map_err(MAP_FQDN4)),
            IpAddr::V6(a) => ignore_missing(self.fqdn6.remove(&Egress6Key {
                identity,
                addr: a.octets(),
            }))
            .map_err(map_err(MAP_FQDN6)),
        }
    }

    /// The kernel's entry for a learned address, if any.
    pub fn learned_value(&self, identity: u32, addr: IpAddr) -> Option<EgressValue> {
        match addr {
            IpAddr::V4(a) => self
                .fqdn4
                .get(
                    &Egress4Key {
                        identity,
                        addr: a.octets(),
                    },
                    0,
                )
                .ok(),
            IpAddr::V6(a) => self
                .fqdn6
                .get(
                    &Egress6Key {
                        identity,
                        addr: a.octets(),
                    },
                    0,
                )
                .ok(),
        }
    }

    /// Every learned (identity, address, value) in the kernel maps.
    pub fn learned(&self) -> Vec<(u32, IpAddr, EgressValue)> {
        let v4 = self
            .fqdn4
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k.identity, IpAddr::from(k.addr), v));
        let v6 = self
            .fqdn6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k.identity, IpAddr::from(k.addr), v));
        v4.chain(v6).collect()
    }

    /// Allows `identity` to reach `net` as described by `value` (a literal CIDR).
    pub fn set_cidr(
        &mut self,
        identity: u32,
        net: IpNet,
        value: EgressValue,
    ) -> Result<(), DatapathError> {
        match cidr_key(identity, net) {
            CidrKey::V4(key) => self
                .cidr4
                .insert(&key, value, 0)
                .map_err(map_err(MAP_CIDR4)),
            CidrKey::V6(key) => self
                .cidr6
                .insert(&key, value, 0)
                .map_err(map_err(MAP_CIDR6)),
        }
    }

    /// Every (identity, CIDR) in the kernel maps.
    pub fn cidrs(&self) -> Vec<(u32, IpNet, EgressValue)> {
        let mut out = Vec::new();
        for (k, v) in self.cidr4.iter().filter_map(Result::ok) {
            let (len, data) = (k.prefix_len(), k.data());
            if let Ok(net) = IpNet::new(IpAddr::from(data.addr), (len.saturating_sub(32)) as u8) {
                out.push((u32::from_be_bytes(data.identity_be), net, v));
            }
        }
        for (k, v) in self.cidr6.iter().filter_map(Result::ok) {
            let (len, data) = (k.prefix_len(), k.data());
            if let Ok(net) = IpNet::new(IpAddr::from(data.addr), (len.saturating_sub(32)) as u8) {
                out.push((u32::from_be_bytes(data.identity_be), net, v));
            }
        }
        out
    }

    /// Removes one CIDR entry (a missing entry is not an error).
    pub fn remove_cidr(&mut self, identity: u32, net: IpNet) -> Result<(), DatapathError> {
        match cidr_key(identity, net) {
            CidrKey::V4(key) => ignore_missing(self.cidr4.remove(&key)).map_err(map_err(MAP_CIDR4)),
            CidrKey::V6(key) => ignore_missing(self.cidr6.remove(&key)).map_err(map_err(MAP_CIDR6)),
        }
    }
}

fn attach_sock(p: &mut CgroupSock, cgroup: &fs::File) -> Result<FdLink, ProgramError> {
    let id = p.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
    let link = p.take_link(id)?;
    FdLink::try_from(link).map_err(|e| ProgramError::IOError(io::Error::other(e.to_string())))
}

fn attach_sockops(p: &mut SockOps, cgroup: &fs::File) -> Result<FdLink, ProgramError> {
    let id = p.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
    let link = p.take_link(id)?;
    FdLink::try_from(link).map_err(|e| ProgramError::IOError(io::Error::other(e.to_string())))
}

enum CidrKey {
    V4(Key<Cidr4Data>),
    V6(Key<Cidr6Data>),
}

/// The LPM key of `net` for `identity`: the identity's 32 bits, then the network's prefix.
fn cidr_key(identity: u32, net: IpNet) -> CidrKey {
    let identity_be = identity.to_be_bytes();
    let len = 32 + u32::from(net.prefix_len());
    match net {
        IpNet::V4(n) => CidrKey::V4(Key::new(
            len,
            Cidr4Data {
                identity_be,
                addr: n.network().octets(),
            },
        )),
        IpNet::V6(n) => CidrKey::V6(Key::new(
            len,
            Cidr6Data {
                identity_be,
                addr: n.network().octets(),
            },
        )),
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

// === impl EventReader ===

impl EventReader {
    /// Takes every event currently in the ring.
    pub fn drain(&mut self) -> Vec<DenyEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<DenyEvent>() {
                // SAFETY: the kernel wrote a whole `DenyEvent` (checked length); `read_unaligned`
                // copes with the ring's 8-byte alignment and every bit pattern is valid.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DenyEvent>()) });
            }
        }
        out
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// [`EventReader`] driven by tokio.
pub struct AsyncEventReader {
    fd: tokio::io::unix::AsyncFd<EventReader>,
}

impl EventReader {
    /// Registers the ring buffer with the tokio reactor (must run inside the runtime).
    ///
    /// # Errors
    /// The reactor refuses the fd.
    pub fn into_async(self) -> io::Result<AsyncEventReader> {
        // SAFETY: the fd belongs to `self.ring`, which the AsyncFd owns and keeps open for its
        // whole life; `as_raw_fd` always returns that same fd.
        let fd =
            unsafe { tokio::io::unix::AsyncFd::register(self) }.map_err(|e| e.into_parts().1)?;
        Ok(AsyncEventReader { fd })
    }
}

impl AsyncEventReader {
    /// Waits for events and returns every event in the ring.
    ///
    /// # Errors
    /// The reactor fails.
    pub async fn next_batch(&mut self) -> io::Result<Vec<DenyEvent>> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let events = guard.get_inner_mut().drain();
            guard.clear_ready();
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

/// Forwards kernel-side logs (aya-log) to the `log` facade until the fd fails.
pub async fn forward_kernel_logs(logger: KernelLogger) {
    // SAFETY: as in `EventReader::into_async`: the logger owns its fd for the AsyncFd's life.
    let Ok(mut fd) = (unsafe { tokio::io::unix::AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Makes sure `dir` is a bpffs mount, mounting one there if it is an empty, unmounted
/// directory (bpf(2) pins only work on bpffs).
fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    if is_bpffs(dir)? {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let target = c(&dir.to_string_lossy());
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c("bpf").as_ptr(),
            target.as_ptr(),
            c("bpf").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::Io {
            path: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn is_bpffs(dir: &Path) -> Result<bool, DatapathError> {
    let path = std::ffi::CString::new(dir.to_string_lossy().as_bytes()).expect("no NUL");
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(DatapathError::Io {
            path: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock of `bpf_ktime_get_boot_ns`, used for expiries.
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Removes everything Aegis pinned under `pin_dir`: links first (which detaches the programs
/// from every cgroup), then maps. A missing directory is not an error.
pub fn uninstall(pin_dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Io {
            path: pin_dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Names of the maps and programs in the embedded object, for layout checks.
#[cfg(test)]
fn object_symbols() -> Result<
    (
        std::collections::HashSet<String>,
        std::collections::HashSet<String>,
    ),
    DatapathError,
> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| DatapathError::Pin {
        path: "embedded object".into(),
        message: e.to_string(),
    })?;
    Ok((
        obj.maps.keys().cloned().collect(),
        obj.programs.keys().cloned().collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our `bpf_alignchecker`: every map and program the agent uses exists in the object.
    #[test]
    fn embedded_object_has_every_map_and_program() {
        let (maps, programs) = object_symbols().unwrap();
        for name in ALL_MAPS {
            assert!(
                maps.contains(name),
                "map {name} missing; object has {maps:?}"
            );
        }
        for name in ALL_PROGRAMS {
            assert!(
                programs.contains(name),
                "program {name} missing; object has {programs:?}"
            );
        }
    }
}
