//! The XDP program on exact packets through BPF_PROG_TEST_RUN: verdicts, rewritten bytes
//! (compared whole, checksums included, against packets built by etherparse), drop counters.
use std::net::Ipv4Addr;

use lb::dataplane::Limits;
use lb_common::{IPPROTO_TCP, kernel_hop::KernelHopMeta, stats::DropReason};
use lb_tests::packet::*;

const SNAT: (u16, u16) = (61000, 65535);
const CLIENT_PORT: u16 = 40000;

fn lab() -> PacketLab {
    let limits = Limits {
        max_services: 64,
        max_backends: 64,
        maglev_slots: 8192,
        conntrack_entries: 4096,
    };
    PacketLab::new(&limits, SNAT).unwrap()
}

/// The three backends of service "web" at VIP:80 in [`web_lab`].
const WEB_BACKENDS: [&str; 3] = ["10.70.0.11:8080", "10.70.0.12:8080", "10.70.0.13:8080"];

/// A lab whose service "web", VIP:80 over TCP, has the three [`WEB_BACKENDS`].
fn web_lab() -> PacketLab {
    let mut lab = lab();
    lab.service("web", "10.70.0.100:80", "tcp", &WEB_BACKENDS);
    lab
}

/// A client packet to VIP:80 arriving on v0.
fn to_vip(l4: L4, payload: &[u8]) -> Frame {
    Frame {
        src_mac: mac(10),
        dst_mac: mac(0x01),
        src: CLIENT,
        dst: VIP,
        ttl: 64,
        sport: CLIENT_PORT,
        dport: 80,
        l4,
        payload: payload.to_vec(),
    }
}

fn backend_mac(ip: Ipv4Addr) -> [u8; 6] {
    mac(ip.octets()[3])
}

/// What lb must send to the backend for `f`: SNAT source, backend destination, one hop less.
fn forwarded(
    f: &Frame,
    snat: Ipv4Addr,
    snat_port: u16,
    backend: Ipv4Addr,
    bport: u16,
    smac: [u8; 6],
) -> Frame {
    Frame {
        src_mac: smac,
        dst_mac: backend_mac(backend),
        src: snat,
        dst: backend,
        ttl: f.ttl - 1,
        sport: snat_port,
        dport: bport,
        ..f.clone()
    }
}

/// The backend's SYN-ACK to lb's SNAT port `snat_port` (on v0's address).
fn syn_ack(backend: Ipv4Addr, snat_port: u16) -> Frame {
    Frame {
        src_mac: backend_mac(backend),
        dst_mac: mac(0x01),
        src: backend,
        dst: LB0,
        ttl: 64,
        sport: 8080,
        dport: snat_port,
        l4: L4::Tcp {
            syn: true,
            ack: true,
            fin: false,
            rst: false,
        },
        payload: vec![],
    }
}

/// Where a forwarded packet went, and from which SNAT port.
fn backend_and_port(out: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(out[30], out[31], out[32], out[33]),
        u16::from_be_bytes([out[34], out[35]]),
    )
}

/// A client connection from `sport` opened through lb: its SYN, and the backend's
/// answer (the flow is tracked from then on). Where it went, and from which SNAT port.
fn open(lab: &mut PacketLab, sport: u16) -> (Ipv4Addr, u16) {
    let syn = Frame {
        sport,
        ..to_vip(SYN, b"")
    };
    let (verdict, out) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(verdict, XDP_TX, "SYN from {sport}");
    let (backend, snat_port) = backend_and_port(&out);
    assert_eq!(
        lab.run(lab.v0, &syn_ack(backend, snat_port).bytes()).0,
        XDP_TX
    );
    (backend, snat_port)
}

/// Table rows for packets that lb must leave to the kernel untouched.
struct PassCase {
    what: &'static str,
    packet: Vec<u8>,
}

fn with(mut p: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut p);
    p
}

/// Re-computes the IPv4 header checksum after a test edited the header.
fn fix_ip_checksum(p: &mut [u8]) {
    let ihl = (p[14] & 0x0f) as usize * 4;
    p[24] = 0;
    p[25] = 0;
    let mut sum = 0u32;
    for w in p[14..14 + ihl].chunks(2) {
        sum += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    p[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn new_flow_established_flow_and_reply_are_rewritten_exactly() {
    let lab = web_lab();

    // New flow: balanced, SNATed from lb's address on v0, sent back out of v0. Its SYN
    // takes a SNAT port (the reverse entry); the flow is tracked once the backend answers.
    let syn = to_vip(SYN, b"");
    let (verdict, out) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(verdict, XDP_TX);
    let (key, rev) = lab.reverse(CLIENT, CLIENT_PORT).expect("SNAT port taken");
    assert!((SNAT.0..=SNAT.1).contains(&key.dst_port), "{key:?}");
    assert_eq!(
        (key.dst_addr, rev.vip_addr, rev.vip_port),
        (LB0.octets(), VIP.octets(), 80)
    );
    let backend = Ipv4Addr::from(key.src_addr);
    assert_eq!(
        out,
        forwarded(&syn, LB0, key.dst_port, backend, 8080, mac(0x01)).bytes(),
        "new flow"
    );
    assert!(
        lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
            .is_none(),
        "a SYN alone is not tracked"
    );

    // Reply: from the backend to lb's SNAT port, back to the client from the VIP.
    let reply = Frame {
        src_mac: backend_mac(backend),
        dst_mac: mac(0x01),
        src: backend,
        dst: LB0,
        ttl: 64,
        sport: 8080,
        dport: key.dst_port,
        l4: L4::Tcp {
            syn: true,
            ack: true,
            fin: false,
            rst: false,
        },
        payload: b"".to_vec(),
    };
    let (verdict, out) = lab.run(lab.v0, &reply.bytes());
    assert_eq!(verdict, XDP_TX);
    let expected = Frame {
        src_mac: mac(0x01),
        dst_mac: mac(10),
        src: VIP,
        dst: CLIENT,
        ttl: 63,
        sport: 80,
        dport: CLIENT_PORT,
        ..reply.clone()
    };
    assert_eq!(out, expected.bytes(), "reply");
    let conn = lab
        .conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
        .expect("tracked once the backend answered");
    assert_eq!(
        (conn.snat_port, conn.snat_addr),
        (key.dst_port, LB0.octets())
    );

    // Established: same backend, same SNAT port, payload intact.
    let data = to_vip(ACK, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    for _ in 0..3 {
        let (verdict, out) = lab.run(lab.v0, &data.bytes());
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            out,
            forwarded(&data, LB0, conn.snat_port, backend, 8080, mac(0x01)).bytes(),
            "established flow"
        );
    }
    let answer = Frame {
        l4: ACK,
        payload: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
        ..reply.clone()
    };
    let (verdict, out) = lab.run(lab.v0, &answer.bytes());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out,
        Frame {
            l4: ACK,
            payload: answer.payload.clone(),
            ..expected
        }
        .bytes(),
        "answer"
    );

    // A reply to a SNAT port nobody holds is not ours: the kernel gets it.
    let stray = Frame {
        dport: if conn.snat_port == SNAT.0 {
            SNAT.0 + 1
        } else {
            SNAT.0
        },
        ..reply
    };
    assert_eq!(lab.run(lab.v0, &stray.bytes()), (XDP_PASS, stray.bytes()));
}

/// A fresh node has no neighbour entry for a client that it never spoke to: the reply is
/// rewritten as usual and handed to the kernel (XDP_PASS with lb's metadata naming the
/// egress interface), whose tc program sends it through the neighbour layer; once the
/// kernel has the entry, XDP sends the next reply itself.
#[test]
fn a_reply_toward_a_client_without_a_neighbour_entry_is_handed_to_the_kernel() {
    let lab = web_lab();
    let stranger = Ipv4Addr::new(10, 70, 0, 60);
    let syn = Frame {
        src: stranger,
        src_mac: mac(60),
        ..to_vip(SYN, b"")
    };
    assert_eq!(lab.run(lab.v0, &syn.bytes()).0, XDP_TX);
    let (key, _) = lab.reverse(stranger, CLIENT_PORT).expect("SNAT port taken");
    let backend = Ipv4Addr::from(key.src_addr);
    let reply = syn_ack(backend, key.dst_port);
    let expected = Frame {
        src_mac: mac(0x01),
        dst_mac: mac(60),
        src: VIP,
        dst: stranger,
        ttl: 63,
        sport: 80,
        dport: CLIENT_PORT,
        ..reply.clone()
    }
    .bytes();

    let (verdict, out) = lab.run(lab.v0, &reply.bytes());
    assert_eq!(verdict, XDP_PASS);
    let (meta, frame) = KernelHopMeta::split(&out).expect("lb's metadata in front");
    assert_eq!(meta.ifindex, lab.v0);
    // The kernel writes the Ethernet header when it has resolved the next hop.
    assert_eq!(frame[14..], expected[14..], "the rewritten packet");
    assert_eq!(lab.drops(DropReason::NoNeighbor), 0);

    lab.ns
        .ip(&format!(
            "neigh replace {stranger} lladdr 02:00:00:00:00:3c dev v0 nud reachable"
        ))
        .unwrap();
    assert_eq!(
        lab.run(lab.v0, &reply.bytes()),
        (XDP_TX, expected),
        "once the kernel knows the neighbour"
    );
}

/// `"hash": "src_ip"`: every connection of one client reaches one backend, whatever its
/// port; other clients still spread over the backends, and a "5tuple" service (the
/// default) spreads one client's connections.
#[test]
fn a_service_hashed_by_client_address_sends_each_clients_connections_to_one_backend() {
    let mut lab = lab();
    let spec = |vip: &str, hash: Option<&str>| lb::model::ServiceSpec {
        vip: Some(vip.into()),
        protocol: Some("tcp".into()),
        backends: Some(WEB_BACKENDS.iter().map(|&b| b.into()).collect()),
        hash: hash.map(str::to_string),
        ..Default::default()
    };
    lab.service_as("sticky", spec("10.70.0.100:80", Some("src_ip")));
    lab.service_as("spread", spec("10.70.0.100:81", None));
    let backend_of = |client: Ipv4Addr, sport: u16, dport: u16| {
        let syn = Frame {
            src: client,
            sport,
            dport,
            ..to_vip(SYN, b"")
        };
        let (verdict, out) = lab.run(lab.v0, &syn.bytes());
        assert_eq!(verdict, XDP_TX, "SYN from {client}:{sport} to port {dport}");
        backend_and_port(&out).0
    };
    let mut per_client = std::collections::BTreeSet::new();
    for c in 20..80u8 {
        let client = Ipv4Addr::new(10, 70, 0, c);
        let mine: std::collections::BTreeSet<Ipv4Addr> =
            (0..8).map(|i| backend_of(client, 41000 + i, 80)).collect();
        assert_eq!(mine.len(), 1, "{client}'s connections went to {mine:?}");
        per_client.extend(mine);
    }
    assert_eq!(per_client.len(), 3, "clients spread over every backend");
    let spread: std::collections::BTreeSet<Ipv4Addr> =
        (0..24).map(|i| backend_of(CLIENT, 42000 + i, 81)).collect();
    assert_eq!(
        spread.len(),
        3,
        "a 5tuple service spreads one client's connections"
    );
}

#[test]
fn egress_on_another_interface_is_redirected_with_that_interfaces_address() {
    let mut lab = lab();
    lab.service("far", "10.70.0.100:443", "tcp", &["10.71.0.21:8443"]);
    let syn = Frame {
        dport: 443,
        ..to_vip(SYN, b"")
    };
    let (verdict, out) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(verdict, XDP_REDIRECT);
    let (key, _) = lab.reverse(CLIENT, CLIENT_PORT).unwrap();
    assert_eq!(key.dst_addr, LB2.octets());
    assert_eq!(
        out,
        forwarded(&syn, LB2, key.dst_port, FAR_BACKEND, 8443, mac(0x02)).bytes()
    );
    // Its reply comes in on v2 and leaves through v0.
    let reply = Frame {
        src_mac: mac(21),
        dst_mac: mac(0x02),
        src: FAR_BACKEND,
        dst: LB2,
        ttl: 64,
        sport: 8443,
        dport: key.dst_port,
        l4: ACK,
        payload: b"hello".to_vec(),
    };
    let (verdict, out) = lab.run(lab.v2, &reply.bytes());
    assert_eq!(verdict, XDP_REDIRECT);
    let expected = Frame {
        src_mac: mac(0x01),
        dst_mac: mac(10),
        src: VIP,
        dst: CLIENT,
        ttl: 63,
        sport: 443,
        dport: CLIENT_PORT,
        ..reply
    };
    assert_eq!(out, expected.bytes());
}

#[test]
fn udp_checksums_are_updated_or_left_absent() {
    let mut lab = lab();
    lab.service("dns", "10.70.0.100:53", "udp", &["10.70.0.11:5353"]);
    for (i, checksum) in [true, false].into_iter().enumerate() {
        let q = Frame {
            dport: 53,
            sport: 5000 + i as u16,
            ..to_vip(L4::Udp { checksum }, b"query")
        };
        let (verdict, out) = lab.run(lab.v0, &q.bytes());
        assert_eq!(verdict, XDP_TX);
        let (key, _) = lab.reverse(CLIENT, q.sport).unwrap();
        let expected = forwarded(
            &q,
            LB0,
            key.dst_port,
            Ipv4Addr::new(10, 70, 0, 11),
            5353,
            mac(0x01),
        );
        assert_eq!(out, expected.bytes(), "checksum {checksum}");
        if !checksum {
            assert_eq!(&out[40..42], &[0, 0], "an absent UDP checksum stays absent");
        }
    }
}

#[test]
fn packets_that_are_not_for_a_service_pass_untouched() {
    let mut lab = lab();
    lab.service("web", "10.70.0.100:80", "tcp", &["10.70.0.11:8080"]);
    let syn = to_vip(SYN, b"");
    let mut arp = syn.bytes();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut icmp = syn.bytes();
    icmp[23] = 1;
    fix_ip_checksum(&mut icmp);
    let cases = vec![
        PassCase {
            what: "not a VIP",
            packet: Frame {
                dst: Ipv4Addr::new(10, 70, 0, 99),
                ..syn.clone()
            }
            .bytes(),
        },
        PassCase {
            what: "VIP, other port",
            packet: Frame {
                dport: 81,
                ..syn.clone()
            }
            .bytes(),
        },
        PassCase {
            what: "VIP and port, other protocol",
            packet: Frame {
                l4: UDP,
                ..syn.clone()
            }
            .bytes(),
        },
        PassCase {
            what: "ARP",
            packet: arp,
        },
        PassCase {
            what: "ICMP",
            packet: icmp,
        },
        PassCase {
            what: "first fragment",
            packet: with(syn.bytes(), |p| {
                p[20] = 0x20;
                fix_ip_checksum(p);
            }),
        },
        PassCase {
            what: "later fragment",
            packet: with(syn.bytes(), |p| {
                p[20] = 0x00;
                p[21] = 0x10;
                fix_ip_checksum(p);
            }),
        },
        PassCase {
            what: "IP options",
            packet: with(syn.bytes(), |p| {
                // IHL 6: four bytes of options (NOPs) before the TCP header.
                p.splice(34..34, [1u8, 1, 1, 1]);
                p[14] = 0x46;
                let len = u16::from_be_bytes([p[16], p[17]]) + 4;
                p[16..18].copy_from_slice(&len.to_be_bytes());
                fix_ip_checksum(p);
            }),
        },
    ];
    for case in cases {
        let (verdict, out) = lab.run(lab.v0, &case.packet);
        assert_eq!(verdict, XDP_PASS, "{}", case.what);
        assert_eq!(out, case.packet, "{}: changed", case.what);
    }
    assert!(
        lab.reverse(CLIENT, CLIENT_PORT).is_none(),
        "nothing was tracked"
    );
}

#[test]
fn every_truncation_of_the_headers_is_dropped_and_counted() {
    let mut lab = lab();
    lab.service("web", "10.70.0.100:80", "tcp", &["10.70.0.11:8080"]);
    lab.service("dns", "10.70.0.100:53", "udp", &["10.70.0.11:5353"]);
    let tcp = to_vip(SYN, b"").bytes();
    let udp = Frame {
        dport: 53,
        ..to_vip(UDP, b"")
    }
    .bytes();
    let mut dropped = 0;
    // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
    for (what, full) in [("tcp", &tcp), ("udp", &udp)] {
        for len in 14..full.len() {
            let (verdict, _) = lab.run(lab.v0, &full[..len]);
            assert_eq!(verdict, XDP_DROP, "{what} cut to {len} bytes");
            dropped += 1;
        }
    }
    assert_eq!(
        lab.drops(DropReason::Truncated) + lab.drops(DropReason::Malformed),
        dropped
    );
    assert!(lab.drops(DropReason::Truncated) > 0);
    assert!(
        lab.reverse(CLIENT, CLIENT_PORT).is_none(),
        "a truncated packet created a flow"
    );
}

#[test]
fn malformed_headers_are_dropped_and_counted() {
    let mut lab = lab();
    lab.service("web", "10.70.0.100:80", "tcp", &["10.70.0.11:8080"]);
    lab.service("dns", "10.70.0.100:53", "udp", &["10.70.0.11:5353"]);
    let tcp = to_vip(SYN, b"payload").bytes();
    let udp = Frame {
        dport: 53,
        ..to_vip(UDP, b"payload")
    }
    .bytes();
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        (
            "IHL below 5",
            with(tcp.clone(), |p| p[14] = 0x44),
            DropReason::Malformed,
        ),
        (
            "IP version 6 in an IPv4 frame",
            with(tcp.clone(), |p| p[14] = 0x65),
            DropReason::Malformed,
        ),
        (
            "total length below the header",
            with(tcp.clone(), |p| {
                p[16..18].copy_from_slice(&10u16.to_be_bytes());
            }),
            DropReason::Malformed,
        ),
        (
            "total length beyond the frame",
            with(tcp.clone(), |p| {
                p[16..18].copy_from_slice(&1400u16.to_be_bytes());
            }),
            DropReason::Truncated,
        ),
        (
            "TCP data offset below 5",
            with(tcp.clone(), |p| p[46] = 0x40),
            DropReason::Malformed,
        ),
        (
            "TCP data offset beyond the packet",
            with(tcp.clone(), |p| p[46] = 0xf0),
            DropReason::Malformed,
        ),
        (
            "UDP length below 8",
            with(udp.clone(), |p| {
                p[38..40].copy_from_slice(&4u16.to_be_bytes());
            }),
            DropReason::Malformed,
        ),
        (
            "UDP length beyond the packet",
            with(udp.clone(), |p| {
                p[38..40].copy_from_slice(&400u16.to_be_bytes());
            }),
            DropReason::Malformed,
        ),
        (
            "TTL 1",
            with(tcp.clone(), |p| p[22] = 1),
            DropReason::TtlExceeded,
        ),
    ];
    for (what, packet, reason) in cases {
        let before = lab.drops(reason);
        let (verdict, _) = lab.run(lab.v0, &packet);
        assert_eq!(verdict, XDP_DROP, "{what}");
        assert_eq!(
            lab.drops(reason),
            before + 1,
            "{what}: not counted as {}",
            reason.name()
        );
    }
    assert!(lab.reverse(CLIENT, CLIENT_PORT).is_none());
}

#[test]
fn a_flow_keeps_its_backend_until_that_backend_is_removed() {
    let mut lab = web_lab();
    let all = WEB_BACKENDS;
    let dst_of = |out: &[u8]| Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let (backend, _) = open(&mut lab, CLIENT_PORT);
    let first = lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP).unwrap();
    // Removing the other backends leaves the flow where it is.
    let others: Vec<&str> = all
        .iter()
        .copied()
        .filter(|b| !b.starts_with(&format!("{backend}:")))
        .collect();
    lab.service(
        "web",
        "10.70.0.100:80",
        "tcp",
        &[&format!("{backend}:8080"), others[0]],
    );
    let (_, out) = lab.run(lab.v0, &to_vip(ACK, b"x").bytes());
    assert_eq!(dst_of(&out), backend);
    assert_eq!(
        lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
            .unwrap()
            .snat_port,
        first.snat_port
    );
    // Removing its own backend drains it: the flow keeps it, a new flow cannot have it.
    lab.service("web", "10.70.0.100:80", "tcp", &[others[0]]);
    let (verdict, out) = lab.run(lab.v0, &to_vip(ACK, b"x").bytes());
    assert_eq!((verdict, dst_of(&out)), (XDP_TX, backend));
    for sport in CLIENT_PORT + 1..CLIENT_PORT + 20 {
        let (other, _) = open(&mut lab, sport);
        assert_eq!(
            other.to_string() + ":8080",
            others[0],
            "a new flow from {sport}"
        );
    }
    // The sweep counts its flow: it drains until its time is up, then the flow is
    // balanced again on its next packet.
    // The sweep counts the flows: the backend removed first, which has none, is retired;
    // this one drains until its time is up, then the flow is balanced again on its next
    // packet.
    let draining = |lab: &PacketLab| -> Vec<Ipv4Addr> {
        let inst = lab.dataplane.installed("web").unwrap();
        inst.draining.iter().map(|d| *d.addr.ip()).collect()
    };
    assert_eq!(draining(&lab).len(), 2);
    let now = std::time::Instant::now();
    lab.dataplane.sweep().unwrap();
    assert_eq!(lab.dataplane.end_drains(now).unwrap(), ["web"]);
    assert_eq!(draining(&lab), [backend]);
    let (_, out) = lab.run(lab.v0, &to_vip(ACK, b"x").bytes());
    assert_eq!(
        dst_of(&out),
        backend,
        "the flow left its backend while it drains"
    );
    let after = now + std::time::Duration::from_secs(301);
    assert_eq!(lab.dataplane.end_drains(after).unwrap(), ["web"]);
    assert!(draining(&lab).is_empty());
    let (verdict, out) = lab.run(lab.v0, &to_vip(ACK, b"x").bytes());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(dst_of(&out).to_string() + ":8080", others[0]);
}

#[test]
fn a_drained_backend_is_retired_once_the_sweep_finds_no_flow_of_its_own() {
    let mut lab = web_lab();
    let (backend, _) = open(&mut lab, CLIENT_PORT);
    // The client's ACK ends the handshake (a reset is then taken whatever its sequence).
    lab.run(lab.v0, &to_vip(ACK, b"").bytes());
    let rest: Vec<&str> = WEB_BACKENDS
        .iter()
        .copied()
        .filter(|b| !b.starts_with(&format!("{backend}:")))
        .collect();
    lab.service("web", "10.70.0.100:80", "tcp", &rest);
    let installed = |lab: &PacketLab| lab.dataplane.installed("web").unwrap().draining.len();
    assert_eq!(installed(&lab), 1);
    lab.dataplane.sweep().unwrap();
    assert!(
        lab.dataplane
            .end_drains(std::time::Instant::now())
            .unwrap()
            .is_empty()
    );
    // The client resets its connection: the next sweep counts no live flow.
    let rst = L4::Tcp {
        syn: false,
        ack: true,
        fin: false,
        rst: true,
    };
    let (_, out) = lab.run(lab.v0, &to_vip(rst, b"").bytes());
    assert_eq!(
        backend_and_port(&out).0,
        backend,
        "the reset reaches its backend"
    );
    lab.dataplane.sweep().unwrap();
    assert_eq!(
        lab.dataplane.end_drains(std::time::Instant::now()).unwrap(),
        ["web"]
    );
    assert_eq!(installed(&lab), 0);
}

#[test]
fn a_write_that_cuts_removed_backends_balances_their_flows_again_at_once() {
    let mut lab = web_lab();
    let (backend, _) = open(&mut lab, CLIENT_PORT);
    let rest: Vec<serde_json::Value> = WEB_BACKENDS
        .iter()
        .filter(|b| !b.starts_with(&format!("{backend}:")))
        .map(|&b| b.into())
        .collect();
    lab.service_as(
        "web",
        lb::model::ServiceSpec {
            vip: Some("10.70.0.100:80".into()),
            backends: Some(rest.clone()),
            cut_removed: true,
            ..Default::default()
        },
    );
    assert!(lab.dataplane.installed("web").unwrap().draining.is_empty());
    let (verdict, out) = lab.run(lab.v0, &to_vip(ACK, b"x").bytes());
    assert_eq!(verdict, XDP_TX);
    let moved = backend_and_port(&out).0;
    assert!(rest.contains(&format!("{moved}:8080").into()), "{moved}");
}

#[test]
fn a_service_without_a_routable_backend_drops_and_counts() {
    let mut lab = lab();
    // 10.99.0.0/16 is not routed in the lab.
    lab.service("nowhere", "10.70.0.100:80", "tcp", &["10.99.0.1:80"]);
    let (verdict, _) = lab.run(lab.v0, &to_vip(SYN, b"").bytes());
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(lab.drops(DropReason::NoRoute), 1);
}

#[test]
fn a_retried_syn_finds_its_port_and_the_backends_answer_tracks_the_flow() {
    let lab = web_lab();
    // A retried SYN finds the SNAT port and backend its first try took, with no
    // conntrack entry: a SYN that is never answered holds only its embryonic port.
    let syn = to_vip(SYN, b"");
    let (_, first) = lab.run(lab.v0, &syn.bytes());
    let (verdict, again) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(
        (verdict, &again),
        (XDP_TX, &first),
        "a SYN retry went elsewhere"
    );
    assert!(
        lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
            .is_none(),
        "a retried SYN is not tracked"
    );

    // Before the backend answers, a client's ACK belongs to no flow: dropped, counted,
    // and no state is made for it.
    let ack = to_vip(ACK, b"x");
    let before = lab.drops(DropReason::UnknownFlow);
    assert_eq!(lab.run(lab.v0, &ack.bytes()).0, XDP_DROP);
    assert_eq!(lab.drops(DropReason::UnknownFlow), before + 1);
    assert!(
        lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
            .is_none()
    );

    // The backend's SYN-ACK tracks the flow on the port the SYN took.
    let (key, rev) = lab.reverse(CLIENT, CLIENT_PORT).unwrap();
    let backend = Ipv4Addr::from(key.src_addr);
    assert_eq!(
        lab.run(lab.v0, &syn_ack(backend, key.dst_port).bytes()).0,
        XDP_TX
    );
    let conn = lab
        .conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
        .expect("tracked by the answer");
    assert_eq!(
        (conn.snat_port, conn.backend_id),
        (key.dst_port, rev.backend_id)
    );
    let (verdict, out) = lab.run(lab.v0, &ack.bytes());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(backend_and_port(&out), (backend, key.dst_port));
}

/// The backend Maglev gives a client flow: the paper's table (the test kit's reference,
/// not lb's), at the slot the flow's keyed hash names.
fn maglev_pick(lab: &PacketLab, service: &str, cport: u16) -> Ipv4Addr {
    let inst = lab.dataplane.installed(service).unwrap();
    let addrs: Vec<std::net::SocketAddrV4> = inst.backends.iter().map(|&(a, _)| a).collect();
    let table = lb_tests::maglev_ref::table(&addrs, inst.table_size as u64);
    let key = lb::dataplane::Settings::with_ports(0, 0).flow_key;
    let hash =
        lb_common::hash::flow_hash(key, CLIENT.octets(), VIP.octets(), cport, 80, IPPROTO_TCP);
    let slot = lb_common::hash::reduce(lb_common::hash::slot_hash(hash), inst.table_size);
    *addrs[table[slot as usize]].ip()
}

#[test]
fn a_new_connection_on_a_reused_port_is_balanced_afresh() {
    let mut lab = lab();
    let first = ["10.70.0.11:8080", "10.70.0.12:8080"];
    lab.service("web", "10.70.0.100:80", "tcp", &first);
    // Find a client port whose backend changes when a third backend comes.
    let mut port = CLIENT_PORT;
    let old = loop {
        let before = maglev_pick(&lab, "web", port);
        lab.service(
            "web",
            "10.70.0.100:80",
            "tcp",
            &["10.70.0.11:8080", "10.70.0.12:8080", "10.70.0.13:8080"],
        );
        let after = maglev_pick(&lab, "web", port);
        lab.service("web", "10.70.0.100:80", "tcp", &first);
        if before != after {
            break before;
        }
        port += 1;
    };
    let dst_of = |out: &[u8]| Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let flow = |l4| Frame {
        sport: port,
        ..to_vip(l4, b"")
    };
    // A connection, tracked, then closed by the client.
    assert_eq!(open(&mut lab, port).0, old);
    assert_eq!(dst_of(&lab.run(lab.v0, &flow(ACK).bytes()).1), old);
    lab.run(
        lab.v0,
        &flow(L4::Tcp {
            syn: false,
            ack: true,
            fin: true,
            rst: false,
        })
        .bytes(),
    );
    // The third backend arrives; the client reuses its port a little later.
    lab.service(
        "web",
        "10.70.0.100:80",
        "tcp",
        &["10.70.0.11:8080", "10.70.0.12:8080", "10.70.0.13:8080"],
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (verdict, out) = lab.run(lab.v0, &flow(SYN).bytes());
    assert_eq!(verdict, XDP_TX);
    let (new, new_port) = backend_and_port(&out);
    assert_eq!(new, maglev_pick(&lab, "web", port));
    assert_ne!(new, old);
    // The new connection's next packet follows its SYN (once its backend answered), not
    // the old connection's entry.
    assert_eq!(lab.run(lab.v0, &syn_ack(new, new_port).bytes()).0, XDP_TX);
    let (verdict, out) = lab.run(lab.v0, &flow(ACK).bytes());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        dst_of(&out),
        new,
        "the reused port went to the old connection's backend"
    );
    let conn = lab.conn(CLIENT, port, VIP, 80, IPPROTO_TCP).unwrap();
    assert_eq!(conn.snat_port, u16::from_be_bytes([out[34], out[35]]));
}

#[test]
fn a_backend_down_and_up_again_leaves_the_table_in_the_map_as_it_was() {
    let mut lab = web_lab();
    let before = lab.dataplane.table_in_map("web").unwrap();
    let fallen: std::net::SocketAddrV4 = "10.70.0.12:8080".parse().unwrap();
    let fallen_id = {
        // The id whose slots go: the one the table loses.
        assert!(
            lab.dataplane
                .set_health("web", &std::collections::HashSet::from([fallen]))
                .unwrap()
        );
        let down = lab.dataplane.table_in_map("web").unwrap();
        let lost: std::collections::HashSet<u32> = before
            .iter()
            .copied()
            .filter(|id| !down.contains(id))
            .collect();
        assert_eq!(lost.len(), 1, "one backend left the table: {lost:?}");
        for (slot, (&b, &d)) in before.iter().zip(&down).enumerate() {
            if !lost.contains(&b) {
                assert_eq!(b, d, "slot {slot} of a healthy backend moved");
            }
        }
        *lost.iter().next().unwrap()
    };
    assert!(
        lab.dataplane
            .set_health("web", &std::collections::HashSet::new())
            .unwrap()
    );
    let after = lab.dataplane.table_in_map("web").unwrap();
    assert_eq!(
        after, before,
        "backend {fallen_id} back: the table differs from before it fell"
    );
    assert!(
        !lab.dataplane
            .set_health("web", &std::collections::HashSet::new())
            .unwrap(),
        "up twice changed something"
    );
}

/// Services whose keys fall on one VIP filter slot are each forwarded (through the
/// `services` map), and a slot of one key names its service's entry itself, so that the
/// program needs no hash lookup: equal to `services` after every change, and gone
/// before the entry is.
#[test]
fn services_sharing_a_filter_slot_are_each_forwarded_and_a_slot_of_one_names_its_service() {
    use lb_common::service::{FilterSlot, ServiceKey};
    let mut lab = lab();
    let web = ServiceKey::new(VIP.octets(), 80, IPPROTO_TCP);
    let (other_addr, other_port) = (101..=254u8)
        .flat_map(|h| (1..=u16::MAX).map(move |p| (Ipv4Addr::new(10, 70, 0, h), p)))
        .find(|(a, p)| {
            ServiceKey::new(a.octets(), *p, IPPROTO_TCP).filter_slot() == web.filter_slot()
        })
        .expect("a key on web's filter slot");
    let other = ServiceKey::new(other_addr.octets(), other_port, IPPROTO_TCP);
    let names = |lab: &PacketLab, key: &ServiceKey| {
        let slot = lab.filter_slot(key);
        let entry = lab.service_entry(key).expect("services entry");
        slot == FilterSlot::new(1, Some((*key, entry)))
    };
    let backend = |last: u8| Some(Ipv4Addr::new(10, 70, 0, last));
    let syn_to = |lab: &PacketLab, dst: Ipv4Addr, dport: u16, sport: u16| {
        let syn = Frame {
            dst,
            dport,
            sport,
            ..to_vip(SYN, b"")
        };
        let (verdict, out) = lab.run(lab.v0, &syn.bytes());
        (
            verdict,
            (verdict == XDP_TX).then(|| backend_and_port(&out).0),
        )
    };

    lab.service("web", "10.70.0.100:80", "tcp", &["10.70.0.11:8080"]);
    assert!(names(&lab, &web));
    assert_eq!(syn_to(&lab, VIP, 80, 40001), (XDP_TX, backend(11)));

    lab.service(
        "other",
        &format!("{other_addr}:{other_port}"),
        "tcp",
        &["10.70.0.12:8080"],
    );
    assert_eq!(
        lab.filter_slot(&web),
        FilterSlot::new(2, None),
        "a slot of two keys names neither"
    );
    assert_eq!(syn_to(&lab, VIP, 80, 40002).1, backend(11));
    assert_eq!(syn_to(&lab, other_addr, other_port, 40003).1, backend(12));

    assert!(lab.dataplane.remove("web").unwrap());
    assert!(names(&lab, &other));
    assert_eq!(syn_to(&lab, VIP, 80, 40004).0, XDP_PASS);
    assert_eq!(syn_to(&lab, other_addr, other_port, 40005).1, backend(12));

    // A table of another size lies elsewhere in `maglev`: the slot follows the entry.
    let before = lab.service_entry(&other).unwrap();
    let spec = lb::model::ServiceSpec {
        vip: Some(format!("{other_addr}:{other_port}")),
        protocol: Some("tcp".into()),
        backends: Some(vec!["10.70.0.13:8080".into()]),
        table_size: Some(if before.table_size == 211 { 223 } else { 211 }),
        ..Default::default()
    };
    lab.dataplane
        .upsert(&spec.validate("other").unwrap(), &Default::default())
        .unwrap();
    let after = lab.service_entry(&other).unwrap();
    assert_ne!(after.table_offset, before.table_offset);
    assert!(names(&lab, &other));
    assert_eq!(syn_to(&lab, other_addr, other_port, 40006).1, backend(13));

    assert!(lab.dataplane.remove("other").unwrap());
    assert_eq!(lab.filter_slot(&other), FilterSlot::default());
    assert_eq!(syn_to(&lab, other_addr, other_port, 40007).0, XDP_PASS);
}
