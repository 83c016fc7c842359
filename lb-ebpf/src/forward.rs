//! Next hop and MAC addresses from the kernel's FIB, and the verdict that sends the frame.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::stats::DropReason;

use crate::parse::Packet;

const AF_INET: u8 = 2;

/// Where a rewritten packet leaves: the egress ifindex and the MACs to put on it.
pub struct NextHop {
    pub ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// Asks the FIB for the route from `src` to `dst` of a packet that came in on the
/// context's interface.
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    src: [u8; 4],
    dst: [u8; 4],
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
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop { ifindex: p.ifindex, smac: p.smac, dmac: p.dmac }),
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
