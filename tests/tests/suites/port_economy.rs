//! The SNAT port economy and the flood defence on exact packets through
//! BPF_PROG_TEST_RUN: when a port is free again, which SYN a backend's TIME_WAIT lets reuse
//! a port, allocation near a full range, what a full flow table does to live flows, and
//! SYN cookies end to end (lb's SYN-ACK, the ACK that proves the client, the handshake lb
//! makes with the backend, and the translation of the flow's sequence numbers).
use std::net::Ipv4Addr;

use lb::dataplane::{CookieMode, Limits, Settings};
use lb_common::{
    IPPROTO_TCP,
    flow::{CONN_HANDSHAKE, state},
    stats::DropReason,
};
use lb_tests::{packet::*, segment::*};

const CLIENT_PORT: u16 = 40000;
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 11);

fn limits(conntrack_entries: u32) -> Limits {
    Limits {
        max_services: 64,
        max_backends: 64,
        maglev_slots: 8192,
        conntrack_entries,
    }
}

/// A lab whose only service, VIP:80, has one backend, BACKEND:8080.
fn lab_with(snat: (u16, u16), cookies: CookieMode, conntrack_entries: u32) -> PacketLab {
    let settings = Settings {
        cookies,
        ..Settings::with_ports(snat.0, snat.1)
    };
    let mut lab = PacketLab::with_settings(&limits(conntrack_entries), &settings).unwrap();
    lab.service("web", "10.70.0.100:80", "tcp", &["10.70.0.11:8080"]);
    lab
}

fn flags(syn: bool, ack: bool, fin: bool, rst: bool) -> L4 {
    L4::Tcp { syn, ack, fin, rst }
}

/// The client's segment from `sport` to VIP:80.
fn client(sport: u16, l4: L4, seq: u32, ack: u32) -> Seg {
    Seg::new(
        Frame {
            src_mac: mac(10),
            dst_mac: mac(0x01),
            src: CLIENT,
            dst: VIP,
            ttl: 64,
            sport,
            dport: 80,
            l4,
            payload: vec![],
        },
        seq,
        ack,
    )
}

/// The backend's segment to lb's SNAT port.
fn backend(snat_port: u16, l4: L4, seq: u32, ack: u32) -> Seg {
    Seg::new(
        Frame {
            src_mac: mac(11),
            dst_mac: mac(0x01),
            src: BACKEND,
            dst: LB0,
            ttl: 64,
            sport: 8080,
            dport: snat_port,
            l4,
            payload: vec![],
        },
        seq,
        ack,
    )
}

fn with_ts(mut s: Seg, tsval: u32, tsecr: u32) -> Seg {
    s.ts = Some((tsval, tsecr));
    s
}

/// Runs segment `s` with timestamps `tsval` and `tsecr`: the verdict.
fn run_ts(lab: &PacketLab, s: Seg, tsval: u32, tsecr: u32) -> u32 {
    lab.run(lab.v0, &with_ts(s, tsval, tsecr).bytes()).0
}

/// Opens a connection from `sport` (client ISN `isn`, timestamp `ts`): SYN, the backend's
/// SYN-ACK (ISN 9000), the client's ACK. The SNAT port it got.
fn open(lab: &PacketLab, sport: u16, isn: u32, ts: u32) -> u16 {
    let (v, out) = lab.run(
        lab.v0,
        &Seg::linux_syn(client(sport, SYN, isn, 0).frame, isn, ts).bytes(),
    );
    assert_eq!(v, XDP_TX, "SYN from {sport}");
    let syn = seen(&out);
    assert_eq!((syn.dst, syn.dport, syn.seq), (BACKEND, 8080, isn));
    let port = syn.sport;
    let (v, _) = lab.run(
        lab.v0,
        &with_ts(
            backend(port, flags(true, true, false, false), 9000, isn + 1),
            70_000,
            ts,
        )
        .bytes(),
    );
    assert_eq!(v, XDP_TX, "SYN-ACK to {port}");
    let (v, _) = lab.run(
        lab.v0,
        &with_ts(client(sport, ACK, isn + 1, 9001), ts + 1, 70_000).bytes(),
    );
    assert_eq!(v, XDP_TX, "ACK from {sport}");
    port
}

fn reverse_state(lab: &PacketLab, sport: u16) -> Option<u8> {
    lab.reverse(CLIENT, sport).map(|(_, r)| r.state)
}

/// The SYN of a new client from `sport`: its verdict, and where it went.
fn try_syn(lab: &PacketLab, sport: u16, isn: u32, ts: Option<u32>) -> (u32, Option<Seen>) {
    let mut s = Seg::linux_syn(client(sport, SYN, isn, 0).frame, isn, 0);
    s.ts = ts.map(|t| (t, 0));
    let (v, out) = lab.run(lab.v0, &s.bytes());
    (v, (v == XDP_TX).then(|| seen(&out)))
}

#[test]
fn a_port_the_client_closed_is_free_after_a_second_and_one_reset_at_once() {
    // One SNAT port: every new flow needs the port the last one held.
    let lab = lab_with((61000, 61000), CookieMode::Never, 4096);
    let port = open(&lab, CLIENT_PORT, 1000, 5000);
    assert_eq!(port, 61000);
    // While the flow lives, nobody else gets the port.
    let before = lab.drops(DropReason::SnatExhausted);
    assert_eq!(try_syn(&lab, CLIENT_PORT + 1, 50, Some(1)).0, XDP_DROP);
    assert_eq!(lab.drops(DropReason::SnatExhausted), before + 1);

    // The client closes first: FIN, the backend's FIN, the client's last ACK. The backend
    // keeps no TIME_WAIT for it.
    lab.run(
        lab.v0,
        &with_ts(
            client(CLIENT_PORT, flags(false, true, true, false), 1001, 9001),
            5001,
            70_000,
        )
        .bytes(),
    );
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::FIN_CLIENT));
    lab.run(
        lab.v0,
        &with_ts(
            backend(port, flags(false, true, true, false), 9001, 1002),
            70_001,
            5001,
        )
        .bytes(),
    );
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::LAST_ACK));
    lab.run(
        lab.v0,
        &with_ts(client(CLIENT_PORT, ACK, 1002, 9002), 5002, 70_001).bytes(),
    );
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::CLOSED));
    // Held a second for stragglers, then free.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (v, out) = try_syn(&lab, CLIENT_PORT + 2, 60, Some(2));
    assert_eq!(v, XDP_TX, "the closed flow's port was not reused");
    assert_eq!(out.unwrap().sport, 61000);

    // A reset frees the port at once (after the same short hold).
    lab.run(
        lab.v0,
        &backend(61000, flags(false, false, false, true), 9001, 0).bytes(),
    );
    let (_, r) = lab
        .reverse(CLIENT, CLIENT_PORT + 2)
        .expect("entry of the new flow");
    assert_eq!(r.state, state::CLOSED);
}

#[test]
fn a_port_in_the_backends_time_wait_goes_only_to_a_syn_the_backend_accepts() {
    let lab = lab_with((61000, 61000), CookieMode::Never, 4096);
    let port = open(&lab, CLIENT_PORT, 1000, 5000);
    // The backend closes first: its FIN, then the client's FIN. The backend now holds the
    // tuple in TIME_WAIT for a minute, and takes a new SYN on it only if the SYN's
    // timestamp is newer than 5001 (the last it saw), or, without timestamps, if its
    // sequence number is beyond 1002.
    lab.run(
        lab.v0,
        &with_ts(
            backend(port, flags(false, true, true, false), 9001, 1001),
            70_001,
            5000,
        )
        .bytes(),
    );
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::FIN_BACKEND));
    lab.run(
        lab.v0,
        &with_ts(
            client(CLIENT_PORT, flags(false, true, true, false), 1001, 9002),
            5001,
            70_001,
        )
        .bytes(),
    );
    let (_, r) = lab.reverse(CLIENT, CLIENT_PORT).unwrap();
    assert_eq!(
        (r.state, r.tw_seq, r.tw_tsval),
        (state::TIME_WAIT, 1002, 5001)
    );

    // An older timestamp would be taken for an old duplicate (PAWS): not on this port.
    assert_eq!(
        try_syn(&lab, CLIENT_PORT + 1, 5_000_000, Some(4000)).0,
        XDP_DROP
    );
    // No timestamp and a sequence number behind the old connection's: not on this port.
    assert_eq!(try_syn(&lab, CLIENT_PORT + 2, 900, None).0, XDP_DROP);
    assert_eq!(
        reverse_state(&lab, CLIENT_PORT),
        Some(state::TIME_WAIT),
        "kept"
    );
    // A newer timestamp: the backend accepts it, so the port is reused at once.
    let (v, out) = try_syn(&lab, CLIENT_PORT + 3, 10, Some(6000));
    assert_eq!(v, XDP_TX);
    let out = out.unwrap();
    assert_eq!((out.dst, out.sport, out.seq), (BACKEND, 61000, 10));
    assert!(
        lab.reverse(CLIENT, CLIENT_PORT).is_none(),
        "the old entry was replaced"
    );
    assert!(
        lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
            .is_none(),
        "the old flow's conntrack entry went with its port"
    );
}

#[test]
fn a_syn_without_timestamps_beyond_the_old_sequence_reuses_a_time_wait_port() {
    let lab = lab_with((61000, 61000), CookieMode::Never, 4096);
    let sport = CLIENT_PORT;
    let (v, out) = lab.run(lab.v0, &client(sport, SYN, 1000, 0).bytes());
    assert_eq!(v, XDP_TX);
    let port = seen(&out).sport;
    lab.run(
        lab.v0,
        &backend(port, flags(true, true, false, false), 9000, 1001).bytes(),
    );
    lab.run(lab.v0, &client(sport, ACK, 1001, 9001).bytes());
    lab.run(
        lab.v0,
        &backend(port, flags(false, true, true, false), 9001, 1001).bytes(),
    );
    lab.run(
        lab.v0,
        &client(sport, flags(false, true, true, false), 1001, 9002).bytes(),
    );
    assert_eq!(reverse_state(&lab, sport), Some(state::TIME_WAIT));
    assert_eq!(
        try_syn(&lab, sport + 1, 1001, None).0,
        XDP_DROP,
        "not beyond 1002"
    );
    let (v, out) = try_syn(&lab, sport + 2, 100_000, None);
    assert_eq!(v, XDP_TX);
    assert_eq!(out.unwrap().sport, 61000);
}

/// A connection from `sport` (client ISN `isn`) as [`open`] makes it, or None when its SYN
/// found no port.
fn try_open(lab: &PacketLab, sport: u16, isn: u32) -> Option<u16> {
    let (v, out) = try_syn(lab, sport, isn, Some(5000));
    if v != XDP_TX {
        return None;
    }
    let port = out.unwrap().sport;
    let syn_ack = backend(port, flags(true, true, false, false), 9000, isn + 1);
    assert_eq!(
        run_ts(lab, syn_ack, 70_000, 5000),
        XDP_TX,
        "SYN-ACK to {port}"
    );
    let ack = client(sport, ACK, isn + 1, 9001);
    assert_eq!(run_ts(lab, ack, 5001, 70_000), XDP_TX, "ACK from {sport}");
    Some(port)
}

/// The backend closes the connection from `sport` on `port` first, and the client's FIN
/// carries timestamp `tsval`: the backend holds the port in TIME_WAIT, and takes a new SYN
/// on it only with a newer timestamp.
fn close_into_time_wait(lab: &PacketLab, sport: u16, port: u16, isn: u32, tsval: u32) {
    let fin = flags(false, true, true, false);
    assert_eq!(
        run_ts(lab, backend(port, fin, 9001, isn + 1), 70_001, 5001),
        XDP_TX
    );
    assert_eq!(
        run_ts(lab, client(sport, fin, isn + 1, 9002), tsval, 70_001),
        XDP_TX
    );
    let (_, r) = lab.reverse(CLIENT, sport).unwrap();
    assert_eq!(
        (r.state, r.tw_tsval),
        (state::TIME_WAIT, tsval),
        "port {port}"
    );
}

#[test]
fn a_syn_that_every_port_near_its_first_choice_refuses_gets_a_port_further_away() {
    // Two words of 64 ports, every one in the backend's TIME_WAIT. Linux clients draw a
    // timestamp offset per connection, so a SYN's timestamp may be older than the last one
    // the backend saw on a port, which then refuses it (PAWS): here every port of the word
    // holding the new SYN's first choice refuses it, and every port of the other takes it.
    let (min, max) = (61000u16, 61127u16);
    let lab = lab_with((min, max), CookieMode::Never, 4096);
    let first = open(&lab, CLIENT_PORT, 1000, 5000);
    let word = |port: u16| (port - min) / 64;
    let mut held = vec![(CLIENT_PORT, first)];
    let mut sport = CLIENT_PORT;
    while held.len() < usize::from(max - min) + 1 {
        sport += 1;
        assert!(
            sport < CLIENT_PORT + 1000,
            "the range did not fill: {} ports, {:?}",
            held.len(),
            lab.dataplane.drops()
        );
        if let Some(port) = try_open(&lab, sport, 1000) {
            held.push((sport, port));
        }
    }
    for &(sport, port) in &held {
        let tsval = if word(port) == word(first) {
            1_000_000
        } else {
            100
        };
        close_into_time_wait(&lab, sport, port, 1000, tsval);
    }

    // A new connection from the first client, its SYN stamped 500: not on its first choice
    // nor anywhere in that word, but a port of the other word takes it.
    let before = lab.drops(DropReason::SnatExhausted);
    let (v, out) = try_syn(&lab, CLIENT_PORT, 5, Some(500));
    assert_eq!(
        v,
        XDP_TX,
        "no port for the SYN: {:?}",
        lab.dataplane.drops()
    );
    let port = out.unwrap().sport;
    assert_ne!(word(port), word(first), "port {port} refuses the SYN");
    assert_eq!(lab.drops(DropReason::SnatExhausted), before);
    // The ports tried and refused were left to the connections the backend remembers.
    let remembered = held
        .iter()
        .filter(|&&(s, p)| {
            s != CLIENT_PORT
                && word(p) == word(first)
                && reverse_state(&lab, s) == Some(state::TIME_WAIT)
        })
        .count();
    assert_eq!(remembered, 63);
}

#[test]
fn allocation_succeeds_for_99_percent_of_new_flows_from_95_percent_occupancy() {
    // 8192 ports towards the one backend; 7782 (95 %) held by established flows. Then 200
    // more new flows (to 97.4 %): at least 99 % of them get a port, none a held one.
    let lab = lab_with((40000, 48191), CookieMode::Never, 16384);
    let held = 7782u32;
    let syn_from = |i: u32| client(1000 + i as u16, SYN, 1, 0);
    let mut ports = std::collections::HashSet::new();
    for i in 0..held {
        let (v, out) = lab.run(lab.v0, &syn_from(i).bytes());
        assert_eq!(v, XDP_TX, "filling: flow {i}: {:?}", lab.dataplane.drops());
        let port = seen(&out).sport;
        assert!(ports.insert(port), "port {port} given twice");
        let (v, _) = lab.run(
            lab.v0,
            &backend(port, flags(true, true, false, false), 9000, 2).bytes(),
        );
        assert_eq!(
            v,
            XDP_TX,
            "filling: the answer to flow {i} on {port}: {:?}",
            lab.dataplane.drops()
        );
    }
    let tries = 200u32;
    let mut got = 0;
    for i in held..held + tries {
        let (v, out) = lab.run(lab.v0, &syn_from(i).bytes());
        if v != XDP_TX {
            continue;
        }
        got += 1;
        let port = seen(&out).sport;
        assert!(ports.insert(port), "a held port {port} was given again");
    }
    println!("{got} of {tries} new flows got a port from 95 % occupancy");
    assert!(
        got * 100 >= tries * 99,
        "only {got} of {tries} new flows got a port"
    );
    // And the range fills to its last port: a search finds any port that is free.
    let mut i = held + tries;
    while ports.len() < 8192 {
        let (v, out) = lab.run(lab.v0, &syn_from(i).bytes());
        assert_eq!(
            v,
            XDP_TX,
            "{} ports held, {:?}",
            ports.len(),
            lab.dataplane.drops()
        );
        assert!(ports.insert(seen(&out).sport));
        i += 1;
    }
    let before = lab.drops(DropReason::SnatExhausted);
    assert_eq!(lab.run(lab.v0, &syn_from(i).bytes()).0, XDP_DROP);
    assert_eq!(lab.drops(DropReason::SnatExhausted), before + 1);
}

#[test]
fn a_full_flow_table_never_evicts_a_live_flow() {
    // 256 conntrack entries (the reverse map has as many); 200 live flows.
    let lab = lab_with((40000, 65000), CookieMode::Never, 256);
    let live: Vec<u16> = (0..200u16)
        .map(|i| open(&lab, 10_000 + i, 1000, 5000))
        .collect();
    // A burst of new flows far beyond what the tables hold, none of which completes.
    for i in 0..2000u16 {
        lab.run(lab.v0, &client(20_000 + i, SYN, 7, 0).bytes());
    }
    // Every live flow still has its entries and still forwards, from its own port.
    for (i, &port) in live.iter().enumerate() {
        let sport = 10_000 + i as u16;
        let conn = lab
            .conn(CLIENT, sport, VIP, 80, IPPROTO_TCP)
            .unwrap_or_else(|| panic!("live flow {sport} was evicted"));
        assert_eq!(conn.snat_port, port);
        let (v, out) = lab.run(lab.v0, &client(sport, ACK, 1001, 9001).bytes());
        assert_eq!(v, XDP_TX);
        assert_eq!(seen(&out).sport, port, "flow {sport} moved");
        let (v, out) = lab.run(lab.v0, &backend(port, ACK, 9001, 1001).bytes());
        assert_eq!(v, XDP_TX, "reply to {port}");
        assert_eq!(seen(&out).dport, sport);
    }
}

#[test]
fn syn_cookies_open_the_backend_side_only_for_a_client_that_answered() {
    let lab = lab_with((61000, 61100), CookieMode::Always, 4096);
    // The SYN is answered by lb itself, with a cookie; nothing is stored.
    let syn = Seg::linux_syn(client(CLIENT_PORT, SYN, 1000, 0).frame, 1000, 5000);
    let (v, out) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(v, XDP_TX);
    let sa = seen(&out);
    assert_eq!(
        (
            sa.src, sa.sport, sa.dst, sa.dport, sa.syn, sa.ack, sa.ack_no
        ),
        (VIP, 80, CLIENT, CLIENT_PORT, true, true, 1001)
    );
    assert!(sa.mss.is_some(), "lb's SYN-ACK offers an MSS");
    let (lb_tsval, echo) = sa.ts.expect("timestamps answered with timestamps");
    assert_eq!(echo, 5000);
    let cookie = sa.seq;
    assert!(
        lab.reverse_entries().is_empty(),
        "a SYN in cookie mode stored a port"
    );
    assert_eq!(lab.conn_count(), 0, "a SYN in cookie mode stored a flow");

    // An ACK whose cookie does not check is dropped and counted; still nothing stored.
    let invalid = lab.dataplane.flood_view().cookies_invalid;
    let bad = with_ts(
        client(CLIENT_PORT, ACK, 1001, cookie.wrapping_add(2)),
        5001,
        lb_tsval,
    );
    assert_eq!(lab.run(lab.v0, &bad.bytes()).0, XDP_DROP);
    assert_eq!(lab.dataplane.flood_view().cookies_invalid, invalid + 1);
    assert!(lab.reverse_entries().is_empty());

    // The client's ACK proves its address: lb opens the connection to the backend with the
    // client's own ISN and SYN options.
    let ack = with_ts(
        client(CLIENT_PORT, ACK, 1001, cookie.wrapping_add(1)),
        5001,
        lb_tsval,
    );
    let (v, out) = lab.run(lab.v0, &ack.bytes());
    assert_eq!(v, XDP_TX);
    let bs = seen(&out);
    assert_eq!(
        (bs.dst, bs.dport, bs.src, bs.syn, bs.ack, bs.seq),
        (BACKEND, 8080, LB0, true, false, 1000)
    );
    assert_eq!(
        (bs.mss, bs.wscale, bs.sack_ok),
        (Some(1460), Some(7), true),
        "the client's SYN options"
    );
    assert!(bs.ts.is_some());
    assert_eq!(lab.dataplane.flood_view().cookies_valid, 1);
    let port = bs.sport;
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::SYNPROXY));

    // The backend's SYN-ACK (window scale 10) becomes the window update that lets the
    // client send: lb's SYN-ACK offered a zero window. In lb's numbers, its window in the
    // scale lb promised (7).
    let mut synack = with_ts(
        backend(port, flags(true, true, false, false), 777_000, 1001),
        90_000,
        bs.ts.unwrap().0,
    );
    synack.wscale = Some(10);
    synack.mss = Some(1400);
    synack.window = 65160;
    let (v, out) = lab.run(lab.v0, &synack.bytes());
    assert_eq!(v, XDP_TX);
    let open = seen(&out);
    assert_eq!(
        (
            open.src,
            open.sport,
            open.dst,
            open.dport,
            open.syn,
            open.ack,
            open.seq,
            open.ack_no
        ),
        (
            VIP,
            80,
            CLIENT,
            CLIENT_PORT,
            false,
            true,
            cookie.wrapping_add(1),
            1001
        )
    );
    assert_eq!(open.window, 65160 >> 7);
    assert_eq!(
        open.ts,
        Some((lb_tsval, 5001)),
        "lb's clock, and the client's echoed"
    );
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::EMBRYONIC));

    // Sent again (the client is silent: a server-first protocol), the SYN-ACK gets lb's
    // ACK, back to the backend, with about 64 KiB of window in the client's scale.
    let (v, out) = lab.run(lab.v0, &synack.bytes());
    assert_eq!(v, XDP_TX);
    let done = seen(&out);
    assert_eq!(
        (done.dst, done.dport, done.sport, done.syn, done.ack),
        (BACKEND, 8080, port, false, true)
    );
    assert_eq!(
        (done.seq, done.ack_no, done.window),
        (1001, 777_001, 65535 >> 7)
    );

    // A client that learned the backend's scale (10) still gets the scale lb promises:
    // its ACK must find the same one.
    let again = Seg::linux_syn(client(CLIENT_PORT + 1, SYN, 3000, 0).frame, 3000, 6000);
    let (v, out) = lab.run(lab.v0, &again.bytes());
    assert_eq!(v, XDP_TX);
    assert_eq!(
        (seen(&out).wscale, seen(&out).mss),
        (Some(7), Some(1400)),
        "the backend's MSS, lb's scale"
    );

    // From now on each side sees its own sequence space: the client's data is acknowledged
    // in the backend's numbers, and the backend's in lb's cookie numbers.
    let mut data = with_ts(
        client(CLIENT_PORT, ACK, 1001, cookie.wrapping_add(1)),
        5002,
        lb_tsval,
    );
    data.frame.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    let (v, out) = lab.run(lab.v0, &data.bytes());
    assert_eq!(v, XDP_TX);
    let fwd = seen(&out);
    assert_eq!(
        (fwd.dst, fwd.sport, fwd.seq, fwd.ack_no),
        (BACKEND, port, 1001, 777_001)
    );
    assert_eq!(fwd.payload, data.frame.payload);
    let mut answer = with_ts(backend(port, ACK, 777_001, 1019), 90_001, 5002);
    answer.frame.payload = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    answer.window = 64;
    let (v, out) = lab.run(lab.v0, &answer.bytes());
    assert_eq!(v, XDP_TX);
    let back = seen(&out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (VIP, 80, CLIENT, CLIENT_PORT)
    );
    assert_eq!((back.seq, back.ack_no), (cookie.wrapping_add(1), 1019));
    assert_eq!(
        back.ts.map(|t| t.1),
        Some(5002),
        "the client's timestamp echoed back"
    );
    assert_eq!(back.payload, answer.frame.payload);
    assert_eq!(
        back.window, 512,
        "the backend's window (64 << 10) in the client's scale (>> 7)"
    );
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::ESTABLISHED));
}

#[test]
fn cookie_mode_turns_on_above_the_syn_rate_and_answers_syns_itself() {
    // 2,000 SYNs a second or more turn cookie mode on.
    let lab = lab_with(
        (40000, 65000),
        CookieMode::Auto {
            rate: 2000,
            occupancy: 0,
        },
        65536,
    );
    assert!(!lab.dataplane.flood_view().cookies);
    // A burst from one CPU (as a NIC with one queue delivers it) over more than one
    // measuring window.
    let started = std::time::Instant::now();
    let mut n = 0u16;
    while started.elapsed() < std::time::Duration::from_millis(300) {
        lab.run(lab.v0, &client(1024 + n, SYN, 1, 0).bytes());
        n += 1;
    }
    let view = lab.dataplane.flood_view();
    assert!(
        view.cookies,
        "{n} SYNs in 300 ms did not turn cookie mode on: {view:?}"
    );
    assert_eq!(view.entered, 1);
    assert!(view.syn_rate >= 2000, "{view:?}");
    // Now a SYN is answered by lb, from the VIP, and leaves no state.
    let held = lab.reverse_entries().len();
    let (v, out) = lab.run(
        lab.v0,
        &Seg::linux_syn(client(60000, SYN, 1, 0).frame, 1, 7).bytes(),
    );
    assert_eq!(v, XDP_TX);
    let sa = seen(&out);
    assert_eq!((sa.src, sa.dst, sa.syn, sa.ack), (VIP, CLIENT, true, true));
    assert_eq!(lab.reverse_entries().len(), held);
    assert!(lab.dataplane.flood_view().cookies_sent >= 1);
}

#[test]
fn on_a_veth_what_leaves_where_it_came_in_goes_by_redirect() {
    // A veth's peer gets XDP_TX frames only if it runs an XDP program itself; a redirect
    // reaches it with GRO on. lb marks such interfaces; it still answers and forwards the
    // same frames.
    let mut lab = lab_with((61000, 61100), CookieMode::Never, 4096);
    lab.dataplane.set_tx_by_redirect(lab.v0).unwrap();
    let (v, out) = lab.run(
        lab.v0,
        &Seg::linux_syn(client(CLIENT_PORT, SYN, 1000, 0).frame, 1000, 5000).bytes(),
    );
    assert_eq!(
        v, XDP_REDIRECT,
        "one-armed: a new flow leaves where it came in"
    );
    assert_eq!((seen(&out).dst, seen(&out).dport), (BACKEND, 8080));

    let mut lab = lab_with((61000, 61100), CookieMode::Always, 4096);
    lab.dataplane.set_tx_by_redirect(lab.v0).unwrap();
    let (v, out) = lab.run(
        lab.v0,
        &Seg::linux_syn(client(CLIENT_PORT, SYN, 1000, 0).frame, 1000, 5000).bytes(),
    );
    assert_eq!(v, XDP_REDIRECT, "lb's cookie SYN-ACK");
    let sa = seen(&out);
    assert_eq!(
        (sa.dst, sa.dport, sa.syn, sa.ack),
        (CLIENT, CLIENT_PORT, true, true)
    );
}

#[test]
fn a_handshake_the_client_never_completes_is_not_kept_alive_by_the_backends_retries() {
    // A spoofed SYN: the backend answers, and sends its SYN-ACK again and again (for about
    // a minute on Linux) to a client that never answers. The flow's clock runs from the
    // first SYN-ACK, so that it ends 10 s later.
    let lab = lab_with((61000, 61100), CookieMode::Never, 4096);
    let (v, out) = try_syn(&lab, CLIENT_PORT, 1000, Some(5000));
    assert_eq!(v, XDP_TX);
    let port = out.unwrap().sport;
    let synack = with_ts(
        backend(port, flags(true, true, false, false), 9000, 1001),
        70_000,
        5000,
    );
    assert_eq!(lab.run(lab.v0, &synack.bytes()).0, XDP_TX);
    let (_, first) = lab.reverse(CLIENT, CLIENT_PORT).unwrap();
    assert_eq!(first.state, state::EMBRYONIC);
    // Past the once-a-second refresh of a flow's clock.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        lab.run(lab.v0, &synack.bytes()).0,
        XDP_TX,
        "the retry still reaches the client"
    );
    let (_, after) = lab.reverse(CLIENT, CLIENT_PORT).unwrap();
    assert_eq!(
        after.last_seen, first.last_seen,
        "the backend's retry kept the flow alive"
    );
    // The client's own segment does.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    lab.run(
        lab.v0,
        &with_ts(client(CLIENT_PORT, ACK, 1001, 9001), 5001, 70_000).bytes(),
    );
    let (_, answered) = lab.reverse(CLIENT, CLIENT_PORT).unwrap();
    assert_eq!(answered.state, state::ESTABLISHED);
}

#[test]
fn a_syn_of_a_flow_that_must_move_or_expired_begins_a_handshake() {
    // In cookie mode a SYN on a live tracked flow goes to that flow; if its backend went
    // away (cut, not draining), it is balanced again as what it is, a SYN: its flow has a
    // handshake's timeout, not an established connection's hour.
    let mut lab = lab_with((61000, 61100), CookieMode::Always, 4096);
    let syn = Seg::linux_syn(client(CLIENT_PORT, SYN, 1000, 0).frame, 1000, 5000);
    let sa = seen(&lab.run(lab.v0, &syn.bytes()).1);
    let ack = with_ts(
        client(CLIENT_PORT, ACK, 1001, sa.seq.wrapping_add(1)),
        5001,
        sa.ts.unwrap().0,
    );
    assert_eq!(seen(&lab.run(lab.v0, &ack.bytes()).1).dst, BACKEND);
    lab.service_as(
        "web",
        lb::model::ServiceSpec {
            vip: Some("10.70.0.100:80".into()),
            backends: Some(vec!["10.70.0.12:8080".into()]),
            cut_removed: true,
            ..Default::default()
        },
    );
    let syn2 = Seg::linux_syn(client(CLIENT_PORT, SYN, 50_000, 0).frame, 50_000, 6000);
    let (v, out) = lab.run(lab.v0, &syn2.bytes());
    assert_eq!(v, XDP_TX);
    assert_eq!(
        (seen(&out).dst, seen(&out).syn, seen(&out).seq),
        (Ipv4Addr::new(10, 70, 0, 12), true, 50_000)
    );
    let moved = lab
        .conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP)
        .expect("tracked at once");
    assert_ne!(
        moved.flags & CONN_HANDSHAKE,
        0,
        "the re-balanced SYN's flow is no handshake: {moved:?}"
    );
    assert_eq!(moved.isn, 50_000);

    // In cookie mode, a SYN retried after its flow's 10 s (Linux retries at 1, 3, 7, 15,
    // 31 s...) is a new SYN: it gets a cookie, not a flow without a handshake.
    let lab = lab_with((61000, 61100), CookieMode::Always, 4096);
    let syn = Seg::linux_syn(client(CLIENT_PORT, SYN, 1000, 0).frame, 1000, 5000);
    let (v, out) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(v, XDP_TX);
    let sa = seen(&out);
    let ack = with_ts(
        client(CLIENT_PORT, ACK, 1001, sa.seq.wrapping_add(1)),
        5001,
        sa.ts.unwrap().0,
    );
    let (v, out) = lab.run(lab.v0, &ack.bytes());
    assert_eq!(
        (v, seen(&out).dst),
        (XDP_TX, BACKEND),
        "the cookie's answer opens the backend side"
    );
    std::thread::sleep(std::time::Duration::from_millis(10_500));
    let (v, out) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(v, XDP_TX);
    let again = seen(&out);
    assert_eq!(
        (again.dst, again.syn, again.ack),
        (CLIENT, true, true),
        "not lb's cookie SYN-ACK: {again:?}"
    );
}

/// Client ports whose flows to VIP:80 share one home slot in the flow table (found with
/// the table's own key and size, read from `config`), and that slot.
fn colliding_ports(lab: &PacketLab, n: usize) -> (u32, Vec<u16>) {
    let cfg = lab.config();
    let home = |p: u16| {
        let flow = lb_common::flow::FlowKey::new(CLIENT.octets(), p, VIP.octets(), 80, IPPROTO_TCP);
        lb_common::flowtab::home_slot(cfg.table_key, &flow, cfg.flow_slots)
    };
    let slot = home(CLIENT_PORT);
    let ports: Vec<u16> = (1024..=65535u16)
        .filter(|&p| home(p) == slot)
        .take(n)
        .collect();
    assert_eq!(ports.len(), n, "not enough ports share slot {slot}");
    (slot, ports)
}

/// The client's data segment on an open connection from `sport`: where lb sent it.
fn data_from(lab: &PacketLab, sport: u16, isn: u32) -> (u32, Option<Seen>) {
    let mut s = client(sport, ACK, isn + 1, 9001);
    s.frame.payload = b"ping".to_vec();
    let (v, out) = lab.run(lab.v0, &s.bytes());
    (v, (v == XDP_TX).then(|| seen(&out)))
}

/// The flow table is lb's own (one cache line a flow): flows whose hashes name the same
/// slot take the slots after it, each is found there, a removed one leaves a slot that
/// lookups pass over and new flows reuse, and the sweep empties dead slots that end a run.
#[test]
fn flows_that_share_a_slot_are_each_found_past_removed_ones() {
    use lb_common::flowtab::slot;
    // A small table (512 slots), so that enough client ports share a home slot.
    let lab = lab_with((10_000, 65_535), CookieMode::Never, 256);
    let (home, ports) = colliding_ports(&lab, 6);
    let mask = lab.config().flow_slots - 1;
    // Established, half-open, established, half-open, half-open: SYN and SYN-ACK only
    // for the half-open ones (their flow is tracked from the SYN-ACK, for 10 s).
    let half_open = [false, true, false, true, true];
    let mut snat = Vec::new();
    for (i, (&p, &half)) in ports.iter().zip(&half_open).enumerate() {
        let isn = 1000 * (i as u32 + 1);
        if half {
            let (v, out) = lab.run(
                lab.v0,
                &Seg::linux_syn(client(p, SYN, isn, 0).frame, isn, 5000).bytes(),
            );
            assert_eq!(v, XDP_TX);
            let port = seen(&out).sport;
            let (v, _) = lab.run(
                lab.v0,
                &with_ts(
                    backend(port, flags(true, true, false, false), 9000, isn + 1),
                    70_000,
                    5000,
                )
                .bytes(),
            );
            assert_eq!(v, XDP_TX);
            snat.push(port);
        } else {
            snat.push(open(&lab, p, isn, 5000));
        }
    }
    let table = lab.all_flow_slots();
    for (i, &p) in ports[..5].iter().enumerate() {
        let s = &table[((home + i as u32) & mask) as usize];
        assert_eq!(
            (s.state, s.src_port, s.conn.snat_port),
            (slot::LIVE, p, snat[i]),
            "slot home+{i}"
        );
    }
    // The half-open ones expire (10 s), and the sweep removes them.
    std::thread::sleep(std::time::Duration::from_millis(10_500));
    lab.dataplane.sweep().unwrap();
    let table = lab.all_flow_slots();
    let state = |i: u32| table[((home + i) & mask) as usize].state;
    assert_eq!(
        (0..6).map(state).collect::<Vec<_>>(),
        [
            slot::LIVE,
            slot::DEAD,
            slot::LIVE,
            slot::EMPTY,
            slot::EMPTY,
            slot::EMPTY
        ],
        "a removed flow in a run stays dead; those that end it become empty"
    );
    // Past the dead slot, the established flow after it is found and keeps its port.
    for i in [0, 2] {
        let (v, out) = data_from(&lab, ports[i], 1000 * (i as u32 + 1));
        assert_eq!(v, XDP_TX, "flow {i}");
        assert_eq!(out.unwrap().sport, snat[i], "flow {i} kept its port");
    }
    // A new flow on the same home takes the dead slot.
    open(&lab, ports[5], 7000, 5000);
    let s = &lab.all_flow_slots()[((home + 1) & mask) as usize];
    assert_eq!((s.state, s.src_port), (slot::LIVE, ports[5]));
    assert_eq!(lab.conn_count(), 3);
}

/// A run of 64 slots from a flow's home is as far as lb looks: a flow that finds none of
/// them free is refused and counted (`flow_table_full`), and the 64 flows there keep
/// their slots and their traffic.
#[test]
fn a_full_run_of_slots_refuses_a_new_flow_and_keeps_every_live_one() {
    let lab = lab_with((10_000, 65_535), CookieMode::Never, 256);
    let n = lb_common::flowtab::FLOW_PROBES as usize;
    let (_, ports) = colliding_ports(&lab, n + 1);
    let snat: Vec<u16> = ports[..n]
        .iter()
        .map(|&p| open(&lab, p, 1000, 5000))
        .collect();
    assert_eq!(lab.conn_count(), n);
    let full_before = lab.drops(DropReason::FlowTableFull);
    // The one too many: its SYN goes out, but its flow cannot be tracked, so the client's
    // next segment is an unknown flow's.
    let last = ports[n];
    let (v, out) = lab.run(
        lab.v0,
        &Seg::linux_syn(client(last, SYN, 1000, 0).frame, 1000, 5000).bytes(),
    );
    assert_eq!(v, XDP_TX);
    let port = seen(&out).sport;
    let (v, _) = lab.run(
        lab.v0,
        &with_ts(
            backend(port, flags(true, true, false, false), 9000, 1001),
            70_000,
            5000,
        )
        .bytes(),
    );
    assert_eq!(v, XDP_TX);
    assert_eq!(lab.drops(DropReason::FlowTableFull), full_before + 1);
    assert_eq!(data_from(&lab, last, 1000).0, XDP_DROP);
    assert_eq!(lab.conn_count(), n, "no live flow was pushed out");
    for (i, &p) in ports[..n].iter().enumerate() {
        let (v, out) = data_from(&lab, p, 1000);
        assert_eq!(v, XDP_TX, "flow {i}");
        assert_eq!(out.unwrap().sport, snat[i], "flow {i} kept its port");
    }
}

/// A SYN from `sport` (client ISN `isn`, timestamp `ts` if any) in cookie mode, lb's
/// cookie SYN-ACK, and the client's ACK answering it: that SYN-ACK, and the SYN the ACK
/// turned into towards the backend.
fn cookie_answer(lab: &PacketLab, sport: u16, isn: u32, ts: Option<u32>) -> (Seen, Seen) {
    let mut syn = Seg::linux_syn(client(sport, SYN, isn, 0).frame, isn, 0);
    syn.ts = ts.map(|t| (t, 0));
    let (v, out) = lab.run(lab.v0, &syn.bytes());
    assert_eq!(v, XDP_TX, "SYN from {sport}");
    let sa = seen(&out);
    assert_eq!(
        (sa.dst, sa.syn, sa.ack),
        (CLIENT, true, true),
        "lb's cookie SYN-ACK"
    );
    let mut ack = client(sport, ACK, isn + 1, sa.seq.wrapping_add(1));
    ack.ts = ts.map(|t| (t + 1, sa.ts.unwrap().0));
    let (v, out) = lab.run(lab.v0, &ack.bytes());
    assert_eq!(v, XDP_TX, "the cookie's answer from {sport}");
    let bs = seen(&out);
    assert_eq!(
        (bs.dst, bs.syn, bs.ack, bs.seq),
        (BACKEND, true, false, isn),
        "the cookie's answer from {sport} opens a backend connection of its own: {bs:?}"
    );
    (sa, bs)
}

/// A cookie handshake from `sport` (client ISN `isn`, timestamp `ts`) through to the
/// backend's SYN-ACK (ISN 777,000) and the client's first ACK after it: the SNAT port,
/// and the cookie lb's SYN-ACK carried.
fn cookie_open(lab: &PacketLab, sport: u16, isn: u32, ts: u32) -> (u16, u32) {
    let (sa, bs) = cookie_answer(lab, sport, isn, Some(ts));
    let (cookie, lb_ts) = (sa.seq, sa.ts.unwrap().0);
    let port = bs.sport;
    let synack = with_ts(
        backend(port, flags(true, true, false, false), 777_000, isn + 1),
        90_000,
        bs.ts.unwrap().0,
    );
    assert_eq!(lab.run(lab.v0, &synack.bytes()).0, XDP_TX);
    let (v, _) = lab.run(
        lab.v0,
        &with_ts(
            client(sport, ACK, isn + 1, cookie.wrapping_add(1)),
            ts + 2,
            lb_ts,
        )
        .bytes(),
    );
    assert_eq!(v, XDP_TX);
    (port, cookie)
}

/// A client reuses its 5-tuple at once after a close the backend began (Linux does, when
/// its side closed second): in cookie mode the new connection's SYN gets a cookie, and its
/// answer must open a new backend connection, not go to the old one's. On the old port
/// only if the backend's TIME_WAIT takes the new SYN; elsewhere if not.
#[test]
fn a_closed_connections_5_tuple_opens_again_through_a_cookie() {
    for newer in [true, false] {
        let lab = lab_with((61000, 61100), CookieMode::Always, 4096);
        let (port, cookie) = cookie_open(&lab, CLIENT_PORT, 1000, 5000);
        // The backend closes first, the client second; the backend's last ACK.
        let fin = backend(port, flags(false, true, true, false), 777_001, 1001);
        assert_eq!(run_ts(&lab, fin, 90_001, 5002), XDP_TX);
        let cfin = client(
            CLIENT_PORT,
            flags(false, true, true, false),
            1001,
            cookie.wrapping_add(2),
        );
        assert_eq!(run_ts(&lab, cfin, 5003, 0), XDP_TX);
        let last = backend(port, ACK, 777_002, 1002);
        assert_eq!(run_ts(&lab, last, 90_002, 5003), XDP_TX);
        assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::TIME_WAIT));

        // The same 5-tuple again: with a newer timestamp, or (without timestamps) a
        // sequence number behind the old connection's, which the backend's TIME_WAIT
        // refuses.
        let (isn, ts) = if newer {
            (2_000_000, Some(6000))
        } else {
            (500, None)
        };
        // Its cookie's answer opens a backend connection of its own, not the old one's.
        let (_, bs) = cookie_answer(&lab, CLIENT_PORT, isn, ts);
        if newer {
            assert_eq!(
                bs.sport, port,
                "the backend's TIME_WAIT takes a newer timestamp"
            );
        } else {
            assert_ne!(
                bs.sport, port,
                "a SYN the backend's TIME_WAIT refuses, on its tuple"
            );
        }
        let conn = lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP).unwrap();
        assert_eq!((conn.isn, conn.snat_port), (isn, bs.sport), "{conn:?}");
    }
}

/// Without cookies, a connection on a 5-tuple whose last connection closed is tracked as
/// itself: its own close moves its port's state (here to the backend's TIME_WAIT, which
/// frees the port for a SYN the backend accepts), not the old connection's flags.
#[test]
fn a_reused_5_tuple_is_tracked_as_the_new_connection() {
    let lab = lab_with((61000, 61100), CookieMode::Never, 4096);
    let mut ts = 5000;
    let mut isn = 1000;
    for round in 0..3 {
        let port = open(&lab, CLIENT_PORT, isn, ts);
        let fin = backend(port, flags(false, true, true, false), 9001, isn + 1);
        assert_eq!(run_ts(&lab, fin, 70_001, ts + 1), XDP_TX);
        assert_eq!(
            reverse_state(&lab, CLIENT_PORT),
            Some(state::FIN_BACKEND),
            "round {round}"
        );
        let cfin = client(CLIENT_PORT, flags(false, true, true, false), isn + 1, 9002);
        assert_eq!(run_ts(&lab, cfin, ts + 2, 70_001), XDP_TX);
        assert_eq!(
            reverse_state(&lab, CLIENT_PORT),
            Some(state::TIME_WAIT),
            "round {round}: the client's FIN of this connection"
        );
        let conn = lab.conn(CLIENT, CLIENT_PORT, VIP, 80, IPPROTO_TCP).unwrap();
        assert_eq!(conn.isn, isn, "round {round}: {conn:?}");
        ts += 1000;
        isn += 1_000_000;
    }
}

/// FINs that cross (nginx closing after its answer while the client closes too): the
/// client's reaches lb first, but the backend sent its own before the client's arrived
/// (its FIN does not acknowledge the client's), so the backend ends in TIME_WAIT like a
/// side that closed first. lb must hold the port for it, and give it only to a SYN that
/// TIME_WAIT accepts: measured, treating it as closed cost a connection in every few
/// hundred of a churn run a reset and a second's SYN retry.
#[test]
fn fins_that_cross_leave_the_backend_in_time_wait() {
    let lab = lab_with((61000, 61000), CookieMode::Never, 4096);
    let port = open(&lab, CLIENT_PORT, 1000, 5000);
    let cfin = client(CLIENT_PORT, flags(false, true, true, false), 1001, 9001);
    assert_eq!(run_ts(&lab, cfin, 5001, 70_000), XDP_TX);
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::FIN_CLIENT));
    // The backend's FIN acknowledges 1001, not the client's FIN (1002).
    let bfin = backend(port, flags(false, true, true, false), 9001, 1001);
    assert_eq!(run_ts(&lab, bfin, 70_001, 5000), XDP_TX);
    let (_, r) = lab.reverse(CLIENT, CLIENT_PORT).unwrap();
    assert_eq!(
        (r.state, r.tw_seq, r.tw_tsval),
        (state::TIME_WAIT, 1002, 5001),
        "the backend's TIME_WAIT expects what follows the client's FIN"
    );
    // The rest of the close: each side acknowledges the other's FIN.
    let back = backend(port, ACK, 9002, 1002);
    assert_eq!(run_ts(&lab, back, 70_002, 5001), XDP_TX);
    let last = client(CLIENT_PORT, ACK, 1002, 9002);
    assert_eq!(run_ts(&lab, last, 5002, 70_001), XDP_TX);
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::TIME_WAIT));

    // A SYN that TIME_WAIT refuses (an older timestamp, as another client port's clock
    // may well be) does not get the port, even after the hold of a closed flow.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        try_syn(&lab, CLIENT_PORT + 1, 5_000_000, Some(4000)).0,
        XDP_DROP
    );
    // A newer one does.
    let (v, out) = try_syn(&lab, CLIENT_PORT + 2, 10, Some(6000));
    assert_eq!(v, XDP_TX);
    assert_eq!(out.unwrap().sport, 61000);
}

#[test]
fn a_reset_for_a_stray_segment_does_not_end_the_handshake_it_came_in() {
    let lab = lab_with((61000, 61000), CookieMode::Never, 4096);
    let port = open(&lab, CLIENT_PORT, 1000, 5000);
    // The backend closes first; the client's FIN leaves it in TIME_WAIT (last timestamp
    // 5001).
    let bfin = backend(port, flags(false, true, true, false), 9001, 1001);
    run_ts(&lab, bfin, 70_001, 5000);
    let cfin = client(CLIENT_PORT, flags(false, true, true, false), 1001, 9002);
    run_ts(&lab, cfin, 5001, 70_001);
    assert_eq!(reverse_state(&lab, CLIENT_PORT), Some(state::TIME_WAIT));

    // Another client's SYN that the TIME_WAIT takes gets the port at once...
    let (b, b_isn) = (CLIENT_PORT + 1, 20_000);
    let (v, out) = try_syn(&lab, b, b_isn, Some(6000));
    assert_eq!((v, out.map(|o| o.sport)), (XDP_TX, Some(port)));
    // ...so the backend's ACK of the old connection's FIN, on its way as the SYN came,
    // reaches this new client, just before the backend's SYN-ACK. The client answers that
    // ACK with a reset whose sequence number is the ACK's: nothing the backend's
    // half-open connection takes, so the handshake goes on.
    let (v, out) = lab.run(
        lab.v0,
        &with_ts(backend(port, ACK, 9002, 1002), 70_002, 5001).bytes(),
    );
    assert_eq!((v, seen(&out).dport), (XDP_TX, b));
    let synack = backend(port, flags(true, true, false, false), 30_000, b_isn + 1);
    assert_eq!(run_ts(&lab, synack, 80_000, 6000), XDP_TX);
    let stray_reset = client(b, flags(false, false, false, true), 1002, 0);
    assert_eq!(lab.run(lab.v0, &stray_reset.bytes()).0, XDP_TX);
    assert_eq!(
        reverse_state(&lab, b),
        Some(state::EMBRYONIC),
        "a reset the backend ignores ended the flow"
    );
    // The connection opens, and the backend closes it first: TIME_WAIT again, last
    // timestamp 6002.
    let ack = client(b, ACK, b_isn + 1, 30_001);
    assert_eq!(run_ts(&lab, ack, 6001, 80_000), XDP_TX);
    let bfin = backend(port, flags(false, true, true, false), 30_001, b_isn + 1);
    run_ts(&lab, bfin, 80_001, 6001);
    let cfin = client(b, flags(false, true, true, false), b_isn + 1, 30_002);
    run_ts(&lab, cfin, 6002, 80_001);
    let (_, r) = lab.reverse(CLIENT, b).expect("the new flow's entry");
    assert_eq!(
        (r.state, r.tw_seq, r.tw_tsval),
        (state::TIME_WAIT, b_isn + 2, 6002)
    );
    // So a SYN whose timestamp that TIME_WAIT refuses does not get the port.
    assert_eq!(try_syn(&lab, CLIENT_PORT + 2, 50, Some(5500)).0, XDP_DROP);

    // The client's own reset during a handshake (its ISN + 1) does end it.
    let c = CLIENT_PORT + 3;
    assert_eq!(try_syn(&lab, c, 40_000, Some(7000)).0, XDP_TX);
    let synack = backend(port, flags(true, true, false, false), 50_000, 40_001);
    assert_eq!(run_ts(&lab, synack, 90_000, 7000), XDP_TX);
    assert_eq!(reverse_state(&lab, c), Some(state::EMBRYONIC));
    let reset = client(c, flags(false, false, false, true), 40_001, 0);
    lab.run(lab.v0, &reset.bytes());
    assert_eq!(reverse_state(&lab, c), Some(state::CLOSED));
}
