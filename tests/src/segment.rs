//! TCP segments with the fields the port economy and SYN cookies judge (sequence and
//! acknowledgement numbers, window, options), built and read back with etherparse, so
//! that checksums are checked by an implementation independent of lb's.
use std::net::Ipv4Addr;

use etherparse::{PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};

use crate::packet::{Frame, L4};

/// A TCP segment: `frame` gives addresses, ports, TTL, MACs, flags and payload.
#[derive(Clone, Debug)]
pub struct Seg {
    pub frame: Frame,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_ok: bool,
    /// (TSval, TSecr).
    pub ts: Option<(u32, u32)>,
}

impl Seg {
    pub fn new(frame: Frame, seq: u32, ack: u32) -> Self {
        Self {
            frame,
            seq,
            ack,
            window: 64240,
            mss: None,
            wscale: None,
            sack_ok: false,
            ts: None,
        }
    }

    /// A client's SYN as Linux sends it: MSS, SACK permitted, timestamp, window scale.
    pub fn linux_syn(frame: Frame, seq: u32, tsval: u32) -> Self {
        Self {
            mss: Some(1460),
            wscale: Some(7),
            sack_ok: true,
            ts: Some((tsval, 0)),
            ..Self::new(frame, seq, 0)
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let f = &self.frame;
        let L4::Tcp { syn, ack, fin, rst } = f.l4 else {
            panic!("a segment is TCP");
        };
        let mut t = PacketBuilder::ethernet2(f.src_mac, f.dst_mac)
            .ipv4(f.src.octets(), f.dst.octets(), f.ttl)
            .tcp(f.sport, f.dport, self.seq, self.window);
        if syn {
            t = t.syn();
        }
        if ack {
            t = t.ack(self.ack);
        }
        if fin {
            t = t.fin();
        }
        if rst {
            t = t.rst();
        }
        let mut opts = Vec::new();
        if let Some(m) = self.mss {
            opts.push(TcpOptionElement::MaximumSegmentSize(m));
        }
        if self.sack_ok {
            opts.push(TcpOptionElement::SelectiveAcknowledgementPermitted);
        }
        if let Some((v, e)) = self.ts {
            opts.push(TcpOptionElement::Timestamp(v, e));
        }
        if let Some(w) = self.wscale {
            opts.push(TcpOptionElement::Noop);
            opts.push(TcpOptionElement::WindowScale(w));
        }
        if !opts.is_empty() {
            t = t.options(&opts).expect("options fit");
        }
        let mut out = Vec::new();
        t.write(&mut out, &f.payload).unwrap();
        out
    }
}

/// A TCP segment as lb sent it, read back; both checksums verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub seq: u32,
    pub ack_no: u32,
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub window: u16,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_ok: bool,
    pub ts: Option<(u32, u32)>,
    pub payload: Vec<u8>,
}

/// Reads a frame lb sent as a TCP segment. Panics, naming the problem, if it is not a
/// well-formed IPv4 TCP packet with correct IP and TCP checksums.
pub fn seen(bytes: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(bytes).expect("parses as Ethernet");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4");
    };
    let iph = ip.header().to_header();
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "IP header checksum"
    );
    let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
        panic!("not TCP");
    };
    let h = tcp.to_header();
    let payload = tcp.payload().to_vec();
    assert_eq!(
        h.checksum,
        h.calc_checksum_ipv4(&iph, &payload).unwrap(),
        "TCP checksum"
    );
    let mut s = Seen {
        src: iph.source.into(),
        dst: iph.destination.into(),
        sport: h.source_port,
        dport: h.destination_port,
        ttl: iph.time_to_live,
        seq: h.sequence_number,
        ack_no: h.acknowledgment_number,
        syn: h.syn,
        ack: h.ack,
        fin: h.fin,
        rst: h.rst,
        window: h.window_size,
        mss: None,
        wscale: None,
        sack_ok: false,
        ts: None,
        payload,
    };
    for o in h.options_iterator() {
        match o.expect("well-formed options") {
            TcpOptionElement::MaximumSegmentSize(m) => s.mss = Some(m),
            TcpOptionElement::WindowScale(w) => s.wscale = Some(w),
            TcpOptionElement::SelectiveAcknowledgementPermitted => s.sack_ok = true,
            TcpOptionElement::Timestamp(v, e) => s.ts = Some((v, e)),
            _ => {}
        }
    }
    s
}
