//! Frames whose next hop has no neighbour entry yet. XDP cannot resolve a MAC address, so
//! the rewritten frame goes up to the kernel with its egress interface in the XDP
//! metadata, and `lb_kernel_hop`, lb's tc ingress program on the same interface, sends it
//! there with `bpf_redirect_neigh`: the kernel resolves the neighbour (queueing the frame
//! meanwhile) and transmits it, as it does for its own packets. The entry it makes then
//! serves the next packets from XDP. Without this a fresh node dropped every reply toward
//! a client it had never spoken to (`no_neighbor`) until something else resolved it.
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    helpers::generated::{bpf_redirect_neigh, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use lb_common::{kernel_hop::KernelHopMeta as Meta, stats::DropReason};

const META_LEN: usize = Meta::LEN;

/// Hands the rewritten frame to the kernel, to be sent out of `ifindex` once its next hop
/// is resolved. The last thing done with a frame: its packet pointers are stale after.
#[inline(always)]
pub fn send_via_kernel(ctx: &XdpContext, ifindex: u32) -> u32 {
    // SAFETY: a BPF helper call with the program's context and a length change; no packet
    // pointer is used after it without being derived afresh.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(META_LEN as i32)) } != 0 {
        // A driver without XDP metadata: nothing can carry the frame to tc.
        return crate::next::drop(DropReason::NoNeighbor);
    }
    let (meta, end) = (ctx.metadata(), ctx.metadata_end());
    if meta + META_LEN > end {
        return crate::next::drop(DropReason::NoNeighbor);
    }
    // SAFETY: checked above against the start of the frame, which bounds the metadata.
    unsafe {
        (meta as *mut Meta).write_unaligned(Meta::new(ifindex));
    }
    xdp_action::XDP_PASS
}

/// tc ingress: a frame XDP handed up with [`send_via_kernel`] leaves through the kernel's
/// neighbour layer; any other goes on as usual.
#[inline(always)]
pub fn from_xdp(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context's fields, which the kernel fills for every tc program.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + META_LEN > data {
        return TC_ACT_OK;
    }
    // SAFETY: checked above against the start of the frame, which bounds the metadata.
    let m = unsafe { (meta as *const Meta).read_unaligned() };
    if m.magic != Meta::MAGIC {
        return TC_ACT_OK;
    }
    // SAFETY: a BPF helper call with an interface index and no parameter block: the kernel
    // routes the frame by its own header and resolves the next hop itself.
    unsafe { bpf_redirect_neigh(m.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
