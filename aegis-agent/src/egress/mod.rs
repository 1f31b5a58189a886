//! The egress enforcement state of the node: which cgroups carry which identity, each
//! identity's DNS proxy port, its literal CIDRs and its DNS-learned addresses, kept in step
//! with the kernel maps.
//!
//! Invariants:
//! - Every change is written to the kernel before the call that made it returns; in
//!   particular [`Enforcer::learn`] returns only once the kernel allows the addresses, so the
//!   DNS proxy can release the answer right after.
//! - Learned addresses are per identity: nothing learned for one identity is visible to
//!   another. Two identities whose numeric ids collide are refused.
//! - An identity without policy is enforced with an empty allowlist (fail closed).

pub mod learned;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use aegis_common::{
    CONFIG_F_DNS6, CONFIG_F_L7_6, IDENTITY_F_DENY_RAW, IDENTITY_F_KILLED, IDENTITY_F_SHADOW,
    IdentityValue, L7Orig, NodeConfig,
};
use ipnet::IpNet;

use crate::{
    cgroup::{self, CgroupError},
    ebpf::{self, Datapath, DatapathError},
    identity::{Identity, IdentityCgroup},
    killswitch::KillSwitch,
    policy::{Mode, Policy, PolicySet, Ports},
};
use learned::{LearnedStore, egress_value};

/// How long an expired learned address stays in the kernel map (refusing connections) before
/// it is deleted, so that denials in that window say `ttl_expired`, not `not_allowed`.
pub const EXPIRED_RETENTION: Duration = Duration::from_secs(60);

/// Errors of enforcement state changes.
#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "identity {new} has the same numeric id {id} as identity {existing}; rename one of them"
    )]
    IdCollision {
        id: u32,
        new: Identity,
        existing: Identity,
    },
    #[error("no free DNS proxy port at or above {base}")]
    NoPort { base: u16 },
}

/// Node-wide settings of the enforcer.
#[derive(Clone, Debug)]
pub struct Settings {
    /// IPv4 address pods' DNS is steered to (the proxy listens there).
    pub dns4: Ipv4Addr,
    /// IPv6 address of the proxy; without it DNS over IPv6 is denied.
    pub dns6: Option<Ipv6Addr>,
    /// First per-identity DNS proxy port.
    pub dns_port_base: u16,
    /// IPv4 address of the L7 enforcer; without it, connections to inspected destinations
    /// are denied.
    pub l7_addr4: Option<Ipv4Addr>,
    /// IPv6 address of the L7 enforcer.
    pub l7_addr6: Option<Ipv6Addr>,
    /// First per-identity L7 enforcer port; an identity's port keeps the same offset from it
    /// as its DNS port from `dns_port_base`.
    pub l7_port_base: u16,
    /// Floor on how long a learned address stays allowed.
    pub min_ttl: Duration,
    /// Mount point of cgroup v2.
    pub cgroup2: PathBuf,
}

/// One identity cgroup known to the enforcer.
#[derive(Clone, Debug)]
pub struct Registered {
    pub path: PathBuf,
    pub identity: Identity,
    pub level: u32,
    pub since: Instant,
}

/// The node's enforcement state; see the module docs.
pub struct Enforcer {
    datapath: Datapath,
    settings: Settings,
    learned: LearnedStore,
    cgroups: HashMap<u64, Registered>,
    /// DNS proxy port of each numeric identity (kept for the process's life once given).
    ports: HashMap<u32, u16>,
    names: HashMap<u32, Identity>,
    level_mask: u32,
    /// cgroup levels an earlier agent's identities sit at, kept in the mask until start-up
    /// has re-registered (or dropped) them all ([`Enforcer::adoption_done`]): a level missing
    /// from the mask would let a pod's containers (below a pinned pod cgroup) out unenforced.
    adopted_levels: u32,
    kill: Arc<KillSwitch>,
}

impl Enforcer {
    /// Takes over the kernel state: learned addresses and identity ports left by an earlier
    /// agent are adopted, and the node configuration is written.
    ///
    /// # Errors
    /// The configuration map cannot be written.
    pub fn new(
        datapath: Datapath,
        settings: Settings,
        max_learned: usize,
        kill: Arc<KillSwitch>,
    ) -> Result<Enforcer, EnforcerError> {
        let mut learned = LearnedStore::new(max_learned);
        for (identity, addr, value) in datapath.learned() {
            learned.adopt(identity, addr, &value);
        }
        let ports = datapath
            .identities()
            .into_iter()
            .map(|(_, v)| (v.identity, v.dns_port))
            .collect();
        let adopted_levels = datapath.config().map_or(0, |c| c.level_mask);
        let mut enforcer = Enforcer {
            datapath,
            settings,
            learned,
            cgroups: HashMap::new(),
            ports,
            names: HashMap::new(),
            level_mask: adopted_levels,
            adopted_levels,
            kill,
        };
        enforcer.write_config()?;
        Ok(enforcer)
    }

    fn write_config(&mut self) -> Result<(), EnforcerError> {
        let mut config = NodeConfig {
            dns4: u32::from_ne_bytes(self.settings.dns4.octets()),
            level_mask: self.level_mask,
            ..Default::default()
        };
        if let Some(v6) = self.settings.dns6 {
            config.flags |= CONFIG_F_DNS6;
            config.dns6 = v6.octets();
        }
        if let Some(v4) = self.settings.l7_addr4 {
            config.l7_addr4 = u32::from_ne_bytes(v4.octets());
        }
        if let Some(v6) = self.settings.l7_addr6 {
            config.flags |= CONFIG_F_L7_6;
            config.l7_addr6 = v6.octets();
        }
        Ok(self.datapath.set_config(config)?)
    }

    /// The DNS proxy port of `identity`, allocating one if it has none. The caller makes sure
    /// a listener is bound to it before calling [`Enforcer::register`].
    ///
    /// # Errors
    /// Another identity has the same numeric id, or no port is free.
    pub fn port_for(&mut self, identity: &Identity) -> Result<u16, EnforcerError> {
        let id = identity.id();
        if let Some(existing) = self.names.get(&id)
            && existing != identity
        {
            return Err(EnforcerError::IdCollision {
                id,
                new: identity.clone(),
                existing: existing.clone(),
            });
        }
        self.names.insert(id, identity.clone());
        if let Some(port) = self.ports.get(&id) {
            return Ok(*port);
        }
        let used: HashSet<u16> = self.ports.values().copied().collect();
        let base = self.settings.dns_port_base;
        let port = (base..=u16::MAX)
            .find(|p| !used.contains(p))
            .ok_or(EnforcerError::NoPort { base })?;
        self.ports.insert(id, port);
        Ok(port)
    }

    /// Puts a cgroup under its identity: writes the identity, with the policy in force, to
    /// the kernel. The caller attaches the programs first ([`crate::ebpf::Links::attach`]),
    /// outside this lock. Idempotent.
    ///
    /// # Errors
    /// The cgroup is gone, the kernel refuses the attachment, or [`Enforcer::port_for`] fails.
    pub fn register(
        &mut self,
        cg: &IdentityCgroup,
        policies: &PolicySet,
    ) -> Result<u64, EnforcerError> {
        let cgroup_id = cgroup::cgroup_id(&cg.path)?;
        if self
            .cgroups
            .get(&cgroup_id)
            .is_some_and(|r| r.identity == cg.identity)
        {
            return Ok(cgroup_id);
        }
        let port = self.port_for(&cg.identity)?;
        let first_of_identity = !self.cgroups.values().any(|r| r.identity == cg.identity);
        let policy = policies.for_identity(cg.identity.agent.as_str(), cg.identity.tenant.as_str());
        self.datapath.set_identity(
            cgroup_id,
            identity_value(
                &cg.identity,
                port,
                self.l7_port(port),
                policy.map(AsRef::as_ref),
                self.kill.is_killed(cg.identity.agent.as_str()),
            ),
        )?;
        let level = cgroup::level(&self.settings.cgroup2, &cg.path);
        let previous = self.cgroups.insert(
            cgroup_id,
            Registered {
                path: cg.path.clone(),
                identity: cg.identity.clone(),
                level,
                since: Instant::now(),
            },
        );
        // A cgroup moving to another identity (a relabelled pod) may leave the old one unused.
        if let Some(previous) = previous {
            self.forget_if_unused(&previous.identity)?;
        }
        self.update_levels()?;
        if first_of_identity {
            self.sync_cidrs(&cg.identity, policy.map(AsRef::as_ref))?;
        }
        tracing::info!(
            target: "aegis::identity",
            cgroup = %cg.path.display(), cgroup_id, identity = %cg.identity, dns_port = port,
            policy_version = policy.map(|p| p.version), "identity cgroup registered"
        );
        Ok(cgroup_id)
    }

    /// Takes a cgroup out of enforcement: removes its identity and, when it was the last
    /// cgroup of its identity, forgets the identity's learned addresses and CIDRs. The caller
    /// detaches the programs afterwards ([`crate::ebpf::Links::detach`]), outside this lock.
    ///
    /// # Errors
    /// The kernel maps or pins cannot be updated.
    pub fn unregister(&mut self, cgroup_id: u64) -> Result<(), EnforcerError> {
        let Some(reg) = self.cgroups.remove(&cgroup_id) else {
            return Ok(());
        };
        self.datapath.remove_identity(cgroup_id)?;
        self.forget_if_unused(&reg.identity)?;
        self.update_levels()?;
        tracing::info!(target: "aegis::identity", cgroup = %reg.path.display(), cgroup_id, identity = %reg.identity, "identity cgroup unregistered");
        Ok(())
    }

    /// Forgets the learned addresses and CIDRs of an identity no registered cgroup carries.
    fn forget_if_unused(&mut self, identity: &Identity) -> Result<(), EnforcerError> {
        if !self.cgroups.values().any(|r| r.identity == *identity) {
            let changes = self.learned.remove_identity(identity.id());
            self.apply_learned(changes)?;
            self.sync_cidrs(identity, None)?;
        }
        Ok(())
    }

    /// Start-up has registered every cgroup it will (and dropped the earlier agent's stale
    /// entries): the level mask now follows the registered cgroups alone.
    ///
    /// # Errors
    /// The configuration map cannot be written.
    pub fn adoption_done(&mut self) -> Result<(), EnforcerError> {
        self.adopted_levels = 0;
        self.update_levels()
    }

    fn update_levels(&mut self) -> Result<(), EnforcerError> {
        let mask = self.cgroups.values().fold(self.adopted_levels, |m, r| {
            m | 1u32.checked_shl(r.level).unwrap_or(0)
        });
        if mask != self.level_mask {
            self.level_mask = mask;
            self.write_config()?;
        }
        Ok(())
    }

    /// Writes the policy in force to every registered identity: versions and flags, CIDRs,
    /// and learned addresses re-checked against the new FQDN rules.
    ///
    /// # Errors
    /// The kernel maps cannot be updated.
    pub fn apply_policies(&mut self, policies: &PolicySet) -> Result<(), EnforcerError> {
        let regs: Vec<(u64, Identity)> = self
            .cgroups
            .iter()
            .map(|(id, r)| (*id, r.identity.clone()))
            .collect();
        let mut done = HashSet::new();
        for (cgroup_id, identity) in regs {
            let policy = policies
                .for_identity(identity.agent.as_str(), identity.tenant.as_str())
                .map(AsRef::as_ref);
            let port = self.port_for(&identity)?;
            self.datapath.set_identity(
                cgroup_id,
                identity_value(
                    &identity,
                    port,
                    self.l7_port(port),
                    policy,
                    self.kill.is_killed(identity.agent.as_str()),
                ),
            )?;
            if done.insert(identity.clone()) {
                self.sync_cidrs(&identity, policy)?;
            }
        }
        let by_id: HashMap<u32, Identity> = done.into_iter().map(|i| (i.id(), i)).collect();
        let changes = self.learned.revalidate(|id, name| {
            let identity = by_id.get(&id)?;
            let policy =
                policies.for_identity(identity.agent.as_str(), identity.tenant.as_str())?;
            Some((policy.fqdn_ports(name)?, policy.inspects(name)))
        });
        self.apply_learned(changes)
    }

    /// Makes the kernel's CIDR entries of `identity` equal to its policy's.
    fn sync_cidrs(
        &mut self,
        identity: &Identity,
        policy: Option<&Policy>,
    ) -> Result<(), EnforcerError> {
        let id = identity.id();
        let desired: HashMap<IpNet, Ports> = policy.map_or_else(HashMap::new, |p| {
            let mut m: HashMap<IpNet, Ports> = HashMap::new();
            for (net, ports) in p.cidrs() {
                let merged = m
                    .get(&net)
                    .map_or_else(|| ports.clone(), |old| old.union(ports));
                m.insert(net, merged);
            }
            m
        });
        for (owner, net, _) in self.datapath.cidrs() {
            if owner == id && !desired.contains_key(&net) {
                self.datapath.remove_cidr(id, net)?;
            }
        }
        for (net, ports) in desired {
            self.datapath.set_cidr(id, net, egress_value(0, &ports))?;
        }
        Ok(())
    }

    /// Allows `identity` to reach `addrs` (address, record TTL in seconds) learned from an
    /// answer for `name`, on `ports`, for at least the configured minimum TTL; expiries are
    /// rounded up to the next whole second so that repeated answers rarely need a map write.
    /// Returns once the kernel has them, with the addresses that were new to the identity.
    ///
    /// # Errors
    /// The kernel maps cannot be updated (the caller must then not release the answer).
    pub fn learn(
        &mut self,
        identity: u32,
        name: &str,
        ports: &Ports,
        inspect: bool,
        addrs: &[(IpAddr, u32)],
    ) -> Result<Vec<IpAddr>, EnforcerError> {
        const SECOND: u64 = 1_000_000_000;
        let now = ebpf::boot_time_ns();
        let mut added = Vec::new();
        for (addr, ttl) in addrs {
            let ttl = Duration::from_secs(u64::from(*ttl)).max(self.settings.min_ttl);
            let expires = now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
            let expires = (expires / SECOND).saturating_add(1).saturating_mul(SECOND);
            let changes = self
                .learned
                .learn(identity, *addr, name, ports, inspect, expires);
            added.extend(changes.added.iter().map(|(_, a)| *a));
            self.apply_learned(changes)?;
        }
        Ok(added)
    }

    /// Adopts learned addresses another agent process wrote to the kernel (a predecessor
    /// answering the queries it read before the hand-over): this process then expires them,
    /// and never deletes an address before the expiry the kernel has for it.
    pub fn readopt_learned(&mut self) {
        for (identity, addr, value) in self.datapath.learned() {
            self.learned.adopt(identity, addr, &value);
        }
    }

    /// Deletes learned addresses whose TTL ran out more than [`EXPIRED_RETENTION`] ago (the
    /// kernel refuses them from the moment they expire; this frees the map entries).
    pub fn expire(&mut self) -> Result<(), EnforcerError> {
        let retain = u64::try_from(EXPIRED_RETENTION.as_nanos()).unwrap_or(u64::MAX);
        let now = ebpf::boot_time_ns();
        let mut changes = self.learned.expire(now, retain);
        // Another agent process (a predecessor during an upgrade) may have extended it.
        changes.removed.retain(|(identity, addr)| {
            match self.datapath.learned_value(*identity, *addr) {
                Some(v) if v.expires_ns.saturating_add(retain) > now => {
                    self.learned.adopt(*identity, *addr, &v);
                    false
                }
                _ => true,
            }
        });
        self.apply_learned(changes)
    }

    fn apply_learned(&mut self, changes: learned::Changes) -> Result<(), EnforcerError> {
        for (identity, addr, value) in changes.set {
            self.datapath.set_learned(identity, addr, value)?;
        }
        for (identity, addr) in changes.removed {
            self.datapath.remove_learned(identity, addr)?;
        }
        Ok(())
    }

    /// Identity cgroups in the kernel map that this agent has not registered (left by an
    /// earlier agent for cgroups that no longer exist or no source reports).
    pub fn stale_kernel_cgroups(&self) -> Vec<u64> {
        self.datapath
            .identities()
            .into_iter()
            .map(|(c, _)| c)
            .filter(|c| !self.cgroups.contains_key(c))
            .collect()
    }

    /// Removes the kernel identity entry of a cgroup not registered here.
    pub fn drop_stale(&mut self, cgroup_id: u64) -> Result<(), EnforcerError> {
        Ok(self.datapath.remove_identity(cgroup_id)?)
    }

    /// The L7 enforcer port of the identity whose DNS port is `dns_port`, when the node has
    /// an enforcer address.
    pub fn l7_port(&self, dns_port: u16) -> Option<u16> {
        if self.settings.l7_addr4.is_none() && self.settings.l7_addr6.is_none() {
            return None;
        }
        let offset = dns_port.checked_sub(self.settings.dns_port_base)?;
        self.settings.l7_port_base.checked_add(offset)
    }

    /// Takes the original destination of a connection redirected to the L7 enforcer.
    pub fn take_l7_origin(&mut self, peer: std::net::SocketAddr) -> Option<L7Orig> {
        self.datapath.take_l7_origin(peer)
    }

    /// Whether `cgroup_id` is registered under `identity`.
    pub fn is_registered(&self, cgroup_id: u64, identity: &Identity) -> bool {
        self.cgroups
            .get(&cgroup_id)
            .is_some_and(|r| &r.identity == identity)
    }

    /// Registered cgroups.
    pub fn cgroups(&self) -> &HashMap<u64, Registered> {
        &self.cgroups
    }

    /// The identity with numeric id `id`, if registered.
    pub fn identity(&self, id: u32) -> Option<&Identity> {
        self.names.get(&id)
    }

    /// Number of learned addresses of all identities.
    pub fn learned_total(&self) -> usize {
        self.learned.total()
    }
}

/// The kernel identity value for `identity` under `policy` (none: deny everything), with its
/// kill switch on or off.
fn identity_value(
    identity: &Identity,
    dns_port: u16,
    l7_port: Option<u16>,
    policy: Option<&Policy>,
    killed: bool,
) -> IdentityValue {
    let mut flags = 0;
    if killed {
        flags |= IDENTITY_F_KILLED;
    }
    if policy.is_none_or(|p| p.deny_raw_sockets) {
        flags |= IDENTITY_F_DENY_RAW;
    }
    if policy.is_some_and(|p| p.mode == Mode::Shadow) {
        flags |= IDENTITY_F_SHADOW;
    }
    IdentityValue {
        identity: identity.id(),
        policy_version: policy.map_or(0, |p| p.version),
        flags,
        dns_port,
        l7_port: l7_port.unwrap_or(0),
    }
}
