//! "Fragmentation needed" (ICMP destination unreachable, code 4) for a packet lb cannot
//! forward whole: larger than its route's MTU (less the outer header a `dsr` flow adds),
//! with DF set. XDP cannot fragment, and a silent drop would leave the sender's path MTU
//! discovery waiting for a reply that never comes. The answer goes back the way the
//! packet came, from the address it was sent to (a VIP, or lb's SNAT address for a
//! backend's reply), and quotes its IP header and first 8 bytes, as RFC 792 asks.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::stats::DropReason;
use network_types::eth::EthHdr;

use crate::{emit, maps, parse::ptr_at, stats};

const ICMP_HDR_LEN: usize = 8;
/// The packet's IP header (lb forwards none with options) and 8 bytes of its payload.
const QUOTED_LEN: usize = 28;
/// The answer's headers (IP and ICMP) go where the packet's Ethernet header was, and in
/// front of it.
const GROWTH: usize = 20 + ICMP_HDR_LEN;
const ANSWER_LEN: usize = EthHdr::LEN + GROWTH + QUOTED_LEN;
const IP_DF: u8 = 0x40;
const IPPROTO_ICMP: u8 = 1;
const TTL: u8 = 64;

/// Answers the packet with "fragmentation needed" advertising the MTU left in the scratch
/// space; the packet itself is counted as a `frag_needed` drop either way.
#[inline(never)]
pub fn too_big(ctx: &XdpContext) -> u32 {
    stats::count_drop(DropReason::FragNeeded);
    match try_too_big(ctx) {
        Ok(v) => v,
        Err(reason) => {
            if !matches!(reason, DropReason::FragNeeded) {
                stats::count_drop(reason);
            }
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_too_big(ctx: &XdpContext) -> Result<u32, DropReason> {
    let mtu = maps::scratch_space()
        .ok_or(DropReason::MapUpdate)?
        .too_big_mtu
        .to_be_bytes();
    let head: *mut [u8; EthHdr::LEN + QUOTED_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 42 bytes against data_end: byte 6 of the IP header.
    let df = unsafe { (*head)[EthHdr::LEN + 6] } & IP_DF;
    if df == 0 {
        // The sender lets routers fragment it, which XDP cannot: a plain drop.
        return Err(DropReason::FragNeeded);
    }
    let len = crate::parse::data_end(ctx) - crate::parse::data(ctx);
    let cut = (EthHdr::LEN + QUOTED_LEN) as i32 - len as i32;
    // SAFETY: BPF helper calls with the program's context and a length change; every
    // packet pointer below is derived afresh.
    if cut < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, cut) } != 0 {
        return Err(DropReason::NoRoom);
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROWTH as i32)) } != 0 {
        return Err(DropReason::NoRoom);
    }
    let frame: *mut [u8; ANSWER_LEN] = ptr_at(ctx, 0)?;
    let b = frame as *mut u8;
    // The packet's Ethernet header is now at GROWTH, its IP header at `QUOTED`.
    const OLD_ETH: usize = GROWTH;
    const QUOTED: usize = OLD_ETH + EthHdr::LEN;
    // SAFETY: `ptr_at` checked the whole 70-byte answer against data_end; every access is
    // at a constant offset inside it, unaligned.
    unsafe {
        let read4 = |off: usize| (b.add(off) as *const [u8; 4]).read_unaligned();
        let (sender, receiver) = (read4(QUOTED + 12), read4(QUOTED + 16));
        // The packet's MACs as they were (`send_back` swaps them), and type IPv4.
        let macs = [read4(OLD_ETH), read4(OLD_ETH + 4), read4(OLD_ETH + 8)];
        let words = b as *mut [u8; 4];
        words.write_unaligned(macs[0]);
        words.add(1).write_unaligned(macs[1]);
        words.add(2).write_unaligned(macs[2]);
        (b.add(12) as *mut [u8; 2]).write_unaligned([0x08, 0x00]);

        let tot = ((20 + ICMP_HDR_LEN + QUOTED_LEN) as u16).to_be_bytes();
        let ip = [
            [0x45, 0, tot[0], tot[1]],
            [0, 0, IP_DF, 0],
            [TTL, IPPROTO_ICMP, 0, 0],
            receiver,
            sender,
        ];
        let mut sum = 0;
        for w in &ip {
            sum = emit::sum_words(sum, w);
        }
        let check = emit::fold(sum).to_ne_bytes();
        let ipw = b.add(EthHdr::LEN) as *mut [u8; 4];
        ipw.write_unaligned(ip[0]);
        ipw.add(1).write_unaligned(ip[1]);
        ipw.add(2)
            .write_unaligned([TTL, IPPROTO_ICMP, check[0], check[1]]);
        ipw.add(3).write_unaligned(receiver);
        ipw.add(4).write_unaligned(sender);

        let icmp0 = [3, 4, 0, 0];
        let icmp1 = [0, 0, mtu[0], mtu[1]];
        let mut sum = emit::sum_words(emit::sum_words(0, &icmp0), &icmp1);
        let mut off = QUOTED;
        while off < ANSWER_LEN {
            sum = emit::sum_words(sum, &read4(off));
            off += 4;
        }
        let check = emit::fold(sum).to_ne_bytes();
        let icmpw = b.add(EthHdr::LEN + 20) as *mut [u8; 4];
        icmpw.write_unaligned([3, 4, check[0], check[1]]);
        icmpw.add(1).write_unaligned(icmp1);
    }
    emit::send_back(ctx)
}
