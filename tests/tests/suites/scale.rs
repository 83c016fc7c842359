//! Map memory stays bounded: 10,000 services of 10 backends each fit in a few hundred MiB,
//! because a table is sized for its own backends rather than at the 65537-slot maximum.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb::{
    dataplane::{Dataplane, Limits},
    model::ServiceSpec,
};
use lb_common::maglev;

const SERVICES: u32 = 10_000;
const BACKENDS: u32 = 10;

#[test]
fn ten_thousand_services_of_ten_backends_fit_in_a_few_hundred_mib() {
    let slots = maglev::default_table_size(BACKENDS as usize);
    let limits = Limits {
        max_services: SERVICES,
        max_backends: SERVICES * BACKENDS,
        maglev_slots: SERVICES * slots,
        conntrack_entries: Limits::default().conntrack_entries,
    };
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(lb_tests::unique("lbt-scale"));
    let mut dp = Dataplane::load(&pins, &limits).unwrap();
    for s in 0..SERVICES {
        let backend = |b: u32| {
            let n = s * BACKENDS + b;
            SocketAddrV4::new(
                Ipv4Addr::new(10, 100 + (n >> 16) as u8, (n >> 8) as u8, n as u8),
                8080,
            )
            .to_string()
        };
        let spec = ServiceSpec {
            vip: Some(
                SocketAddrV4::new(Ipv4Addr::new(10, 99, (s >> 8) as u8, s as u8), 80).to_string(),
            ),
            protocol: Some("tcp".into()),
            backends: Some((0..BACKENDS).map(|i| backend(i).into()).collect()),
            table_size: None,
            ..Default::default()
        };
        let svc = spec.validate(&format!("svc-{s}")).unwrap();
        dp.upsert(&svc, &Default::default())
            .unwrap_or_else(|e| panic!("service {s}: {e}"));
    }
    // What the kernel holds is the paper's table for that backend set.
    for s in [0, SERVICES / 2, SERVICES - 1] {
        let name = format!("svc-{s}");
        let inst = dp.installed(&name).unwrap();
        let addrs: Vec<SocketAddrV4> = inst.backends.iter().map(|&(a, _)| a).collect();
        let expected: Vec<u32> = lb_tests::maglev_ref::table(&addrs, inst.table_size as u64)
            .into_iter()
            .map(|i| inst.backends[i].1)
            .collect();
        assert_eq!(dp.table_in_map(&name).unwrap(), expected, "{name}");
    }
    let memory = dp.map_memory();
    let total: u64 = memory.iter().map(|(_, b)| b).sum();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for (name, bytes) in &memory {
        println!("{name:<14} {:>8.1} MiB", mib(*bytes));
    }
    println!(
        "{:<14} {:>8.1} MiB for {SERVICES} services of {BACKENDS} backends",
        "total",
        mib(total)
    );
    assert!(
        memory
            .iter()
            .any(|(n, b)| *n == "maglev" && *b >= (SERVICES * slots) as u64 * 8),
        "{memory:?}"
    );
    // The README's figure (249 MiB on 2 CPUs), with 5 % of room; the per-CPU counters
    // (services' and backends': about 2.1 MiB a CPU here) grow with the CPU count.
    let per_cpu: u64 = memory
        .iter()
        .filter(|(n, _)| matches!(*n, "service_stats" | "backend_stats"))
        .map(|(_, b)| b)
        .sum();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
    let on_two_cpus = total - per_cpu + per_cpu * 2 / cpus;
    assert!(
        mib(on_two_cpus) < 262.0,
        "{:.1} MiB ({:.1} on 2 CPUs): the README says 249",
        mib(total),
        mib(on_two_cpus)
    );
}

#[test]
fn the_default_sizes_take_about_two_hundred_mib() {
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(lb_tests::unique("lbt-scale"));
    let dp = Dataplane::load(&pins, &Limits::default()).unwrap();
    let total: u64 = dp.map_memory().iter().map(|(_, b)| b).sum();
    let mib = total as f64 / (1024.0 * 1024.0);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!("default sizes: {mib:.1} MiB on {cpus} CPUs");
    // Per-CPU counters: 16 bytes per service and per backend on every CPU.
    let per_cpu = (2 * 65_537 * 16 * cpus) as f64 / (1024.0 * 1024.0);
    assert!(mib < 220.0 + per_cpu, "{mib:.1} MiB");
}
