//! Next hop and MAC addresses from the kernel's FIB, and the verdict that sends the frame.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    config::{Config, FIB_CACHE_TTL_S, FibKey, NextHop},
    stats::DropReason,
};

use crate::{maps, parse::Packet};

const AF_INET: u8 = 2;

/// Whether a remembered next hop may still be used for `pkt`: not expired, and the packet
/// no larger than one the FIB accepted for the egress MTU.
#[inline(always)]
pub fn fresh(hop: &NextHop, pkt: &Packet, now: u64) -> bool {
    hop.expires > now && pkt.ip_len <= hop.max_len
}

/// The route from `src` to `dst` of a packet that came in on the context's interface:
/// from `fib_cache` while that is fresh, else from the FIB (and then cached).
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    src: [u8; 4],
    dst: [u8; 4],
    now: u64,
    cfg: &Config,
) -> Result<NextHop, DropReason> {
    let key = FibKey {
        dst,
        ingress_ifindex: ctx.ingress_ifindex() as u32,
    };
    if let Some(e) = unsafe { maps::fib_cache.get(&key) } {
        if fresh(e, pkt, now) {
            return Ok(*e);
        }
    }
    let hop = fib_lookup(ctx, pkt, src, dst, now + cfg.jiffies(FIB_CACHE_TTL_S))?;
    // A full cache only costs speed, never correctness.
    let _ = maps::fib_cache.insert(&key, &hop, 0);
    Ok(hop)
}

#[inline(always)]
fn fib_lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    src: [u8; 4],
    dst: [u8; 4],
    expires: u64,
) -> Result<NextHop, DropReason> {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.__bindgen_anon_1.tot_len = pkt.ip_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: p.ifindex,
            max_len: pkt.ip_len,
            smac: p.smac,
            dmac: p.dmac,
            // No address on the egress interface: forwarding a new flow there fails, later.
            src_addr: unsafe { maps::iface_addrs.get(&p.ifindex) }.map(|a| a.addr).unwrap_or([0; 4]),
            _pad: [0; 2],
            expires,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(DropReason::NoNeighbor),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(DropReason::FragNeeded),
        _ => Err(DropReason::NoRoute),
    }
}

/// Puts the next hop's MACs on the frame and sends it: back out of the same interface
/// with `XDP_TX`, or to another one with `XDP_REDIRECT`.
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, hop: &NextHop) -> u32 {
    unsafe {
        (*pkt.eth).dst_addr = hop.dmac;
        (*pkt.eth).src_addr = hop.smac;
    }
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(hop.ifindex, 0) as u32 }
    }
}
