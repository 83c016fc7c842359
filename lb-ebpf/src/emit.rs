//! Segments lb writes itself, in place of the packet it received: a SYN cookie's SYN-ACK,
//! and the handshake it completes with a backend for a client that answered a cookie.
//! Always an IPv4 header without options and a 40-byte TCP header without payload.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{config::IFACE_TX_BY_REDIRECT, stats::DropReason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    maps,
    parse::{L4_OFF, ptr_at},
};

const TCP_LEN: usize = 40;
const FRAME_LEN: usize = L4_OFF + TCP_LEN;

/// The segment to write.
pub struct Segment {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// TCP flags.
    pub flags: u8,
    pub window: u16,
    pub ttl: u8,
    pub options: [u8; 20],
}

#[inline(always)]
pub fn sum_words(sum: u32, bytes: &[u8; 4]) -> u32 {
    sum + u16::from_ne_bytes([bytes[0], bytes[1]]) as u32
        + u16::from_ne_bytes([bytes[2], bytes[3]]) as u32
}

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Replaces the frame's IP and TCP headers with `seg` (keeping its Ethernet header) and
/// cuts or grows it to fit.
#[inline(always)]
pub fn write(ctx: &XdpContext, seg: &Segment) -> Result<(), DropReason> {
    let len = crate::parse::data_end(ctx) - crate::parse::data(ctx);
    let delta = FRAME_LEN as i32 - len as i32;
    // SAFETY: a BPF helper call with arguments of the types it documents: the program's
    // context and a length change. Every packet pointer is derived afresh after it.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        // No room after the frame (a small packet in a buffer of its own size, as veth
        // gives an option-less SYN): grow at the front instead, into the headroom XDP
        // always has, and move the Ethernet header there.
        // SAFETY: as above: the helper grows the packet at its front by `delta` bytes.
        if !(0..64).contains(&delta) || unsafe { bpf_xdp_adjust_head(ctx.ctx, -delta) } != 0 {
            return Err(DropReason::NoRoom);
        }
        // Masked where the verifier sees it (the compiler drops a mask it can prove).
        let mut off = delta as usize;
        // SAFETY: inline asm that only moves a register to itself: no memory touched.
        unsafe { core::arch::asm!("{0} = {0}", inout(reg) off, options(pure, nomem, nostack)) };
        let old: *mut [u8; 14] = ptr_at(ctx, off & 63)?;
        let new: *mut [u8; 14] = ptr_at(ctx, 0)?;
        // SAFETY: `ptr_at` checked both 14-byte headers against data_end; the accesses are
        // unaligned ones.
        unsafe {
            let (o, n) = (old as *mut u8, new as *mut u8);
            (n as *mut u32).write_unaligned((o as *const u32).read_unaligned());
            (n.add(4) as *mut u32).write_unaligned((o.add(4) as *const u32).read_unaligned());
            (n.add(8) as *mut u32).write_unaligned((o.add(8) as *const u32).read_unaligned());
            (n.add(12) as *mut u16).write_unaligned((o.add(12) as *const u16).read_unaligned());
        }
    }
    let _eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut [u8; 20] = ptr_at(ctx, EthHdr::LEN)?;
    let tcp: *mut [u8; TCP_LEN] = ptr_at(ctx, L4_OFF)?;

    let tot = ((Ipv4Hdr::LEN + TCP_LEN) as u16).to_be_bytes();
    let w0 = [0x45, 0, tot[0], tot[1]];
    // Identification 0, don't fragment.
    let w1 = [0, 0, 0x40, 0];
    let w2 = [seg.ttl, lb_common::IPPROTO_TCP, 0, 0];
    let mut sum = sum_words(0, &w0);
    sum = sum_words(sum, &w1);
    sum = sum_words(sum, &w2);
    sum = sum_words(sum, &seg.src);
    sum = sum_words(sum, &seg.dst);
    let ip_check = fold(sum).to_ne_bytes();
    let ipw = ip as *mut [u8; 4];
    // SAFETY: `ptr_at` checked the 20-byte IP header against data_end: five unaligned
    // words.
    unsafe {
        ipw.write_unaligned(w0);
        ipw.add(1).write_unaligned(w1);
        ipw.add(2)
            .write_unaligned([seg.ttl, lb_common::IPPROTO_TCP, ip_check[0], ip_check[1]]);
        ipw.add(3).write_unaligned(seg.src);
        ipw.add(4).write_unaligned(seg.dst);
    }

    let (sp, dp) = (seg.sport.to_be_bytes(), seg.dport.to_be_bytes());
    let win = seg.window.to_be_bytes();
    let words: [[u8; 4]; 5] = [
        [sp[0], sp[1], dp[0], dp[1]],
        seg.seq.to_be_bytes(),
        seg.ack.to_be_bytes(),
        [((TCP_LEN / 4) as u8) << 4, seg.flags, win[0], win[1]],
        // Checksum and urgent pointer: summed as zero.
        [0, 0, 0, 0],
    ];
    let o = &seg.options;
    let opts: [[u8; 4]; 5] = [
        [o[0], o[1], o[2], o[3]],
        [o[4], o[5], o[6], o[7]],
        [o[8], o[9], o[10], o[11]],
        [o[12], o[13], o[14], o[15]],
        [o[16], o[17], o[18], o[19]],
    ];
    // Pseudo-header: addresses, protocol, TCP length.
    let mut sum = sum_words(0, &seg.src);
    sum = sum_words(sum, &seg.dst);
    sum = sum_words(sum, &[0, lb_common::IPPROTO_TCP, 0, TCP_LEN as u8]);
    for w in &words {
        sum = sum_words(sum, w);
    }
    for w in &opts {
        sum = sum_words(sum, w);
    }
    let check = fold(sum).to_ne_bytes();
    let tw = tcp as *mut [u8; 4];
    // SAFETY: `ptr_at` checked the 40-byte TCP header against data_end: ten unaligned
    // words.
    unsafe {
        tw.write_unaligned(words[0]);
        tw.add(1).write_unaligned(words[1]);
        tw.add(2).write_unaligned(words[2]);
        tw.add(3).write_unaligned(words[3]);
        tw.add(4).write_unaligned([check[0], check[1], 0, 0]);
        tw.add(5).write_unaligned(opts[0]);
        tw.add(6).write_unaligned(opts[1]);
        tw.add(7).write_unaligned(opts[2]);
        tw.add(8).write_unaligned(opts[3]);
        tw.add(9).write_unaligned(opts[4]);
    }
    Ok(())
}

/// Sends the frame lb wrote back where its packet came from: MAC addresses swapped, out
/// of the same interface (by redirect where `XDP_TX` would not reach the peer, see
/// `IFACE_TX_BY_REDIRECT`).
#[inline(always)]
pub fn send_back(ctx: &XdpContext) -> Result<u32, DropReason> {
    swap_macs(ctx)?;
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the program never inserts into or removes from `iface_addrs`, and its
    // elements are preallocated: the value stays valid for the run.
    let by_redirect = unsafe { maps::iface_addrs.get(&ifindex) }
        .is_some_and(|a| a.flags & IFACE_TX_BY_REDIRECT != 0);
    Ok(if by_redirect {
        crate::forward::redirect(ifindex)
    } else {
        xdp_action::XDP_TX
    })
}

/// Swaps the frame's MAC addresses: back where it came from.
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), DropReason> {
    let eth: *mut [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 12 MAC bytes against data_end; the accesses are
    // unaligned.
    unsafe {
        let p = eth as *mut u8;
        let d0 = (p as *const u32).read_unaligned();
        let d1 = (p.add(4) as *const u16).read_unaligned();
        let s0 = (p.add(6) as *const u16).read_unaligned();
        let s1 = (p.add(8) as *const u32).read_unaligned();
        // dst <- src: bytes 6..12 to 0..6; src <- dst: bytes 0..6 to 6..12.
        let src = [
            s0.to_ne_bytes()[0],
            s0.to_ne_bytes()[1],
            s1.to_ne_bytes()[0],
            s1.to_ne_bytes()[1],
            s1.to_ne_bytes()[2],
            s1.to_ne_bytes()[3],
        ];
        let dst = [
            d0.to_ne_bytes()[0],
            d0.to_ne_bytes()[1],
            d0.to_ne_bytes()[2],
            d0.to_ne_bytes()[3],
            d1.to_ne_bytes()[0],
            d1.to_ne_bytes()[1],
        ];
        (p as *mut u32).write_unaligned(u32::from_ne_bytes([src[0], src[1], src[2], src[3]]));
        (p.add(4) as *mut u16).write_unaligned(u16::from_ne_bytes([src[4], src[5]]));
        (p.add(6) as *mut u16).write_unaligned(u16::from_ne_bytes([dst[0], dst[1]]));
        (p.add(8) as *mut u32)
            .write_unaligned(u32::from_ne_bytes([dst[2], dst[3], dst[4], dst[5]]));
    }
    Ok(())
}
