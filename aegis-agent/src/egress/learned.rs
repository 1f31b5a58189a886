//! Addresses learned from DNS answers, per identity, with their expiry, ports and the names
//! they were learned for. This is the userspace mirror of the kernel's `AEGIS_FQDN*` maps: the
//! caller writes every change it returns to the kernel.
//!
//! Invariants: an identity never holds more than `max_per_identity` addresses (the one closest
//! to expiry is evicted first); an address is allowed until the latest expiry any answer gave
//! it; ports are the union over the names it was learned for.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use aegis_common::{EGRESS_F_INSPECT, EgressValue, MAX_PORTS};

use crate::policy::Ports;

/// One learned address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// `CLOCK_BOOTTIME` nanoseconds after which the address is no longer allowed.
    pub expires_ns: u64,
    pub ports: Ports,
    /// Names (lowercase, no trailing dot) whose answers held the address; empty when adopted
    /// from the kernel after a restart (names are not stored there).
    pub names: BTreeSet<String>,
    /// TCP to the address goes through the L7 enforcer (`EGRESS_F_INSPECT`): set when any name
    /// it was learned for is inspected (a shared address must not let an inspected name
    /// through uninspected).
    pub inspect: bool,
}

impl Learned {
    /// The kernel map value for this entry.
    pub fn to_value(&self) -> EgressValue {
        let mut v = egress_value(self.expires_ns, &self.ports);
        if self.inspect {
            v.flags |= EGRESS_F_INSPECT;
        }
        v
    }
}

/// The kernel map value allowing `ports` until `expires_ns` (0 = forever).
pub fn egress_value(expires_ns: u64, ports: &Ports) -> EgressValue {
    let mut v = EgressValue {
        expires_ns,
        ..Default::default()
    };
    if let Ports::Only(set) = ports {
        for (slot, port) in v.ports.iter_mut().zip(set.iter().take(MAX_PORTS)) {
            *slot = *port;
        }
        v.port_count = set.len().min(MAX_PORTS) as u32;
    }
    v
}

fn ports_of(v: &EgressValue) -> Ports {
    if v.port_count == 0 {
        Ports::Any
    } else {
        Ports::Only(
            v.ports
                .iter()
                .take(v.port_count as usize)
                .copied()
                .collect(),
        )
    }
}

/// What a store operation changed, to be written to the kernel.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub set: Vec<(u32, IpAddr, EgressValue)>,
    pub removed: Vec<(u32, IpAddr)>,
    /// Addresses new to their identity (a subset of `set`), for the audit trail.
    pub added: Vec<(u32, IpAddr)>,
}

/// Learned addresses of every identity.
#[derive(Debug)]
pub struct LearnedStore {
    by_identity: HashMap<u32, HashMap<IpAddr, Learned>>,
    max_per_identity: usize,
}

impl LearnedStore {
    /// An empty store bounding each identity to `max_per_identity` addresses (at least 1).
    pub fn new(max_per_identity: usize) -> LearnedStore {
        LearnedStore {
            by_identity: HashMap::new(),
            max_per_identity: max_per_identity.max(1),
        }
    }

    /// Records that `name` resolved to `addr` for `identity`, allowed on `ports` until
    /// `expires_ns`.
    pub fn learn(
        &mut self,
        identity: u32,
        addr: IpAddr,
        name: &str,
        ports: &Ports,
        inspect: bool,
        expires_ns: u64,
    ) -> Changes {
        let max = self.max_per_identity;
        let table = self.by_identity.entry(identity).or_default();
        let mut changes = Changes::default();
        let before = table
            .get(&addr)
            .map(|l| (l.expires_ns, l.ports.clone(), l.inspect));
        let entry = table.entry(addr).or_insert_with(|| Learned {
            expires_ns: 0,
            ports: ports.clone(),
            names: BTreeSet::new(),
            inspect,
        });
        entry.inspect |= inspect;
        entry.expires_ns = entry.expires_ns.max(expires_ns);
        entry.ports = entry.ports.union(ports);
        if let Ports::Only(set) = &entry.ports
            && set.len() > MAX_PORTS
        {
            // Ports of an older policy version mixed with the current one: keep the current.
            entry.ports = ports.clone();
        }
        if !entry.names.contains(name) {
            entry.names.insert(name.to_owned());
        }
        match before {
            None => {
                changes.added.push((identity, addr));
                changes.set.push((identity, addr, entry.to_value()));
            }
            Some((expires, ports, inspect))
                if expires != entry.expires_ns
                    || ports != entry.ports
                    || inspect != entry.inspect =>
            {
                changes.set.push((identity, addr, entry.to_value()));
            }
            Some(_) => {}
        }
        if table.len() > max {
            let victim = table
                .iter()
                .filter(|(a, _)| **a != addr)
                .min_by_key(|(_, l)| l.expires_ns)
                .map(|(a, _)| *a);
            if let Some(victim) = victim {
                table.remove(&victim);
                changes.removed.push((identity, victim));
            }
        }
        changes
    }

    /// Takes over an entry found in the kernel map (at start-up, or written by a predecessor
    /// agent still answering during an upgrade): unknown entries are added, and a known one
    /// takes the kernel's expiry (and ports) when that is later, so it is never deleted
    /// before the kernel entry expires.
    pub fn adopt(&mut self, identity: u32, addr: IpAddr, value: &EgressValue) {
        let entry = self
            .by_identity
            .entry(identity)
            .or_default()
            .entry(addr)
            .or_insert_with(|| Learned {
                expires_ns: 0,
                ports: ports_of(value),
                names: BTreeSet::new(),
                inspect: false,
            });
        if value.expires_ns > entry.expires_ns {
            entry.expires_ns = value.expires_ns;
            entry.ports = ports_of(value);
            entry.inspect = value.flags & EGRESS_F_INSPECT != 0;
        }
    }

    /// Removes every entry that expired at least `retain_ns` before `now_ns`. Until then an
    /// expired entry stays in the kernel map, which refuses it and reports `ttl_expired`
    /// rather than `not_allowed`.
    pub fn expire(&mut self, now_ns: u64, retain_ns: u64) -> Changes {
        let mut changes = Changes::default();
        for (identity, table) in &mut self.by_identity {
            table.retain(|addr, l| {
                let keep = l.expires_ns.saturating_add(retain_ns) > now_ns;
                if !keep {
                    changes.removed.push((*identity, *addr));
                }
                keep
            });
        }
        self.by_identity.retain(|_, t| !t.is_empty());
        changes
    }

    /// Re-checks every entry learned for a name against the policy: `allowed(identity, name)`
    /// gives the ports now allowed for that name, or `None`. Entries none of whose names are
    /// still allowed are removed; the others get the new ports. Entries without names (adopted
    /// after a restart) are left to expire.
    pub fn revalidate(&mut self, allowed: impl Fn(u32, &str) -> Option<(Ports, bool)>) -> Changes {
        let mut changes = Changes::default();
        for (identity, table) in &mut self.by_identity {
            table.retain(|addr, l| {
                if l.names.is_empty() {
                    return true;
                }
                let mut ports: Option<Ports> = None;
                let mut inspect = false;
                l.names.retain(|name| match allowed(*identity, name) {
                    Some((p, inspected)) => {
                        inspect |= inspected;
                        ports = Some(
                            ports
                                .as_ref()
                                .map_or_else(|| p.clone(), |acc| acc.union(&p)),
                        );
                        true
                    }
                    None => false,
                });
                match ports {
                    None => {
                        changes.removed.push((*identity, *addr));
                        false
                    }
                    Some(p) => {
                        if p != l.ports || inspect != l.inspect {
                            l.ports = p;
                            l.inspect = inspect;
                            changes.set.push((*identity, *addr, l.to_value()));
                        }
                        true
                    }
                }
            });
        }
        self.by_identity.retain(|_, t| !t.is_empty());
        changes
    }

    /// Forgets every address of `identity`.
    pub fn remove_identity(&mut self, identity: u32) -> Changes {
        let removed = self.by_identity.remove(&identity).unwrap_or_default();
        Changes {
            removed: removed.into_keys().map(|a| (identity, a)).collect(),
            ..Changes::default()
        }
    }

    /// Number of addresses learned for `identity`.
    #[cfg(test)]
    pub fn count(&self, identity: u32) -> usize {
        self.by_identity.get(&identity).map_or(0, HashMap::len)
    }

    /// Number of addresses learned for all identities.
    pub fn total(&self) -> usize {
        self.by_identity.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn only(p: &[u16]) -> Ports {
        Ports::Only(p.iter().copied().collect())
    }

    #[test]
    fn learning_extends_expiry_and_unions_ports() {
        let mut s = LearnedStore::new(10);
        let c = s.learn(1, ip("198.18.1.1"), "a.test", &only(&[443]), false, 100);
        assert_eq!(c.added, vec![(1, ip("198.18.1.1"))]);
        let c = s.learn(1, ip("198.18.1.1"), "b.test", &only(&[80]), false, 50);
        assert!(c.added.is_empty(), "the address was known");
        let v = c.set[0].2;
        assert_eq!(v.expires_ns, 100);
        assert_eq!(v.port_count, 2);
        assert_eq!(&v.ports[..2], &[80, 443]);
        assert_eq!(s.count(1), 1);
        assert_eq!(
            s.count(2),
            0,
            "learning for identity 1 must not touch identity 2"
        );
    }

    #[test]
    fn repeated_answers_write_nothing() {
        let mut s = LearnedStore::new(10);
        s.learn(1, ip("198.18.1.1"), "a.test", &Ports::Any, false, 100);
        assert_eq!(
            s.learn(1, ip("198.18.1.1"), "a.test", &Ports::Any, false, 100),
            Changes::default()
        );
        assert_eq!(
            s.learn(1, ip("198.18.1.1"), "a.test", &Ports::Any, false, 90),
            Changes::default()
        );
        assert_eq!(
            s.learn(1, ip("198.18.1.1"), "a.test", &Ports::Any, false, 101)
                .set
                .len(),
            1
        );
    }

    #[test]
    fn an_inspected_name_makes_a_shared_address_inspected() {
        let mut s = LearnedStore::new(10);
        let c = s.learn(1, ip("198.18.1.1"), "cdn.test", &Ports::Any, false, 100);
        assert_eq!(c.set[0].2.flags & EGRESS_F_INSPECT, 0);
        let c = s.learn(
            1,
            ip("198.18.1.1"),
            "api.stripe.com",
            &Ports::Any,
            true,
            100,
        );
        assert_ne!(
            c.set[0].2.flags & EGRESS_F_INSPECT,
            0,
            "inspection wins on a shared address"
        );
        let c = s.learn(1, ip("198.18.1.1"), "cdn.test", &Ports::Any, false, 200);
        assert_ne!(c.set[0].2.flags & EGRESS_F_INSPECT, 0, "and stays");
        // A reload that stops inspecting the name clears the flag.
        let c = s.revalidate(|_, _| Some((Ports::Any, false)));
        assert_eq!(c.set[0].2.flags & EGRESS_F_INSPECT, 0);
    }

    #[test]
    fn bound_evicts_the_entry_closest_to_expiry() {
        let mut s = LearnedStore::new(2);
        s.learn(1, ip("198.18.1.1"), "a", &Ports::Any, false, 300);
        s.learn(1, ip("198.18.1.2"), "b", &Ports::Any, false, 100);
        let c = s.learn(1, ip("198.18.1.3"), "c", &Ports::Any, false, 200);
        assert_eq!(c.removed, vec![(1, ip("198.18.1.2"))]);
        assert_eq!(s.count(1), 2);
        // Another identity has its own bound.
        s.learn(2, ip("198.18.1.2"), "b", &Ports::Any, false, 100);
        assert_eq!(s.count(2), 1);
    }

    #[test]
    fn expiry_removes_only_expired_entries() {
        let mut s = LearnedStore::new(10);
        s.learn(1, ip("198.18.1.1"), "a", &Ports::Any, false, 100);
        s.learn(1, ip("fd00::1"), "a", &Ports::Any, false, 200);
        assert_eq!(
            s.expire(150, 100),
            Changes::default(),
            "expired entries are retained for a while"
        );
        let c = s.expire(150, 0);
        assert_eq!(c.removed, vec![(1, ip("198.18.1.1"))]);
        assert_eq!(s.total(), 1);
    }

    #[test]
    fn revalidation_drops_names_the_policy_no_longer_allows() {
        let mut s = LearnedStore::new(10);
        s.learn(1, ip("198.18.1.1"), "gone.test", &Ports::Any, false, 100);
        s.learn(1, ip("198.18.1.2"), "kept.test", &Ports::Any, false, 100);
        s.adopt(
            1,
            ip("198.18.1.3"),
            &EgressValue {
                expires_ns: 100,
                ..Default::default()
            },
        );
        let c = s.revalidate(|_, name| (name == "kept.test").then(|| (only(&[443]), false)));
        assert_eq!(c.removed, vec![(1, ip("198.18.1.1"))]);
        assert_eq!(c.set.len(), 1);
        assert_eq!(c.set[0].2.port_count, 1);
        assert_eq!(s.count(1), 2);
    }

    #[test]
    fn values_round_trip_ports() {
        let v = egress_value(5, &only(&[53, 443]));
        assert_eq!(ports_of(&v), only(&[53, 443]));
        assert_eq!(ports_of(&egress_value(5, &Ports::Any)), Ports::Any);
    }

    #[test]
    fn adoption_keeps_the_later_expiry() {
        let mut store = LearnedStore::new(8);
        let a = ip("198.18.1.1");
        let _ = store.learn(1, a, "x.test", &Ports::Any, false, 100);
        store.adopt(1, a, &egress_value(50, &Ports::Any));
        assert_eq!(store.by_identity[&1][&a].expires_ns, 100);
        assert!(store.by_identity[&1][&a].names.contains("x.test"));
        store.adopt(1, a, &egress_value(200, &Ports::Any));
        assert_eq!(store.by_identity[&1][&a].expires_ns, 200);
        // Not deleted before the later expiry (plus the retention).
        assert!(store.expire(150, 10).removed.is_empty());
        assert_eq!(store.expire(300, 10).removed, vec![(1, a)]);
        store.adopt(2, a, &egress_value(70, &Ports::Any));
        assert_eq!(store.count(2), 1);
    }
}
