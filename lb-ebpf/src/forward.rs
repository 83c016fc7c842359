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
    config::{
        Config, FIB_CACHE_TTL_S, FibKey, HOP_VIA_GATEWAY, HOP_VIA_KERNEL, IFACE_TX_BY_REDIRECT,
        NextHop,
    },
    stats::DropReason,
};

use crate::{kernel_hop, maps, parse::Packet};

const AF_INET: u8 = 2;

/// Whether a remembered next hop may still be used for a packet of IP length `len`: not
/// expired, and no larger than one the FIB accepted for the egress MTU.
#[inline(always)]
pub fn fresh(hop: &NextHop, len: u16, now: u64) -> bool {
    hop.expires > now && len <= hop.max_len
}

/// The next hop to backend `id` at `addr` for a packet of IP length `len` as it will
/// leave (with any encapsulation): from `backend_hops` while that is fresh, else from the
/// FIB (and then kept there). Shared by all the backend's flows, so it is usually in the
/// cache.
#[inline(always)]
pub fn backend_hop(
    ctx: &XdpContext,
    pkt: &Packet,
    len: u16,
    id: u32,
    addr: [u8; 4],
    now: u64,
    cfg: &Config,
) -> Result<&'static NextHop, DropReason> {
    let Some(kept) = maps::backend_hops.get_ptr_mut(id) else {
        return Err(DropReason::NoRoute);
    };
    // SAFETY: non-null from the lookup; array values live as long as the map. All CPUs
    // share it and may rewrite it at once (see below).
    let kept = unsafe { &mut *kept };
    if fresh(kept, len, now) {
        return Ok(kept);
    }
    let hop = fib(
        ctx,
        pkt,
        len,
        [0; 4],
        addr,
        now + cfg.jiffies(FIB_CACHE_TTL_S),
    )?;
    // Shared by all CPUs: invalidated first and made valid last, so that a reader who
    // checks it after the rewrite began never takes it for fresh. Volatile stores: plain
    // ones were reordered, and the first dropped as dead, by the compiler.
    macro_rules! put {
        ($f:ident, $v:expr) => {
            // SAFETY: a field of the entry `kept` points at, which is valid (see above).
            unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(kept.$f), $v) }
        };
    }
    put!(expires, 0);
    put!(ifindex, hop.ifindex);
    put!(max_len, hop.max_len);
    put!(smac, hop.smac);
    put!(dmac, hop.dmac);
    put!(src_addr, hop.src_addr);
    put!(snat_count, hop.snat_count);
    put!(flags, hop.flags);
    put!(expires, hop.expires);
    Ok(kept)
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
    // SAFETY: LRU elements are preallocated, so the value stays valid for the run, and it
    // is copied out before the insert below. Another CPU's insert may recycle it meanwhile.
    if let Some(e) = unsafe { maps::fib_cache.get(&key) }
        && fresh(e, pkt.ip_len, now)
    {
        return Ok(*e);
    }
    let hop = fib(
        ctx,
        pkt,
        pkt.ip_len,
        src,
        dst,
        now + cfg.jiffies(FIB_CACHE_TTL_S),
    )?;
    // A full cache only costs speed, never correctness.
    if hop.flags & HOP_VIA_KERNEL == 0 {
        let _ = maps::fib_cache.insert(&key, &hop, 0);
    }
    Ok(hop)
}

/// Asks the FIB for the route from `src` to `dst` of a packet that came in on the
/// context's interface and leaves `len` bytes long (IP); the answer may be kept until
/// `expires`. The parameter block lives in the per-CPU scratch map, not on the stack.
/// Too large for the route's MTU: `FragNeeded`, with that MTU left in the scratch space
/// for the ICMP answer (`icmp::too_big`).
#[inline(always)]
fn fib(
    ctx: &XdpContext,
    pkt: &Packet,
    len: u16,
    src: [u8; 4],
    dst: [u8; 4],
    expires: u64,
) -> Result<NextHop, DropReason> {
    let scratch = maps::scratch_space().ok_or(DropReason::NoRoute)?;
    let p = &mut scratch.fib;
    // Every field the helper reads is set; the output fields are written by it.
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.sport = 0;
    p.dport = 0;
    p.__bindgen_anon_1.tot_len = len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_2.tos = 0;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    p.__bindgen_anon_5.tbid = 0;
    // SAFETY: a BPF helper call with arguments of the types it documents: the context, a
    // parameter block in the scratch map and its size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    // A route without the next hop's MAC (the FIB still names the egress interface): the
    // kernel sends the frame and resolves the neighbour, and the hop is asked for again.
    let (mut flags, expires) = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => (0, expires),
        BPF_FIB_LKUP_RET_NO_NEIGH => (HOP_VIA_KERNEL, 0),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: on this answer the helper wrote the route's MTU over `tot_len`.
            scratch.too_big_mtu = unsafe { p.__bindgen_anon_1.mtu_result };
            return Err(DropReason::FragNeeded);
        }
        _ => return Err(DropReason::NoRoute),
    };
    // The helper puts the gateway's address in place of the destination's.
    // SAFETY: an IPv4 lookup writes and reads the IPv4 member.
    if unsafe { p.__bindgen_anon_4.ipv4_dst } != u32::from_ne_bytes(dst) {
        flags |= HOP_VIA_GATEWAY;
    }
    // No address on the egress interface: a new flow there is dropped.
    // SAFETY: the program never inserts into or removes from `iface_addrs`, and its
    // elements are preallocated: the value stays valid for the run.
    let (src_addr, snat_count, iface_flags) = match unsafe { maps::iface_addrs.get(&p.ifindex) } {
        Some(a) if a.count > 0 => (a.addrs[0], a.count, a.flags),
        Some(a) => ([0; 4], 0, a.flags),
        None => ([0; 4], 0, 0),
    };
    Ok(NextHop {
        ifindex: p.ifindex,
        max_len: len,
        smac: p.smac,
        dmac: p.dmac,
        src_addr,
        snat_count,
        flags: iface_flags | flags,
        expires,
    })
}

/// Puts the next hop's MACs on the frame and sends it: back out of the same interface
/// with `XDP_TX`, or to another one with `XDP_REDIRECT`.
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, hop: &NextHop) -> u32 {
    if hop.flags & HOP_VIA_KERNEL != 0 {
        return kernel_hop::send_via_kernel(ctx, hop.ifindex);
    }
    put_macs(pkt.eth(), hop);
    verdict(ctx, hop)
}

/// [`send`] for a frame lb rewrote whole (its earlier pointers no longer hold).
#[inline(always)]
pub fn send_rewritten(ctx: &XdpContext, hop: &NextHop) -> Result<u32, DropReason> {
    if hop.flags & HOP_VIA_KERNEL != 0 {
        return Ok(kernel_hop::send_via_kernel(ctx, hop.ifindex));
    }
    let eth: *mut [u8; 14] = crate::parse::ptr_at(ctx, 0)?;
    put_macs(eth as *mut u8, hop);
    Ok(verdict(ctx, hop))
}

#[inline(always)]
fn put_macs(eth: *mut u8, hop: &NextHop) {
    // Word writes: a plain `[u8; 6]` assignment becomes a call to a byte-loop memmove.
    let (d, s) = (&hop.dmac, &hop.smac);
    // SAFETY: callers pass the start of a frame whose Ethernet header was checked against
    // data_end (`parse`, `ptr_at`); the writes are unaligned.
    unsafe {
        (eth as *mut u32).write_unaligned(u32::from_ne_bytes([d[0], d[1], d[2], d[3]]));
        (eth.add(4) as *mut u16).write_unaligned(u16::from_ne_bytes([d[4], d[5]]));
        (eth.add(6) as *mut u16).write_unaligned(u16::from_ne_bytes([s[0], s[1]]));
        (eth.add(8) as *mut u32).write_unaligned(u32::from_ne_bytes([s[2], s[3], s[4], s[5]]));
    }
}

#[inline(always)]
fn verdict(ctx: &XdpContext, hop: &NextHop) -> u32 {
    if hop.ifindex == ctx.ingress_ifindex() as u32 && hop.flags & IFACE_TX_BY_REDIRECT == 0 {
        xdp_action::XDP_TX
    } else {
        redirect(hop.ifindex)
    }
}

/// Sends the frame out of `ifindex`: XDP_REDIRECT, or XDP_ABORTED on a bad index (bounded
/// so that the verifier knows a verdict from a sub-program is never `CONTINUE`).
#[inline(always)]
pub fn redirect(ifindex: u32) -> u32 {
    // SAFETY: a BPF helper call with plain integer arguments: no memory passed.
    match unsafe { bpf_redirect(ifindex, 0) } as u32 {
        xdp_action::XDP_REDIRECT => xdp_action::XDP_REDIRECT,
        _ => xdp_action::XDP_ABORTED,
    }
}
