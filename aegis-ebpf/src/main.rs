//! Aegis kernel programs, attached to the cgroup v2 of every agent workload.
//!
//! - `connect4`/`connect6`: a TCP connect or UDP connect from an agent identity succeeds only if
//!   the destination address and port are in that identity's allowlist (addresses learned by the
//!   DNS proxy, or CIDRs written in policy); otherwise it fails with EPERM and a [`DenyEvent`] is
//!   pushed. Port 53 is rewritten to the identity's DNS proxy listener.
//! - `sendmsg4`/`sendmsg6`: the same for unconnected UDP sends (QUIC to an unlisted host would be
//!   a bypass otherwise); DNS is steered to the proxy.
//! - `recvmsg4`/`recvmsg6`: a DNS answer from the proxy appears to come from the resolver the
//!   workload asked, so stub resolvers that check the source accept it.
//! - `sock_create`: raw (and, where the kernel runs the hook, packet) sockets are refused.
//!
//! Invariants: a process under no identity is never touched (every program returns "allow"
//! before doing anything else); IPv4-mapped IPv6 destinations get the IPv4 rules; entry points
//! never panic and loops are bounded by constants. The identity of a process is found on its
//! own cgroup or the deepest ancestor that carries one (containers live below the pod cgroup).
#![no_std]
#![no_main]

use aegis_common::{
    AF_INET, AF_INET6, AF_PACKET, CONFIG_F_DNS6, Cidr4Data, Cidr6Data, DNS_PORT, DenyEvent,
    EVENTS_RING_BYTES, Egress4Key, Egress6Key, EgressValue, HOOK_CONNECT4, HOOK_CONNECT6,
    HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SOCK_CREATE, IDENTITY_F_DENY_RAW, IDENTITY_F_SHADOW,
    IdentityValue, MAX_CGROUP_LEVEL, MAX_CIDRS, MAX_DNS_SOCKETS, MAX_IDENTITY_CGROUPS,
    MAX_LEARNED_ADDRS, NodeConfig, OrigDst, REASON_NO_DNS_PROXY, REASON_NONE, REASON_NOT_ALLOWED,
    REASON_PACKET_SOCKET, REASON_RAW_SOCKET, SOCK_RAW, VERDICT_DENIED, VERDICT_WOULD_DENY,
};
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
            bpf_ktime_get_boot_ns,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{
        Array, HashMap, LruHashMap, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;

/// Verdicts of cgroup sock/sock_addr programs (Documentation/bpf/prog_cgroup_sockopt.rst and
/// kernel/bpf/cgroup.c: 1 lets the call proceed, 0 fails it with EPERM).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "AEGIS_IDENT_V1")]
static IDENTITY: HashMap<u64, IdentityValue> = HashMap::pinned(MAX_IDENTITY_CGROUPS, 0);

#[map(name = "AEGIS_CONFIG_V1")]
static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map(name = "AEGIS_FQDN4_V1")]
static FQDN4: HashMap<Egress4Key, EgressValue> = HashMap::pinned(MAX_LEARNED_ADDRS, 0);

#[map(name = "AEGIS_FQDN6_V1")]
static FQDN6: HashMap<Egress6Key, EgressValue> = HashMap::pinned(MAX_LEARNED_ADDRS, 0);

#[map(name = "AEGIS_CIDR4_V1")]
static CIDR4: LpmTrie<Cidr4Data, EgressValue> = LpmTrie::pinned(MAX_CIDRS, 0);

#[map(name = "AEGIS_CIDR6_V1")]
static CIDR6: LpmTrie<Cidr6Data, EgressValue> = LpmTrie::pinned(MAX_CIDRS, 0);

#[map(name = "AEGIS_DNSORG_V1")]
static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_DNS_SOCKETS, 0);

#[map(name = "AEGIS_EVENTS_V1")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// The identity of the calling process and the cgroup it was found on.
struct Caller {
    cgroup_id: u64,
    ident: IdentityValue,
}

/// Finds the identity of the current task: its own cgroup first, then ancestors at the levels
/// where the agent placed identities (`NodeConfig::level_mask`), deepest match winning.
#[inline(always)]
fn caller() -> Option<Caller> {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: plain-data value; a concurrent update can at worst give a stale identity.
    if let Some(ident) = unsafe { IDENTITY.get(&own) } {
        return Some(Caller {
            cgroup_id: own,
            ident: *ident,
        });
    }
    let mask = match CONFIG.get(0) {
        Some(c) => c.level_mask,
        None => return None,
    };
    if mask == 0 {
        return None;
    }
    let mut found = None;
    let mut level = 1u32;
    while level < MAX_CGROUP_LEVEL {
        if mask & (1 << level) != 0 {
            // SAFETY: helper without pointer arguments; returns 0 beyond the task's depth.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id == 0 {
                break;
            }
            // SAFETY: as above.
            if let Some(ident) = unsafe { IDENTITY.get(&id) } {
                found = Some(Caller {
                    cgroup_id: id,
                    ident: *ident,
                });
            }
        }
        level += 1;
    }
    found
}

/// Pushes a deny (or would-deny) event. A full ring drops the event, never the verdict, and
/// says so through aya-log.
#[inline(always)]
fn report<C: EbpfContext>(
    ctx: &C,
    c: &Caller,
    verdict: u32,
    reason: u32,
    hook: u32,
    family: u32,
    addr: [u8; 16],
    port: u16,
    protocol: u16,
    sock_type: u32,
) {
    if let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) {
        let comm = bpf_get_current_comm().unwrap_or([0; 16]);
        entry.write(DenyEvent {
            // SAFETY: helper without pointer arguments.
            ts_ns: unsafe { bpf_ktime_get_boot_ns() },
            cgroup_id: c.cgroup_id,
            identity: c.ident.identity,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            comm,
            verdict,
            reason,
            hook,
            family,
            addr,
            port,
            protocol,
            sock_type,
        });
        entry.submit(0);
    } else {
        warn!(
            ctx,
            "aegis: event ring full, deny event of identity {} dropped", c.ident.identity
        );
    }
}

/// Turns a reason into the program's return value, reporting denials (shadow mode: report
/// and allow).
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    c: &Caller,
    reason: u32,
    hook: u32,
    family: u32,
    addr: [u8; 16],
    port: u16,
    sa: &bpf_sock_addr,
) -> i32 {
    if reason == REASON_NONE {
        return ALLOW;
    }
    let shadow = c.ident.flags & IDENTITY_F_SHADOW != 0;
    let verdict = if shadow {
        VERDICT_WOULD_DENY
    } else {
        VERDICT_DENIED
    };
    report(
        ctx,
        c,
        verdict,
        reason,
        hook,
        family,
        addr,
        port,
        sa.protocol as u16,
        sa.type_,
    );
    if shadow { ALLOW } else { DENY }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without pointer arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Allowlist check of an IPv4 destination (`addr` network byte order, `port` host order).
#[inline(always)]
fn check4(identity: u32, addr: [u8; 4], port: u16) -> u32 {
    let t = now();
    // SAFETY: plain-data value.
    let learned = unsafe { FQDN4.get(&Egress4Key { identity, addr }) };
    let mut reason = REASON_NOT_ALLOWED;
    if let Some(v) = learned {
        reason = v.check(port, t);
        if reason == REASON_NONE {
            return reason;
        }
    }
    let key = Key::new(
        64,
        Cidr4Data {
            identity_be: identity.to_be_bytes(),
            addr,
        },
    );
    if let Some(v) = CIDR4.get(&key) {
        let r = v.check(port, t);
        if r == REASON_NONE || reason == REASON_NOT_ALLOWED {
            reason = r;
        }
    }
    reason
}

/// Allowlist check of an IPv6 destination; IPv4-mapped addresses get the IPv4 rules.
#[inline(always)]
fn check6(identity: u32, addr: [u8; 16], port: u16) -> u32 {
    if let Some(v4) = mapped_v4(&addr) {
        return check4(identity, v4, port);
    }
    let t = now();
    // SAFETY: plain-data value.
    let learned = unsafe { FQDN6.get(&Egress6Key { identity, addr }) };
    let mut reason = REASON_NOT_ALLOWED;
    if let Some(v) = learned {
        reason = v.check(port, t);
        if reason == REASON_NONE {
            return reason;
        }
    }
    let key = Key::new(
        160,
        Cidr6Data {
            identity_be: identity.to_be_bytes(),
            addr,
        },
    );
    if let Some(v) = CIDR6.get(&key) {
        let r = v.check(port, t);
        if r == REASON_NONE || reason == REASON_NOT_ALLOWED {
            reason = r;
        }
    }
    reason
}

/// `::ffff:a.b.c.d` (RFC 4291 section 2.5.5.2) → `a.b.c.d`.
#[inline(always)]
fn mapped_v4(a: &[u8; 16]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            return None;
        }
        i += 1;
    }
    if a[10] == 0xff && a[11] == 0xff {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

#[inline(always)]
fn ip6_of(sa: &bpf_sock_addr) -> [u8; 16] {
    let w = sa.user_ip6;
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn set_ip6(sa: &mut bpf_sock_addr, a: &[u8; 16]) {
    let mut i = 0;
    while i < 4 {
        sa.user_ip6[i] = u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
        i += 1;
    }
}

#[inline(always)]
fn port_of(sa: &bpf_sock_addr) -> u16 {
    // `user_port` holds the port in network byte order in its low 16 bits.
    u16::from_be(sa.user_port as u16)
}

/// Records where a DNS socket was sending, so recvmsg can restore it as the reply source.
#[inline(always)]
fn remember_resolver(ctx: &SockAddrContext, family: u32, addr: [u8; 16], port_be: u32) {
    // SAFETY: `ctx` is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_ORIG.insert(
        &cookie,
        &OrigDst {
            addr,
            port_be,
            family,
        },
        0,
    );
}

fn sock_addr<'a>(ctx: &'a SockAddrContext) -> &'a mut bpf_sock_addr {
    // SAFETY: the kernel hands every sock_addr program a valid `bpf_sock_addr`.
    unsafe { &mut *ctx.sock_addr }
}

// === IPv4 ===

fn egress4(ctx: &SockAddrContext, hook: u32) -> i32 {
    let Some(c) = caller() else { return ALLOW };
    let sa = sock_addr(ctx);
    let addr = sa.user_ip4.to_ne_bytes();
    let port = port_of(sa);
    let mut addr16 = [0u8; 16];
    addr16[..4].copy_from_slice(&addr);
    if port == DNS_PORT {
        let Some(cfg) = CONFIG.get(0) else {
            return DENY;
        };
        if cfg.dns4 == 0 {
            return decide(
                ctx,
                &c,
                REASON_NO_DNS_PROXY,
                hook,
                AF_INET,
                addr16,
                port,
                sa,
            );
        }
        remember_resolver(ctx, AF_INET, addr16, sa.user_port);
        sa.user_ip4 = cfg.dns4;
        sa.user_port = u32::from(c.ident.dns_port.to_be());
        return ALLOW;
    }
    let reason = check4(c.ident.identity, addr, port);
    decide(ctx, &c, reason, hook, AF_INET, addr16, port, sa)
}

#[cgroup_sock_addr(connect4)]
pub fn aegis_connect4(ctx: SockAddrContext) -> i32 {
    egress4(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn aegis_sendmsg4(ctx: SockAddrContext) -> i32 {
    egress4(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn aegis_recvmsg4(ctx: SockAddrContext) -> i32 {
    let Some(c) = caller() else { return ALLOW };
    let sa = sock_addr(&ctx);
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    if cfg.dns4 == 0 || sa.user_ip4 != cfg.dns4 || port_of(sa) != c.ident.dns_port {
        return ALLOW;
    }
    // SAFETY: `ctx` is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value.
    if let Some(orig) = unsafe { DNS_ORIG.get(&cookie) } {
        if orig.family == AF_INET {
            sa.user_ip4 =
                u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
            sa.user_port = orig.port_be;
        }
    }
    // recvmsg programs must return 1 (kernel/bpf/cgroup.c).
    ALLOW
}

// === IPv6 ===

fn egress6(ctx: &SockAddrContext, hook: u32) -> i32 {
    let Some(c) = caller() else { return ALLOW };
    let sa = sock_addr(ctx);
    let addr = ip6_of(sa);
    let port = port_of(sa);
    if port == DNS_PORT {
        let Some(cfg) = CONFIG.get(0) else {
            return DENY;
        };
        let target = match mapped_v4(&addr) {
            Some(_) if cfg.dns4 != 0 => {
                let mut t = [0u8; 16];
                t[10] = 0xff;
                t[11] = 0xff;
                t[12..].copy_from_slice(&cfg.dns4.to_ne_bytes());
                t
            }
            None if cfg.flags & CONFIG_F_DNS6 != 0 => cfg.dns6,
            _ => return decide(ctx, &c, REASON_NO_DNS_PROXY, hook, AF_INET6, addr, port, sa),
        };
        remember_resolver(ctx, AF_INET6, addr, sa.user_port);
        set_ip6(sa, &target);
        sa.user_port = u32::from(c.ident.dns_port.to_be());
        return ALLOW;
    }
    let reason = check6(c.ident.identity, addr, port);
    decide(ctx, &c, reason, hook, AF_INET6, addr, port, sa)
}

#[cgroup_sock_addr(connect6)]
pub fn aegis_connect6(ctx: SockAddrContext) -> i32 {
    egress6(&ctx, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn aegis_sendmsg6(ctx: SockAddrContext) -> i32 {
    egress6(&ctx, HOOK_SENDMSG6)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn aegis_recvmsg6(ctx: SockAddrContext) -> i32 {
    let Some(c) = caller() else { return ALLOW };
    let sa = sock_addr(&ctx);
    if port_of(sa) != c.ident.dns_port {
        return ALLOW;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    let from = ip6_of(sa);
    let from_proxy = match mapped_v4(&from) {
        Some(v4) => cfg.dns4 != 0 && u32::from_ne_bytes(v4) == cfg.dns4,
        None => cfg.flags & CONFIG_F_DNS6 != 0 && from == cfg.dns6,
    };
    if !from_proxy {
        return ALLOW;
    }
    // SAFETY: `ctx` is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value.
    if let Some(orig) = unsafe { DNS_ORIG.get(&cookie) } {
        if orig.family == AF_INET6 {
            let a = orig.addr;
            set_ip6(sa, &a);
            sa.user_port = orig.port_be;
        }
    }
    ALLOW
}

// === Socket creation ===

#[cgroup_sock(sock_create)]
pub fn aegis_sock_new(ctx: SockContext) -> i32 {
    let Some(c) = caller() else { return ALLOW };
    if c.ident.flags & IDENTITY_F_DENY_RAW == 0 {
        return ALLOW;
    }
    // SAFETY: the kernel hands every cgroup/sock program a valid `bpf_sock`.
    let sk = unsafe { &*ctx.sock };
    let reason = if sk.type_ == SOCK_RAW {
        REASON_RAW_SOCKET
    } else if sk.family == AF_PACKET {
        REASON_PACKET_SOCKET
    } else {
        return ALLOW;
    };
    let shadow = c.ident.flags & IDENTITY_F_SHADOW != 0;
    let verdict = if shadow {
        VERDICT_WOULD_DENY
    } else {
        VERDICT_DENIED
    };
    report(
        &ctx,
        &c,
        verdict,
        reason,
        HOOK_SOCK_CREATE,
        sk.family,
        [0; 16],
        0,
        sk.protocol as u16,
        sk.type_,
    );
    if shadow { ALLOW } else { DENY }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
