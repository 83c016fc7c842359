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
    topo.start_backends(topo.backends.len(), port, true)
        .unwrap()
}

fn service(
    topo: &Topology,
    vip_port: u16,
    proto: &str,
    backends: &[usize],
    port: u16,
) -> serde_json::Value {
    json!({
        "vip": topo.vip(vip_port).to_string(),
        "protocol": proto,
        "backends": backends.iter().map(|&i| topo.backend(i, port).to_string()).collect::<Vec<_>>(),
    })
}

/// What to look at when a flow fails: drop counters, lb's log, neighbours.
fn diagnose(topo: &Topology, lb: &LbProcess) -> String {
    let stats = lb
        .request("GET", "/v1/stats", None)
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    let neigh = topo.lb.ip("neigh show").unwrap_or_default();
    let maps: String = ["services", "nat_reverse", "iface_addrs", "config"]
        .iter()
        .map(|m| {
            let path = lb.bpffs.join(m);
            let out = std::process::Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(&path)
                .output();
            format!(
                "{m}: {}",
                out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "stats: {stats}\nneighbours:\n{neigh}\nmaps:\n{maps}\nlb log:\n{}",
        lb.log_text()
    )
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
    lb.put_service("web", &service(&topo, 80, "tcp", &[0, 1, 2], 8080))
        .unwrap();
    let counts = spread(&topo, &lb, topo.vip(80).into(), 300);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (who, n) in &counts {
        assert!(*n >= 50, "{who} got only {n} of 300: {counts:?}");
    }
    // The API counts what went through, per backend.
    let (status, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        view["counters"]["packets"].as_u64().unwrap() >= 300 * 4,
        "{view}"
    );
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

fn removed_backend_gets_no_new_connections(topo: Topology) {
    let _backends = start_backends(&topo, 8080);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("web", &service(&topo, 80, "tcp", &[0, 1, 2], 8080))
        .unwrap();
    assert_eq!(spread(&topo, &lb, topo.vip(80).into(), 60).len(), 3);
    lb.put_service("web", &service(&topo, 80, "tcp", &[0, 2], 8080))
        .unwrap();
    let counts = spread(&topo, &lb, topo.vip(80).into(), 200);
    assert!(
        !counts.contains_key("be1"),
        "removed backend still got connections: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[test]
fn one_armed_removed_backend_gets_no_new_connections() {
    removed_backend_gets_no_new_connections(Topology::one_armed(3).unwrap());
}

#[test]
fn two_armed_removed_backend_gets_no_new_connections() {
    removed_backend_gets_no_new_connections(Topology::two_armed(3).unwrap());
}

fn long_lived_connection_keeps_its_backend_while_backends_are_added(topo: Topology) {
    let _backends = start_backends(&topo, 8080);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("web", &service(&topo, 80, "tcp", &[1], 8080))
        .unwrap();
    let mut conns: Vec<HttpConn> = (0..20)
        .map(|_| HttpConn::connect(&topo.client, topo.vip(80).into(), T).unwrap())
        .collect();
    for c in &mut conns {
        assert_eq!(c.get().unwrap(), "be1");
    }
    lb.put_service("web", &service(&topo, 80, "tcp", &[0, 1, 2], 8080))
        .unwrap();
    // New connections now go to all three (so the table really changed)...
    assert_eq!(spread(&topo, &lb, topo.vip(80).into(), 60).len(), 3);
    // ...while every established connection stays where it was, request after request.
    for round in 0..3 {
        for (i, c) in conns.iter_mut().enumerate() {
            let who = c
                .get()
                .unwrap_or_else(|e| panic!("round {round}, connection {i}: {e:#}"));
            assert_eq!(who, "be1", "round {round}, connection {i} moved");
        }
    }
}

#[test]
fn one_armed_long_lived_connection_keeps_its_backend_while_backends_are_added() {
    long_lived_connection_keeps_its_backend_while_backends_are_added(
        Topology::one_armed(3).unwrap(),
    );
}

#[test]
fn two_armed_long_lived_connection_keeps_its_backend_while_backends_are_added() {
    long_lived_connection_keeps_its_backend_while_backends_are_added(
        Topology::two_armed(3).unwrap(),
    );
}

fn udp_service_works(topo: Topology) {
    let _backends = start_backends(&topo, 5353);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("dns", &service(&topo, 53, "udp", &[0, 1, 2], 5353))
        .unwrap();
    let mut counts = HashMap::new();
    for i in 0..150 {
        let who = udp_ask(&topo.client, topo.vip(53).into(), T)
            .unwrap_or_else(|e| panic!("datagram {i}: {e:#}\n{}", diagnose(&topo, &lb)));
        *counts.entry(who).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (who, n) in &counts {
        assert!(*n >= 20, "{who} got only {n} of 150: {counts:?}");
    }
}

#[test]
fn one_armed_udp_service_works() {
    udp_service_works(Topology::one_armed(3).unwrap());
}

#[test]
fn two_armed_udp_service_works() {
    udp_service_works(Topology::two_armed(3).unwrap());
}

/// `PUT` with `?drain=false`: the backends it leaves out are cut at once.
fn put_cutting(lb: &LbProcess, name: &str, body: &serde_json::Value) {
    let (status, answer) = lb
        .request(
            "PUT",
            &format!("/v1/services/{name}?drain=false"),
            Some(&body.to_string()),
        )
        .unwrap();
    assert_eq!(status, 200, "{answer}");
}

/// A flow whose own backend is removed keeps it while it drains (the default); removed
/// with `?drain=false`, it is balanced again on its next packet instead of being sent to
/// a backend that is gone.
#[test]
fn flow_of_a_removed_backend_is_rebalanced_when_cut() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = start_backends(&topo, 5353);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("dns", &service(&topo, 53, "udp", &[0, 1, 2], 5353))
        .unwrap();
    let sock = topo
        .client
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let ask = || {
        sock.send_to(b"who", topo.vip(53)).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = sock.recv_from(&mut buf).expect("answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = ask();
    assert_eq!(ask(), first, "one flow, one backend");
    let index: usize = first.trim_start_matches("be").parse().unwrap();
    let rest: Vec<usize> = (0..3).filter(|&i| i != index).collect();
    lb.put_service("dns", &service(&topo, 53, "udp", &rest, 5353))
        .unwrap();
    assert_eq!(ask(), first, "the flow left its backend while it drains");
    put_cutting(&lb, "dns", &service(&topo, 53, "udp", &rest, 5353));
    let second = ask();
    assert_ne!(second, first, "the flow still reached its removed backend");
    assert_eq!(
        ask(),
        second,
        "after re-balancing the flow stays on its new backend"
    );
}

#[test]
fn deleted_service_is_no_longer_forwarded() {
    let topo = Topology::two_armed(1).unwrap();
    let _backends = start_backends(&topo, 5353);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("dns", &service(&topo, 53, "udp", &[0], 5353))
        .unwrap();
    assert_eq!(
        udp_ask(&topo.client, topo.vip(53).into(), T).unwrap(),
        "be0"
    );
    assert_eq!(
        lb.request("DELETE", "/v1/services/dns", None).unwrap().0,
        204
    );
    assert!(
        udp_ask(
            &topo.client,
            topo.vip(53).into(),
            Duration::from_millis(500)
        )
        .is_err()
    );
    assert_eq!(
        lb.request("DELETE", "/v1/services/dns", None).unwrap().0,
        404
    );
    assert_eq!(lb.request("GET", "/v1/services/dns", None).unwrap().0, 404);
}

/// A fresh node has never spoken to the client, so no neighbour entry holds its next
/// hop's MAC: the replies toward it must still leave from the first one (handed to the
/// kernel, which resolves the neighbour). The client knows lb's MAC statically, so it
/// never ARPs lb (which would teach lb its MAC); lb's entry for it is deleted.
fn fresh_node_answers_a_client_it_has_no_neighbour_for(
    topo: Topology,
    client: &str,
    gateway: &str,
) {
    let _backends = start_backends(&topo, 8080);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("web", &service(&topo, 80, "tcp", &[0, 1, 2], 8080))
        .unwrap();
    let lb_mac = topo.lb.mac("eth0").unwrap();
    let lb_mac: Vec<String> = lb_mac.iter().map(|b| format!("{b:02x}")).collect();
    topo.client
        .ip(&format!(
            "neigh replace {gateway} lladdr {} dev eth0 nud permanent",
            lb_mac.join(":")
        ))
        .unwrap();
    let _ = topo.lb.ip(&format!("neigh del {client} dev eth0"));
    assert_eq!(
        topo.lb
            .ip(&format!("neigh show to {client}"))
            .unwrap()
            .trim(),
        "",
        "lb still has a neighbour entry for the client"
    );
    let retransmits_before = topo.client.syn_retransmits();
    for i in 0..20 {
        http_get_once(&topo.client, topo.vip(80).into(), T)
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}\n{}", diagnose(&topo, &lb)));
    }
    assert_eq!(
        topo.client.syn_retransmits(),
        retransmits_before,
        "a reply was lost: the client sent a SYN again\n{}",
        diagnose(&topo, &lb)
    );
    let (_, stats) = lb.request("GET", "/v1/stats", None).unwrap();
    assert_eq!(stats["drops"]["no_neighbor"], 0, "{stats}");
    // The kernel resolved the client's next hop on the way: later replies go from XDP.
    assert_ne!(
        topo.lb
            .ip(&format!("neigh show to {client}"))
            .unwrap()
            .trim(),
        "",
        "the kernel never resolved the client"
    );
}

#[test]
fn one_armed_fresh_node_answers_a_client_it_has_no_neighbour_for() {
    fresh_node_answers_a_client_it_has_no_neighbour_for(
        Topology::one_armed(3).unwrap(),
        "10.201.0.10",
        "10.201.0.1",
    );
}

#[test]
fn two_armed_fresh_node_answers_a_client_it_has_no_neighbour_for() {
    fresh_node_answers_a_client_it_has_no_neighbour_for(
        Topology::two_armed(3).unwrap(),
        "10.202.1.10",
        "10.202.1.1",
    );
}

/// Weighted Maglev end to end: over 3,000 connections each backend's share is within 3
/// points of its weight's share, and the API shows the weights and tracked flows.
#[test]
fn connections_follow_the_backends_weights() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = start_backends(&topo, 8080);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let weights = [1u32, 2, 3];
    let backends: Vec<serde_json::Value> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| json!({"address": topo.backend(i, 8080).to_string(), "weight": w}))
        .collect();
    lb.put_service(
        "web",
        &json!({"vip": topo.vip(80).to_string(), "backends": backends}),
    )
    .unwrap();
    let n = 3000;
    let counts = spread(&topo, &lb, topo.vip(80).into(), n);
    let total: u32 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let got = *counts.get(&format!("be{i}")).unwrap_or(&0) as f64 / n as f64;
        let want = *w as f64 / total as f64;
        assert!(
            (got - want).abs() <= 0.03,
            "be{i} (weight {w}) got {:.1}% of connections, its weight's share is {:.1}%: {counts:?}",
            got * 100.0,
            want * 100.0
        );
    }
    let (_, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    assert_eq!(view["backends"][2]["weight"], 3, "{view}");
    for (i, b) in view["backend_counters"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(b["weight"], weights[i], "{view}");
        assert_eq!(b["state"], "active", "{view}");
    }
}

/// A draining backend (`"state": "draining"`, or weight 0) keeps its established
/// connections, request after request, and gets no new one.
#[test]
fn a_draining_backend_keeps_its_connections_and_gets_no_new_one() {
    let topo = Topology::one_armed(3).unwrap();
    let _backends = start_backends(&topo, 8080);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("web", &service(&topo, 80, "tcp", &[1], 8080))
        .unwrap();
    let mut conns: Vec<HttpConn> = (0..10)
        .map(|_| HttpConn::connect(&topo.client, topo.vip(80).into(), T).unwrap())
        .collect();
    for c in &mut conns {
        assert_eq!(c.get().unwrap(), "be1");
    }
    for drained in [
        json!({"address": topo.backend(1, 8080).to_string(), "state": "draining"}),
        json!({"address": topo.backend(1, 8080).to_string(), "weight": 0}),
    ] {
        let backends = json!([
            topo.backend(0, 8080).to_string(),
            drained,
            topo.backend(2, 8080).to_string()
        ]);
        lb.put_service(
            "web",
            &json!({"vip": topo.vip(80).to_string(), "backends": backends}),
        )
        .unwrap();
        let counts = spread(&topo, &lb, topo.vip(80).into(), 100);
        assert!(
            !counts.contains_key("be1"),
            "a draining backend got new connections ({drained}): {counts:?}"
        );
        assert_eq!(counts.len(), 2, "{counts:?}");
        for (i, c) in conns.iter_mut().enumerate() {
            let who = c
                .get()
                .unwrap_or_else(|e| panic!("connection {i} ({drained}): {e:#}"));
            assert_eq!(who, "be1", "connection {i} left its draining backend");
        }
    }
    let (_, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    let drained = &view["backend_counters"][1];
    assert_eq!(drained["weight"], 0, "{view}");
    // The sweep counts the ten connections within a second or so.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, view) = lb.request("GET", "/v1/services/web", None).unwrap();
        if view["backend_counters"][1]["flows"] == 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the draining backend's tracked flows: {view}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Backend `addr` of service `name` as `GET /v1/services/{name}` shows it, if listed.
fn backend_view(lb: &LbProcess, name: &str, addr: &str) -> Option<serde_json::Value> {
    let (_, view) = lb
        .request("GET", &format!("/v1/services/{name}"), None)
        .unwrap();
    view["backend_counters"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr)
        .cloned()
}

/// `n` keep-alive connections, each answered by be1.
fn connections_to_be1(topo: &Topology, n: usize) -> Vec<HttpConn> {
    (0..n)
        .map(|i| {
            let mut c = HttpConn::connect(&topo.client, topo.vip(80).into(), T).unwrap();
            assert_eq!(c.get().unwrap(), "be1", "connection {i}");
            c
        })
        .collect()
}

/// A backend a write leaves out drains by default: its connections keep going, request
/// after request, no new one reaches it, the API shows it draining with its flows, and
/// it is retired once they end. `?drain=false` cuts at once; `drain_timeout_s` ends a
/// drain whose connections outlive it.
#[test]
fn a_removed_backend_drains_until_its_connections_end_or_its_time_is_up() {
    let topo = Topology::one_armed(3).unwrap();
    let _backends = start_backends(&topo, 8080);
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let be1 = topo.backend(1, 8080).to_string();
    let vip: SocketAddr = topo.vip(80).into();
    let only_be1 = service(&topo, 80, "tcp", &[1], 8080);
    let rest = service(&topo, 80, "tcp", &[0, 2], 8080);

    lb.put_service("web", &only_be1).unwrap();
    let mut conns = connections_to_be1(&topo, 10);
    lb.put_service("web", &rest).unwrap();
    let counts = spread(&topo, &lb, vip, 100);
    assert!(
        !counts.contains_key("be1"),
        "a removed backend got new connections: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    for (i, c) in conns.iter_mut().enumerate() {
        let who = c
            .get()
            .unwrap_or_else(|e| panic!("connection {i} broke while draining: {e:#}"));
        assert_eq!(who, "be1", "connection {i} left its draining backend");
    }
    assert!(
        lb_tests::eventually(Duration::from_secs(5), || {
            backend_view(&lb, "web", &be1).is_some_and(|b| b["flows"] == 10)
        }),
        "the draining backend's flows: {:?}",
        backend_view(&lb, "web", &be1)
    );
    let view = backend_view(&lb, "web", &be1).unwrap();
    assert_eq!(
        (&view["state"], &view["weight"], &view["health"]),
        (&json!("draining"), &json!(0), &json!("unchecked")),
        "{view}"
    );
    let left = view["drain_left_s"].as_u64().unwrap();
    assert!((290..=300).contains(&left), "{view}");
    // The service as written does not list it.
    let (_, svc) = lb.request("GET", "/v1/services/web", None).unwrap();
    assert_eq!(svc["backends"], rest["backends"], "{svc}");
    // Its connections close: the next sweeps find no flow of its own and retire it.
    drop(conns);
    assert!(
        lb_tests::eventually(Duration::from_secs(10), || backend_view(&lb, "web", &be1)
            .is_none()),
        "still draining after its connections closed: {:?}",
        backend_view(&lb, "web", &be1)
    );
    assert!(lb.log_text().contains("backend drained"));

    // `?drain=false`: cut at once, its connections are balanced again on their next
    // packet (to backends that know nothing of them: they are reset).
    lb.put_service("web", &only_be1).unwrap();
    let mut conns = connections_to_be1(&topo, 5);
    put_cutting(&lb, "web", &rest);
    assert!(
        backend_view(&lb, "web", &be1).is_none(),
        "a cut backend drains"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        let answer = c.get();
        assert!(
            answer.is_err(),
            "connection {i} still answered after a cut: {answer:?}"
        );
    }

    // A drain that outlives its timeout is cut when the time is up.
    let with_timeout = |mut body: serde_json::Value| {
        body["drain_timeout_s"] = json!(2);
        body
    };
    lb.put_service("web", &with_timeout(only_be1.clone()))
        .unwrap();
    let mut conns = connections_to_be1(&topo, 5);
    lb.put_service("web", &with_timeout(rest.clone())).unwrap();
    let view = backend_view(&lb, "web", &be1).expect("draining");
    assert!(view["drain_left_s"].as_u64().unwrap() <= 2, "{view}");
    assert_eq!(conns[0].get().unwrap(), "be1");
    assert!(
        lb_tests::eventually(Duration::from_secs(6), || backend_view(&lb, "web", &be1)
            .is_none()),
        "still draining past its timeout: {:?}",
        backend_view(&lb, "web", &be1)
    );
    for (i, c) in conns.iter_mut().enumerate() {
        let answer = c.get();
        assert!(
            answer.is_err(),
            "connection {i} still answered past the drain timeout: {answer:?}"
        );
    }
}
