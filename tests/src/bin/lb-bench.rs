//! `cargo xtask bench`: per-packet cost of lb's XDP program, measured with
//! BPF_PROG_TEST_RUN. Every call runs once on the original bytes (a forwarding program
//! rewrites its buffer, so `repeat` would measure its own output); the kernel's own
//! timing of each call is collected and the median printed, with the do-nothing program's
//! median as the floor and each case net of it.
use std::net::Ipv4Addr;

use lb::dataplane::Limits;
use lb_tests::packet::*;

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
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
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
    let mut lab = PacketLab::new(&limits, (10_000, 65_535))?;
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
    let (verdict, _, _) = run(&lab, &frame(CLIENT, VIP, 40_000, 80, SYN).bytes());
    assert_eq!(verdict, XDP_TX);
    // The second packet has the flow tracked.
    run(&lab, &established);
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

    let cases: [(&str, u32, u64); 4] = [
        ("established flow", XDP_TX, 120),
        ("reply path", XDP_TX, 120),
        ("non-VIP packet", XDP_PASS, 40),
        ("new flow", XDP_TX, 450),
    ];
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
    let mut per_round: Vec<[u64; 7]> = Vec::new();
    for _ in 0..ROUNDS {
        let mut samples: [Vec<u64>; 7] = Default::default();
        for _ in 0..CALLS / ROUNDS {
            samples[4].push(lab.run_pass(&established));
            samples[5].push(tx(&lab, &established));
            samples[6].push(tx(&lab, new_flow()));
            let fresh = new_flow();
            for (k, packet) in [
                established.as_slice(),
                reply.as_slice(),
                non_vip.as_slice(),
                fresh,
            ]
            .into_iter()
            .enumerate()
            {
                let (verdict, _, ns) = run(&lab, packet);
                let _ = verdict;
                samples[k].push(ns);
            }
        }
        let medians = samples.map(median);
        per_round.push(medians);
    }
    let column = |k: usize| median(per_round.iter().map(|r| r[k]).collect());
    let floor = column(4);
    println!(
        "lb XDP program, BPF_PROG_TEST_RUN: {CALLS} single calls per case from the original bytes,"
    );
    println!("in {ROUNDS} rounds; the median round's median, in ns per packet");
    println!(
        "{:<18} {:>8} {:>14} {:>14}",
        "case", "median", "net of floor", "target (net)"
    );
    println!(
        "{:<18} {:>8} {:>14} {:>14}",
        "XDP_PASS floor", floor, "-", "-"
    );
    let mut missed = 0;
    for (k, (name, _, target)) in cases.iter().enumerate() {
        let m = column(k);
        let net = median(
            per_round
                .iter()
                .map(|r| r[k].saturating_sub(r[4]))
                .collect(),
        );
        let ok = net <= *target;
        missed += usize::from(!ok);
        println!(
            "{name:<18} {m:>8} {net:>14} {:>11} {}",
            format!("<= {target}"),
            if ok { "ok" } else { "MISSED" }
        );
    }
    println!("({missed} of {} targets missed)", cases.len());
    println!(
        "(a program that only answers XDP_TX: {} ns on one packet, {} ns on a new packet each call)",
        column(5),
        column(6)
    );
    Ok(())
}
