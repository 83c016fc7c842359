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
    config::{Config, NextHop},
    flow::{CONN_CLOSING, Conn, FlowKey, NatReverse, REV_PENDING},
    hash::flow_hash,
    service::{ServiceInfo, ServiceKey},
    stats::DropReason,
};

use crate::{
    conntrack::SnatPort,
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
    let Some(svc) = (unsafe { maps::services.get(&key) }) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let svc = *svc;
    to_backend(ctx, &pkt, &svc, cfg)
}

/// A client's packet to a service: keep its tracked backend, or balance it.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: &ServiceInfo,
    cfg: &Config,
) -> Result<u32, DropReason> {
    if pkt.ttl_expires() {
        return Err(DropReason::TtlExceeded);
    }
    let client = pkt.src_addr();
    let client_port = pkt.src_port();
    let vip = pkt.dst_addr();
    let vip_port = pkt.dst_port();
    let flow = FlowKey::new(client, client_port, vip, vip_port, pkt.proto);
    let now = conntrack::now();

    let tracked = maps::conntrack.get_ptr_mut(&flow);
    if let Some(conn) = tracked {
        let c = unsafe { &mut *conn };
        if let Some(backend) = maps::backends.get(c.backend_id) {
            if backend.is_active() && backend.generation == c.backend_generation {
                if !forward::fresh(&c.hop, pkt, now) {
                    c.hop = forward::lookup(ctx, pkt, [0; 4], backend.addr, now, cfg)?;
                }
                conntrack::touch(c, pkt, now, cfg);
                nat::rewrite(pkt, c.snat_addr, c.snat_port, backend.addr, backend.port);
                stats::count(svc.id, c.backend_id, pkt.ip_len as u64);
                return Ok(forward::send(ctx, pkt, &c.hop));
            }
        }
        // Its backend is gone: balance the flow again below, and track it at once.
    }

    let hash = flow_hash(client, vip, client_port, vip_port, pkt.proto);
    let (backend_id, backend) = select::pick(svc, hash).ok_or(DropReason::NoBackend)?;
    let hop = forward::lookup(ctx, pkt, [0; 4], backend.addr, now, cfg)?;
    let snat_addr = hop.src_addr;
    if snat_addr == [0; 4] {
        return Err(DropReason::NoSnatAddress);
    }
    let rebalanced = tracked.is_some();
    let rev = NatReverse {
        client_addr: client,
        vip_addr: vip,
        client_port,
        vip_port,
        service_id: svc.id,
        backend_id,
        backend_generation: backend.generation,
        flags: if rebalanced { 0 } else { REV_PENDING },
        _pad: 0,
        last_seen: now,
        // Expired: the first reply looks up the way back to the client.
        hop: NextHop::default(),
    };
    let snat_port =
        match conntrack::alloc_snat_port(cfg, &backend, snat_addr, pkt.proto, hash, &rev, now)? {
            // The first packet of a flow: one insert, the flow is tracked on its next packet.
            SnatPort::New(port) if !rebalanced => port,
            SnatPort::New(port) | SnatPort::Own(port) => {
                let conn = Conn {
                    backend_id,
                    backend_generation: backend.generation,
                    snat_addr,
                    snat_port: port,
                    flags: if pkt.closes() { CONN_CLOSING } else { 0 },
                    last_seen: now,
                    hop,
                };
                maps::conntrack
                    .insert(&flow, &conn, 0)
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
