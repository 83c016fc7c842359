//! Address and port rewriting with incremental checksum updates.
use lb_common::{
    IPPROTO_UDP,
    csum::{apply, diff_addr, diff_u16, port_word},
};

use crate::parse::Packet;

/// Rewrites the packet to `src:sport -> dst:dport` (ports in host order), decrementing
/// the TTL, and fixes the IP and L4 checksums. The address change enters both checksums
/// (the L4 one through the pseudo-header) and is summed once.
#[inline(always)]
pub fn rewrite(pkt: &Packet, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) {
    // SAFETY: `parse` checked the IP header, ports and checksum against data_end, and the
    // verifier refuses them across a resize. (`ports` as u16s assumes an even start.)
    unsafe {
        let ip = &mut *pkt.ip;
        let addrs = diff_addr(ip.src_addr, src) + diff_addr(ip.dst_addr, dst);
        let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let ttl = diff_u16(old_ttl_word, u16::from_ne_bytes([ip.ttl, ip.proto]));
        ip.check = apply(u16::from_ne_bytes(ip.check), addrs + ttl).to_ne_bytes();
        ip.src_addr = src;
        ip.dst_addr = dst;

        let ports = &mut *pkt.ports;
        let (new_sport, new_dport) = (port_word(sport), port_word(dport));
        let port_diff = diff_u16(ports[0], new_sport) + diff_u16(ports[1], new_dport);
        ports[0] = new_sport;
        ports[1] = new_dport;

        let l4_check = pkt.l4_check.read_unaligned();
        // A UDP checksum of zero means "none" and stays so.
        if pkt.proto == IPPROTO_UDP && l4_check == 0 {
            return;
        }
        let mut c = apply(l4_check, addrs + port_diff);
        if pkt.proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        pkt.l4_check.write_unaligned(c);
    }
}
