//! `cargo xtask bench` (fourth part): lb's XDP full NAT against nftables (DNAT with
//! masquerade, the kernel's own NAT) and HAProxy 2.6 in TCP mode, end to end as users load
//! them: a routed namespace topology (client -> balancer -> three nginx backends), the same
//! backends and the same wrk load for each, in interleaved rounds, keep-alive and one
//! connection per request (`Connection: close`: nginx closes first, so its TIME_WAIT sits
//! on the balancer's source tuples and every source port is reused many times over).
//! Targets: lb's connections a second with one connection per request at least
//! nftables', and lb's keep-alive requests a second at least nftables'.
//!
//! Each balancer runs alone in the balancer namespace during its runs: lb started afresh
//! (and removed with `lb down`), the nftables table added and deleted, HAProxy started and
//! stopped. Each figure is the median over the rounds; lb's drops by reason are printed
//! for each of its runs. `LB_BENCH_SECS` (default 30) sets the length of a run,
//! `LB_BENCH_ROUNDS` (default 2) the number of rounds.
use std::{net::SocketAddr, time::Duration};

use anyhow::bail;
use lb_tests::{
    lbproc::{LbProcess, temp_store},
    peers::{Daemon, Nginx, version},
    topology::Topology,
    wrk::{Wrk, WrkErrors, WrkOptions, WrkReport},
};
use serde_json::{Value, json};

const BACKENDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Balancer {
    Lb,
    Nftables,
    Haproxy,
}

impl Balancer {
    fn name(self) -> &'static str {
        match self {
            Balancer::Lb => "lb (XDP)",
            Balancer::Nftables => "nftables DNAT+masq",
            Balancer::Haproxy => "HAProxy tcp",
        }
    }
}

/// nftables' ruleset: the VIP's connections spread over the backends at random (the
/// kernel's conntrack keeps each connection where it went), masqueraded towards them.
fn nft_ruleset(topo: &Topology) -> String {
    let map: Vec<String> = topo
        .backend_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{i} : {a}"))
        .collect();
    let set: Vec<String> = topo
        .backend_addrs
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    format!(
        "table ip lbbench {{
    chain pre {{
        type nat hook prerouting priority dstnat;
        ip daddr {vip} tcp dport 80 dnat to numgen random mod {n} map {{ {map} }}
    }}
    chain post {{
        type nat hook postrouting priority srcnat;
        ip daddr {{ {set} }} tcp dport 80 masquerade
    }}
}}
",
        vip = topo.vip,
        n = topo.backend_addrs.len(),
        map = map.join(", "),
        set = set.join(", ")
    )
}

/// HAProxy in TCP mode on the VIP, round robin over the backends, one thread a CPU.
fn haproxy_config(topo: &Topology) -> String {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut c = format!(
        "global
    nbthread {threads}
    maxconn 4096

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend l4
    bind {vip}:80
    default_backend web

backend web
    balance roundrobin
",
        vip = topo.vip
    );
    for (i, a) in topo.backend_addrs.iter().enumerate() {
        c.push_str(&format!("    server be{i} {a}:80\n"));
    }
    c
}

/// A balancer in place, until dropped.
enum Running {
    Lb(LbProcess, lb_tests::lbproc::TempStore),
    Nftables,
    Haproxy(Daemon),
}

fn start(b: Balancer, topo: &Topology) -> anyhow::Result<Running> {
    Ok(match b {
        Balancer::Lb => {
            let store = temp_store();
            let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--store", &store.url()])?;
            let backends: Vec<String> = (0..BACKENDS)
                .map(|i| topo.backend(i, 80).to_string())
                .collect();
            lb.put_service(
                "web",
                &json!({"vip": topo.vip(80).to_string(), "protocol": "tcp", "backends": backends}),
            )?;
            Running::Lb(lb, store)
        }
        Balancer::Nftables => {
            topo.lb
                .sh(&format!("nft -f - <<'EOF'\n{}EOF", nft_ruleset(topo)))?;
            Running::Nftables
        }
        Balancer::Haproxy => {
            let mut d = Daemon::new("lbt-haproxy-l4", "haproxy (Debian package haproxy)")?;
            let conf = d.dir().join("haproxy.cfg");
            std::fs::write(&conf, haproxy_config(topo))?;
            d.start(
                &topo.lb,
                "haproxy",
                &["-db".as_ref(), "-f".as_ref(), conf.as_os_str()],
            )?;
            d.wait_listening(&topo.lb, topo.vip(80).into(), Duration::from_secs(10))?;
            Running::Haproxy(d)
        }
    })
}

fn stop(r: Running, topo: &Topology) -> anyhow::Result<()> {
    match r {
        Running::Lb(lb, _store) => drop(lb),
        Running::Nftables => {
            topo.lb.sh("nft delete table ip lbbench")?;
        }
        Running::Haproxy(d) => drop(d),
    }
    // Nothing of this balancer may stay for the next.
    let links = topo.lb.ip("link show")?;
    if links.contains("xdp") {
        bail!("an XDP program stayed attached: {links}");
    }
    Ok(())
}

/// lb's drop counters, by reason.
fn lb_drops(r: &Running) -> Value {
    match r {
        Running::Lb(lb, _) => lb
            .request("GET", "/v1/stats", None)
            .map(|(_, v)| v["drops"].clone())
            .unwrap_or_default(),
        _ => Value::Null,
    }
}

/// Waits until a connection through the balancer is answered.
fn wait_serving(topo: &Topology) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if answered(topo).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the balancer does not answer on {}", topo.vip(80));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request to nginx through the balancer, on a connection of its own.
fn answered(topo: &Topology) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let to = SocketAddr::from(topo.vip(80));
    let mut c = topo
        .client
        .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)))?;
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    c.write_all(b"GET /a/ HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("answer: {answer}");
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let secs = lb_tests::env_num("LB_BENCH_SECS", 30)?.max(1);
    let rounds = lb_tests::env_num("LB_BENCH_ROUNDS", 2)?.max(1) as usize;
    let topo = Topology::two_armed(BACKENDS)?;
    // HAProxy binds the VIP; nftables and lb take its packets before local delivery.
    topo.lb.ip(&format!("addr add {}/32 dev lo", topo.vip))?;
    topo.lb.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    let _nginx = (0..BACKENDS)
        .map(|i| {
            Nginx::start(
                &topo.backends[i],
                topo.backend(i, 80).into(),
                &format!("be{i}"),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let wrk = Wrk::new(&["/a/"])?;
    println!(
        "L4 balancers end to end: client -> balancer -> {BACKENDS} nginx, wrk 2 threads, 32 connections, \
         {secs} s runs, {rounds} rounds interleaved; {}, {}",
        version("haproxy", &["-v"]),
        version("nft", &["--version"])
    );
    let modes = [("keep-alive", false), ("connection per request", true)];
    let order = [Balancer::Lb, Balancer::Nftables, Balancer::Haproxy];
    // (mode, balancer) -> rates and summed errors.
    let mut rates: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); order.len()]; modes.len()];
    let mut errors: Vec<Vec<WrkErrors>> =
        vec![vec![WrkErrors::default(); order.len()]; modes.len()];
    for round in 0..rounds {
        // Alternate the order, so that no balancer always runs first.
        let mut this: Vec<usize> = (0..order.len()).collect();
        if round % 2 == 1 {
            this.reverse();
        }
        for &b in &this {
            let balancer = order[b];
            let running = start(balancer, &topo)?;
            wait_serving(&topo)?;
            for (m, (mode, close)) in modes.iter().enumerate() {
                let before = lb_drops(&running);
                let o = WrkOptions {
                    threads: 2,
                    connections: 32,
                    duration: Duration::from_secs(secs),
                    close: *close,
                    tls: false,
                };
                let r: WrkReport = wrk.run(&topo.client, SocketAddr::from(topo.vip(80)), &o)?;
                rates[m][b].push(r.rps());
                errors[m][b].add(&r.errors);
                let drops = lb_drops(&running);
                let dropped = drops_since(&before, &drops);
                println!(
                    "round {} {:<22} {:<20} {:>9.0}/s  errors {}{}",
                    round + 1,
                    mode,
                    balancer.name(),
                    r.rps(),
                    r.errors,
                    if balancer == Balancer::Lb {
                        format!("  lb drops: {dropped}")
                    } else {
                        String::new()
                    }
                );
            }
            stop(running, &topo)?;
        }
    }
    println!();
    println!(
        "{:<22} {:<20} {:>12} {:>10}",
        "mode", "balancer", "median /s", "errors"
    );
    let mut missed = 0;
    for (m, (mode, _)) in modes.iter().enumerate() {
        for (b, balancer) in order.iter().enumerate() {
            println!(
                "{:<22} {:<20} {:>12.0} {:>10}",
                mode,
                balancer.name(),
                median(rates[m][b].clone()),
                errors[m][b]
            );
        }
        let (lb, nft) = (median(rates[m][0].clone()), median(rates[m][1].clone()));
        let ok = lb >= nft;
        missed += usize::from(!ok);
        println!(
            "target: lb >= nftables ({mode}): {:.2}x {}",
            lb / nft.max(1.0),
            if ok { "ok" } else { "MISSED" }
        );
    }
    println!("({missed} of {} targets missed)", modes.len());
    Ok(())
}

/// The drop counters that grew between two readings, as "reason n, ...".
fn drops_since(before: &Value, after: &Value) -> String {
    let Some(after) = after.as_object() else {
        return "-".into();
    };
    let grew: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let n = v
                .as_u64()?
                .saturating_sub(before.get(k).and_then(Value::as_u64).unwrap_or(0));
            (n > 0).then(|| format!("{k} {n}"))
        })
        .collect();
    if grew.is_empty() {
        "none".into()
    } else {
        grew.join(", ")
    }
}
