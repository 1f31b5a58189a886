//! Aegis kernel programs, attached to the cgroup v2 of every agent workload.
//!
//! - `connect4`/`connect6`: a TCP connect or UDP connect from an agent identity succeeds only if
//!   the destination address and port are in that identity's allowlist (addresses learned by the
//!   DNS proxy, or CIDRs written in policy); otherwise it fails with EPERM and a [`DenyEvent`] is
//!   pushed. Port 53 is rewritten to the identity's DNS proxy listener. An allowed TCP connection
//!   to an *inspected* destination is rewritten to the identity's L7 enforcer port, its original
//!   destination recorded under the socket cookie.
//! - `sendmsg4`/`sendmsg6`: the same for unconnected UDP sends (QUIC to an unlisted host would be
//!   a bypass otherwise); DNS is steered to the proxy.
//! - `recvmsg4`/`recvmsg6`: a DNS answer from the proxy appears to come from the resolver the
//!   workload asked, so stub resolvers that check the source accept it.
//! - `sock_create`: raw (and, where the kernel runs the hook, packet) sockets are refused.
//! - `sockops`: re-keys the original destination of a redirected connection by the client's
//!   local address and port, which the enforcer sees as its peer.
//!
//! Invariants: a process under no identity is never touched (every program returns "allow"
//! before doing anything else); IPv4-mapped IPv6 destinations get the IPv4 rules; entry points
//! never panic and loops are bounded by constants. The identity of a process is found on its
//! own cgroup or the deepest ancestor that carries one (containers live below the pod cgroup).
#![no_std]
#![no_main]

use aegis_common::{
    AF_INET, AF_INET6, AF_PACKET, CONFIG_F_DNS6, CONFIG_F_L7_6, Cidr4Data, Cidr6Data, DNS_PORT,
    DenyEvent, EGRESS_F_INSPECT, EVENTS_RING_BYTES, Egress4Key, Egress6Key, EgressValue,
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SOCK_CREATE,
    IDENTITY_F_DENY_RAW, IDENTITY_F_KILLED, IDENTITY_F_SHADOW, IdentityValue, L7Orig,
    MAX_CGROUP_LEVEL, MAX_CIDRS, MAX_DNS_SOCKETS, MAX_IDENTITY_CGROUPS, MAX_L7_PENDING,
    MAX_LEARNED_ADDRS, NodeConfig, OrigDst, PeerKey, REASON_KILLED, REASON_NO_DNS_PROXY,
    REASON_NO_L7_ENFORCER, REASON_NONE, REASON_NOT_ALLOWED, REASON_PACKET_SOCKET,
    REASON_RAW_SOCKET, REASON_UDP_TO_INSPECTED, SOCK_RAW, SOCK_STREAM, VERDICT_DENIED,
    VERDICT_WOULD_DENY,
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
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{
        Array, HashMap, LruHashMap, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;

/// Verdicts of cgroup sock/sock_addr programs (Documentation/bpf/prog_cgroup_sockopt.rst and
/// kernel/bpf/cgroup.c: 1 lets the call proceed, 0 fails it with EPERM).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "AEGIS_IDENT_V1")]
static IDENTITY: HashMap<u64, IdentityValue> = HashMap::pinned(MAX_IDENTITY_CGROUPS, 0);

#[map(name = "AEGIS_CONFIG_V2")]
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

#[map(name = "AEGIS_L7CK_V1")]
static L7_COOKIE: LruHashMap<u64, L7Orig> = LruHashMap::pinned(MAX_L7_PENDING, 0);

#[map(name = "AEGIS_L7PEER_V1")]
static L7_PEER: LruHashMap<PeerKey, L7Orig> = LruHashMap::pinned(MAX_L7_PENDING, 0);

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

/// What was denied, for the event record.
struct Denial {
    reason: u32,
    hook: u32,
    family: u32,
    port: u16,
    protocol: u16,
    sock_type: u32,
    addr: [u8; 16],
}

/// Pushes a deny (or would-deny) event. A full ring drops the event, never the verdict, and
/// says so through aya-log. Not inlined: one copy of the event-building code and its stack
/// frame, instead of one per call site (the BPF stack is 512 bytes).
#[inline(never)]
fn report<C: EbpfContext>(ctx: &C, c: &Caller, verdict: u32, d: &Denial) {
    if let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` points to a reserved, writable `DenyEvent` in the ring; every field is
        // written before submit.
        unsafe {
            (*ev).ts_ns = bpf_ktime_get_boot_ns();
            (*ev).cgroup_id = c.cgroup_id;
            (*ev).identity = c.ident.identity;
            (*ev).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
            (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
            (*ev).verdict = verdict;
            (*ev).reason = d.reason;
            (*ev).hook = d.hook;
            (*ev).family = d.family;
            (*ev).addr = d.addr;
            (*ev).port = d.port;
            (*ev).protocol = d.protocol;
            (*ev).sock_type = d.sock_type;
        }
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
    deny(ctx, c, &denial(reason, hook, family, addr, port, sa))
}

/// The event fields of a refused sock_addr call.
#[inline(always)]
fn denial(
    reason: u32,
    hook: u32,
    family: u32,
    addr: [u8; 16],
    port: u16,
    sa: &bpf_sock_addr,
) -> Denial {
    Denial {
        reason,
        hook,
        family,
        port,
        protocol: sa.protocol as u16,
        sock_type: sa.type_,
        addr,
    }
}

/// The kill switch: reports the call and refuses it, in shadow mode too.
#[inline(always)]
fn killed(
    ctx: &SockAddrContext,
    c: &Caller,
    family: u32,
    hook: u32,
    addr: [u8; 16],
    port: u16,
    sa: &bpf_sock_addr,
) -> i32 {
    refuse(ctx, c, &denial(REASON_KILLED, hook, family, addr, port, sa))
}

/// Reports a denial and refuses, whatever the mode.
#[inline(never)]
fn refuse(ctx: &SockAddrContext, c: &Caller, d: &Denial) -> i32 {
    report(ctx, c, VERDICT_DENIED, d);
    DENY
}

/// Reports a denial and returns the verdict (shadow mode: allow).
#[inline(never)]
fn deny(ctx: &SockAddrContext, c: &Caller, d: &Denial) -> i32 {
    let shadow = c.ident.flags & IDENTITY_F_SHADOW != 0;
    report(
        ctx,
        c,
        if shadow {
            VERDICT_WOULD_DENY
        } else {
            VERDICT_DENIED
        },
        d,
    );
    if shadow { ALLOW } else { DENY }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without pointer arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Allowlist check of an IPv4 destination (`addr` network byte order, `port` host order):
/// (reason, `EGRESS_F_*` flags of the entry that allowed).
#[inline(always)]
fn check4(identity: u32, addr: [u8; 4], port: u16) -> (u32, u32) {
    // SAFETY: plain-data value.
    let learned = unsafe { FQDN4.get(&Egress4Key { identity, addr }) };
    let key = Key::new(
        64,
        Cidr4Data {
            identity_be: identity.to_be_bytes(),
            addr,
        },
    );
    verdict(learned, || CIDR4.get(&key), port)
}

/// Allowlist check of an IPv6 destination; IPv4-mapped addresses get the IPv4 rules.
#[inline(always)]
fn check6(identity: u32, addr: [u8; 16], port: u16) -> (u32, u32) {
    if let Some(v4) = mapped_v4(&addr) {
        return check4(identity, v4, port);
    }
    // SAFETY: plain-data value.
    let learned = unsafe { FQDN6.get(&Egress6Key { identity, addr }) };
    let key = Key::new(
        160,
        Cidr6Data {
            identity_be: identity.to_be_bytes(),
            addr,
        },
    );
    verdict(learned, || CIDR6.get(&key), port)
}

/// Combines the two allowlists of a destination: a learned entry that allows wins; else a CIDR
/// entry that allows (looked up only then); else the most telling reason (an expired or
/// wrong-port learned entry says more than "not allowed").
#[inline(always)]
fn verdict<'a>(
    learned: Option<&EgressValue>,
    cidr: impl FnOnce() -> Option<&'a EgressValue>,
    port: u16,
) -> (u32, u32) {
    let t = now();
    let mut reason = REASON_NOT_ALLOWED;
    if let Some(v) = learned {
        reason = v.check(port, t);
        if reason == REASON_NONE {
            return (reason, v.flags);
        }
    }
    if let Some(v) = cidr() {
        let r = v.check(port, t);
        if r == REASON_NONE {
            return (r, v.flags);
        }
        if reason == REASON_NOT_ALLOWED {
            reason = r;
        }
    }
    (reason, 0)
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
    words_to_bytes(sa.user_ip6)
}

/// Four `u32` words of an address as the kernel stores it (network byte order in memory) to
/// its 16 bytes.
#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
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
    if c.ident.flags & IDENTITY_F_KILLED != 0 {
        return killed(ctx, &c, AF_INET, hook, addr16, port, sa);
    }
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
    let (reason, flags) = check4(c.ident.identity, addr, port);
    if reason != REASON_NONE || flags & EGRESS_F_INSPECT == 0 {
        return decide(ctx, &c, reason, hook, AF_INET, addr16, port, sa);
    }
    let Some(cfg) = CONFIG.get(0) else {
        return DENY;
    };
    let target = cfg.l7_addr4;
    match inspect(ctx, &c, sa, hook, mapped(&addr), port, target != 0) {
        Ok(()) => {
            sa.user_ip4 = target;
            sa.user_port = u32::from(c.ident.l7_port.to_be());
            ALLOW
        }
        Err(verdict) => verdict,
    }
}

/// `a.b.c.d` → `::ffff:a.b.c.d` (RFC 4291 section 2.5.5.2).
#[inline(always)]
fn mapped(v4: &[u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12] = v4[0];
    a[13] = v4[1];
    a[14] = v4[2];
    a[15] = v4[3];
    a
}

/// An allowed connection to an inspected destination: TCP is to be redirected to the
/// identity's L7 enforcer port (the caller rewrites the address once this returns `Ok`), with
/// the original destination recorded under the socket cookie; UDP is refused (QUIC would
/// bypass the inspection); without an enforcer the connection is refused.
#[inline(always)]
fn inspect(
    ctx: &SockAddrContext,
    c: &Caller,
    sa: &bpf_sock_addr,
    hook: u32,
    orig: [u8; 16],
    port: u16,
    have_target: bool,
) -> Result<(), i32> {
    let family = if mapped_v4(&orig).is_some() {
        AF_INET
    } else {
        AF_INET6
    };
    let report_addr = match mapped_v4(&orig) {
        Some(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4);
            a
        }
        None => orig,
    };
    if sa.type_ != SOCK_STREAM {
        if hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6 {
            // A UDP connect() sends nothing; glibc's getaddrinfo makes one per candidate
            // address to sort them (RFC 6724), so reporting it would flood the SOC with
            // non-events. Refusing it still stops connected-UDP QUIC (its sends would not pass
            // sendmsg); unconnected sends are refused and reported below.
            let shadow = c.ident.flags & IDENTITY_F_SHADOW != 0;
            return Err(if shadow { ALLOW } else { DENY });
        }
        return Err(decide(
            ctx,
            c,
            REASON_UDP_TO_INSPECTED,
            hook,
            family,
            report_addr,
            port,
            sa,
        ));
    }
    if !have_target || c.ident.l7_port == 0 {
        return Err(decide(
            ctx,
            c,
            REASON_NO_L7_ENFORCER,
            hook,
            family,
            report_addr,
            port,
            sa,
        ));
    }
    // SAFETY: `ctx` is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let record = L7Orig {
        addr: orig,
        port: u32::from(port),
        identity: c.ident.identity,
        cgroup_id: c.cgroup_id,
    };
    if L7_COOKIE.insert(&cookie, &record, 0).is_err() {
        // Without the record the enforcer could not tell where the call was going.
        return Err(DENY);
    }
    Ok(())
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
    if c.ident.flags & IDENTITY_F_KILLED != 0 {
        return killed(ctx, &c, AF_INET6, hook, addr, port, sa);
    }
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
    let (reason, flags) = check6(c.ident.identity, addr, port);
    if reason == REASON_NONE && flags & EGRESS_F_INSPECT != 0 {
        let Some(cfg) = CONFIG.get(0) else {
            return DENY;
        };
        let target = match mapped_v4(&addr) {
            Some(_) if cfg.l7_addr4 != 0 => Some(mapped(&cfg.l7_addr4.to_ne_bytes())),
            None if cfg.flags & CONFIG_F_L7_6 != 0 => Some(cfg.l7_addr6),
            _ => None,
        };
        return match inspect(ctx, &c, sa, hook, addr, port, target.is_some()) {
            Ok(()) => {
                if let Some(t) = target {
                    set_ip6(sa, &t);
                }
                sa.user_port = u32::from(c.ident.l7_port.to_be());
                ALLOW
            }
            Err(verdict) => verdict,
        };
    }
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
    let d = Denial {
        reason,
        hook: HOOK_SOCK_CREATE,
        family: sk.family,
        port: 0,
        protocol: sk.protocol as u16,
        sock_type: sk.type_,
        addr: [0; 16],
    };
    report(&ctx, &c, verdict, &d);
    if shadow { ALLOW } else { DENY }
}

// === Redirect bookkeeping ===

/// `BPF_SOCK_OPS_TCP_CONNECT_CB` (include/uapi/linux/bpf.h): called before the SYN is sent,
/// when the local port is known.
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;

/// Re-keys the original destination of a connection redirected to the L7 enforcer from the
/// socket cookie (known at connect) to the client's local address and port (known once the
/// SYN is about to leave), which is what the enforcer sees as its peer.
#[sock_ops]
pub fn aegis_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: `ctx` is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value.
    let Some(orig) = (unsafe { L7_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let addr = if ctx.family() == AF_INET {
        mapped(&ctx.local_ip4().to_ne_bytes())
    } else {
        // One constant-offset load per word: the verifier refuses loads through a ctx pointer
        // that LLVM advanced (which copying the array produces).
        let ops = ctx.ops;
        // SAFETY: `ops` is the program's context; each read is a plain field load.
        let w = unsafe {
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ]
        };
        words_to_bytes(w)
    };
    let key = PeerKey {
        addr,
        port: ctx.local_port(),
    };
    let _ = L7_PEER.insert(&key, &orig, 0);
    let _ = L7_COOKIE.remove(&cookie);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
