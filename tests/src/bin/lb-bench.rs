//! `cargo xtask bench`: per-packet cost of lb's XDP program, measured with
//! BPF_PROG_TEST_RUN. Every call runs once on the original bytes (a forwarding program
//! rewrites its buffer, so `repeat` would measure its own output); the kernel's own
//! timing of each call is collected and the median printed, with the do-nothing program's
//! median as the floor and each case net of it.
use std::net::Ipv4Addr;

use lb::dataplane::Limits;
use lb_tests::packet::*;

const CALLS: usize = 20_000;

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, l4: L4) -> Frame {
    Frame { src_mac: mac(10), dst_mac: mac(1), src, dst, ttl: 64, sport, dport, l4, payload: vec![0x61; 64] }
}

/// Keeps the measuring thread on one CPU: per-CPU map state and caches stay put.
fn pin_to_last_cpu() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpus - 1).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn main() -> anyhow::Result<()> {
    pin_to_last_cpu();
    let limits = Limits { max_services: 1024, max_backends: 1024, maglev_slots: 1 << 20, conntrack_entries: 1 << 18 };
    let mut lab = PacketLab::new(&limits, (10_000, 65_535))?;
    lab.service("web", "10.70.0.100:80", "tcp", &["10.70.0.11:8080", "10.70.0.12:8080", "10.70.0.13:8080"]);
    // Other services, so the lookups do not run on an empty map.
    for i in 0..200u16 {
        lab.service(&format!("s{i}"), &format!("10.70.1.{}:{}", i % 250, 1000 + i), "tcp", &["10.70.0.11:8080"]);
    }
    let (v0, run) = (lab.v0, |lab: &PacketLab, p: &[u8]| lab.run_on(lb::dataplane::PROGRAM, lab.v0, p).expect("test run"));

    let established = frame(CLIENT, VIP, 40_000, 80, ACK).bytes();
    let (verdict, _, _) = run(&lab, &frame(CLIENT, VIP, 40_000, 80, SYN).bytes());
    assert_eq!(verdict, XDP_TX);
    // The second packet has the flow tracked.
    run(&lab, &established);
    let conn = lab.conn(CLIENT, 40_000, VIP, 80, 6).expect("tracked");
    let backend = lab.dataplane.installed("web").unwrap().backends.iter().find(|(_, id)| *id == conn.backend_id).unwrap().0;
    let reply = frame(*backend.ip(), LB0, 8080, conn.snat_port, ACK).bytes();
    let non_vip = frame(CLIENT, Ipv4Addr::new(10, 70, 0, 99), 40_000, 80, ACK).bytes();

    let mut floor = Vec::with_capacity(CALLS);
    let mut cases: Vec<(&str, Vec<u64>, u32, u64)> = vec![
        ("established flow", Vec::new(), XDP_TX, 120),
        ("reply path", Vec::new(), XDP_TX, 120),
        ("non-VIP packet", Vec::new(), XDP_PASS, 40),
        ("new flow", Vec::new(), XDP_TX, 450),
    ];
    // Each case in a run of its own, as a stream of such packets would come; the floor
    // before and after, so that a drift of the machine shows.
    let new_flows: Vec<Vec<u8>> = (0..CALLS)
        .map(|i| frame(Ipv4Addr::new(10, 80, (i / 250) as u8, (i % 250) as u8 + 1), VIP, 1024 + (i % 60_000) as u16, 80, SYN).bytes())
        .collect();
    for _ in 0..CALLS {
        floor.push(lab.run_pass(&established));
    }
    for (case, packets) in cases.iter_mut().zip([
        vec![established.clone()],
        vec![reply.clone()],
        vec![non_vip.clone()],
        new_flows,
    ]) {
        for i in 0..CALLS {
            let (verdict, _, ns) = run(&lab, &packets[i % packets.len()]);
            assert_eq!(verdict, case.2, "{}: unexpected verdict", case.0);
            case.1.push(ns);
        }
    }
    for _ in 0..CALLS {
        floor.push(lab.run_pass(&established));
    }
    let _ = v0;
    let floor = median(floor);
    println!("lb XDP program, BPF_PROG_TEST_RUN, {CALLS} single calls per case, median ns per packet");
    println!("{:<18} {:>8} {:>14} {:>12}", "case", "median", "net of floor", "target (net)");
    println!("{:<18} {:>8} {:>14} {:>12}", "XDP_PASS floor", floor, "-", "-");
    let mut missed = 0;
    for (name, samples, _, target) in cases {
        let m = median(samples);
        let net = m.saturating_sub(floor);
        let ok = net <= target;
        missed += usize::from(!ok);
        println!("{name:<18} {m:>8} {net:>14} {:>9} {}", format!("<= {target}"), if ok { "ok" } else { "MISSED" });
    }
    println!("({missed} target(s) missed)");
    Ok(())
}
