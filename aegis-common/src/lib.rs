//! Types shared by the kernel programs (`aegis-ebpf`) and the agent (`aegis-agent`).
//!
//! Every type here is `#[repr(C)]`, has explicit padding and a compile-time size check: the
//! kernel and userspace must agree on every byte. Booleans and enums are `u32` plus named
//! constants because the kernel side cannot trust a byte to hold a valid Rust `bool` or enum.
//! Map names carry a version suffix (`_V1`) that is bumped on any layout change, so an agent
//! never reuses a pinned map of another layout (the idea of cilium's `cilium_lb4_backends_v3`).
//! Verdict, reason and hook codes are append-only: they reach SIEMs and must keep meaning.
#![no_std]

use core::mem::size_of;

// === Map and program names ===
// BPF object names are at most 15 bytes (BPF_OBJ_NAME_LEN - 1, include/uapi/linux/bpf.h).

/// `HashMap<u64 cgroup id, IdentityValue>`: cgroups that carry an agent identity.
pub const MAP_IDENTITY: &str = "AEGIS_IDENT_V1";
/// `Array<NodeConfig>` with one entry: node-wide settings (DNS proxy and L7 enforcer
/// addresses, cgroup levels).
pub const MAP_CONFIG: &str = "AEGIS_CONFIG_V2";
/// `HashMap<Egress4Key, EgressValue>`: IPv4 addresses learned from DNS, per identity.
pub const MAP_FQDN4: &str = "AEGIS_FQDN4_V1";
/// `HashMap<Egress6Key, EgressValue>`: IPv6 addresses learned from DNS, per identity.
pub const MAP_FQDN6: &str = "AEGIS_FQDN6_V1";
/// `LpmTrie<Cidr4Data, EgressValue>`: IPv4 CIDRs written literally in policy, per identity.
pub const MAP_CIDR4: &str = "AEGIS_CIDR4_V1";
/// `LpmTrie<Cidr6Data, EgressValue>`: IPv6 CIDRs written literally in policy, per identity.
pub const MAP_CIDR6: &str = "AEGIS_CIDR6_V1";
/// `LruHashMap<u64 socket cookie, OrigDst>`: where a redirected DNS query was going.
pub const MAP_DNS_ORIG: &str = "AEGIS_DNSORG_V1";
/// `RingBuf` of [`DenyEvent`]s.
pub const MAP_EVENTS: &str = "AEGIS_EVENTS_V1";
/// `LruHashMap<u64 socket cookie, L7Orig>`: where a connection redirected to the L7 enforcer
/// was going, from connect until the sockops program re-keys it by the client's address.
pub const MAP_L7_COOKIE: &str = "AEGIS_L7CK_V1";
/// `LruHashMap<PeerKey, L7Orig>`: the same record keyed by the client's local address and
/// port, which the enforcer sees as its peer.
pub const MAP_L7_PEER: &str = "AEGIS_L7PEER_V1";

/// Every map the agent opens; a test checks each exists in the embedded object.
pub const ALL_MAPS: [&str; 10] = [
    MAP_IDENTITY,
    MAP_CONFIG,
    MAP_FQDN4,
    MAP_FQDN6,
    MAP_CIDR4,
    MAP_CIDR6,
    MAP_DNS_ORIG,
    MAP_EVENTS,
    MAP_L7_COOKIE,
    MAP_L7_PEER,
];

pub const PROG_CONNECT4: &str = "aegis_connect4";
pub const PROG_CONNECT6: &str = "aegis_connect6";
pub const PROG_SENDMSG4: &str = "aegis_sendmsg4";
pub const PROG_SENDMSG6: &str = "aegis_sendmsg6";
pub const PROG_RECVMSG4: &str = "aegis_recvmsg4";
pub const PROG_RECVMSG6: &str = "aegis_recvmsg6";
pub const PROG_SOCK_CREATE: &str = "aegis_sock_new";
pub const PROG_SOCK_OPS: &str = "aegis_sockops";

/// Every program the agent attaches to an identity's cgroup.
pub const ALL_PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_SOCK_CREATE,
    PROG_SOCK_OPS,
];

// === Sizes ===

/// Capacity of [`MAP_IDENTITY`]: agent cgroups per node.
pub const MAX_IDENTITY_CGROUPS: u32 = 16_384;
/// Capacity of [`MAP_FQDN4`] and [`MAP_FQDN6`] each, all identities together.
pub const MAX_LEARNED_ADDRS: u32 = 262_144;
/// Capacity of [`MAP_CIDR4`] and [`MAP_CIDR6`] each.
pub const MAX_CIDRS: u32 = 65_536;
/// Capacity of [`MAP_DNS_ORIG`]: in-flight redirected DNS sockets; LRU evicts the oldest.
pub const MAX_DNS_SOCKETS: u32 = 65_536;
/// Capacity of [`MAP_L7_COOKIE`] and [`MAP_L7_PEER`]: connections being redirected to the L7
/// enforcer and not yet accepted by it; LRU evicts the oldest.
pub const MAX_L7_PENDING: u32 = 65_536;
/// Size of [`MAP_EVENTS`] in bytes (a power of two and a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Deepest cgroup level (root = 0) at which an identity cgroup may sit; the kernel walks
/// ancestors up to this level (`bpf_get_current_ancestor_cgroup_id`).
pub const MAX_CGROUP_LEVEL: u32 = 24;
/// Most distinct ports one allowlist entry can name; an empty list means every port.
pub const MAX_PORTS: usize = 8;

// === Identity ===

/// `IdentityValue::flags`: raw (`SOCK_RAW`) and packet (`AF_PACKET`) sockets are refused.
pub const IDENTITY_F_DENY_RAW: u32 = 1 << 0;
/// `IdentityValue::flags`: shadow mode; a would-be deny is reported and the call is allowed.
pub const IDENTITY_F_SHADOW: u32 = 1 << 1;
/// `IdentityValue::flags`: kill switch; every connect and send is refused (`REASON_KILLED`),
/// DNS included, whatever the allowlist and the mode (shadow mode does not soften it).
pub const IDENTITY_F_KILLED: u32 = 1 << 2;

/// Value of [`MAP_IDENTITY`], keyed by the cgroup v2 id (the directory's inode number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityValue {
    /// Numeric identity of (agent, tenant); see `aegis-agent`'s identity module.
    pub identity: u32,
    /// Version of the policy in force for this identity.
    pub policy_version: u32,
    /// `IDENTITY_F_*` bits.
    pub flags: u32,
    /// Port of this identity's DNS proxy listener, host byte order.
    pub dns_port: u16,
    /// Port of this identity's L7 enforcer listener, host byte order; 0 = none (connections
    /// to inspected destinations are then denied).
    pub l7_port: u16,
}
const _: () = assert!(size_of::<IdentityValue>() == 16);

// === Node configuration ===

/// `NodeConfig::flags`: `dns6` holds an IPv6 DNS proxy address.
pub const CONFIG_F_DNS6: u32 = 1 << 0;
/// `NodeConfig::flags`: `l7_addr6` holds an IPv6 L7 enforcer address.
pub const CONFIG_F_L7_6: u32 = 1 << 1;

/// The one value of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// IPv4 address of the DNS proxy, network byte order; 0 = none (DNS over IPv4 is denied).
    pub dns4: u32,
    /// Bit `n` set: some identity cgroup sits at level `n` (root = 0). Saves the kernel from
    /// walking levels where no identity lives.
    pub level_mask: u32,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// IPv4 address of the L7 enforcer, network byte order; 0 = none.
    pub l7_addr4: u32,
    /// IPv6 address of the DNS proxy, network byte order.
    pub dns6: [u8; 16],
    /// IPv6 address of the L7 enforcer, network byte order (valid with `CONFIG_F_L7_6`).
    pub l7_addr6: [u8; 16],
}
const _: () = assert!(size_of::<NodeConfig>() == 48);

// === Allowlist ===

/// Key of [`MAP_FQDN4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Egress4Key {
    pub identity: u32,
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Egress4Key>() == 8);

/// Key of [`MAP_FQDN6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Egress6Key {
    pub identity: u32,
    /// IPv6 address, network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Egress6Key>() == 20);

/// Data of an [`MAP_CIDR4`] LPM key. The identity is big-endian so that it forms the first 32
/// bits of the prefix; the key's prefix length is `32 + CIDR length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cidr4Data {
    pub identity_be: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Cidr4Data>() == 8);

/// Data of an [`MAP_CIDR6`] LPM key; see [`Cidr4Data`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cidr6Data {
    pub identity_be: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Cidr6Data>() == 20);

/// `EgressValue::flags`: TCP connections go to the L7 enforcer (TLS inspection); UDP to the
/// destination is refused (QUIC would bypass the inspection).
pub const EGRESS_F_INSPECT: u32 = 1 << 0;

/// Value of the allowlist maps: until when and to which ports the destination is allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressValue {
    /// `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`) after which the entry no longer
    /// allows anything; 0 = never expires.
    pub expires_ns: u64,
    /// Number of used entries in `ports`; 0 = every port.
    pub port_count: u32,
    /// `EGRESS_F_*` bits.
    pub flags: u32,
    /// Allowed destination ports, host byte order.
    pub ports: [u16; MAX_PORTS],
}
const _: () = assert!(size_of::<EgressValue>() == 32);

impl EgressValue {
    /// Whether `port` (host byte order) is allowed at boot-time `now_ns`.
    #[inline(always)]
    pub fn check(&self, port: u16, now_ns: u64) -> u32 {
        if self.expires_ns != 0 && now_ns > self.expires_ns {
            return REASON_EXPIRED;
        }
        if self.port_count == 0 {
            return REASON_NONE;
        }
        let mut i = 0;
        while i < MAX_PORTS {
            if (i as u32) < self.port_count && self.ports[i] == port {
                return REASON_NONE;
            }
            i += 1;
        }
        REASON_PORT_NOT_ALLOWED
    }
}

/// Key of [`MAP_L7_PEER`]: the client's local address as the enforcer sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// IPv6 address, network byte order; IPv4 as IPv4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u32,
}
const _: () = assert!(size_of::<PeerKey>() == 20);

/// Value of [`MAP_L7_COOKIE`] and [`MAP_L7_PEER`]: where a redirected connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Orig {
    /// Original destination, network byte order; IPv4 as IPv4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Original destination port, host byte order.
    pub port: u32,
    /// Identity of the connecting workload.
    pub identity: u32,
    /// cgroup the identity was found on.
    pub cgroup_id: u64,
}
const _: () = assert!(size_of::<L7Orig>() == 32);

/// Value of [`MAP_DNS_ORIG`]: the resolver a redirected DNS socket was sending to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 (first 4 bytes) or IPv6 address, network byte order.
    pub addr: [u8; 16],
    /// Port, network byte order, as in `bpf_sock_addr::user_port`.
    pub port_be: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}
const _: () = assert!(size_of::<OrigDst>() == 24);

// === Events ===

/// `DenyEvent::verdict`: the call failed with EPERM.
pub const VERDICT_DENIED: u32 = 1;
/// `DenyEvent::verdict`: shadow mode; the call would have been denied and was allowed.
pub const VERDICT_WOULD_DENY: u32 = 2;

/// No reason: allowed.
pub const REASON_NONE: u32 = 0;
/// The destination is in none of the identity's allowlist entries.
pub const REASON_NOT_ALLOWED: u32 = 1;
/// The destination was learned from DNS but its TTL has run out.
pub const REASON_EXPIRED: u32 = 2;
/// The destination is allowed, but not on this port.
pub const REASON_PORT_NOT_ALLOWED: u32 = 3;
/// A `SOCK_RAW` socket was requested.
pub const REASON_RAW_SOCKET: u32 = 4;
/// An `AF_PACKET` socket was requested.
pub const REASON_PACKET_SOCKET: u32 = 5;
/// A DNS query over a family for which the node has no DNS proxy address.
pub const REASON_NO_DNS_PROXY: u32 = 6;
/// A TCP connection to an inspected destination, and no L7 enforcer to send it to.
pub const REASON_NO_L7_ENFORCER: u32 = 7;
/// UDP to an inspected destination (QUIC would bypass the inspection).
pub const REASON_UDP_TO_INSPECTED: u32 = 8;
/// The identity's kill switch is on.
pub const REASON_KILLED: u32 = 9;

pub const HOOK_CONNECT4: u32 = 1;
pub const HOOK_CONNECT6: u32 = 2;
pub const HOOK_SENDMSG4: u32 = 3;
pub const HOOK_SENDMSG6: u32 = 4;
pub const HOOK_SOCK_CREATE: u32 = 5;

/// One record of [`MAP_EVENTS`]: a denied (or, in shadow mode, would-be denied) call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_boot_ns` at the hook.
    pub ts_ns: u64,
    /// cgroup v2 id the identity was found on.
    pub cgroup_id: u64,
    pub identity: u32,
    /// Thread group id (the process id seen by userspace in the root pid namespace).
    pub pid: u32,
    /// `comm` of the calling task, NUL-padded.
    pub comm: [u8; 16],
    /// `VERDICT_*`.
    pub verdict: u32,
    /// `REASON_*`.
    pub reason: u32,
    /// `HOOK_*`.
    pub hook: u32,
    /// `AF_INET`, `AF_INET6` or, for socket creation, the requested family.
    pub family: u32,
    /// Destination address, network byte order (IPv4 in the first 4 bytes); zero for
    /// socket creation.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// `IPPROTO_*` of the socket (for socket creation: the requested protocol).
    pub protocol: u16,
    /// `SOCK_*` type of the socket.
    pub sock_type: u32,
}
const _: () = assert!(size_of::<DenyEvent>() == 80);

/// `AF_INET` (include/linux/socket.h).
pub const AF_INET: u32 = 2;
/// `AF_INET6` (include/linux/socket.h).
pub const AF_INET6: u32 = 10;
/// `AF_PACKET` (include/linux/socket.h).
pub const AF_PACKET: u32 = 17;
/// `SOCK_STREAM` (include/linux/net.h).
pub const SOCK_STREAM: u32 = 1;
/// `SOCK_DGRAM` (include/linux/net.h).
pub const SOCK_DGRAM: u32 = 2;
/// `SOCK_RAW` (include/linux/net.h).
pub const SOCK_RAW: u32 = 3;
/// The DNS port (RFC 1035 section 4.2).
pub const DNS_PORT: u16 = 53;

/// 32-bit FNV-1a over `bytes`: stable across builds and machines, used to derive numeric
/// identities from (agent, tenant) names (FNV: <http://www.isthe.com/chongo/tech/comp/fnv/>).
pub const fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made of integers and byte arrays with explicit
    // padding fields, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for Egress4Key {}
    unsafe impl aya::Pod for Egress6Key {}
    unsafe impl aya::Pod for Cidr4Data {}
    unsafe impl aya::Pod for Cidr6Data {}
    unsafe impl aya::Pod for EgressValue {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for L7Orig {}
    unsafe impl aya::Pod for DenyEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_bpf_obj_name_len() {
        for name in ALL_MAPS.iter().chain(ALL_PROGRAMS.iter()) {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn egress_value_checks_expiry_and_ports() {
        let mut v = EgressValue {
            expires_ns: 100,
            ..Default::default()
        };
        assert_eq!(v.check(443, 50), REASON_NONE);
        assert_eq!(v.check(443, 101), REASON_EXPIRED);
        v.port_count = 2;
        v.ports[0] = 80;
        v.ports[1] = 443;
        assert_eq!(v.check(443, 50), REASON_NONE);
        assert_eq!(v.check(8443, 50), REASON_PORT_NOT_ALLOWED);
        // A stale port beyond `port_count` must not allow.
        v.ports[2] = 22;
        assert_eq!(v.check(22, 50), REASON_PORT_NOT_ALLOWED);
        v.expires_ns = 0;
        assert_eq!(v.check(80, u64::MAX), REASON_NONE);
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        // Reference values from the FNV test suite (fnv1a32 of "" and "a").
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
    }
}
