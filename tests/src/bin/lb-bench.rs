//! `cargo xtask bench`: per-packet cost of lb's XDP program, measured with
//! BPF_PROG_TEST_RUN. Every call runs once on the original bytes (a forwarding program
//! rewrites its buffer, so `repeat` would measure its own output); the kernel's own
//! timing of each call is collected and the median printed, with the do-nothing program's
//! median as the floor and each case net of it.
//!
//! Four phases: the everyday cases interleaved in rounds; direct server return's
//! established flow and new flow; the first packet of each of
//! 100,000 tracked flows after more than a second of silence (its entries have left the
//! caches); and SYN cookies (lb's SYN-ACK, and the ACK that opens the backend side).
use std::net::Ipv4Addr;

use lb::dataplane::{CookieMode, Limits, Settings};
use lb_tests::{packet::*, segment::*};

const CALLS: usize = 21_000;
const ROUNDS: usize = 7;

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, l4: L4) -> Frame {
    Frame {
        src_mac: mac(10),
        dst_mac: mac(1),
        src,
        dst,
        ttl: 64,
        sport,
        dport,
        l4,
        payload: vec![0x61; 64],
    }
}

/// Keeps the measuring thread on one CPU: per-CPU map state and caches stay put.
fn pin_to_last_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpus - 1).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn main() -> anyhow::Result<()> {
    pin_to_last_cpu();
    let limits = Limits {
        max_services: 1024,
        max_backends: 1024,
        maglev_slots: 1 << 20,
        conntrack_entries: 1 << 18,
    };
    // The SNAT ports lb takes by default on this host (outside its ephemeral ports).
    let snat = lb::snat::default_range(lb::snat::ephemeral_range().unwrap_or((32768, 60999)))
        .map_err(anyhow::Error::msg)?;
    let mut lab = PacketLab::new(&limits, snat)?;
    lab.service(
        "web",
        "10.70.0.100:80",
        "tcp",
        &["10.70.0.11:8080", "10.70.0.12:8080", "10.70.0.13:8080"],
    );
    // Other services, so the lookups do not run on an empty map.
    for i in 0..200u16 {
        lab.service(
            &format!("s{i}"),
            &format!("10.70.1.{}:{}", i % 250, 1000 + i),
            "tcp",
            &["10.70.0.11:8080"],
        );
    }
    let run = |lab: &PacketLab, p: &[u8]| {
        lab.run_on(lb::dataplane::PROGRAM, lab.v0, p)
            .expect("test run")
    };

    let established = frame(CLIENT, VIP, 40_000, 80, ACK).bytes();
    open(&lab, CLIENT, VIP, 40_000);
    let conn = lab.conn(CLIENT, 40_000, VIP, 80, 6).expect("tracked");
    let backend = lab
        .dataplane
        .installed("web")
        .unwrap()
        .backends
        .iter()
        .find(|(_, id)| *id == conn.backend_id)
        .unwrap()
        .0;
    let reply = frame(*backend.ip(), LB0, 8080, conn.snat_port, ACK).bytes();
    let non_vip = frame(CLIENT, Ipv4Addr::new(10, 70, 0, 99), 40_000, 80, ACK).bytes();

    // A SYN sent before and never answered: its retries find their port again.
    let retried_syn = frame(CLIENT, VIP, 40_001, 80, SYN).bytes();
    assert_eq!(run(&lab, &retried_syn).0, XDP_TX);
    let cases: [(&str, u32, u64); 5] = [
        ("established flow", XDP_TX, 120),
        ("reply path", XDP_TX, 120),
        ("non-VIP packet", XDP_PASS, 40),
        ("new flow", XDP_TX, 450),
        ("retried SYN", XDP_TX, 350),
    ];
    const FLOOR: usize = 5;
    // Every new flow's packet made beforehand, so no packet building runs between calls.
    let new_flows: Vec<Vec<u8>> = (0..2 * CALLS)
        .map(|i| {
            frame(
                Ipv4Addr::new(10, 80, (i / 250 % 250) as u8, (i % 250) as u8 + 1),
                VIP,
                1024 + (i % 60_000) as u16,
                80,
                SYN,
            )
            .bytes()
        })
        .collect();
    let mut next_flow = new_flows.iter();
    let mut new_flow = || next_flow.next().expect("enough new flows").as_slice();
    // Rounds of interleaved single calls, so that a slow spell of the machine touches
    // every case and the floor alike; each round's medians are taken net of its floor,
    // and the median round is reported.
    let tx = |lab: &PacketLab, p: &[u8]| {
        lab.run_on(lb::dataplane::TX_PROGRAM, lab.v0, p)
            .expect("test run")
            .2
    };
    let mut per_round: Vec<[u64; 8]> = Vec::new();
    for _ in 0..ROUNDS {
        let mut samples: [Vec<u64>; 8] = Default::default();
        for _ in 0..CALLS / ROUNDS {
            samples[FLOOR].push(lab.run_pass(&established));
            samples[6].push(tx(&lab, &established));
            samples[7].push(tx(&lab, new_flow()));
            let fresh = new_flow();
            for (k, packet) in [
                established.as_slice(),
                reply.as_slice(),
                non_vip.as_slice(),
                fresh,
                retried_syn.as_slice(),
            ]
            .into_iter()
            .enumerate()
            {
                let (verdict, _, ns) = run(&lab, packet);
                // A dropped packet would be a fast one: every call must do its case's work.
                let (name, want, _) = cases[k];
                assert_eq!(
                    verdict,
                    want,
                    "{name}: verdict {verdict}, drops {:?}",
                    lab.dataplane.drops()
                );
                samples[k].push(ns);
            }
        }
        let medians = samples.map(median);
        per_round.push(medians);
    }
    let column = |k: usize| median(per_round.iter().map(|r| r[k]).collect());
    let floor = column(FLOOR);
    println!(
        "lb XDP program, BPF_PROG_TEST_RUN: {CALLS} single calls per case from the original bytes,"
    );
    println!("in {ROUNDS} rounds; the median round's median, in ns per packet");
    println!(
        "{:<28} {:>8} {:>14} {:>14}",
        "case", "median", "net of floor", "target (net)"
    );
    println!(
        "{:<28} {:>8} {:>14} {:>14}",
        "XDP_PASS floor", floor, "-", "-"
    );
    let mut missed = 0;
    let mut targets = 0;
    let mut report = |name: &str, m: u64, net: u64, target: Option<u64>| {
        let verdict = match target {
            Some(t) if net <= t => "ok",
            Some(_) => "MISSED",
            None => "",
        };
        targets += usize::from(target.is_some());
        missed += usize::from(verdict == "MISSED");
        let target = target.map_or("-".to_string(), |t| format!("<= {t}"));
        println!("{name:<28} {m:>8} {net:>14} {target:>11} {verdict}");
    };
    for (k, (name, _, target)) in cases.iter().enumerate() {
        let net = median(
            per_round
                .iter()
                .map(|r| r[k].saturating_sub(r[FLOOR]))
                .collect(),
        );
        report(name, column(k), net, Some(*target));
    }

    // Direct server return (IPIP) on the same kind of packets, to a `dsr` service: the
    // established path (Katran's, the anchor, costs about 155 ns net on this machine) and
    // a new flow's first packet (a SYN from a client never seen).
    lab.service_as(
        "web-dsr",
        lb::model::ServiceSpec {
            vip: Some("10.70.0.101:80".into()),
            backends: Some(
                ["10.70.0.11:80", "10.70.0.12:80", "10.70.0.13:80"]
                    .iter()
                    .map(|&b| b.into())
                    .collect(),
            ),
            forwarding: Some("dsr".into()),
            ..Default::default()
        },
    );
    let dsr_vip = Ipv4Addr::new(10, 70, 0, 101);
    let dsr_established = frame(CLIENT, dsr_vip, 40_000, 80, ACK).bytes();
    assert_eq!(
        run(&lab, &frame(CLIENT, dsr_vip, 40_000, 80, SYN).bytes()).0,
        XDP_TX
    );
    let (m, net) = measure_once_each(&lab, &vec![dsr_established; CALLS], XDP_TX);
    report("dsr established flow", m, net, Some(120));
    let dsr_syns: Vec<Vec<u8>> = (0..CALLS as u32)
        .map(|i| {
            let src = Ipv4Addr::new(10, 83, (i / 250 % 250) as u8, (i % 250) as u8 + 1);
            frame(src, dsr_vip, 1024 + (i % 60_000) as u16, 80, SYN).bytes()
        })
        .collect();
    let (m, net) = measure_once_each(&lab, &dsr_syns, XDP_TX);
    report("dsr new flow (a SYN)", m, net, None);

    // The same two cases over 10,000 open flows in turn, rather than one hot flow: what
    // a busy balancer's packets meet (no target: the targets are for the cases above).
    let (mut forward, mut back) = (Vec::new(), Vec::new());
    for sport in 20_000..30_000u16 {
        let (backend, port) = open(&lab, CLIENT, VIP, sport);
        forward.push(frame(CLIENT, VIP, sport, 80, ACK).bytes());
        back.push(frame(backend, LB0, 8080, port, ACK).bytes());
    }
    shuffle(&mut forward);
    shuffle(&mut back);
    let (m, net) = measure_once_each(&lab, &forward, XDP_TX);
    report("established, 10,000 flows", m, net, None);
    let (m, net) = measure_once_each(&lab, &back, XDP_TX);
    report("reply, 10,000 flows", m, net, None);

    // The first packet of a flow idle for more than a second, among 100,000.
    let idle = idle_flows(&mut lab, 100_000);
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let (m, net) = measure_once_each(&lab, &idle, XDP_TX);
    report("first packet after 1 s idle", m, net, Some(280));

    // The daemon's sweep, once a second, walks every slot of the flow table.
    let mut sweeps: Vec<u64> = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            lab.dataplane.sweep().expect("sweep");
            t.elapsed().as_micros() as u64
        })
        .collect();
    sweeps.sort_unstable();
    println!(
        "(the sweep of {} flow-table slots and {} tracked flows: {} µs, median of 5)",
        lab.config().flow_slots,
        idle.len(),
        sweeps[2]
    );

    // SYN cookies: lb's SYN-ACK for a SYN, and the ACK that proves the client.
    lab.dataplane.configure(&Settings {
        cookies: CookieMode::Always,
        ..Settings::with_ports(snat.0, snat.1)
    })?;
    let syns: Vec<Vec<u8>> = (0..CALLS as u32)
        .map(|i| {
            cookie_syn(
                Ipv4Addr::new(10, 81, (i / 250 % 250) as u8, (i % 250) as u8 + 1),
                2000 + (i % 50_000) as u16,
            )
        })
        .collect();
    let (m, net) = measure_once_each(&lab, &syns, XDP_TX);
    report("SYN in cookie mode", m, net, None);
    // Each client's ACK to lb's SYN-ACK (made just before: a cookie lasts a minute or two).
    let acks: Vec<Vec<u8>> = (0..CALLS as u32)
        .map(|i| {
            let src = Ipv4Addr::new(10, 82, (i / 250 % 250) as u8, (i % 250) as u8 + 1);
            let syn = cookie_syn(src, 3000 + (i % 50_000) as u16);
            let (v, out, _) = run(&lab, &syn);
            assert_eq!(v, XDP_TX, "cookie SYN-ACK");
            let sa = seen(&out);
            let mut ack = Seg::new(
                frame(src, VIP, sa.dport, 80, ACK),
                1001,
                sa.seq.wrapping_add(1),
            );
            ack.frame.payload.clear();
            ack.ts = sa.ts.map(|(v, _)| (5001, v));
            ack.bytes()
        })
        .collect();
    let (m, net) = measure_once_each(&lab, &acks, XDP_TX);
    report("ACK of a cookie", m, net, None);
    let view = lab.dataplane.flood_view();
    assert!(
        view.cookies_valid >= CALLS as u64,
        "cookies did not check: {view:?}"
    );

    println!("({missed} of {targets} targets missed)");
    println!(
        "(a program that only answers XDP_TX: {} ns on one packet, {} ns on a new packet each call)",
        column(6),
        column(7)
    );
    Ok(())
}

/// Opens a connection from `client`:`sport` through lb: its SYN, the backend's SYN-ACK, and
/// the client's ACK.
fn open(lab: &PacketLab, client: Ipv4Addr, vip: Ipv4Addr, sport: u16) -> (Ipv4Addr, u16) {
    let (v, out, _) = lab
        .run_on(
            lb::dataplane::PROGRAM,
            lab.v0,
            &frame(client, vip, sport, 80, SYN).bytes(),
        )
        .expect("test run");
    assert_eq!(v, XDP_TX, "SYN");
    let (backend, port) = (
        Ipv4Addr::new(out[30], out[31], out[32], out[33]),
        u16::from_be_bytes([out[34], out[35]]),
    );
    let syn_ack = frame(
        backend,
        LB0,
        8080,
        port,
        L4::Tcp {
            syn: true,
            ack: true,
            fin: false,
            rst: false,
        },
    );
    assert_eq!(lab.run(lab.v0, &syn_ack.bytes()).0, XDP_TX, "SYN-ACK");
    assert_eq!(
        lab.run(lab.v0, &frame(client, vip, sport, 80, ACK).bytes())
            .0,
        XDP_TX,
        "ACK"
    );
    (backend, port)
}

/// `n` tracked flows, from clients the lab can answer; the next packet of each.
fn idle_flows(lab: &mut PacketLab, n: u32) -> Vec<Vec<u8>> {
    // A service of its own, with backends enough for 100,000 flows in the default SNAT
    // range; clients next to CLIENT. All with neighbour entries, so that packets route.
    let vip = Ipv4Addr::new(10, 70, 0, 101);
    let backends: Vec<String> = (21..25u8).map(|i| format!("10.70.0.{i}:8080")).collect();
    let clients: Vec<Ipv4Addr> = (30..34u8).map(|i| Ipv4Addr::new(10, 70, 0, i)).collect();
    for host in (21..25u8).chain(30..34) {
        let m = mac(host).map(|b| format!("{b:02x}")).join(":");
        lab.ns
            .ip(&format!(
                "neigh replace 10.70.0.{host} lladdr {m} dev v0 nud permanent"
            ))
            .expect("neighbour");
    }
    let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
    lab.service("idle", &format!("{vip}:80"), "tcp", &refs);
    let per = n / clients.len() as u32;
    let mut next = Vec::with_capacity(n as usize);
    for c in &clients {
        for i in 0..per {
            let sport = 2000 + i as u16;
            open(lab, *c, vip, sport);
            next.push(frame(*c, vip, sport, 80, ACK).bytes());
        }
    }
    shuffle(&mut next);
    next
}

/// Puts packets in an order unrelated to their making (a fixed xorshift, so every run
/// measures the same order).
fn shuffle(packets: &mut [Vec<u8>]) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..packets.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        packets.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// A SYN as Linux sends it.
fn cookie_syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut f = frame(src, VIP, sport, 80, SYN);
    f.payload.clear();
    Seg::linux_syn(f, 1000, 5000).bytes()
}

/// Runs each packet once, each beside a floor call: the median, and the median net of the
/// floor. Every call must answer `want`.
fn measure_once_each(lab: &PacketLab, packets: &[Vec<u8>], want: u32) -> (u64, u64) {
    let mut cost = Vec::with_capacity(packets.len());
    let mut floor = Vec::with_capacity(packets.len());
    for p in packets.iter().take(CALLS) {
        floor.push(lab.run_pass(p));
        let (v, _, ns) = lab
            .run_on(lb::dataplane::PROGRAM, lab.v0, p)
            .expect("test run");
        assert_eq!(v, want, "verdict {v}, drops {:?}", lab.dataplane.drops());
        cost.push(ns);
    }
    let (m, f) = (median(cost), median(floor));
    (m, m.saturating_sub(f))
}
