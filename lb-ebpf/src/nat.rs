//! Address and port rewriting with incremental checksum updates.
use lb_common::{
    IPPROTO_UDP,
    csum::{port_word, replace_addr, replace_u16},
};

use crate::parse::Packet;

/// Rewrites the packet to `src:sport -> dst:dport` (ports in host order), decrementing
/// the TTL, and fixes the IP and L4 checksums.
#[inline(always)]
pub fn rewrite(pkt: &Packet, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) {
    unsafe {
        let ip = &mut *pkt.ip;
        let old_src = ip.src_addr;
        let old_dst = ip.dst_addr;
        let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let new_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
        let mut check = u16::from_ne_bytes(ip.check);
        check = replace_addr(check, old_src, src);
        check = replace_addr(check, old_dst, dst);
        check = replace_u16(check, old_ttl_word, new_ttl_word);
        ip.check = check.to_ne_bytes();
        ip.src_addr = src;
        ip.dst_addr = dst;

        let ports = &mut *pkt.ports;
        let old_sport = ports[0];
        let old_dport = ports[1];
        let new_sport = port_word(sport);
        let new_dport = port_word(dport);
        ports[0] = new_sport;
        ports[1] = new_dport;

        let l4_check = pkt.l4_check.read_unaligned();
        // A UDP checksum of zero means "none" and stays so.
        if pkt.proto == IPPROTO_UDP && l4_check == 0 {
            return;
        }
        let mut c = replace_addr(l4_check, old_src, src);
        c = replace_addr(c, old_dst, dst);
        c = replace_u16(c, old_sport, new_sport);
        c = replace_u16(c, old_dport, new_dport);
        if pkt.proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        pkt.l4_check.write_unaligned(c);
    }
}
