//! Bounds-checked header access and the parse of Ethernet / IPv4 / TCP or UDP.
use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, stats::DropReason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const ETH_P_IP: u16 = 0x0800;
const IP_MF: u8 = 0x20;
pub const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
/// Offset of the checksum in the TCP and UDP headers.
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where the L4 header starts: lb only handles IPv4 without options.
pub const L4_OFF: usize = EthHdr::LEN + Ipv4Hdr::LEN;

/// The packet's start, as a pointer from which every header pointer is derived by pointer
/// arithmetic. (`xdp_md`'s `data` is a 32-bit field: integer arithmetic on it lets the
/// compiler store a header pointer as two 32-bit halves, which the verifier refuses.)
#[inline(always)]
pub fn start(ctx: &XdpContext) -> *mut u8 {
    // SAFETY: `ctx.ctx` is the `xdp_md` the kernel passed the program, valid for its run.
    opaque(unsafe { (*ctx.ctx).data })
}

/// A 32-bit `xdp_md` field as a pointer whose bits the compiler does not know (see `end`).
#[inline(always)]
fn opaque(field: u32) -> *mut u8 {
    let mut v = field as usize;
    // SAFETY: inline asm that only moves a register to itself: no memory touched.
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) v, options(pure, nomem, nostack)) };
    v as *mut u8
}

/// The packet's start as an address.
#[inline(always)]
pub fn data(ctx: &XdpContext) -> usize {
    start(ctx) as usize
}

/// The packet's end as an address (see [`end`]).
#[inline(always)]
pub fn data_end(ctx: &XdpContext) -> usize {
    end(ctx) as usize
}

/// The packet's end, hidden from the compiler's range analysis. `xdp_md.data_end` is a
/// 32-bit field: from a comparison with it the compiler would learn that a header pointer
/// fits in 32 bits and store it as two halves, and the verifier refuses a packet pointer
/// spilled that way. A register move in `asm` makes the value opaque.
#[inline(always)]
pub fn end(ctx: &XdpContext) -> *mut u8 {
    // SAFETY: as in `start`: the kernel's `xdp_md`, valid for the program's run.
    opaque(unsafe { (*ctx.ctx).data_end })
}

/// A pointer to a `T` at `offset` from the start of the packet, if the packet holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, DropReason> {
    let p = start(ctx).wrapping_add(offset);
    if p.wrapping_add(core::mem::size_of::<T>()) > end(ctx) {
        return Err(DropReason::Truncated);
    }
    Ok(p as *mut T)
}

/// An IPv4 TCP or UDP packet without options, not a fragment: the only kind lb rewrites.
///
/// `repr(C)` with the small fields first: a `Result` around it shares its first word with
/// the error, and the compiler then handles that word as two 32-bit halves. A pointer there
/// would be stored in halves, which the verifier refuses.
#[repr(C)]
pub struct Packet {
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// The IP total length, host order.
    pub ip_len: u16,
    /// TCP: the header's length with options (20 to 60); UDP: 8.
    pub l4_hdr_len: u16,
    /// The IP header (the Ethernet header is right before it: see `eth`).
    pub ip: *mut Ipv4Hdr,
    /// The TCP or UDP header (its fixed part is in the packet).
    pub l4: *mut [u8; TCP_HDR_LEN],
    /// Source and destination port, as on the wire.
    pub ports: *mut [u16; 2],
    /// The L4 checksum, as on the wire.
    pub l4_check: *mut u16,
}

/// What the parse found: a packet lb may rewrite, or something to leave to the kernel.
pub enum Parsed {
    Packet(Packet),
    Pass,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, DropReason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the Ethernet header against data_end (the verifier does
    // too). A u16 read: this assumes the frame starts 2-byte aligned.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(Parsed::Pass);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr_at` checked the IPv4 header against data_end (the verifier does too).
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
    let available = data_end(ctx) - data(ctx) - EthHdr::LEN;
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
    let l4_len = ip_len as usize - Ipv4Hdr::LEN;
    match proto {
        IPPROTO_TCP => {
            let hdr: *mut [u8; TCP_HDR_LEN] = ptr_at(ctx, L4_OFF)?;
            if l4_len < TCP_HDR_LEN {
                return Err(DropReason::Malformed);
            }
            // SAFETY: `ptr_at` checked the 20-byte TCP header against data_end.
            let data_off = unsafe { (*hdr)[12] >> 4 } as usize * 4;
            if data_off < TCP_HDR_LEN || data_off > l4_len {
                return Err(DropReason::Malformed);
            }
            Ok(Parsed::Packet(Packet {
                ip,
                l4: hdr,
                ports: hdr as *mut [u16; 2],
                // SAFETY: offset 16 is inside the 20 bytes `ptr_at` checked.
                l4_check: unsafe { (hdr as *mut u8).add(TCP_CHECK_OFF) } as *mut u16,
                proto,
                // SAFETY: byte 13 of the 20 `ptr_at` checked.
                tcp_flags: unsafe { (*hdr)[TCP_FLAGS_OFF] },
                ip_len,
                l4_hdr_len: data_off as u16,
            }))
        }
        IPPROTO_UDP => {
            let hdr: *mut [u8; UDP_HDR_LEN] = ptr_at(ctx, L4_OFF)?;
            // SAFETY: `ptr_at` checked the 8-byte UDP header against data_end.
            let udp_len = u16::from_be_bytes(unsafe { [(*hdr)[4], (*hdr)[5]] }) as usize;
            if udp_len < UDP_HDR_LEN || udp_len > l4_len {
                return Err(DropReason::Malformed);
            }
            Ok(Parsed::Packet(Packet {
                ip,
                l4: hdr as *mut [u8; TCP_HDR_LEN],
                ports: hdr as *mut [u16; 2],
                // SAFETY: offset 6 is inside the 8 bytes `ptr_at` checked.
                l4_check: unsafe { (hdr as *mut u8).add(UDP_CHECK_OFF) } as *mut u16,
                proto,
                tcp_flags: 0,
                ip_len,
                l4_hdr_len: UDP_HDR_LEN as u16,
            }))
        }
        _ => Ok(Parsed::Pass),
    }
}

#[inline(always)]
fn be32(p: *const u8) -> u32 {
    // SAFETY: callers (`seq`, `ack_seq`) pass 4 bytes inside the TCP header `parse`
    // checked; the read is unaligned.
    u32::from_be_bytes(unsafe { (p as *const [u8; 4]).read_unaligned() })
}

impl Packet {
    /// The Ethernet header. Derived from the IP header's pointer rather than kept: the
    /// packet's start is a zero-extended 32-bit load, which the compiler may store in two
    /// halves, and the verifier refuses a packet pointer spilled that way.
    #[inline(always)]
    pub fn eth(&self) -> *mut u8 {
        (self.ip as *mut u8).wrapping_sub(EthHdr::LEN)
    }

    #[inline(always)]
    pub fn src_addr(&self) -> [u8; 4] {
        // SAFETY: `Packet`s come only from `parse`, which checked the IP header against
        // data_end; the verifier refuses a packet pointer kept across a resize.
        unsafe { (*self.ip).src_addr }
    }
    #[inline(always)]
    pub fn dst_addr(&self) -> [u8; 4] {
        // SAFETY: as in `src_addr`.
        unsafe { (*self.ip).dst_addr }
    }
    /// Source port, host order.
    #[inline(always)]
    pub fn src_port(&self) -> u16 {
        // SAFETY: as in `src_addr`: the L4 header's first 4 bytes. A u16 read: this assumes
        // the frame starts 2-byte aligned.
        u16::from_be(unsafe { (*self.ports)[0] })
    }
    /// Destination port, host order.
    #[inline(always)]
    pub fn dst_port(&self) -> u16 {
        // SAFETY: as in `src_port`.
        u16::from_be(unsafe { (*self.ports)[1] })
    }
    /// Forwarding decrements the TTL; a packet that would reach zero is not forwarded.
    #[inline(always)]
    pub fn ttl_expires(&self) -> bool {
        // SAFETY: as in `src_addr`.
        unsafe { (*self.ip).ttl <= 1 }
    }
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }
    /// A TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn opens(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
    /// A TCP SYN with ACK: a backend accepting.
    #[inline(always)]
    pub fn accepts(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
    }
    #[inline(always)]
    pub fn closes(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
    #[inline(always)]
    pub fn fin(&self) -> bool {
        self.tcp_flags & TCP_FIN != 0
    }
    #[inline(always)]
    pub fn rst(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }
    /// An ACK without SYN, RST or FIN: what completes a handshake.
    #[inline(always)]
    pub fn plain_ack(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_ACK
    }
    #[inline(always)]
    pub fn seq(&self) -> u32 {
        // SAFETY: offset 4 is inside the L4 header `parse` checked (20 bytes for TCP, 8 for
        // UDP).
        be32(unsafe { (self.l4 as *const u8).add(4) })
    }
    #[inline(always)]
    pub fn ack_seq(&self) -> u32 {
        // SAFETY: offset 8 is inside the TCP header `parse` checked. Only called on TCP
        // packets: on UDP the read would pass the checked 8 bytes, which the verifier
        // refuses.
        be32(unsafe { (self.l4 as *const u8).add(8) })
    }
    /// The TCP window field, host order.
    #[inline(always)]
    pub fn window(&self) -> u16 {
        // SAFETY: bytes 14 and 15 of the TCP header `parse` checked (TCP only, as
        // `ack_seq`).
        unsafe { u16::from_be_bytes([(*self.l4)[14], (*self.l4)[15]]) }
    }
    /// TCP payload bytes.
    #[inline(always)]
    pub fn payload_len(&self) -> u32 {
        (self.ip_len as u32)
            .saturating_sub(20)
            .saturating_sub(self.l4_hdr_len as u32)
    }
    /// The sequence number after this segment (its payload, and one for a SYN or FIN).
    #[inline(always)]
    pub fn seq_end(&self) -> u32 {
        let flags = (self.tcp_flags & (TCP_SYN | TCP_FIN) != 0) as u32
            + (self.tcp_flags & TCP_SYN != 0 && self.tcp_flags & TCP_FIN != 0) as u32;
        self.seq()
            .wrapping_add(self.payload_len())
            .wrapping_add(flags)
    }
}
