//! lb's XDP program.
//!
//! Packet path: parse -> a reply to a port lb holds? (reverse NAT, `reply`) -> VIP filter
//! -> SYN: a new flow (`balance`), or lb's own SYN-ACK in cookie mode | a tracked flow:
//! keep its backend | another TCP packet: a cookie's answer, else dropped | UDP: a new flow
//! -> SNAT port (`ports`) -> rewrite -> next hop -> `XDP_TX` / `XDP_REDIRECT`; a flow of a
//! direct-server-return service instead goes to its backend unchanged (`direct`), and a
//! packet too large for its route is answered (`icmp`). Each step
//! is a sub-program called from here, one after another (`next`), and counts its own drops.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod balance;
mod cookie;
mod direct;
mod emit;
mod flood;
mod flows;
mod forward;
mod icmp;
mod kernel_hop;
mod maps;
mod nat;
mod next;
mod parse;
mod ports;
mod reply;
mod select;
mod stats;
mod sweep;
mod tcpopt;
mod track;
mod vips;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    config::Config,
    flow::{
        CONN_BACKEND_OPEN, CONN_DIRECT, CONN_SLOW, CONN_SYNPROXY, Conn, FlowKey, PROBE_SYN,
        PROBE_TS, SynProbe,
    },
    hash::{flow_hash, slot_hash},
    service::{SERVICE_HASH_SRC_IP, ServiceInfo, ServiceKey},
    stats::DropReason,
};

use crate::parse::{Packet, Parsed};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb_xdp(&ctx) {
        Ok(next::TOO_BIG) | Err(DropReason::FragNeeded) => icmp::too_big(&ctx),
        Ok(action) => action,
        Err(reason) => {
            stats::count_drop(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// tc ingress beside `lb_xdp`: sends the frames XDP handed up for want of a next hop's MAC
/// (see `kernel_hop`).
#[classifier]
pub fn lb_kernel_hop(ctx: TcContext) -> i32 {
    kernel_hop::from_xdp(&ctx)
}

/// Does nothing but pass: the floor that benchmarks subtract.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Does nothing but answer XDP_TX: shows what that verdict alone costs in the benchmark.
#[xdp]
pub fn lb_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    let pkt = match parse::parse(ctx)? {
        Parsed::Packet(pkt) => pkt,
        Parsed::Pass => return Ok(xdp_action::XDP_PASS),
    };
    let Some(cfg) = maps::config.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let dport = pkt.dst_port();
    if dport >= cfg.snat_port_min
        && dport <= cfg.snat_port_max
        && let Some(rev) = maps::nat_reverse.get_ptr_mut(&track::reverse_key(&pkt))
    {
        let mut seen = 0;
        let mut v = reply::reply(ctx, &pkt, rev, seen, cfg);
        if v == next::ROUTE {
            seen |= reply::SEEN_ROUTE;
            v = reply::refresh_hop(ctx, &pkt, rev, cfg);
            if v == next::CONTINUE {
                v = reply::reply(ctx, &pkt, rev, seen, cfg);
            }
        }
        if v == next::SYNPROXY {
            seen |= reply::SEEN_HANDSHAKE;
            v = reply::synproxy_handshake(ctx, &pkt, rev, cfg);
            if v == next::CONTINUE {
                v = reply::reply(ctx, &pkt, rev, seen, cfg);
            }
        }
        return Ok(v);
    }
    let key = ServiceKey::new(pkt.dst_addr(), dport, pkt.proto);
    if vips::maybe_service(&key) {
        to_service(ctx, &pkt, &key, cfg)
    } else {
        Ok(xdp_action::XDP_PASS)
    }
}

/// A client's packet that may be for a service.
#[inline(always)]
fn to_service(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &ServiceKey,
    cfg: &Config,
) -> Result<u32, DropReason> {
    let flow = FlowKey::new(
        pkt.src_addr(),
        pkt.src_port(),
        key.addr,
        key.port,
        pkt.proto,
    );
    // A SYN opens a connection: it skips the conntrack lookup (its retries find their
    // port where the first try took it), unless its new flow says a tracked one takes it.
    if pkt.is_tcp() && pkt.opens() {
        let mut v = syn(ctx, pkt, &flow, key, cfg);
        if v == next::NEW_FLOW {
            v = balance::new_flow(ctx, pkt, cfg);
        } else if v == next::COOKIE_SYN {
            v = cookie_syn(ctx, pkt, &flow, cfg);
        }
        if v != next::TRACKED {
            return Ok(then(ctx, pkt, &flow, key, v, cfg));
        }
    }
    let conn = flows::get(&flow, cfg);
    let v = match conn {
        Some(c) => tracked_with_slow(ctx, pkt, &flow, c, cfg),
        None if pkt.is_tcp() => unknown_tcp(ctx, pkt, &flow, key, cfg),
        None => {
            // SAFETY: the program never inserts into or removes from `services`, and its
            // elements are preallocated: the value stays valid for the run (the daemon may
            // change or remove it meanwhile).
            let Some(svc) = (unsafe { maps::services.get(key) }) else {
                return Ok(xdp_action::XDP_PASS);
            };
            flow_to_balance(&flow, svc, SynProbe::NONE, false, cfg)
        }
    };
    Ok(then(ctx, pkt, &flow, key, v, cfg))
}

/// The steps a first sub-program's answer asks for, each called from here (see `next`).
#[inline(always)]
fn then(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    key: &ServiceKey,
    v: u32,
    cfg: &Config,
) -> u32 {
    let mut v = v;
    if v == next::REBALANCE {
        // SAFETY: the program never inserts into or removes from `services`, and its
        // elements are preallocated: the value stays valid for the run (the daemon may
        // change or remove it meanwhile).
        let Some(svc) = (unsafe { maps::services.get(key) }) else {
            return xdp_action::XDP_PASS;
        };
        // A SYN stays a SYN: its flow begins a handshake, and ends 10 s later if that
        // does not complete (a client retries its SYN for a minute and more).
        let syn = if pkt.is_tcp() && pkt.opens() {
            syn_probe(ctx, pkt)
        } else {
            SynProbe::NONE
        };
        v = flow_to_balance(flow, svc, syn, true, cfg);
    }
    if v == next::NEW_FLOW {
        v = balance::new_flow(ctx, pkt, cfg);
    }
    if v == next::DIRECT_FLOW || v == next::DIRECT_SEND {
        v = direct::step(ctx, pkt, v, cfg);
    }
    if v == next::OPEN_COOKIE {
        v = balance::cookie_flow(ctx, pkt, cfg);
    }
    if v == next::SCAN {
        v = ports::scan();
        if v == next::CONTINUE {
            v = balance::scan_flow(ctx, pkt);
        }
    }
    // Only a SYN's first step may hand the packet to a tracked flow.
    if v > xdp_action::XDP_REDIRECT && v != next::TOO_BIG {
        return next::drop(DropReason::MapUpdate);
    }
    v
}

/// Leaves a new flow in the scratch space for `balance::new_flow`: `next::NEW_FLOW`.
#[inline(always)]
fn flow_to_balance(
    flow: &FlowKey,
    svc: &ServiceInfo,
    syn: SynProbe,
    rebalanced: bool,
    cfg: &Config,
) -> u32 {
    next::verdict(leave_flow(flow, svc, syn, rebalanced, cfg).map(|()| next::NEW_FLOW))
}

/// Writes a new flow into the scratch space, for the next step to balance.
#[inline(always)]
fn leave_flow(
    flow: &FlowKey,
    svc: &ServiceInfo,
    syn: SynProbe,
    rebalanced: bool,
    cfg: &Config,
) -> Result<(), DropReason> {
    let f = balance::flow_slot().ok_or(DropReason::MapUpdate)?;
    f.key = *flow;
    f.hash = hash(flow, cfg);
    f.pick = pick_hash(flow, svc, f.hash, cfg);
    f.svc = *svc;
    f.syn = syn;
    f.rebalanced = rebalanced;
    Ok(())
}

#[inline(always)]
fn hash(flow: &FlowKey, cfg: &Config) -> u64 {
    flow_hash(
        cfg.flow_key,
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    )
}

/// The hash that picks a new flow's backend: the flow's own `hash`, or, for a service
/// balanced by client address, one without the client's port.
#[inline(always)]
fn pick_hash(flow: &FlowKey, svc: &ServiceInfo, hash: u64, cfg: &Config) -> u64 {
    if svc.flags & SERVICE_HASH_SRC_IP == 0 {
        return hash;
    }
    client_hash(flow, cfg)
}

/// The flow's hash with the client's port left out. Not inlined: a second SipHash state in
/// its callers' frames overflows the verifier's 512-byte stack on the deepest call chain
/// (and only services hashed by client address pay for the call).
#[inline(never)]
fn client_hash(flow: &FlowKey, cfg: &Config) -> u64 {
    flow_hash(
        cfg.flow_key,
        flow.src_addr,
        flow.dst_addr,
        0,
        flow.dst_port,
        flow.proto,
    )
}

/// A SYN: a new connection (`next::NEW_FLOW`, its flow left in the scratch space), or lb's
/// cookie SYN-ACK in cookie mode (`next::COOKIE_SYN`). `next::TRACKED` when a tracked flow
/// of its 5-tuple takes it.
#[inline(never)]
fn syn(ctx: &XdpContext, pkt: &Packet, flow: &FlowKey, key: &ServiceKey, cfg: &Config) -> u32 {
    next::verdict(try_syn(ctx, pkt, flow, key, cfg))
}

#[inline(always)]
fn try_syn(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    key: &ServiceKey,
    cfg: &Config,
) -> Result<u32, DropReason> {
    let Some(svc) = vips::service(key) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let now = track::now();
    flood::count_syn(now, cfg);
    // lb never sees a direct flow's backend answer, so it cannot stand in for it.
    if flood::cookies(cfg) && !direct::is_direct(&svc) {
        // A retry of a handshake begun before, or a SYN on a live connection, goes on.
        if let Some(c) = flows::get(flow, cfg)
            // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live
            // as long as the map. Other CPUs may change it meanwhile (see `flows`).
            && unsafe { &*c }.takes_syn(pkt.seq(), pkt.proto, now, cfg)
        {
            return Ok(next::TRACKED);
        }
        let pick = pick_hash(flow, &svc, hash(flow, cfg), cfg);
        let (id, _) = select::pick(&svc, slot_hash(pick)).ok_or(DropReason::NoBackend)?;
        maps::scratch_space()
            .ok_or(DropReason::MapUpdate)?
            .cookie_backend = id;
        return Ok(next::COOKIE_SYN);
    }
    Ok(flow_to_balance(flow, &svc, syn_probe(ctx, pkt), false, cfg))
}

/// lb's cookie SYN-ACK for a SYN (its backend's id left in the scratch space).
#[inline(never)]
fn cookie_syn(ctx: &XdpContext, pkt: &Packet, flow: &FlowKey, cfg: &Config) -> u32 {
    let Some(scratch) = maps::scratch_space() else {
        return next::drop(DropReason::MapUpdate);
    };
    let backend_id = scratch.cookie_backend;
    next::verdict(cookie::answer_syn(
        ctx,
        pkt,
        flow,
        backend_id,
        track::now(),
        cfg,
    ))
}

/// A SYN's sequence number and timestamp.
#[inline(always)]
fn syn_probe(ctx: &XdpContext, pkt: &Packet) -> SynProbe {
    let (tsval, has) = tcpopt::syn_tsval(ctx, pkt);
    SynProbe {
        seq: pkt.seq(),
        tsval,
        flags: PROBE_SYN | if has { PROBE_TS } else { 0 },
    }
}

/// A TCP packet (not a SYN) of no tracked flow: the answer to a SYN cookie opens the
/// backend side (`next::OPEN_COOKIE`, the flow and the answer left in the scratch space);
/// anything else is dropped, with no state made for it.
#[inline(never)]
fn unknown_tcp(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    key: &ServiceKey,
    cfg: &Config,
) -> u32 {
    next::verdict(try_unknown_tcp(ctx, pkt, flow, key, cfg))
}

#[inline(always)]
fn try_unknown_tcp(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    key: &ServiceKey,
    cfg: &Config,
) -> Result<u32, DropReason> {
    // SAFETY: the program never inserts into or removes from `services`, and its elements
    // are preallocated: the value stays valid for the run (the daemon may change or remove
    // it meanwhile).
    let Some(svc) = (unsafe { maps::services.get(key) }) else {
        return Ok(xdp_action::XDP_PASS);
    };
    // A direct flow lb does not know goes where the table says: another node carried it
    // until now, and picked the same backend.
    if direct::is_direct(svc) {
        return Ok(flow_to_balance(flow, svc, SynProbe::NONE, false, cfg));
    }
    if !pkt.plain_ack() {
        return Err(DropReason::UnknownFlow);
    }
    if answers_cookie(ctx, pkt, flow, svc, true, cfg)? {
        Ok(next::OPEN_COOKIE)
    } else {
        Err(DropReason::UnknownFlow)
    }
}

/// A plain ACK of a tracked flow that is over (closed, or expired): it may answer the
/// cookie lb sent a new connection on the same 5-tuple (a client reuses its port as soon
/// as its side is closed), which then opens the backend side (`next::OPEN_COOKIE`) in
/// place of the old flow. `next::CONTINUE` when it does not: the old flow's last ACKs.
#[inline(never)]
fn cookie_ack(ctx: &XdpContext, pkt: &Packet, flow: &FlowKey, cfg: &Config) -> u32 {
    let key = ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto);
    // SAFETY: the program never inserts into or removes from `services`, and its elements
    // are preallocated: the value stays valid for the run (the daemon may change or remove
    // it meanwhile).
    let Some(svc) = (unsafe { maps::services.get(&key) }) else {
        return next::CONTINUE;
    };
    match answers_cookie(ctx, pkt, flow, svc, false, cfg) {
        Ok(true) => next::OPEN_COOKIE,
        Ok(false) => next::CONTINUE,
        Err(reason) => next::drop(reason),
    }
}

/// Whether plain ACK `pkt` answers one of lb's cookies; if so, the flow and the answer
/// are left in the scratch space for `balance::cookie_flow`. A bad cookie is counted when
/// `count_invalid` says the ACK had nothing else to be.
#[inline(always)]
fn answers_cookie(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    svc: &ServiceInfo,
    count_invalid: bool,
    cfg: &Config,
) -> Result<bool, DropReason> {
    let Some(answer) = cookie::check_ack(ctx, pkt, flow, track::now(), count_invalid, cfg) else {
        return Ok(false);
    };
    let syn = SynProbe {
        seq: answer.isn,
        tsval: answer.syn.tsval,
        flags: PROBE_SYN
            | if answer.syn.flags & lb_common::flow::SYN_TIMESTAMPS != 0 {
                PROBE_TS
            } else {
                0
            },
    };
    leave_flow(flow, svc, syn, false, cfg)?;
    maps::scratch_space().ok_or(DropReason::MapUpdate)?.answer = answer;
    Ok(true)
}

/// What a tracked flow's packet has been through already (`tracked`'s `seen`).
const SEEN_SLOW: u32 = 1;
const SEEN_COOKIE: u32 = 2;

/// A tracked flow's packet, with the turns of the cookie check and of the slow path first
/// where its flow needs them.
#[inline(always)]
fn tracked_with_slow(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    conn: *mut Conn,
    cfg: &Config,
) -> u32 {
    let mut v = tracked(ctx, pkt, conn, 0, cfg);
    if v == next::COOKIE_ACK {
        v = cookie_ack(ctx, pkt, flow, cfg);
        if v != next::CONTINUE {
            return v;
        }
        v = tracked(ctx, pkt, conn, SEEN_COOKIE, cfg);
    }
    if v != next::SLOW {
        return v;
    }
    let v = slow(ctx, pkt, flow, conn, cfg);
    if v != next::CONTINUE {
        return v;
    }
    // The cookie check comes before the slow path, so it has had its turn (or had none
    // to take) by now.
    tracked(ctx, pkt, conn, SEEN_COOKIE | SEEN_SLOW, cfg)
}

/// A packet of a tracked flow: it keeps its backend (its `Conn` proves the service, so no
/// service lookup), unless that backend went away or the flow expired (`next::REBALANCE`).
/// A plain ACK of a flow that is over goes to `cookie_ack` first (`next::COOKIE_ACK`), and
/// a flow marked slow to [`slow`] (`next::SLOW`); `seen` (`SEEN_*`) says which have.
#[inline(never)]
fn tracked(ctx: &XdpContext, pkt: &Packet, conn: *mut Conn, seen: u32, cfg: &Config) -> u32 {
    next::verdict(try_tracked(ctx, pkt, conn, seen, cfg))
}

#[inline(always)]
fn try_tracked(
    ctx: &XdpContext,
    pkt: &Packet,
    conn: *mut Conn,
    seen: u32,
    cfg: &Config,
) -> Result<u32, DropReason> {
    if pkt.ttl_expires() {
        return Err(DropReason::TtlExceeded);
    }
    // SAFETY: `conn` is `flows::get`'s non-null `conntrack` slot; array values live as long
    // as the map. Other CPUs may change it meanwhile (see `flows`).
    let c = unsafe { &mut *conn };
    let now = track::now();
    let expired = c.expired(pkt.proto, now, cfg);
    if (expired || c.closed()) && pkt.is_tcp() && pkt.plain_ack() && seen & SEEN_COOKIE == 0 {
        return Ok(next::COOKIE_ACK);
    }
    let backend = match maps::backends.get(c.backend_id) {
        // Backends are retired when their service goes, so an active one means the
        // service is still there.
        Some(b) if b.is_active() && b.generation == c.backend_generation && !expired => *b,
        // Its backend is gone, or it expired: balance it again, and track it at once.
        _ => return Ok(next::REBALANCE),
    };
    if c.flags & CONN_DIRECT != 0 {
        return direct::tracked(pkt, c, &backend, now, cfg);
    }
    // A FIN or reset of any flow, and every segment of a flow in its handshake or close.
    if (c.flags & CONN_SLOW != 0 || pkt.closes()) && seen & SEEN_SLOW == 0 {
        return Ok(next::SLOW);
    }
    let hop = forward::backend_hop(ctx, pkt, pkt.ip_len, c.backend_id, backend.addr, now, cfg)?;
    track::touch(c, now, cfg);
    nat::rewrite(pkt, c.snat_addr, c.snat_port, backend.addr, backend.port);
    stats::count(c.service_id, c.backend_id, pkt.ip_len as u64);
    Ok(forward::send(ctx, pkt, hop))
}

/// The client side of a flow whose handshake or close is under way, or that lb opened
/// behind a cookie: state, and translation. A verdict when the packet was used otherwise,
/// else `next::CONTINUE`.
#[inline(never)]
fn slow(ctx: &XdpContext, pkt: &Packet, flow: &FlowKey, conn: *mut Conn, cfg: &Config) -> u32 {
    match try_slow(ctx, pkt, flow, conn, cfg) {
        Ok(Some(v)) => v,
        Ok(None) => next::CONTINUE,
        Err(reason) => next::drop(reason),
    }
}

#[inline(always)]
fn try_slow(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    conn: *mut Conn,
    cfg: &Config,
) -> Result<Option<u32>, DropReason> {
    // SAFETY: `conn` is `flows::get`'s non-null `conntrack` slot; array values live as long
    // as the map. Other CPUs may change it meanwhile (see `flows`).
    let c = unsafe { &mut *conn };
    let Some(backend) = maps::backends.get(c.backend_id) else {
        return Ok(None);
    };
    let now = track::now();
    if pkt.is_tcp() {
        track::client_segment(ctx, pkt, flow, c, backend, now, cfg);
    }
    if c.flags & CONN_SYNPROXY == 0 {
        return Ok(None);
    }
    if c.flags & CONN_BACKEND_OPEN == 0 {
        // The backend has not answered lb's SYN: this segment carries it again.
        // SAFETY: `parse` checked the IP header against data_end, and the verifier refuses
        // a packet pointer kept across a resize.
        let ttl = unsafe { (*pkt.ip).ttl } - 1;
        let hop = forward::backend_hop(ctx, pkt, pkt.ip_len, c.backend_id, backend.addr, now, cfg)?;
        cookie::syn_to_backend(ctx, c, backend, ttl)?;
        return forward::send_rewritten(ctx, hop).map(Some);
    }
    let opts = tcpopt::read(ctx, pkt);
    tcpopt::translate(ctx, &opts, &cookie::client_translation(c));
    Ok(None)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
