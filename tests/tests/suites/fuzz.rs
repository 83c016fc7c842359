//! Random and mutated packets through the XDP program (BPF_PROG_TEST_RUN), with services,
//! live flows, held ports and, in one run, cookie mode set up. Every verdict must be PASS
//! (the packet untouched), DROP, or a rewritten packet (sent, or handed to the kernel with
//! lb's metadata when its next hop is unresolved) whose checksums verify (checked with
//! etherparse), that goes to a configured backend or to the client of the flow it belongs
//! to (by the reverse-NAT entry of its port), and whose TTL was decremented when it is the
//! client's or backend's own packet forwarded. No packet may leave with another flow's
//! addresses.
use std::net::Ipv4Addr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb::dataplane::{CookieMode, Limits, Settings};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, flow::FlowKey, kernel_hop::KernelHopMeta};
use lb_tests::{fuzz_rng::Rng, packet::*, segment::*};

const PACKETS_PER_RUN: u32 = 60_000;
const XDP_ABORTED: u32 = 0;
const SNAT: (u16, u16) = (61000, 61999);

fn backends() -> [Ipv4Addr; 4] {
    [
        Ipv4Addr::new(10, 70, 0, 11),
        Ipv4Addr::new(10, 70, 0, 12),
        Ipv4Addr::new(10, 70, 0, 13),
        FAR_BACKEND,
    ]
}

fn lab(cookies: CookieMode) -> PacketLab {
    let limits = Limits {
        max_services: 64,
        max_backends: 64,
        maglev_slots: 8192,
        conntrack_entries: 4096,
    };
    let settings = Settings {
        cookies,
        ..Settings::with_ports(SNAT.0, SNAT.1)
    };
    let mut lab = PacketLab::with_settings(&limits, &settings).unwrap();
    lab.service(
        "web",
        "10.70.0.100:80",
        "tcp",
        &["10.70.0.11:8080", "10.70.0.12:8080", "10.70.0.13:8080"],
    );
    lab.service(
        "dns",
        "10.70.0.100:53",
        "udp",
        &["10.70.0.11:5353", "10.70.0.12:5353"],
    );
    lab.service("far", "10.70.0.100:443", "tcp", &["10.71.0.21:8443"]);
    lab
}

/// The addressing of a packet as the program would read it (None: not IPv4 TCP/UDP).
#[derive(Debug, Clone, Copy)]
struct Tuple {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    ttl: u8,
    /// TCP flags byte (0 for UDP).
    flags: u8,
}

fn tuple(bytes: &[u8]) -> Option<Tuple> {
    let p = SlicedPacket::from_ethernet(bytes).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let h = ip.header();
    let (sport, dport, proto, flags) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (
            t.source_port(),
            t.destination_port(),
            IPPROTO_TCP,
            t.slice()[13],
        ),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port(), IPPROTO_UDP, 0),
        _ => return None,
    };
    Some(Tuple {
        src: h.source_addr(),
        dst: h.destination_addr(),
        sport,
        dport,
        proto,
        ttl: h.ttl(),
        flags,
    })
}

/// Checks a packet lb sent: both checksums, with an implementation that is not lb's.
fn checksums_verify(bytes: &[u8], input_udp_check_zero: bool) -> Result<(), String> {
    let p = SlicedPacket::from_ethernet(bytes).map_err(|e| format!("unparsable: {e}"))?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return Err("not IPv4".into());
    };
    let iph = ip.header().to_header();
    if iph.header_checksum != iph.calc_header_checksum() {
        return Err("bad IP header checksum".into());
    }
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            if h.checksum != h.calc_checksum_ipv4(&iph, t.payload()).unwrap() {
                return Err("bad TCP checksum".into());
            }
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            if h.checksum == 0 {
                if !input_udp_check_zero {
                    return Err("a UDP checksum became zero".into());
                }
            } else if h.checksum != h.calc_checksum_ipv4(&iph, u.payload()).unwrap() {
                return Err("bad UDP checksum".into());
            }
        }
        _ => return Err("not TCP or UDP".into()),
    }
    Ok(())
}

/// One packet of the mix: a client's or a backend's, valid or not, then maybe mutated.
fn packet(rng: &mut Rng, held: &[(FlowKey, u16)]) -> Vec<u8> {
    let clients = [
        CLIENT,
        CLIENT,
        Ipv4Addr::new(10, 70, 0, 50),
        Ipv4Addr::new(192, 0, 2, 9),
    ];
    let sports = [40000u16, 40001, 40002, 40003, 55555, 1024, 61000];
    let tcp_flags = |rng: &mut Rng| L4::Tcp {
        syn: rng.chance(40),
        ack: rng.chance(70),
        fin: rng.chance(15),
        rst: rng.chance(8),
    };
    let mut frame = Frame {
        src_mac: mac(10),
        dst_mac: mac(0x01),
        src: rng.pick(&clients),
        dst: VIP,
        ttl: rng.pick(&[64u8, 64, 2, 1, 0, 255]),
        sport: rng.pick(&sports),
        dport: rng.pick(&[80u16, 80, 53, 443, 22]),
        l4: SYN,
        payload: (0..rng.below(40)).map(|_| rng.next_u64() as u8).collect(),
    };
    match rng.below(10) {
        // A backend's packet to a port lb holds (or near one).
        0..=2 if !held.is_empty() => {
            let (k, _) = held[rng.below(held.len())];
            frame.src = Ipv4Addr::from(k.src_addr);
            frame.sport = k.src_port;
            frame.dst = Ipv4Addr::from(k.dst_addr);
            frame.dport = if rng.chance(80) {
                k.dst_port
            } else {
                k.dst_port.wrapping_add(rng.below(3) as u16)
            };
            frame.src_mac = mac(frame.src.octets()[3]);
            frame.l4 = if k.proto == IPPROTO_UDP {
                UDP
            } else {
                tcp_flags(rng)
            };
        }
        // UDP to a VIP, sometimes without a checksum.
        3 => {
            frame.l4 = L4::Udp {
                checksum: rng.chance(80),
            }
        }
        _ => frame.l4 = tcp_flags(rng),
    }
    let mut bytes = match frame.l4 {
        L4::Tcp { .. } => {
            let mut s = Seg::new(frame, rng.next_u64() as u32, rng.next_u64() as u32);
            if rng.chance(50) {
                s.mss = Some(rng.pick(&[536u16, 1460, 9000]));
                s.sack_ok = rng.chance(50);
                s.ts = rng
                    .chance(70)
                    .then(|| (rng.next_u64() as u32, rng.next_u64() as u32));
                s.wscale = rng.chance(50).then(|| rng.below(15) as u8);
            }
            s.bytes()
        }
        L4::Udp { .. } => frame.bytes(),
    };
    // Mutations.
    if rng.chance(25) {
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
        }
    }
    if rng.chance(5) {
        // A fragment: more-fragments set, or an offset.
        if rng.chance(50) {
            bytes[20] |= 0x20;
        } else {
            bytes[21] = 1 + rng.below(200) as u8;
        }
    }
    if rng.chance(5) {
        // Garbage TCP options: a data offset and option bytes of any kind.
        if bytes.len() > 60 && bytes[23] == 6 {
            bytes[46] = (5 + rng.below(11) as u8) << 4;
            for b in bytes.iter_mut().skip(54).take(8) {
                *b = rng.next_u64() as u8;
            }
        }
    }
    if rng.chance(5) {
        // (BPF_PROG_TEST_RUN wants at least an Ethernet header.)
        bytes.truncate(14 + rng.below(bytes.len() - 14));
    }
    bytes
}

/// The reverse-NAT entries now held, as (key, client port).
fn held(lab: &PacketLab) -> Vec<(FlowKey, u16)> {
    lab.reverse_entries()
        .into_iter()
        .map(|(k, r)| (k, r.client_port))
        .collect()
}

fn fuzz(cookies: CookieMode, seed: u64) {
    println!("seed {seed}");
    let lab = lab(cookies);
    let mut rng = Rng::new(seed);
    // Live flows first, so that there are ports to hit.
    for sport in 40000..40004u16 {
        let syn = Seg::linux_syn(
            Frame {
                src_mac: mac(10),
                dst_mac: mac(0x01),
                src: CLIENT,
                dst: VIP,
                ttl: 64,
                sport,
                dport: 80,
                l4: SYN,
                payload: vec![],
            },
            1000,
            5000,
        );
        lab.run(lab.v0, &syn.bytes());
    }
    let mut ports = held(&lab);
    let backends = backends();
    let mut sent = [0u32; 5];
    for n in 0..PACKETS_PER_RUN {
        if n % 2000 == 0 {
            ports = held(&lab);
        }
        let input = packet(&mut rng, &ports);
        let ingress = if rng.chance(90) { lab.v0 } else { lab.v2 };
        let (verdict, raw) = lab.run(ingress, &input);
        // A frame handed to the kernel to be sent (its next hop has no neighbour entry
        // yet) comes with lb's metadata in front; it is checked as a forwarded one.
        let handed_up = match verdict {
            XDP_PASS if raw != input => KernelHopMeta::split(&raw),
            _ => None,
        };
        let out = handed_up.map_or(raw.clone(), |(_, frame)| frame.to_vec());
        let fail = |why: String| -> ! {
            panic!(
                "packet {n} (seed {seed}), verdict {verdict}: {why}\nin:  {input:02x?}\nout: {raw:02x?}"
            )
        };
        sent[verdict.min(4) as usize] += 1;
        match verdict {
            XDP_DROP => continue,
            XDP_PASS if raw == input => continue,
            XDP_PASS => match handed_up {
                Some((meta, _)) if [lab.v0, lab.v2].contains(&meta.ifindex) => {}
                Some((meta, _)) => fail(format!("handed up to leave by ifindex {}", meta.ifindex)),
                None => fail("passed, but changed".into()),
            },
            XDP_TX | XDP_REDIRECT => {}
            XDP_ABORTED => fail("aborted".into()),
            other => fail(format!("verdict {other}")),
        }
        let Some(i) = tuple(&input) else {
            fail("forwarded a packet that is not IPv4 TCP or UDP".into())
        };
        // lb updates checksums incrementally, as routers do: a packet that came in with a
        // wrong one leaves with a wrong one (its receiver drops it, as without lb).
        let udp_zero =
            i.proto == IPPROTO_UDP && input.len() >= 42 && input[40] == 0 && input[41] == 0;
        if checksums_verify(&input, true).is_ok()
            && let Err(e) = checksums_verify(&out, udp_zero)
        {
            fail(e);
        }
        let o = tuple(&out).unwrap();
        let made_by_lb = o.flags != i.flags;
        let lb_answers =
            o.src == i.dst && o.dst == i.src && o.sport == i.dport && o.dport == i.sport;
        if lb_answers && made_by_lb {
            // lb's own answer: its cookie SYN-ACK from the VIP, or its ACK of a backend's
            // SYN-ACK from the SNAT port the backend wrote to.
            let from_snat_port = lab
                .reverse_at(&FlowKey::new(
                    i.src.octets(),
                    i.sport,
                    i.dst.octets(),
                    i.dport,
                    i.proto,
                ))
                .is_some();
            if o.src != VIP && !from_snat_port {
                fail(
                    "lb answered from an address that is neither a VIP nor a port it holds".into(),
                );
            }
            continue;
        }
        if !made_by_lb && o.ttl != i.ttl.wrapping_sub(1) {
            fail(format!("TTL {} -> {}", i.ttl, o.ttl));
        }
        if i.ttl <= 1 {
            fail("forwarded with a TTL that expires".into());
        }
        // A reply: the input came to a port lb holds, and goes to that flow's client, from
        // its VIP.
        let as_reply = FlowKey::new(i.src.octets(), i.sport, i.dst.octets(), i.dport, i.proto);
        if let Some(r) = lab.reverse_at(&as_reply)
            && (r.client_addr, r.client_port, r.vip_addr, r.vip_port)
                == (o.dst.octets(), o.dport, o.src.octets(), o.sport)
        {
            continue;
        }
        // Otherwise a client's packet: to a backend, from a SNAT port whose entry is this
        // very client flow's.
        if !backends.contains(&o.dst) {
            fail(format!(
                "to {}, which is neither a backend nor the flow's client",
                o.dst
            ));
        }
        let key = FlowKey::new(o.dst.octets(), o.dport, o.src.octets(), o.sport, o.proto);
        let Some(r) = lab.reverse_at(&key) else {
            fail(format!("to a backend from a port nobody holds: {key:?}"));
        };
        if (r.client_addr, r.client_port, r.vip_addr, r.vip_port)
            != (i.src.octets(), i.sport, i.dst.octets(), i.dport)
        {
            fail(format!("to a backend on another flow's port: {r:?}"));
        }
    }
    println!("verdicts (aborted, drop, pass, tx, redirect): {sent:?}");
    assert!(
        sent[3] + sent[4] > 1000,
        "too few packets forwarded to mean much: {sent:?}"
    );
}

#[test]
fn random_and_mutated_packets_are_passed_dropped_or_forwarded_correctly() {
    fuzz(CookieMode::Never, 0x5eed_0001);
}

#[test]
fn random_and_mutated_packets_in_cookie_mode_are_passed_dropped_or_forwarded_correctly() {
    fuzz(CookieMode::Always, 0x5eed_0002);
}
