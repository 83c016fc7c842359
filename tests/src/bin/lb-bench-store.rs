//! `cargo xtask bench` (second part): cold start to ready with 10,000 services of 10
//! backends each, from the file store and from etcd, with the map memory it took; and the
//! time from a PUT returning to the first packet forwarded to its new backend.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use lb::{
    controller::Controller,
    dataplane::{Dataplane, Limits},
    model::ServiceSpec,
    owner::ControllerHandle,
    reconcile::Reconciler,
    store::{Expect, Store, etcd::EtcdStore, file::FileStore},
};
use lb_tests::{etcd::EtcdCluster, netns::Netns, packet::*, unique};

const SERVICES: u32 = 10_000;
const BACKENDS: u32 = 10;

fn doc(s: u32) -> Vec<u8> {
    let backends: Vec<String> = (0..BACKENDS)
        .map(|b| {
            let n = s * BACKENDS + b;
            format!("10.{}.{}.{}:8080", 100 + (n >> 16), (n >> 8) & 255, n & 255)
        })
        .collect();
    // Unchecked: these backends exist only as routes to a gateway that never answers, and
    // 100,000 TCP checks would time the check tasks rather than the restore.
    let check = serde_json::json!({"kind": "none", "interval_ms": 2000, "timeout_ms": 1000, "rise": 2, "fall": 3});
    serde_json::json!({"schema": 1, "vip": format!("10.98.{}.{}:80", s >> 8, s & 255), "protocol": "tcp", "backends": backends, "table_size": 1021, "check": check})
        .to_string()
        .into_bytes()
}

fn limits() -> Limits {
    Limits {
        max_services: SERVICES + 16,
        max_backends: SERVICES * BACKENDS + 16,
        maglev_slots: (SERVICES + 16) * 1021,
        conntrack_entries: 1 << 18,
    }
}

/// Loads a fresh data plane and restores every service from `store`; the time to ready.
async fn cold_start(store: Arc<dyn Store>) -> (Duration, f64, Arc<Reconciler>) {
    let start = Instant::now();
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(unique("lbt-bench"));
    let mut dataplane = Dataplane::load(&pins, &limits()).expect("load");
    dataplane
        .configure(&lb::dataplane::Settings::with_ports(61_000, 65_535))
        .expect("configure");
    dataplane
        .set_iface_addrs(&lb::net::interface_addresses().expect("addresses"))
        .expect("addresses");
    let loaded = start.elapsed();
    let reconciler = Reconciler::new(
        store,
        ControllerHandle::start(Controller::new(dataplane)),
        Default::default(),
    );
    tokio::spawn(reconciler.clone().run());
    while !reconciler.is_ready() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = start.elapsed();
    println!(
        "    (of which loading the program and creating the maps: {} ms)",
        loaded.as_millis()
    );
    let (restored, memory) = reconciler
        .controller()
        .call(|c| (c.list().len(), c.memory()))
        .await
        .expect("the controller runs");
    assert_eq!(restored, SERVICES as usize, "every service restored");
    let mib = memory as f64 / (1024.0 * 1024.0);
    (took, mib, reconciler)
}

fn main() -> anyhow::Result<()> {
    // A namespace of its own, where backends (10.100.0.0/14) are routed via one gateway.
    let ns = Netns::new(&unique("lbt-bench"))?;
    ns.ip("link add v0 type veth peer name v1")?;
    ns.ip("link set v0 up")?;
    ns.ip("link set v1 up")?;
    ns.ip("addr add 10.99.0.1/24 dev v0")?;
    ns.ip("route add 10.100.0.0/14 via 10.99.0.2")?;
    ns.ip("neigh replace 10.99.0.2 lladdr 02:00:00:00:00:02 dev v0 nud permanent")?;
    ns.sh("echo 1 > /proc/sys/net/ipv4/conf/v0/forwarding")?;
    let v0 = ns.ifindex("v0")?;
    let file = std::fs::File::open(ns.path())?;
    nix::sched::setns(
        std::os::fd::AsFd::as_fd(&file),
        nix::sched::CloneFlags::CLONE_NEWNET,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("cold start to ready, {SERVICES} services of {BACKENDS} backends (target < 2 s)");
        // File store.
        let dir = std::env::temp_dir().join(unique("lbt-bench-store"));
        let store = Arc::new(FileStore::open(&dir, "lb", Duration::from_millis(100))?);
        let fill = Instant::now();
        for s in 0..SERVICES {
            store.put(&format!("svc-{s}"), &doc(s), Expect::Any).await?;
        }
        println!(
            "  (file store filled in {:.1} s)",
            fill.elapsed().as_secs_f64()
        );
        let mut missed = 0;
        let mut verdict = |met: bool| {
            missed += usize::from(!met);
            if met { "ok" } else { "MISSED" }
        };
        let (took, mib, reconciler) = cold_start(store.clone()).await;
        println!(
            "  file store: {:>7.0} ms to ready, {mib:.0} MiB of maps {}",
            took.as_secs_f64() * 1000.0,
            verdict(took < Duration::from_secs(2))
        );

        // The time from a write returning to the first packet forwarded to its new backend,
        // a packet run through the program as soon as the write returns.
        let mut waits = Vec::new();
        for i in 0..200u32 {
            let spec = ServiceSpec {
                vip: Some("10.70.0.100:80".into()),
                protocol: Some("udp".into()),
                backends: Some(vec![format!("10.{}.{}.{}:53", 103, 200, i % 250).into()]),
                table_size: None,
            ..Default::default()
            };
            reconciler
                .put("probe", spec)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let returned = Instant::now();
            let packet = Frame {
                src_mac: mac(10),
                dst_mac: mac(1),
                src: std::net::Ipv4Addr::new(10, 99, 0, 50),
                dst: std::net::Ipv4Addr::new(10, 70, 0, 100),
                ttl: 64,
                sport: 20_000 + i as u16,
                dport: 80,
                l4: UDP,
                payload: b"q".to_vec(),
            }
            .bytes();
            let out = reconciler
                .controller()
                .call(move |c| {
                    let prog = c
                        .dataplane()
                        .program(lb::dataplane::PROGRAM)
                        .expect("program");
                    let mut out = vec![0u8; packet.len() + 64];
                    let mut ctx = [0u8; 24];
                    ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
                    ctx[12..16].copy_from_slice(&v0.to_ne_bytes());
                    let mut opts = TestRunOptions::new();
                    opts.data_in = Some(&packet);
                    opts.data_out = Some(&mut out);
                    opts.ctx_in = Some(&ctx);
                    let r = prog.test_run(opts)?;
                    assert_eq!(r.return_value, XDP_TX, "the probe was not forwarded");
                    Ok::<_, aya::programs::ProgramError>(out)
                })
                .await
                .expect("the controller runs")?;
            waits.push(returned.elapsed());
            assert_eq!(
                &out[30..34],
                &[10, 103, 200, (i % 250) as u8],
                "forwarded to the new backend"
            );
        }
        waits.sort();
        let p99 = waits[waits.len() * 99 / 100];
        println!(
            "  write returned -> first packet forwarded to the new backend: p99 {:.3} ms (target < 5 ms) {}",
            p99.as_secs_f64() * 1000.0,
            verdict(p99 < Duration::from_millis(5))
        );
        drop(reconciler);
        std::fs::remove_dir_all(&dir)?;

        // etcd, in this namespace's loopback.
        ns.ip("link set lo up")?;
        let cluster = EtcdCluster::start_in(&ns, "127.0.0.1")?;
        let endpoints: Vec<String> = cluster
            .endpoints()
            .iter()
            .map(|e| format!("http://{e}"))
            .collect();
        let store = Arc::new(EtcdStore::connect(&endpoints, "lb").await?);
        let fill = Instant::now();
        for chunk in (0..SERVICES).collect::<Vec<_>>().chunks(64) {
            let writes = chunk.iter().map(|&s| {
                let store = store.clone();
                async move { store.put(&format!("svc-{s}"), &doc(s), Expect::Any).await }
            });
            for r in futures_join_all(writes).await {
                r?;
            }
        }
        println!("  (etcd filled in {:.1} s)", fill.elapsed().as_secs_f64());
        let (took, mib, _reconciler) = cold_start(store).await;
        println!(
            "  etcd:       {:>7.0} ms to ready, {mib:.0} MiB of maps {}",
            took.as_secs_f64() * 1000.0,
            verdict(took < Duration::from_secs(2))
        );
        println!("({missed} of 3 targets missed)");
        anyhow::Ok(())
    })?;
    Ok(())
}

/// Awaits every future (no extra crate for one call).
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
