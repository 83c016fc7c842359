//! `cargo xtask demo`: lb in a small namespace topology. A client reaches a VIP routed
//! through the balancer; three HTTP backends sit behind a bridge on its other side. The
//! demo adds a service over the API, sends a few hundred requests, shows how they spread,
//! what the API and bpftool say; then an HTTP service routed by path through the Docker
//! Flow Proxy API, a backend that dies and leaves the rotation, and removes everything it
//! made.
use std::{collections::BTreeMap, net::SocketAddr, process::Command, time::Duration};

use lb_tests::{
    lbproc::LbProcess,
    servers::{Backend, HttpConn, http_get_once},
    topology::Topology,
};
use serde_json::json;

const REQUESTS: usize = 300;

fn main() -> anyhow::Result<()> {
    println!("== topology (network namespaces, veth pairs, a bridge)");
    let topo = Topology::two_armed(3)?;
    println!(
        "   client 10.202.1.10 --route 10.202.9.0/24--> lb 10.202.1.1 (eth0) | lb {} (eth1) --bridge--> backends {:?}",
        topo.lb_backend_side, topo.backend_addrs
    );
    let mut backends: Vec<Backend> = (0..3)
        .map(|i| {
            Backend::start(
                &topo.backends[i],
                &format!("backend-{i}"),
                topo.backend(i, 8080).into(),
                None,
            )
        })
        .collect::<Result<_, _>>()?;

    println!(
        "\n== lb run --iface eth0 --iface eth1 (in namespace {})",
        topo.lb.name
    );
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[])?;
    let vip = topo.vip(80);
    let body = json!({
        "vip": vip.to_string(),
        "protocol": "tcp",
        "backends": (0..3).map(|i| topo.backend(i, 8080).to_string()).collect::<Vec<_>>(),
    });
    println!("\n== PUT /v1/services/web {body}");
    let stored = lb.put_service("web", &body)?;
    println!("   200 {stored}");

    println!("\n== {REQUESTS} HTTP requests from the client to {vip}, one connection each");
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..REQUESTS {
        let who = http_get_once(&topo.client, SocketAddr::from(vip), Duration::from_secs(3))?;
        *spread.entry(who).or_default() += 1;
    }
    for (who, n) in &spread {
        println!("   {who:<10} {n:>4}  {}", "#".repeat(n / 4));
    }

    let (_, view) = lb.request("GET", "/v1/services/web", None)?;
    println!(
        "\n== GET /v1/services/web\n{}",
        serde_json::to_string_pretty(&view)?
    );

    let pin = lb.bpffs.join("services");
    println!("\n== bpftool map dump pinned {}", pin.display());
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&pin)
        .output()?;
    print!("{}", String::from_utf8_lossy(&dump.stdout));
    println!(
        "\n(other maps under {}: {})",
        lb.bpffs.display(),
        lb::dataplane::MAPS.join(", ")
    );

    let http = SocketAddr::from(([10, 202, 1, 1], 80));
    let ips: Vec<String> = topo.backend_addrs.iter().map(ToString::to_string).collect();
    let reconfigure = format!(
        "/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends={}",
        ips.join(",")
    );
    println!(
        "\n== GET {reconfigure}  (the Docker Flow Proxy API: an HTTP service on lb's --http listener)"
    );
    let (code, answer) = lb.request("GET", &reconfigure, None)?;
    println!("   {code} {answer}");
    let spread_http = |n: usize| -> anyhow::Result<BTreeMap<String, usize>> {
        let mut conn = HttpConn::connect(&topo.client, http, Duration::from_secs(3))?;
        let mut spread = BTreeMap::new();
        for _ in 0..n {
            let (_, who) = conn.send("GET", "/demo/hello", "lb", b"")?;
            *spread.entry(who).or_default() += 1;
        }
        Ok(spread)
    };
    println!(
        "   30 requests for http://{http}/demo/hello on one keep-alive connection: {:?}",
        spread_http(30)?
    );

    println!("\n== backend-2 dies; lb's health checks (TCP, every 2 s, fall 3) take it out");
    drop(backends.pop());
    let down = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        lb.request("GET", "/v1/services/go-demo", None)
            .is_ok_and(|(_, v)| v["backend_counters"][2]["health"] == "down")
    });
    let (_, view) = lb.request("GET", "/v1/services/go-demo", None)?;
    println!(
        "   backend-2 {}: {}",
        if down { "is down" } else { "is still up" },
        view["backend_counters"][2]
    );
    println!("   30 more requests: {:?}", spread_http(30)?);

    println!(
        "\n== cleaning up: lb stops, lb down detaches XDP and removes the pins, namespaces deleted"
    );
    let status = lb.stop()?;
    anyhow::ensure!(status.success(), "lb exited with {status}");
    Ok(())
}
