//! Direct server return: a flow of a `dsr` or `dsr-l2` service reaches its backend with
//! the client's packet untouched, so that the backend sees the client's address and
//! answers it itself. `dsr` wraps the packet in an outer IPv4 header addressed to the
//! backend (IPIP, as Katran does); `dsr-l2` only puts the backend's MAC on it (IPVS's
//! direct routing), for backends on the balancer's own segment.
//!
//! A flow holds no SNAT port and lb sees only its client's side. Its conntrack entry keeps
//! its backend while the table changes; a packet of a flow lb does not track (another node
//! carried it, or lb lost its maps) is balanced by the same table, so every node with the
//! same backends sends it to the same one.
use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    config::{Config, HOP_VIA_GATEWAY, HOP_VIA_KERNEL},
    flow::{CONN_CLIENT_FIN, CONN_DIRECT_IPIP, CONN_DIRECT_L2, CONN_SPREAD_SOURCE, Conn},
    hash::slot_hash,
    service::{Backend, SERVICE_DSR_IPIP, SERVICE_DSR_L2, SERVICE_DSR_SPREAD_SOURCE, ServiceInfo},
    stats::DropReason,
};
use network_types::eth::EthHdr;

use crate::{
    emit,
    flows::{self, Insert},
    forward, maps, next,
    parse::{Packet, ptr_at},
    select, stats,
    track::{self, Assignment},
};

/// The outer IPv4 header's length: what IPIP adds.
pub const IPIP_LEN: u16 = 20;
const IPPROTO_IPIP: u8 = 4;
/// The outer header's TTL (the inner one is left as the client sent it).
const OUTER_TTL: u8 = 64;
const IP_DF: u8 = 0x40;

/// Whether the service's flows go straight to their backends.
#[inline(always)]
pub fn is_direct(svc: &ServiceInfo) -> bool {
    svc.flags & (SERVICE_DSR_IPIP | SERVICE_DSR_L2) != 0
}

/// The `CONN_*` flags of a flow of a service with flags `svc_flags`.
#[inline(always)]
fn conn_flags(svc_flags: u32) -> u16 {
    if svc_flags & SERVICE_DSR_IPIP != 0 {
        if svc_flags & SERVICE_DSR_SPREAD_SOURCE != 0 {
            CONN_DIRECT_IPIP | CONN_SPREAD_SOURCE
        } else {
            CONN_DIRECT_IPIP
        }
    } else {
        CONN_DIRECT_L2
    }
}

/// A direct flow's backend, left in the scratch space for [`try_send`] (a tracked flow's
/// is chosen in `tracked`, whose frame the send then does not sit on).
#[derive(Clone, Copy)]
pub struct Chosen {
    id: u32,
    backend: Backend,
    /// The flow's `CONN_DIRECT_*` flags.
    flags: u16,
}

/// Leaves the choice in the scratch space: `next::DIRECT_SEND`.
#[inline(always)]
fn choose(id: u32, backend: &Backend, flags: u16) -> Result<u32, DropReason> {
    let c = &mut maps::scratch_space().ok_or(DropReason::MapUpdate)?.direct;
    c.id = id;
    c.backend = *backend;
    c.flags = flags;
    Ok(next::DIRECT_SEND)
}

/// A direct flow's steps: a new flow (`next::DIRECT_FLOW`) is balanced and tracked, and
/// the packet of a flow whose backend is chosen (`next::DIRECT_SEND`) is sent. A verdict.
#[inline(never)]
pub fn step(ctx: &XdpContext, pkt: &Packet, v: u32, cfg: &Config) -> u32 {
    let mut v = v;
    if v == next::DIRECT_FLOW {
        v = next::verdict(try_new_flow(pkt, cfg));
    }
    if v == next::DIRECT_SEND {
        v = next::verdict(try_send(ctx, pkt, cfg));
    }
    v
}

/// Balances the new flow in the scratch space and tracks it: `next::DIRECT_SEND`, its
/// choice left for [`try_send`].
#[inline(always)]
fn try_new_flow(pkt: &Packet, cfg: &Config) -> Result<u32, DropReason> {
    let scratch = maps::scratch_space().ok_or(DropReason::MapUpdate)?;
    let f = &scratch.flow;
    let (id, backend) = select::pick(&f.svc, slot_hash(f.pick)).ok_or(DropReason::NoBackend)?;
    let now = track::now();
    let flags = conn_flags(f.svc.flags);
    let to = Assignment {
        service_id: f.svc.id,
        backend_id: id,
        backend_generation: backend.generation,
    };
    let conn = &mut scratch.conn;
    track::write_conn(conn, &to, ([0; 4], 0), flags, f.syn.seq, now);
    // A full table costs the flow only its stickiness across a change of backends: it is
    // sent where the table says all the same.
    let _ = flows::insert(&f.key, conn, Insert::Replace, cfg);
    stats::count(to.service_id, id, pkt.ip_len as u64);
    choose(id, &backend, flags)
}

/// A packet of a tracked direct flow, whose backend `backend` the caller found current:
/// `next::DIRECT_SEND`.
#[inline(always)]
pub fn tracked(
    pkt: &Packet,
    c: &mut Conn,
    backend: &Backend,
    now: u64,
    cfg: &Config,
) -> Result<u32, DropReason> {
    // lb never sees the backend's side of the close: the client's FIN or reset only
    // shortens the flow's timeout to a close's.
    if pkt.closes() && c.flags & CONN_CLIENT_FIN == 0 {
        c.flags |= CONN_CLIENT_FIN;
    }
    track::touch(c, now, cfg);
    stats::count(c.service_id, c.backend_id, pkt.ip_len as u64);
    choose(c.backend_id, backend, c.flags)
}

/// Sends the client's packet to the backend [`choose`] left in the scratch space, as the
/// flow's `CONN_DIRECT_*` flags say.
#[inline(always)]
fn try_send(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> Result<u32, DropReason> {
    let c = &maps::scratch_space().ok_or(DropReason::MapUpdate)?.direct;
    let (id, backend, flags) = (c.id, c.backend, c.flags);
    let now = track::now();
    if flags & CONN_DIRECT_IPIP == 0 {
        let hop = forward::backend_hop(ctx, pkt, pkt.ip_len, id, backend.addr, now, cfg)?;
        // Handed to the kernel, the frame would be routed by its destination, the VIP.
        if hop.flags & HOP_VIA_GATEWAY != 0 {
            return Err(DropReason::NoRoute);
        }
        if hop.flags & HOP_VIA_KERNEL != 0 {
            return Err(DropReason::NoNeighbor);
        }
        return Ok(forward::send(ctx, pkt, hop));
    }
    let len = pkt.ip_len.saturating_add(IPIP_LEN);
    let hop = match forward::backend_hop(ctx, pkt, len, id, backend.addr, now, cfg) {
        Ok(hop) => hop,
        Err(DropReason::FragNeeded) => {
            // The client's packet must leave room for the outer header.
            if let Some(s) = maps::scratch_space() {
                s.too_big_mtu = s.too_big_mtu.saturating_sub(IPIP_LEN);
            }
            return Err(DropReason::FragNeeded);
        }
        Err(e) => return Err(e),
    };
    let src = if flags & CONN_SPREAD_SOURCE != 0 {
        spread_source(pkt)
    } else {
        hop.src_addr
    };
    if src == [0; 4] {
        return Err(DropReason::NoSnatAddress);
    }
    encap(ctx, pkt, src, backend.addr)?;
    forward::send_rewritten(ctx, hop)
}

/// A per-flow outer source in 172.16.0.0/16, from the client's address and port (Katran's
/// scheme): client a.b.c.d port P gives 172.16.(c ^ P's low byte).(d ^ P's high byte).
#[inline(always)]
fn spread_source(pkt: &Packet) -> [u8; 4] {
    let (c, p) = (pkt.src_addr(), pkt.src_port());
    [172, 16, c[2] ^ (p & 0xff) as u8, c[3] ^ (p >> 8) as u8]
}

/// Puts an outer IPv4 header from `src` to `dst` in front of the packet's own: TTL 64,
/// protocol IPIP, the inner header's TOS and DF bit, identification 0. The Ethernet header
/// in front of it is the caller's to fill (its type is set here).
#[inline(always)]
fn encap(ctx: &XdpContext, pkt: &Packet, src: [u8; 4], dst: [u8; 4]) -> Result<(), DropReason> {
    // SAFETY: `parse` checked the IP header against data_end; read before the resize,
    // after which the verifier refuses these pointers.
    let (tos, df) = unsafe { ((*pkt.ip).tos, (*pkt.ip).frags[0] & IP_DF) };
    let tot = pkt.ip_len.saturating_add(IPIP_LEN).to_be_bytes();
    // SAFETY: a BPF helper call with the program's context and a length change; every
    // packet pointer below is derived afresh.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPIP_LEN as i32)) } != 0 {
        return Err(DropReason::NoRoom);
    }
    let eth: *mut [u8; EthHdr::LEN] = ptr_at(ctx, 0)?;
    let ip: *mut [u8; 20] = ptr_at(ctx, EthHdr::LEN)?;
    let w0 = [0x45, tos, tot[0], tot[1]];
    let w1 = [0, 0, df, 0];
    let mut sum = emit::sum_words(0, &w0);
    sum = emit::sum_words(sum, &w1);
    sum = emit::sum_words(sum, &[OUTER_TTL, IPPROTO_IPIP, 0, 0]);
    sum = emit::sum_words(sum, &src);
    sum = emit::sum_words(sum, &dst);
    let check = emit::fold(sum).to_ne_bytes();
    let words = ip as *mut [u8; 4];
    // SAFETY: `ptr_at` checked the 14-byte Ethernet and 20-byte IP headers against
    // data_end; the writes are unaligned.
    unsafe {
        (eth as *mut u8)
            .add(12)
            .cast::<[u8; 2]>()
            .write_unaligned([0x08, 0x00]);
        words.write_unaligned(w0);
        words.add(1).write_unaligned(w1);
        words
            .add(2)
            .write_unaligned([OUTER_TTL, IPPROTO_IPIP, check[0], check[1]]);
        words.add(3).write_unaligned(src);
        words.add(4).write_unaligned(dst);
    }
    Ok(())
}
