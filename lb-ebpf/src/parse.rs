//! Bounds-checked header access and the parse of Ethernet / IPv4 / TCP or UDP.
use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, stats::DropReason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const ETH_P_IP: u16 = 0x0800;
const IP_MF: u8 = 0x20;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
/// Offset of the checksum in the TCP and UDP headers.
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to a `T` at `offset` from the start of the packet, if the packet holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, DropReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(DropReason::Truncated);
    }
    Ok((start + offset) as *mut T)
}

/// An IPv4 TCP or UDP packet without options, not a fragment: the only kind lb rewrites.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Source and destination port, as on the wire.
    pub ports: *mut [u16; 2],
    /// The L4 checksum, as on the wire.
    pub l4_check: *mut u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// The IP total length, host order.
    pub ip_len: u16,
}

/// What the parse found: a packet lb may rewrite, or something to leave to the kernel.
pub enum Parsed {
    Packet(Packet),
    Pass,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, DropReason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(Parsed::Pass);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    let (vihl, frags, proto, tot_len) =
        unsafe { ((*ip).vihl, (*ip).frags, (*ip).proto, (*ip).tot_len) };
    if vihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = (vihl & 0x0f) as usize * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(DropReason::Malformed);
    }
    let ip_len = u16::from_be_bytes(tot_len);
    let available = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if (ip_len as usize) < ihl {
        return Err(DropReason::Malformed);
    }
    if ip_len as usize > available {
        return Err(DropReason::Truncated);
    }
    // Options, fragments (first or later) and other protocols are the kernel's business.
    if ihl != Ipv4Hdr::LEN || frags[0] & IP_MF != 0 || (frags[0] & 0x1f) | frags[1] != 0 {
        return Ok(Parsed::Pass);
    }
    let l4 = EthHdr::LEN + Ipv4Hdr::LEN;
    let l4_len = ip_len as usize - Ipv4Hdr::LEN;
    match proto {
        IPPROTO_TCP => {
            let hdr: *mut [u8; TCP_HDR_LEN] = ptr_at(ctx, l4)?;
            if l4_len < TCP_HDR_LEN {
                return Err(DropReason::Malformed);
            }
            let data_off = unsafe { (*hdr)[12] >> 4 } as usize * 4;
            if data_off < TCP_HDR_LEN || data_off > l4_len {
                return Err(DropReason::Malformed);
            }
            Ok(Parsed::Packet(Packet {
                eth,
                ip,
                ports: hdr as *mut [u16; 2],
                l4_check: unsafe { (hdr as *mut u8).add(TCP_CHECK_OFF) } as *mut u16,
                proto,
                tcp_flags: unsafe { (*hdr)[TCP_FLAGS_OFF] },
                ip_len,
            }))
        }
        IPPROTO_UDP => {
            let hdr: *mut [u8; UDP_HDR_LEN] = ptr_at(ctx, l4)?;
            let udp_len = u16::from_be_bytes(unsafe { [(*hdr)[4], (*hdr)[5]] }) as usize;
            if udp_len < UDP_HDR_LEN || udp_len > l4_len {
                return Err(DropReason::Malformed);
            }
            Ok(Parsed::Packet(Packet {
                eth,
                ip,
                ports: hdr as *mut [u16; 2],
                l4_check: unsafe { (hdr as *mut u8).add(UDP_CHECK_OFF) } as *mut u16,
                proto,
                tcp_flags: 0,
                ip_len,
            }))
        }
        _ => Ok(Parsed::Pass),
    }
}

impl Packet {
    #[inline(always)]
    pub fn src_addr(&self) -> [u8; 4] {
        unsafe { (*self.ip).src_addr }
    }
    #[inline(always)]
    pub fn dst_addr(&self) -> [u8; 4] {
        unsafe { (*self.ip).dst_addr }
    }
    /// Source port, host order.
    #[inline(always)]
    pub fn src_port(&self) -> u16 {
        u16::from_be(unsafe { (*self.ports)[0] })
    }
    /// Destination port, host order.
    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        u16::from_be(unsafe { (*self.ports)[1] })
    }
    /// Forwarding decrements the TTL; a packet that would reach zero is not forwarded.
    #[inline(always)]
    pub fn ttl_expires(&self) -> bool {
        unsafe { (*self.ip).ttl <= 1 }
    }
    /// A TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn opens(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
    #[inline(always)]
    pub fn closes(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}
