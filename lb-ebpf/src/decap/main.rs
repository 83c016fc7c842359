//! `lb-decap`: the XDP program `lb backend` attaches on a direct-server-return backend.
//! It strips the outer IPv4 header of the IPIP packets lb sends (`"forwarding": "dsr"`)
//! and hands the client's packet to the stack, as the kernel's `ipip` device would on a
//! host that has one. Only packets whose inner destination is one of `decap_vips` are
//! touched: anything else passes as it came.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::HashMap,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// The VIPs this backend serves (value unused): the only inner destinations decapsulated.
#[btf_map]
#[allow(non_upper_case_globals)]
static decap_vips: HashMap<[u8; 4], u32, 1024> = HashMap::new();

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const IPPROTO_IPIP: u8 = 4;
/// Ethernet, the outer IPv4 header, the inner one.
const HEADERS: usize = ETH_LEN + 2 * IP_LEN;

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    // SAFETY: the context's fields, which the kernel fills for every XDP program.
    let (start, end) = unsafe { ((*ctx.ctx).data as usize, (*ctx.ctx).data_end as usize) };
    if start + HEADERS > end {
        return xdp_action::XDP_PASS;
    }
    let p = start as *mut u8;
    // SAFETY: the headers were checked against data_end above; constant offsets inside
    // them, unaligned reads.
    let (ether_type, vihl, frags, proto, inner_vihl, inner_dst) = unsafe {
        (
            (p.add(12) as *const [u8; 2]).read_unaligned(),
            *p.add(ETH_LEN),
            (p.add(ETH_LEN + 6) as *const [u8; 2]).read_unaligned(),
            *p.add(ETH_LEN + 9),
            *p.add(ETH_LEN + IP_LEN),
            (p.add(ETH_LEN + IP_LEN + 16) as *const [u8; 4]).read_unaligned(),
        )
    };
    // IPv4 without options, not a fragment, carrying IPv4 for one of the VIPs.
    let fragment = frags[0] & 0x3f != 0 || frags[1] != 0;
    if ether_type != [0x08, 0x00]
        || vihl != 0x45
        || fragment
        || proto != IPPROTO_IPIP
        || inner_vihl >> 4 != 4
    {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: a hash map value, only tested for presence.
    if unsafe { decap_vips.get(&inner_dst) }.is_none() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the headers were checked above: the Ethernet header's 12 MAC bytes move to
    // just before the inner IP header, whose type (IPv4) they keep.
    unsafe {
        let macs = (p as *const [u8; 12]).read_unaligned();
        (p.add(IP_LEN) as *mut [u8; 12]).write_unaligned(macs);
        (p.add(IP_LEN + 12) as *mut [u8; 2]).write_unaligned([0x08, 0x00]);
    }
    // SAFETY: a BPF helper call with the program's context and a length change; no packet
    // pointer is used after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IP_LEN as i32) } != 0 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
