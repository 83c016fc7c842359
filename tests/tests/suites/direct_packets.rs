//! Direct server return and "fragmentation needed" on exact packets through
//! BPF_PROG_TEST_RUN: what lb sends for `dsr` and `dsr-l2` flows, what it answers for a
//! packet too large for its route, and what the backends' decapsulation program makes of
//! lb's IPIP packets, each compared whole with packets built by etherparse.
use std::net::Ipv4Addr;

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header,
    icmpv4::DestUnreachableHeader,
};
use lb::{dataplane::Limits, model::ServiceSpec};
use lb_common::{
    IPPROTO_TCP,
    flow::{CONN_DIRECT_IPIP, CONN_DIRECT_L2, CONN_SPREAD_SOURCE},
    stats::DropReason,
};
use lb_tests::packet::*;

const SNAT: (u16, u16) = (61000, 65535);
const CLIENT_PORT: u16 = 40000;
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 70, 0, 11),
    Ipv4Addr::new(10, 70, 0, 12),
    Ipv4Addr::new(10, 70, 0, 13),
];

fn lab() -> PacketLab {
    let limits = Limits {
        max_services: 64,
        max_backends: 64,
        maglev_slots: 8192,
        conntrack_entries: 4096,
    };
    PacketLab::new(&limits, SNAT).unwrap()
}

/// A lab whose service "web" (VIP:80, TCP, the three [`BACKENDS`] on port 80) forwards as
/// `forwarding` says, with `encap_source`.
fn direct_lab(forwarding: &str, encap_source: Option<&str>) -> PacketLab {
    let mut lab = lab();
    lab.service_as(
        "web",
        ServiceSpec {
            vip: Some("10.70.0.100:80".into()),
            backends: Some(BACKENDS.iter().map(|b| format!("{b}:80").into()).collect()),
            forwarding: Some(forwarding.into()),
            encap_source: encap_source.map(Into::into),
            ..Default::default()
        },
    );
    lab
}

/// A client packet to VIP:80 arriving on v0, from client port `port`.
fn to_vip(l4: L4, port: u16, payload: &[u8]) -> Frame {
    Frame {
        src_mac: mac(10),
        dst_mac: mac(0x01),
        src: CLIENT,
        dst: VIP,
        ttl: 64,
        sport: port,
        dport: 80,
        l4,
        payload: payload.to_vec(),
    }
}

/// `frame`'s IP packet inside an outer IPv4 header from `src` to `backend` (TTL 64,
/// identification 0, the inner TOS and DF bit), sent from lb's v0 to the backend's MAC.
fn ipip(frame: &[u8], src: Ipv4Addr, backend: Ipv4Addr) -> Vec<u8> {
    let inner = &frame[14..];
    let (inner_hdr, _) = Ipv4Header::from_slice(inner).unwrap();
    let mut outer = Ipv4Header::new(
        inner.len() as u16,
        64,
        IpNumber::IPV4,
        src.octets(),
        backend.octets(),
    )
    .unwrap();
    outer.identification = 0;
    outer.dont_fragment = inner_hdr.dont_fragment;
    outer.dscp = inner_hdr.dscp;
    outer.ecn = inner_hdr.ecn;
    outer.header_checksum = outer.calc_header_checksum();
    let eth = Ethernet2Header {
        source: mac(0x01),
        destination: mac(backend.octets()[3]),
        ether_type: EtherType::IPV4,
    };
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&outer.to_bytes());
    out.extend_from_slice(inner);
    out
}

/// The outer destination of an IPIP frame lb sent.
fn outer_dst(out: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(out[30], out[31], out[32], out[33])
}

#[test]
fn a_dsr_flow_reaches_its_backend_in_ipip_with_the_clients_packet_untouched() {
    let lab = direct_lab("dsr", None);
    let syn = to_vip(SYN, CLIENT_PORT, b"").bytes();
    let (v, out) = lab.run(lab.v0, &syn);
    assert_eq!(v, XDP_TX);
    let backend = outer_dst(&out);
    assert!(BACKENDS.contains(&backend), "outer destination {backend}");
    assert_eq!(out, ipip(&syn, LB0, backend));

    let conn = lab
        .conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
        .expect("the flow is tracked");
    assert_eq!(conn.flags, CONN_DIRECT_IPIP);
    assert_eq!(conn.snat_port, 0, "a direct flow holds no SNAT port");
    assert!(
        lab.reverse_entries().is_empty(),
        "a direct flow needs no reverse entry"
    );

    // Its data follows it, whole, with the payload.
    let data = to_vip(ACK, CLIENT_PORT, b"GET / HTTP/1.1\r\n\r\n").bytes();
    let (v, out) = lab.run(lab.v0, &data);
    assert_eq!(v, XDP_TX);
    assert_eq!(out, ipip(&data, LB0, backend));
}

#[test]
fn a_dsr_packet_of_an_unknown_flow_goes_where_the_table_sends_its_syn() {
    // What a node that never saw the flow does (another node carried it until now).
    let lab = direct_lab("dsr", None);
    let mut seen = std::collections::HashSet::new();
    for port in 41000..41060 {
        let ack = to_vip(ACK, port, b"x").bytes();
        let (v, out) = lab.run(lab.v0, &ack);
        assert_eq!(v, XDP_TX, "an ACK of an unknown dsr flow is forwarded");
        let by_ack = outer_dst(&out);
        assert_eq!(out, ipip(&ack, LB0, by_ack));
        // A SYN on the same 5-tuple is balanced by the table alone.
        let (_, out) = lab.run(lab.v0, &to_vip(SYN, port, b"").bytes());
        assert_eq!(outer_dst(&out), by_ack, "client port {port}");
        seen.insert(by_ack);
    }
    assert_eq!(seen.len(), 3, "flows spread over every backend: {seen:?}");
    assert_eq!(lab.drops(DropReason::UnknownFlow), 0);
}

#[test]
fn a_dsr_flow_keeps_its_backend_when_the_table_changes() {
    let mut lab = direct_lab("dsr", None);
    let mut flows = Vec::new();
    for port in 42000..42030 {
        let (_, out) = lab.run(lab.v0, &to_vip(SYN, port, b"").bytes());
        flows.push((port, outer_dst(&out)));
    }
    // A fourth backend takes a share of the table.
    lab.service_as(
        "web",
        ServiceSpec {
            vip: Some("10.70.0.100:80".into()),
            backends: Some(
                [
                    "10.70.0.11:80",
                    "10.70.0.12:80",
                    "10.70.0.13:80",
                    "10.71.0.21:80",
                ]
                .iter()
                .map(|&b| b.into())
                .collect(),
            ),
            forwarding: Some("dsr".into()),
            ..Default::default()
        },
    );
    for (port, backend) in flows {
        let data = to_vip(ACK, port, b"x").bytes();
        let (v, out) = lab.run(lab.v0, &data);
        assert_eq!(v, XDP_TX, "client port {port}");
        assert_eq!(out, ipip(&data, LB0, backend), "client port {port}");
    }
}

#[test]
fn a_per_flow_outer_source_is_made_from_the_clients_address_and_port() {
    let lab = direct_lab("dsr", Some("per_flow"));
    let syn = to_vip(SYN, CLIENT_PORT, b"").bytes();
    let (v, out) = lab.run(lab.v0, &syn);
    assert_eq!(v, XDP_TX);
    // Client 10.70.0.10, port 40000 (0x9c40): 172.16.(0 ^ 0x40).(10 ^ 0x9c).
    let src = Ipv4Addr::new(172, 16, 0x40, 10 ^ 0x9c);
    assert_eq!(out, ipip(&syn, src, outer_dst(&out)));
    let conn = lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP).unwrap();
    assert_eq!(conn.flags, CONN_DIRECT_IPIP | CONN_SPREAD_SOURCE);
    // Another port, another source.
    let (_, out) = lab.run(lab.v0, &to_vip(SYN, CLIENT_PORT + 1, b"").bytes());
    assert_eq!(&out[26..30], &[172, 16, 0x41, 10 ^ 0x9c]);
}

#[test]
fn a_dsr_l2_flow_changes_only_the_destination_mac() {
    let lab = direct_lab("dsr-l2", None);
    for (l4, payload) in [(SYN, &b""[..]), (ACK, &b"hello"[..])] {
        let frame = to_vip(l4, CLIENT_PORT, payload);
        let (v, out) = lab.run(lab.v0, &frame.bytes());
        assert_eq!(v, XDP_TX);
        let id = lab
            .conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
            .expect("tracked")
            .backend_id;
        let (backend, _) = *lab
            .dataplane
            .installed("web")
            .unwrap()
            .backends
            .iter()
            .find(|(_, b)| *b == id)
            .expect("the flow's backend is the service's");
        let expected = Frame {
            src_mac: mac(0x01),
            dst_mac: mac(backend.ip().octets()[3]),
            ..frame
        };
        assert_eq!(
            out,
            expected.bytes(),
            "TTL, addresses and checksums unchanged"
        );
    }
    let conn = lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP).unwrap();
    assert_eq!(conn.flags, CONN_DIRECT_L2);
}

#[test]
fn a_dsr_l2_backend_behind_a_gateway_is_not_sent_the_vips_packets() {
    let mut lab = lab();
    lab.ns.ip("route add 10.72.0.0/24 via 10.71.0.21").unwrap();
    lab.service_as(
        "far",
        ServiceSpec {
            vip: Some("10.70.0.100:80".into()),
            backends: Some(vec!["10.72.0.5:80".into()]),
            forwarding: Some("dsr-l2".into()),
            ..Default::default()
        },
    );
    let (v, _) = lab.run(lab.v0, &to_vip(SYN, CLIENT_PORT, b"").bytes());
    assert_eq!(v, XDP_DROP);
    assert_eq!(lab.drops(DropReason::NoRoute), 1);
}

/// What lb answers a packet `frame` (with DF) too large for its route: "fragmentation
/// needed" advertising `mtu`, from the address it was sent to, back where it came from.
fn too_big_answer(frame: &[u8], mtu: u16) -> Vec<u8> {
    let quoted = &frame[14..14 + 28];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu,
        }),
        quoted,
    );
    let mut ip = Ipv4Header::new(
        (icmp.header_len() + quoted.len()) as u16,
        64,
        IpNumber::ICMP,
        frame[30..34].try_into().unwrap(),
        frame[26..30].try_into().unwrap(),
    )
    .unwrap();
    ip.identification = 0;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let eth = Ethernet2Header {
        source: frame[0..6].try_into().unwrap(),
        destination: frame[6..12].try_into().unwrap(),
        ether_type: EtherType::IPV4,
    };
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(quoted);
    out
}

/// A full-sized (1,500-byte) segment to VIP:80, DF set as `df` says.
fn full_sized(df: bool) -> Vec<u8> {
    full_sized_as(ACK, df)
}

fn full_sized_as(l4: L4, df: bool) -> Vec<u8> {
    let b = to_vip(l4, CLIENT_PORT, &[7u8; 1460]).bytes();
    assert_eq!(b.len(), 14 + 1500);
    with_df(b, df)
}

/// Frame `b` with its DF bit set as `df` says (and its IP checksum to match).
fn with_df(mut b: Vec<u8>, df: bool) -> Vec<u8> {
    let flags = if df { 0x40 } else { 0 };
    if b[20] & 0x40 != flags {
        b[20] = (b[20] & !0x40) | flags;
        // The IP checksum, afresh.
        b[24] = 0;
        b[25] = 0;
        let (mut h, _) = Ipv4Header::from_slice(&b[14..]).unwrap();
        h.header_checksum = h.calc_header_checksum();
        b[14..34].copy_from_slice(&h.to_bytes());
    }
    b
}

#[test]
fn a_dsr_packet_with_no_room_for_the_outer_header_gets_fragmentation_needed() {
    let lab = direct_lab("dsr", None);
    let big = full_sized(true);
    let (v, out) = lab.run(lab.v0, &big);
    assert_eq!(v, XDP_TX);
    // v0's MTU is 1,500: the client's packets must leave 20 bytes for the outer header.
    assert_eq!(out, too_big_answer(&big, 1480));
    assert_eq!(lab.drops(DropReason::FragNeeded), 1);

    // Without DF the sender lets routers fragment, which XDP cannot: a plain drop.
    let (v, _) = lab.run(lab.v0, &full_sized(false));
    assert_eq!(v, XDP_DROP);
    assert_eq!(lab.drops(DropReason::FragNeeded), 2);

    // One that fits with its outer header goes through.
    let fits = to_vip(ACK, CLIENT_PORT, &[7u8; 1440]).bytes();
    let (v, out) = lab.run(lab.v0, &fits);
    assert_eq!(v, XDP_TX);
    assert_eq!(out, ipip(&fits, LB0, outer_dst(&out)));
}

#[test]
fn a_nat_packet_larger_than_the_backends_route_gets_fragmentation_needed() {
    let mut lab = lab();
    lab.ns.ip("link set v2 mtu 1400").unwrap();
    lab.service("far", "10.70.0.100:80", "tcp", &["10.71.0.21:8080"]);
    // A new flow's first packet.
    let big_syn = full_sized_as(SYN, true);
    let (v, out) = lab.run(lab.v0, &big_syn);
    assert_eq!(v, XDP_TX, "answered back on the client's interface");
    assert_eq!(out, too_big_answer(&big_syn, 1400));

    // A tracked flow's.
    let (v, _) = lab.run(lab.v0, &to_vip(SYN, CLIENT_PORT, b"").bytes());
    assert_eq!(v, XDP_REDIRECT);
    let (key, _) = lab.reverse(CLIENT, CLIENT_PORT).expect("a SNAT port");
    let syn_ack = Frame {
        src_mac: mac(21),
        dst_mac: mac(0x02),
        src: FAR_BACKEND,
        dst: LB2,
        ttl: 64,
        sport: 8080,
        dport: key.dst_port,
        l4: L4::Tcp {
            syn: true,
            ack: true,
            fin: false,
            rst: false,
        },
        payload: Vec::new(),
    };
    let (v, _) = lab.run(lab.v2, &syn_ack.bytes());
    assert_eq!(v, XDP_REDIRECT, "the SYN-ACK goes back to the client");
    let (v, _) = lab.run(lab.v0, &to_vip(ACK, CLIENT_PORT, b"").bytes());
    assert_eq!(v, XDP_REDIRECT);
    let big = full_sized(true);
    let (v, out) = lab.run(lab.v0, &big);
    assert_eq!(v, XDP_TX);
    assert_eq!(out, too_big_answer(&big, 1400));
    assert_eq!(lab.drops(DropReason::FragNeeded), 2);
}

#[test]
fn the_backends_decapsulation_program_hands_the_clients_packet_to_the_stack() {
    let lab = direct_lab("dsr", None);
    let data = to_vip(ACK, CLIENT_PORT, b"GET / HTTP/1.1\r\n\r\n").bytes();
    let (_, tunnelled) = lab.run(lab.v0, &data);
    let backend = outer_dst(&tunnelled);

    let mut ebpf = aya::Ebpf::load(lb::decap::DECAP_OBJECT).unwrap();
    let mut vips: aya::maps::HashMap<_, [u8; 4], u32> =
        aya::maps::HashMap::try_from(ebpf.map_mut("decap_vips").unwrap()).unwrap();
    vips.insert(VIP.octets(), 1, 0).unwrap();
    let prog: &mut aya::programs::Xdp = ebpf.program_mut("lb_decap").unwrap().try_into().unwrap();
    prog.load().unwrap();
    let (v, out, _) = test_run(prog, lab.v0, &tunnelled).unwrap();
    assert_eq!(v, XDP_PASS);
    // The client's packet as it was sent, in the frame that brought it to the backend.
    let mut expected = data.clone();
    expected[0..6].copy_from_slice(&mac(backend.octets()[3]));
    expected[6..12].copy_from_slice(&mac(0x01));
    assert_eq!(out, expected);

    // Another inner destination, or a packet that is no tunnel, passes untouched.
    let mut elsewhere = tunnelled.clone();
    elsewhere[14 + 20 + 16..14 + 20 + 20].copy_from_slice(&[10, 70, 0, 99]);
    for frame in [elsewhere, data] {
        let (v, out, _) = test_run(prog, lab.v0, &frame).unwrap();
        assert_eq!((v, out), (XDP_PASS, frame));
    }
}

#[test]
fn a_backends_reply_too_large_for_the_route_to_the_client_gets_fragmentation_needed() {
    // The backend is lb's NAT peer: it hears "fragmentation needed" from lb's SNAT address,
    // about its own packet, and lowers its path MTU toward that address. (A route's MTU
    // binds forwarded packets only when locked, for the kernel's forwarding as for XDP.)
    let mut lab = lab();
    lab.ns
        .ip("route add 10.70.0.10/32 dev v0 mtu lock 1400")
        .unwrap();
    lab.service("web", "10.70.0.100:80", "tcp", &["10.70.0.11:8080"]);
    let (v, _) = lab.run(lab.v0, &to_vip(SYN, CLIENT_PORT, b"").bytes());
    assert_eq!(v, XDP_TX);
    let (key, _) = lab.reverse(CLIENT, CLIENT_PORT).expect("a SNAT port");
    let from_backend = |l4: L4, payload: &[u8]| Frame {
        src_mac: mac(11),
        dst_mac: mac(0x01),
        src: BACKENDS[0],
        dst: LB0,
        ttl: 64,
        sport: 8080,
        dport: key.dst_port,
        l4,
        payload: payload.to_vec(),
    };
    let syn_ack = L4::Tcp {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
    };
    assert_eq!(
        lab.run(lab.v0, &from_backend(syn_ack, b"").bytes()).0,
        XDP_TX
    );
    assert_eq!(
        lab.run(lab.v0, &to_vip(ACK, CLIENT_PORT, b"").bytes()).0,
        XDP_TX
    );
    // A reply that fits goes to the client; a full-sized one is answered.
    assert_eq!(
        lab.run(lab.v0, &from_backend(ACK, &[7u8; 1360]).bytes()).0,
        XDP_TX
    );
    let big = with_df(from_backend(ACK, &[7u8; 1460]).bytes(), true);
    let (v, out) = lab.run(lab.v0, &big);
    assert_eq!(v, XDP_TX);
    assert_eq!(out, too_big_answer(&big, 1400));
    assert_eq!(lab.drops(DropReason::FragNeeded), 1);
}
