//! The configuration outlives the balancer: every service comes back from the store after
//! a restart, two nodes on one store converge without calling each other, and a bad entry
//! in the store is skipped without costing the others.
use std::{net::SocketAddr, time::Duration};

use lb::store::{Expect, Store, file::FileStore};
use lb_tests::{
    etcd::EtcdCluster,
    eventually,
    lbproc::{LbProcess, temp_store},
    netns::Netns,
    servers::{Backend, http_get_once, udp_ask},
    topology::Topology,
    unique,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(3);

fn services(lb: &LbProcess) -> Value {
    lb.request("GET", "/v1/services", None).unwrap().1
}

#[test]
fn a_restarted_lb_restores_every_service_from_the_store() {
    let topo = Topology::two_armed(2).unwrap();
    let _backends = topo.start_backends(2, 8080, true).unwrap();
    let store = temp_store();
    let arg = store.url();
    let first = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--store", &arg]).unwrap();
    let both = [
        topo.backend(0, 8080).to_string(),
        topo.backend(1, 8080).to_string(),
    ];
    first
        .put_service(
            "web",
            &json!({"vip": topo.vip(80).to_string(), "backends": both}),
        )
        .unwrap();
    first
        .put_service(
            "dns",
            &json!({"vip": topo.vip(53).to_string(), "protocol": "udp", "backends": both}),
        )
        .unwrap();
    let before = services(&first);
    assert!(http_get_once(&topo.client, topo.vip(80).into(), T).is_ok());
    assert!(first.stop().unwrap().success());

    let second = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--store", &arg]).unwrap();
    assert_eq!(
        services(&second),
        before,
        "the services came back unchanged"
    );
    assert!(http_get_once(&topo.client, topo.vip(80).into(), T).is_ok());
    assert!(udp_ask(&topo.client, topo.vip(53).into(), T).is_ok());
    drop(second);
}

#[test]
fn two_nodes_on_one_store_converge() {
    // Two sites built alike (the same addresses, in namespaces of their own): node A
    // serves one, node B the other, from the same store.
    let sites: Vec<Topology> = (0..2).map(|_| Topology::two_armed(1).unwrap()).collect();
    let _backends: Vec<Backend> = sites
        .iter()
        .map(|t| Backend::start(&t.backends[0], "be0", t.backend(0, 8080).into(), None).unwrap())
        .collect();
    let store = temp_store();
    let arg = store.url();
    let (site_a, site_b) = (&sites[0], &sites[1]);
    let a = LbProcess::start(&site_a.lb, &site_a.lb_ifaces, &["--store", &arg]).unwrap();
    let b = LbProcess::start(&site_b.lb, &site_b.lb_ifaces, &["--store", &arg]).unwrap();

    let spec = json!({"vip": site_a.vip(80).to_string(), "backends": [site_a.backend(0, 8080).to_string()]});
    let stored = a.put_service("web", &spec).unwrap();
    assert!(eventually(Duration::from_secs(3), || b
        .request("GET", "/v1/services/web", None)
        .unwrap()
        .0
        == 200));
    assert_eq!(services(&b), json!([stored]));
    // B's data plane serves what A stored.
    assert_eq!(
        http_get_once(&site_b.client, site_b.vip(80).into(), T).unwrap(),
        "be0"
    );

    // A change made on B reaches A, whose data plane then serves it.
    let spec2 = json!({"vip": site_a.vip(81).to_string(), "backends": [site_a.backend(0, 8080).to_string()]});
    b.put_service("web81", &spec2).unwrap();
    assert!(eventually(Duration::from_secs(3), || a
        .request("GET", "/v1/services/web81", None)
        .unwrap()
        .0
        == 200));
    assert_eq!(
        http_get_once(&site_a.client, site_a.vip(81).into(), T).unwrap(),
        "be0"
    );

    // Deletes travel too, to B's data plane as well.
    assert_eq!(
        a.request("DELETE", "/v1/services/web", None).unwrap().0,
        204
    );
    assert!(eventually(Duration::from_secs(3), || b
        .request("GET", "/v1/services/web", None)
        .unwrap()
        .0
        == 404));
    assert!(
        http_get_once(
            &site_b.client,
            site_b.vip(80).into(),
            Duration::from_secs(1)
        )
        .is_err(),
        "B still serves the deleted service"
    );
    drop((a, b));
}

#[test]
fn a_bad_store_entry_is_skipped_and_the_others_restored() {
    let store = temp_store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = FileStore::open(&store, "lb", Duration::from_millis(50)).unwrap();
        let good = json!({"schema": 1, "vip": "10.9.9.1:80", "protocol": "tcp", "backends": ["10.9.8.1:80"], "table_size": 251});
        s.put("good", good.to_string().as_bytes(), Expect::Absent).await.unwrap();
        s.put("broken", b"{ not json", Expect::Absent).await.unwrap();
        let bad_vip = json!({"schema": 1, "vip": "10.9.9.300:80", "protocol": "tcp", "backends": ["10.9.8.1:80"], "table_size": 251});
        s.put("badvip", bad_vip.to_string().as_bytes(), Expect::Absent).await.unwrap();
        let future = json!({"schema": 2, "vip": "10.9.9.2:80"});
        s.put("future", future.to_string().as_bytes(), Expect::Absent).await.unwrap();
    });
    let ns = Netns::new(&unique("lbt-x")).unwrap();
    let lb = LbProcess::start(&ns, &["lo"], &["--store", &store.url()]).unwrap();
    let names: Vec<String> = services(&lb)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["good"]);
    let log = lb.log_text();
    for key in ["broken", "badvip", "future"] {
        assert!(
            log.contains(&format!("key={key}")),
            "no error names {key}: {log}"
        );
    }
    assert_eq!(lb.request("GET", "/ready", None).unwrap().0, 200);
    drop(lb);
}

/// Sends one datagram from `client:port` (inside `ns`) to `to`; the backend that answers.
fn udp_from(ns: &Netns, port: u16, to: SocketAddr) -> String {
    let sock = ns
        .run(move || std::net::UdpSocket::bind(("10.202.1.10", port)))
        .unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.send_to(b"who", to).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf).expect("an answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn etcd_for(sites: &[Topology]) -> (Netns, EtcdCluster) {
    EtcdCluster::for_sites(sites).unwrap()
}

#[test]
fn two_nodes_on_one_etcd_send_a_flow_to_the_same_backend() {
    // Two sites built alike: each a client, a balancer and three backends with the same
    // addresses, so a 5-tuple means the same thing at both.
    let sites: Vec<Topology> = (0..2).map(|_| Topology::two_armed(3).unwrap()).collect();
    let (_control, etcd) = etcd_for(&sites);
    let url = etcd.url();
    let mut backends = Vec::new();
    for topo in &sites {
        for i in 0..3 {
            backends.push(topo.start_backend(i, 5353, true).unwrap());
        }
    }
    let prefix = unique("lbt");
    let nodes: Vec<LbProcess> = sites
        .iter()
        .map(|topo| {
            LbProcess::start(
                &topo.lb,
                &topo.lb_ifaces,
                &["--store", &url, "--store-prefix", &prefix],
            )
            .unwrap()
        })
        .collect();
    let addrs: Vec<String> = (0..3)
        .map(|i| sites[0].backend(i, 5353).to_string())
        .collect();
    let spec = json!({"vip": sites[0].vip(53).to_string(), "protocol": "udp", "backends": addrs});
    nodes[0].put_service("dns", &spec).unwrap();
    assert!(eventually(Duration::from_secs(3), || nodes[1]
        .request("GET", "/v1/services/dns", None)
        .unwrap()
        .0
        == 200));
    let mut seen = std::collections::HashSet::new();
    for port in 40_000..40_030u16 {
        let a = udp_from(&sites[0].client, port, sites[0].vip(53).into());
        let b = udp_from(&sites[1].client, port, sites[1].vip(53).into());
        assert_eq!(a, b, "client port {port}");
        seen.insert(a);
    }
    assert_eq!(seen.len(), 3, "the flows spread over all backends");
    drop(nodes);
}

#[test]
fn two_nodes_racing_for_one_vip_give_it_to_one_service() {
    // Two sites built alike, their balancers on one etcd.
    let sites: Vec<Topology> = (0..2).map(|_| Topology::two_armed(1).unwrap()).collect();
    let _backends: Vec<Backend> = sites
        .iter()
        .map(|t| t.start_backend(0, 8080, false).unwrap())
        .collect();
    let (_control, etcd) = etcd_for(&sites);
    let prefix = unique("lbt");
    let nodes: Vec<LbProcess> = sites
        .iter()
        .map(|topo| {
            LbProcess::start(
                &topo.lb,
                &topo.lb_ifaces,
                &["--store", &etcd.url(), "--store-prefix", &prefix],
            )
            .unwrap()
        })
        .collect();
    let backend = sites[0].backend(0, 8080).to_string();
    // Each round, both nodes create a different service on one VIP at the same moment.
    // Exactly one may have it. The other is refused: with 409 naming the VIP and the
    // winner when the store's claim caught it, or with 400 when the winner had already
    // reached that node (then its own check caught it); at least one round must be a
    // true race.
    let mut raced = 0;
    let mut last = None;
    for round in 0..5u16 {
        let port = 80 + round;
        let spec =
            json!({"vip": sites[0].vip(port).to_string(), "backends": [backend]}).to_string();
        let gate = std::sync::Barrier::new(2);
        let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
            let racers: Vec<_> = nodes
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let (gate, spec) = (&gate, &spec);
                    s.spawn(move || {
                        gate.wait();
                        let path = format!("/v1/services/r{round}-node{i}");
                        node.request("PUT", &path, Some(spec)).unwrap()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let won: Vec<usize> = (0..2).filter(|&i| answers[i].0 == 200).collect();
        assert_eq!(won.len(), 1, "round {round}: {answers:?}");
        let (winner, loser) = (won[0], 1 - won[0]);
        let (status, body) = &answers[loser];
        assert_eq!(body["field"], "vip", "round {round}: {body}");
        match status {
            409 => {
                raced += 1;
                let message = body["error"].as_str().unwrap();
                assert!(
                    message.contains(&format!("r{round}-node{winner}")),
                    "the winner is not named: {message}"
                );
            }
            400 => {}
            other => panic!("round {round}: {other} {body}"),
        }
        last = Some((port, winner, loser));
    }
    assert!(raced > 0, "no round was a race the store had to settle");

    // Both nodes converge on the winners, and only them.
    let (port, winner, loser) = last.unwrap();
    let winner_name = format!("r4-node{winner}");
    for node in &nodes {
        assert!(eventually(Duration::from_secs(3), || {
            services(node).as_array().unwrap().len() == 5
        }));
        assert_eq!(
            node.request("GET", &format!("/v1/services/{winner_name}"), None)
                .unwrap()
                .0,
            200
        );
    }
    // Deleting the loser's service, which does not exist, changes nothing: the winner
    // keeps its VIP on both nodes, in the store and in the data plane.
    let (status, _) = nodes[loser]
        .request("DELETE", &format!("/v1/services/r4-node{loser}"), None)
        .unwrap();
    assert_eq!(status, 404);
    std::thread::sleep(Duration::from_millis(500));
    for (node, site) in nodes.iter().zip(&sites) {
        assert_eq!(
            node.request("GET", &format!("/v1/services/{winner_name}"), None)
                .unwrap()
                .0,
            200
        );
        assert_eq!(
            http_get_once(&site.client, site.vip(port).into(), T).unwrap(),
            "be0"
        );
    }
    drop(nodes);
}

/// An lb started by hand: on drop, stopped with SIGTERM and waited for, and its files
/// removed.
struct Stopped {
    child: std::process::Child,
    files: Vec<std::path::PathBuf>,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
            let _ = std::fs::remove_dir_all(f);
        }
    }
}

#[test]
fn an_unreachable_store_is_retried_and_named() {
    let ns = Netns::new(&unique("lbt-x")).unwrap();
    // A port nothing listens on (in a fresh namespace, every port).
    let bpffs = std::path::PathBuf::from("/sys/fs/bpf").join(unique("lbt"));
    let log = std::env::temp_dir().join(unique("lbt-log"));
    let child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg(lb_tests::lbproc::lb_bin())
        .args([
            "run",
            "--iface",
            "lo",
            "--store",
            "etcd://127.0.0.1:2",
            "--bpffs",
        ])
        .arg(&bpffs)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Stopped, and its log and pins removed, however the test ends.
    let mut lb = Stopped {
        child,
        files: vec![log.clone(), bpffs.clone()],
    };
    // Each attempt says which address failed and why, and attempts are repeated.
    let attempts = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("the store") && l.contains("127.0.0.1:2") && l.contains("refused")
            })
            .count()
    };
    let retried = lb_tests::eventually(Duration::from_secs(15), || attempts() >= 2);
    let still_running = lb.child.try_wait().unwrap().is_none();
    // The API is up meanwhile, and says it is not ready.
    let ready = lb_tests::netns::in_netns(&ns.path(), || {
        match ureq::get("http://127.0.0.1:9090/ready")
            .timeout(Duration::from_secs(2))
            .call()
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(_) => 0,
        }
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    drop(lb);
    assert!(
        retried,
        "no second attempt naming the address and the error: {text}"
    );
    assert!(still_running, "lb gave up: {text}");
    assert_eq!(ready, 503, "{text}");
}
