//! Direct server return end to end, in the routed two-armed topology: the client reaches
//! the VIP through lb, lb hands each connection to a backend (`dsr`: in IPIP, undone by
//! `lb backend`; `dsr-l2`: by MAC), and the backend answers the client itself, through the
//! router the balancer's host also is. The backend sees the client's address.
use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use lb_tests::{
    lbproc::{LbProcess, lb_bin},
    netns::Netns,
    servers::{Backend, HttpConn, http_get_once},
    topology::{Topology, plug},
    unique,
};
use serde_json::json;

const T: Duration = Duration::from_secs(3);
const CLIENT: &str = "10.202.1.10";

/// `lb backend` on one backend: its pins are removed (and the program detached) on drop.
struct Decap {
    bpffs: PathBuf,
}

impl Decap {
    fn attach(ns: &Netns, vip: &str) -> Self {
        let bpffs = PathBuf::from("/sys/fs/bpf").join(unique("lbt-decap"));
        let out = ns
            .sh(&format!(
                "{} backend --iface eth0 --vip {vip} --bpffs {} 2>&1",
                lb_bin().display(),
                bpffs.display()
            ))
            .expect("lb backend");
        assert!(
            out.contains("decapsulating IPIP for"),
            "lb backend said: {out}"
        );
        assert!(!out.contains("warning"), "lb backend said: {out}");
        Self { bpffs }
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        let _ = std::process::Command::new(lb_bin())
            .args(["backend", "--down", "--bpffs"])
            .arg(&self.bpffs)
            .output();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// The two-armed topology's backends set up for direct return as the README says: the VIP
/// on `lo`, no ARP answers for it, the route to clients through the balancer's segment, a
/// server on every address at port 80, and for `dsr` lb's decapsulation program.
struct DirectSetup {
    topo: Topology,
    _servers: Vec<Backend>,
    _decap: Vec<Decap>,
}

/// Sets backend `ns` up to answer clients directly, as the README says: the VIP on `lo`,
/// no ARP answers for it, and `route` (`NET via GW`) back to the clients.
fn answer_directly(ns: &Netns, vip: &str, route: &str) {
    ns.ip(&format!("addr add {vip}/32 dev lo")).unwrap();
    ns.sh(
        "sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
         net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2",
    )
    .unwrap();
    ns.ip(&format!("route add {route}")).unwrap();
}

fn direct_setup(mode: &str, backends: usize) -> DirectSetup {
    let topo = Topology::two_armed(backends).unwrap();
    let vip = topo.vip.to_string();
    let mut servers = Vec::new();
    let mut decap = Vec::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        answer_directly(ns, &vip, "10.202.1.0/24 via 10.202.2.1");
        servers.push(
            Backend::start(ns, &format!("be{i}"), "0.0.0.0:80".parse().unwrap(), None).unwrap(),
        );
        if mode == "dsr" {
            decap.push(Decap::attach(ns, &vip));
        }
    }
    DirectSetup {
        topo,
        _servers: servers,
        _decap: decap,
    }
}

fn service(topo: &Topology, mode: &str, backends: &[usize]) -> serde_json::Value {
    json!({
        "vip": topo.vip(80).to_string(),
        "backends": backends.iter().map(|&i| topo.backend(i, 80).to_string()).collect::<Vec<_>>(),
        "forwarding": mode,
    })
}

fn diagnose(topo: &Topology, lb: &LbProcess) -> String {
    let stats = lb
        .request("GET", "/v1/stats", None)
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    format!(
        "stats: {stats}\nlb neighbours:\n{}\nlb log:\n{}",
        topo.lb.ip("neigh show").unwrap_or_default(),
        lb.log_text()
    )
}

/// The client addresses backend `i`'s established connections come from.
fn peers_of(topo: &Topology, i: usize) -> Vec<String> {
    let out = topo.backends[i]
        .sh("ss -Htn state established sport = :80")
        .unwrap();
    out.lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|peer| peer.rsplit_once(':').map_or(peer, |(a, _)| a).to_string())
        .collect()
}

fn backend_view(lb: &LbProcess, addr: &str) -> Option<serde_json::Value> {
    let (_, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    view["backend_counters"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr)
        .cloned()
}

/// Each direct mode: the backend sees the client's own address; a backend left out of the
/// service drains (its connection keeps going, counted among its flows, and no new one
/// reaches it); connections spread over the backends.
fn the_backend_sees_the_client(mode: &str) {
    let setup = direct_setup(mode, 2);
    let topo = &setup.topo;
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let vip: SocketAddr = topo.vip(80).into();
    lb.put_service("web", &service(topo, mode, &[1])).unwrap();
    let (_, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    assert_eq!(view["forwarding"], mode, "{view}");

    let mut held = HttpConn::connect(&topo.client, vip, T)
        .unwrap_or_else(|e| panic!("{mode}: {e:#}\n{}", diagnose(topo, &lb)));
    assert_eq!(held.get().unwrap(), "be1");
    let peers = peers_of(topo, 1);
    assert_eq!(
        peers,
        [CLIENT],
        "{mode}: be1 sees its connection from {peers:?}, not from the client {CLIENT}"
    );

    // Left out of the service, be1 drains.
    lb.put_service("web", &service(topo, mode, &[0])).unwrap();
    for n in 0..10 {
        let who = http_get_once(&topo.client, vip, T)
            .unwrap_or_else(|e| panic!("{mode}: connection {n}: {e:#}\n{}", diagnose(topo, &lb)));
        assert_eq!(
            who, "be0",
            "{mode}: new connection {n} reached the removed backend"
        );
        assert_eq!(
            held.get().unwrap(),
            "be1",
            "{mode}: the held connection moved"
        );
    }
    let be1 = topo.backend(1, 80).to_string();
    assert!(
        lb_tests::eventually(Duration::from_secs(5), || {
            backend_view(&lb, &be1).is_some_and(|b| b["state"] == "draining" && b["flows"] == 1)
        }),
        "{mode}: the removed backend's view: {:?}",
        backend_view(&lb, &be1)
    );

    // Both again: new connections spread, the held one stays.
    lb.put_service("web", &service(topo, mode, &[0, 1]))
        .unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for n in 0..40 {
        let who = http_get_once(&topo.client, vip, T)
            .unwrap_or_else(|e| panic!("{mode}: connection {n}: {e:#}\n{}", diagnose(topo, &lb)));
        *counts.entry(who).or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "{mode}: {counts:?}");
    assert_eq!(held.get().unwrap(), "be1");
}

#[test]
fn a_dsr_backend_sees_the_clients_address() {
    the_backend_sees_the_client("dsr");
}

#[test]
fn a_dsr_l2_backend_sees_the_clients_address() {
    the_backend_sees_the_client("dsr-l2");
}

/// Two lb nodes behind a router that spreads the VIP over them by ECMP (hashing L4), on
/// one etcd; backends on the same segment. Client 10.212.1.10 -- router -- segment
/// 10.212.0.0/24: router .1 (etcd too), lb nodes .2 and .3, backends .11 up.
struct Ecmp {
    client: Netns,
    router: Netns,
    nodes: Vec<Option<Netns>>,
    backends: Vec<Netns>,
    etcd: lb_tests::etcd::EtcdCluster,
    /// Dropped last: the segment.
    _seg: Netns,
}

const ECMP_VIP: &str = "10.212.9.100";

fn ecmp(backends: usize) -> Ecmp {
    let seg = Netns::new(&unique("lbt-seg")).unwrap();
    seg.ip("link add br0 type bridge").unwrap();
    seg.ip("link set br0 up").unwrap();
    let router = Netns::new(&unique("lbt-rt")).unwrap();
    plug(&seg, &router, "p-rt", "10.212.0.1/24").unwrap();
    let client = Netns::new(&unique("lbt-cl")).unwrap();
    lb_tests::netns::veth(&client, "eth0", &router, "eth1").unwrap();
    client.ip("addr add 10.212.1.10/24 dev eth0").unwrap();
    client.ip("route add default via 10.212.1.1").unwrap();
    router.ip("addr add 10.212.1.1/24 dev eth1").unwrap();
    router
        .sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1")
        .unwrap();
    let nodes: Vec<Option<Netns>> = (0..2)
        .map(|k| {
            let ns = Netns::new(&unique("lbt-lb")).unwrap();
            plug(
                &seg,
                &ns,
                &format!("p-lb{k}"),
                &format!("10.212.0.{}/24", 2 + k),
            )
            .unwrap();
            ns.ip("route add default via 10.212.0.1").unwrap();
            Some(ns)
        })
        .collect();
    router
        .ip(&format!(
            "route add {ECMP_VIP}/32 nexthop via 10.212.0.2 nexthop via 10.212.0.3"
        ))
        .unwrap();
    let backends = (0..backends)
        .map(|i| {
            let ns = Netns::new(&unique("lbt-be")).unwrap();
            plug(
                &seg,
                &ns,
                &format!("p-b{i}"),
                &format!("10.212.0.{}/24", 11 + i),
            )
            .unwrap();
            answer_directly(&ns, ECMP_VIP, "10.212.1.0/24 via 10.212.0.1");
            ns
        })
        .collect();
    let etcd = lb_tests::etcd::EtcdCluster::start_in(&router, "10.212.0.1").unwrap();
    Ecmp {
        client,
        router,
        nodes,
        backends,
        etcd,
        _seg: seg,
    }
}

/// The tracked flows of service "web" on one node, over its backends.
fn flows_on(lb: &LbProcess) -> u64 {
    let (_, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    view["backend_counters"]
        .as_array()
        .map_or(0, |bs| bs.iter().filter_map(|b| b["flows"].as_u64()).sum())
}

/// What became of the held connections when a node was lost: how many broke, and how
/// many answered from another backend than before.
struct Loss {
    broken: usize,
    moved: usize,
    carried_by_lost: u64,
}

/// Keep-alive connections through both nodes keep asking while one node is destroyed
/// (killed, its namespace deleted) and the router's route moves to the survivor.
fn lose_a_node(mode: &str) -> Loss {
    let mut net = ecmp(2);
    let vip = ECMP_VIP;
    let _servers: Vec<Backend> = net
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            Backend::start(ns, &format!("be{i}"), "0.0.0.0:80".parse().unwrap(), None).unwrap()
        })
        .collect();
    let _decap: Vec<Decap> = if mode == "dsr" {
        net.backends
            .iter()
            .map(|ns| Decap::attach(ns, vip))
            .collect()
    } else {
        Vec::new()
    };
    let (url, prefix) = (net.etcd.url(), unique("lbt"));
    let mut lbs: Vec<LbProcess> = net
        .nodes
        .iter()
        .map(|ns| {
            LbProcess::start(
                ns.as_ref().unwrap(),
                &["eth0"],
                &["--store", &url, "--store-prefix", &prefix],
            )
            .unwrap()
        })
        .collect();
    lbs[0]
        .put_service(
            "web",
            &json!({
                "vip": format!("{vip}:80"),
                "backends": ["10.212.0.11:80", "10.212.0.12:80"],
                "forwarding": mode,
            }),
        )
        .unwrap();
    assert!(lb_tests::eventually(Duration::from_secs(5), || lbs[1]
        .request("GET", "/v1/services/web", None)
        .unwrap()
        .0
        == 200));

    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let held: Vec<(HttpConn, String)> = (0..16)
        .map(|i| {
            let mut c = HttpConn::connect(&net.client, to, T)
                .unwrap_or_else(|e| panic!("{mode}: connection {i}: {e:#}"));
            let who = c.get().unwrap();
            (c, who)
        })
        .collect();
    // Both nodes carry some of them (the router hashes each connection's ports).
    assert!(
        lb_tests::eventually(Duration::from_secs(5), || flows_on(&lbs[0])
            + flows_on(&lbs[1])
            == 16
            && flows_on(&lbs[0]) > 0
            && flows_on(&lbs[1]) > 0),
        "{mode}: flows by node: {} and {}",
        flows_on(&lbs[0]),
        flows_on(&lbs[1])
    );
    let carried_by_lost = flows_on(&lbs[1]);

    // Each connection asks again and again while the node goes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let askers: Vec<_> = held
        .into_iter()
        .map(|(mut c, who)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match c.get() {
                        Ok(now) if now == who => {}
                        Ok(_) => return (false, true),
                        Err(_) => return (true, false),
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (false, false)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let lost = lbs.pop().unwrap();
    let pins = lost.kill();
    net.nodes[1] = None;
    drop(pins);
    net.router
        .ip(&format!("route replace {vip}/32 via 10.212.0.2"))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes: Vec<(bool, bool)> = askers.into_iter().map(|t| t.join().unwrap()).collect();

    // New connections go through the survivor at once.
    for i in 0..20 {
        http_get_once(&net.client, to, T)
            .unwrap_or_else(|e| panic!("{mode}: new connection {i} after the loss: {e:#}"));
    }
    Loss {
        broken: outcomes.iter().filter(|o| o.0).count(),
        moved: outcomes.iter().filter(|o| o.1).count(),
        carried_by_lost,
    }
}

/// DSR: every connection the lost node carried continues through the other to the same
/// backend (the same table, and a packet of an unknown flow is balanced by it).
#[test]
fn a_lost_node_breaks_no_dsr_connection() {
    let loss = lose_a_node("dsr");
    assert_eq!(
        (loss.broken, loss.moved),
        (0, 0),
        "of {} connections the lost node carried",
        loss.carried_by_lost
    );
}

/// NAT, for comparison (and as the README documents it): the connections the lost node
/// carried break (their SNAT ports and reverse entries were its own), the others and new
/// ones do not.
#[test]
fn a_lost_node_breaks_exactly_the_nat_connections_it_carried() {
    let loss = lose_a_node("nat");
    assert_eq!(loss.moved, 0);
    assert_eq!(loss.broken as u64, loss.carried_by_lost);
}
