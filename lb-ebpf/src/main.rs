//! lb's XDP program.
//!
//! Packet path: parse -> reply of a tracked flow? (reverse NAT) -> service lookup (miss:
//! `XDP_PASS`) -> conntrack -> Maglev select for new flows -> SNAT port -> rewrite ->
//! FIB lookup -> `XDP_TX` / `XDP_REDIRECT`. Every drop is counted by reason in one place.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod maps;
mod nat;
mod parse;
mod select;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    config::Config,
    flow::{CONN_CLOSING, FlowKey, NatReverse, REV_PENDING, SYN_SEEN_SLOTS, SynSeen},
    hash::flow_hash,
    service::{ServiceInfo, ServiceKey},
    stats::DropReason,
};

use crate::{
    conntrack::{Assignment, SnatPort},
    parse::{Packet, Parsed},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count_drop(reason);
            xdp_action::XDP_DROP
        }
    }
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
    if dport >= cfg.snat_port_min && dport <= cfg.snat_port_max {
        let key = FlowKey::new(
            pkt.src_addr(),
            pkt.src_port(),
            pkt.dst_addr(),
            dport,
            pkt.proto,
        );
        if let Some(rev) = maps::nat_reverse.get_ptr_mut(&key) {
            return reply(ctx, &pkt, rev, cfg);
        }
    }
    let key = ServiceKey::new(pkt.dst_addr(), dport, pkt.proto);
    match maps::vip_filter.get(key.filter_slot()) {
        Some(&n) if n > 0 => to_service(ctx, &pkt, &key, cfg),
        _ => Ok(xdp_action::XDP_PASS),
    }
}

/// A client's packet that may be for a service: a tracked flow keeps its backend (its
/// `Conn` proves the service, so no service lookup); anything else is balanced, if the
/// service exists.
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
    let hash = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    let mark = maps::syn_seen.get_ptr_mut(hash & (SYN_SEEN_SLOTS - 1));
    // A SYN opens a connection: it skips the conntrack lookup (a flow is tracked only from
    // its second packet; its retries find their SNAT port again) and leaves a mark, so that
    // an entry left by an earlier connection on the same 5-tuple is not used for this one.
    let tracked = if pkt.opens() {
        if let Some(m) = mark {
            let at = conntrack::now() as u32;
            unsafe { *m = SynSeen { hash, at } };
        }
        None
    } else {
        maps::conntrack.get_ptr_mut(&flow)
    };
    if let Some(conn) = tracked {
        let c = unsafe { &mut *conn };
        // A SYN for this 5-tuple since the flow's last packet: a new connection on a
        // reused port, balanced afresh like a flow whose backend went away.
        let reopened = mark.is_some_and(|m| unsafe { (*m).reopens(hash, c.last_seen) });
        // Backends are retired when their service goes, so an active one means the
        // service is still there.
        // A flow idle past its timeout may have lost its SNAT port to another flow.
        let now = conntrack::now();
        let expired = c.expired(pkt.proto, now, cfg);
        if let Some(backend) = maps::backends.get(c.backend_id) {
            if backend.is_active()
                && backend.generation == c.backend_generation
                && !reopened
                && !expired
            {
                if pkt.ttl_expires() {
                    return Err(DropReason::TtlExceeded);
                }
                if !forward::fresh(&c.hop, pkt, now) {
                    c.hop = forward::to_backend(ctx, pkt, c.backend_id, backend.addr, now, cfg)?;
                }
                if conntrack::due(c, now, cfg) {
                    conntrack::keep_reverse(c, &flow, backend, now);
                }
                conntrack::touch(c, pkt, now, cfg);
                nat::rewrite(pkt, c.snat_addr, c.snat_port, backend.addr, backend.port);
                stats::count(c.service_id, c.backend_id, pkt.ip_len as u64);
                return Ok(forward::send(ctx, pkt, &c.hop));
            }
        }
        // Its backend is gone, it expired, or it is a new connection: balance it again
        // below, and track it at once.
    }
    let Some(svc) = (unsafe { maps::services.get(key) }) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let balance = Balance {
        flow,
        hash,
        svc: *svc,
        rebalanced: tracked.is_some(),
    };
    new_flow(ctx, pkt, &balance, cfg)
}

/// What `new_flow` balances: the client flow, its service, and whether the flow was
/// tracked before (its backend went away).
struct Balance {
    flow: FlowKey,
    /// `flow_hash` of `flow`.
    hash: u32,
    svc: ServiceInfo,
    rebalanced: bool,
}

/// Balances a flow: Maglev picks the backend, a SNAT port is taken, and the flow is
/// tracked from its second packet on (or at once when it is being re-balanced).
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    balance: &Balance,
    cfg: &Config,
) -> Result<u32, DropReason> {
    let (flow, svc, rebalanced) = (&balance.flow, &balance.svc, balance.rebalanced);
    if pkt.ttl_expires() {
        return Err(DropReason::TtlExceeded);
    }
    let now = conntrack::now();
    let hash = balance.hash;
    let (backend_id, backend) = select::pick(svc, hash).ok_or(DropReason::NoBackend)?;
    let hop = forward::to_backend(ctx, pkt, backend_id, backend.addr, now, cfg)?;
    let snat_addr = hop.src_addr;
    if snat_addr == [0; 4] {
        return Err(DropReason::NoSnatAddress);
    }
    // Built in the per-CPU scratch map: the stack has no room for it.
    let scratch = maps::scratch_space().ok_or(DropReason::MapUpdate)?;
    let to = Assignment {
        service_id: svc.id,
        backend_id,
        backend_generation: backend.generation,
    };
    let flags = if rebalanced { 0 } else { REV_PENDING };
    conntrack::write_reverse(&mut scratch.rev, flow, &to, flags, now, &hop);
    let rev = &scratch.rev;
    let snat_port =
        match conntrack::alloc_snat_port(cfg, &backend, snat_addr, pkt.proto, hash, rev, now)? {
            // The first packet of a flow: one insert, the flow is tracked on its next packet.
            SnatPort::New(port) if !rebalanced => port,
            SnatPort::New(port) | SnatPort::Own(port) => {
                let conn = &mut scratch.conn;
                let flags = if pkt.closes() { CONN_CLOSING } else { 0 };
                conntrack::write_conn(conn, &to, (snat_addr, port), flags, now, &hop);
                maps::conntrack
                    .insert(flow, conn, 0)
                    .map_err(|_| DropReason::MapUpdate)?;
                port
            }
        };
    nat::rewrite(pkt, snat_addr, snat_port, backend.addr, backend.port);
    stats::count(svc.id, backend_id, pkt.ip_len as u64);
    Ok(forward::send(ctx, pkt, &hop))
}

/// A backend's reply to a flow lb balanced: restore the VIP as source, the client as
/// destination.
#[inline(always)]
fn reply(
    ctx: &XdpContext,
    pkt: &Packet,
    rev: *mut NatReverse,
    cfg: &Config,
) -> Result<u32, DropReason> {
    if pkt.ttl_expires() {
        return Err(DropReason::TtlExceeded);
    }
    let r = unsafe { &mut *rev };
    let now = conntrack::now();
    if !forward::fresh(&r.hop, pkt, now) {
        r.hop = forward::lookup(ctx, pkt, r.vip_addr, r.client_addr, now, cfg)?;
    }
    conntrack::on_reply(r, pkt, now, cfg);
    nat::rewrite(pkt, r.vip_addr, r.vip_port, r.client_addr, r.client_port);
    stats::count(r.service_id, r.backend_id, pkt.ip_len as u64);
    Ok(forward::send(ctx, pkt, &r.hop))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
