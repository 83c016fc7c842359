//! End to end through real namespaces, veth pairs and a bridge: an `lb` process, real
//! backends and clients, both topologies.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use lb_tests::{
    lbproc::LbProcess,
    servers::{Backend, HttpConn, http_get_once, udp_ask},
    topology::Topology,
};
use serde_json::json;

const T: Duration = Duration::from_secs(3);

fn start_backends(topo: &Topology, port: u16) -> Vec<Backend> {
    (0..topo.backends.len())
        .map(|i| {
            let tcp = SocketAddr::from(topo.backend(i, port));
            Backend::start(&topo.backends[i], &format!("be{i}"), tcp, Some(tcp)).unwrap()
        })
        .collect()
}

fn service(topo: &Topology, vip_port: u16, proto: &str, backends: &[usize], port: u16) -> serde_json::Value {
    json!({
        "vip": topo.vip(vip_port).to_string(),
        "protocol": proto,
        "backends": backends.iter().map(|&i| topo.backend(i, port).to_string()).collect::<Vec<_>>(),
    })
}

/// What to look at when a flow fails: drop counters, lb's log, neighbours.
fn diagnose(topo: &Topology, lb: &LbProcess) -> String {
    let stats = lb.request("GET", "/v1/stats", None).map(|(_, v)| v.to_string()).unwrap_or_default();
    let neigh = topo.lb.ip("neigh show").unwrap_or_default();
    let maps: String = ["services", "conntrack", "nat_reverse", "iface_addrs", "config"]
        .iter()
        .map(|m| {
            let path = lb.bpffs.join(m);
            let out = std::process::Command::new("bpftool").args(["map", "dump", "pinned"]).arg(&path).output();
            format!("{m}: {}", out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default())
        })
        .collect();
    format!("stats: {stats}\nneighbours:\n{neigh}\nmaps:\n{maps}\nlb log:\n{}", lb.log_text())
}

/// Opens `n` connections, one request each; counts answers by backend.
fn spread(topo: &Topology, lb: &LbProcess, vip: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let who = http_get_once(&topo.client, vip, T)
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}\n{}", diagnose(topo, lb)));
        *counts.entry(who).or_insert(0) += 1;
    }
    counts
}

fn many_connections_spread_over_three_backends(topo: Topology) {
    let _backends = start_backends(&topo, 8080);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("web", &service(&topo, 80, "tcp", &[0, 1, 2], 8080)).unwrap();
    let counts = spread(&topo, &lb, topo.vip(80).into(), 300);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (who, n) in &counts {
        assert!(*n >= 50, "{who} got only {n} of 300: {counts:?}");
    }
    // The API counts what went through, per backend.
    let (status, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    assert_eq!(status, 200);
    assert!(view["counters"]["packets"].as_u64().unwrap() >= 300 * 4, "{view}");
    for b in view["backend_counters"].as_array().unwrap() {
        assert!(b["packets"].as_u64().unwrap() > 0, "{view}");
    }
}

#[test]
fn one_armed_many_connections_spread_over_three_backends() {
    many_connections_spread_over_three_backends(Topology::one_armed(3).unwrap());
}

#[test]
fn two_armed_many_connections_spread_over_three_backends() {
    many_connections_spread_over_three_backends(Topology::two_armed(3).unwrap());
}
