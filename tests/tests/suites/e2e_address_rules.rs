//! Backends cannot point at lb itself, from any source (the API, the DFP API, stored
//! documents, etcd and Consul discovery); an HTTP service may reach an app on the same
//! host only with `--allow-loopback-backends`, and never lb's own API or listener; a VIP on
//! a host address cannot take the port a local program listens on unless the write says
//! so.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener, UdpSocket},
    time::Duration,
};

use lb_tests::{
    etcd::EtcdCluster,
    etcd::etcdctl,
    eventually,
    lbproc::LbProcess,
    netns::Netns,
    servers::{Backend, HttpConn, http_get_once},
    topology::Topology,
    unique,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

fn put(lb: &LbProcess, name: &str, body: &Value) -> (u16, Value) {
    lb.request(
        "PUT",
        &format!("/v1/services/{name}"),
        Some(&body.to_string()),
    )
    .unwrap()
}

fn status_of(lb: &LbProcess, name: &str) -> u16 {
    lb.request("GET", &format!("/v1/services/{name}"), None)
        .unwrap()
        .0
}

/// Which answers 30 new requests for `path` on the HTTP listener at `to` get (a
/// backend's name, or the start of whatever else answered).
fn answers(ns: &Netns, to: SocketAddr, path: &str) -> BTreeSet<String> {
    (0..30)
        .map(|_| {
            let mut c = HttpConn::connect(ns, to, T).unwrap();
            let (code, body) = c.send("GET", path, "lb", b"").unwrap();
            format!("{code} {}", body.chars().take(40).collect::<String>())
        })
        .collect()
}

#[test]
fn the_api_and_dfp_refuse_backends_that_point_at_lb_itself() {
    let topo = Topology::two_armed(1).unwrap();
    // A SNAT address, and an address with a broadcast address of its own.
    topo.lb.ip("addr add 10.202.2.5/24 dev eth1").unwrap();
    topo.lb.ip("addr add 10.202.3.1/24 brd + dev eth1").unwrap();
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--http", "10.202.1.1:80", "--snat-address", "10.202.2.5"],
    )
    .unwrap();
    let good = topo.backend(0, 8080).to_string();
    lb.put_service(
        "a",
        &json!({"vip": topo.vip(80).to_string(), "backends": [good]}),
    )
    .unwrap();
    for bad in [
        "127.0.0.1:8080",
        "127.1.2.3:8080",
        "0.0.0.0:8080",
        "0.1.2.3:8080",
        "224.0.0.1:8080",
        "255.255.255.255:8080",
        "10.202.3.255:8080",
        "169.254.169.254:80",
        "10.202.1.1:8080",
        "10.202.2.1:8080",
        "10.202.2.5:8080",
        "10.202.3.1:8080",
        // The VIP of service a, and (layer 4) this service's own.
        "10.202.9.100:8080",
        "10.202.9.101:8080",
    ] {
        for http in [false, true] {
            if http && bad.starts_with("10.202.9.101:") {
                continue;
            }
            let mut body = json!({"backends": [good, bad]});
            if http {
                body["http"] = json!({"paths": ["/b"]});
            } else {
                body["vip"] = json!("10.202.9.101:80");
            }
            let (code, err) = put(&lb, "b", &body);
            assert_eq!(code, 400, "{bad} http={http}: {err}");
            assert_eq!(err["field"], "backends[1]", "{bad}: {err}");
            assert_eq!(status_of(&lb, "b"), 404, "{bad}: nothing changed");
        }
    }
    // Without the flag an HTTP service is told which one lets a loopback backend in.
    let (_, err) = put(
        &lb,
        "b",
        &json!({"http": {"paths": ["/b"]}, "backends": ["127.0.0.1:8080"]}),
    );
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("--allow-loopback-backends"),
        "{err}"
    );
    // A VIP that is a backend's address would send lb's own traffic back to itself.
    let (code, err) = put(
        &lb,
        "b",
        &json!({"vip": topo.backend(0, 81).to_string(), "backends": ["10.202.2.12:80"]}),
    );
    assert_eq!((code, err["field"].as_str()), (400, Some("vip")), "{err}");

    // The DFP API: its own field name, DFP's body.
    for query in [
        "serviceName=go-demo&servicePath=/demo&port=8080&backends=127.0.0.1",
        "serviceName=go-demo&servicePath=/demo&port=8080&backends=10.202.1.1",
        "serviceName=db&reqMode=tcp&srcPort=5432&port=5432&backends=10.202.2.1",
        "serviceName=db&reqMode=tcp&srcPort=5432&port=5432&backends=169.254.169.254",
    ] {
        let (code, body) = lb
            .request(
                "GET",
                &format!("/v1/docker-flow-proxy/reconfigure?{query}"),
                None,
            )
            .unwrap();
        assert_eq!(code, 400, "{query}: {body}");
        assert_eq!(body["Status"], "NOK", "{body}");
        assert_eq!(body["field"], "backends", "{body}");
    }
    assert_eq!(status_of(&lb, "go-demo"), 404);
    assert_eq!(status_of(&lb, "db"), 404);

    // An address the host gains while lb runs is refused from then on.
    let later = json!({"vip": "10.202.9.102:80", "backends": ["10.202.4.1:80"]});
    let (code, _) = put(&lb, "c", &later);
    assert_eq!(code, 200);
    lb.request("DELETE", "/v1/services/c", None).unwrap();
    topo.lb.ip("addr add 10.202.4.1/24 dev eth1").unwrap();
    assert!(
        eventually(Duration::from_secs(6), || {
            let (code, _) = put(&lb, "c", &later);
            if code == 200 {
                // Taken before lb saw the new address: out again, and try once more.
                lb.request("DELETE", "/v1/services/c", None).unwrap();
            }
            code == 400
        }),
        "a new host address is refused as a backend"
    );
    assert_eq!(status_of(&lb, "c"), 404);
}

#[test]
fn an_http_service_reaches_a_loopback_app_only_with_the_flag_and_never_lbs_own_ports() {
    let topo = Topology::two_armed(1).unwrap();
    let _remote = topo.start_backend(0, 8080, false).unwrap();
    // An app on the balancer's host, on loopback.
    let _local =
        Backend::start(&topo.lb, "local", "127.0.0.1:8081".parse().unwrap(), None).unwrap();
    let listener = SocketAddr::from(([10, 202, 1, 1], 80));
    let body = |backends: &[&str]| json!({"http": {"paths": ["/app"]}, "backends": backends});

    // Without the flag, refused.
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--http", "0.0.0.0:80"]).unwrap();
    let (code, err) = put(&lb, "app", &body(&["127.0.0.1:8081"]));
    assert_eq!(
        (code, err["field"].as_str()),
        (400, Some("backends[0]")),
        "{err}"
    );
    drop(lb);

    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--http", "0.0.0.0:80", "--allow-loopback-backends"],
    )
    .unwrap();
    // Never lb's API, nor its HTTP listener (0.0.0.0:80: port 80 on every local address).
    for own in ["127.0.0.1:9090", "127.0.0.1:80", "127.0.0.2:80"] {
        let (code, err) = put(&lb, "app", &body(&["127.0.0.1:8081", own]));
        assert_eq!(
            (code, err["field"].as_str()),
            (400, Some("backends[1]")),
            "{own}: {err}"
        );
    }
    // Nor checks sent there.
    let mut checked = body(&["127.0.0.1:8081"]);
    checked["check"] = json!({"kind": "http", "path": "/health", "port": 9090});
    let (code, err) = put(&lb, "app", &checked);
    assert_eq!(
        (code, err["field"].as_str()),
        (400, Some("check.port")),
        "{err}"
    );
    // Never a layer-4 service: XDP does not see loopback traffic.
    let (code, err) = put(
        &lb,
        "l4",
        &json!({"vip": topo.vip(80).to_string(), "backends": ["127.0.0.1:8081"]}),
    );
    assert_eq!(
        (code, err["field"].as_str()),
        (400, Some("backends[0]")),
        "{err}"
    );
    assert_eq!(status_of(&lb, "app"), 404);
    assert_eq!(status_of(&lb, "l4"), 404);

    // The app on loopback and a remote backend both serve.
    lb.put_service(
        "app",
        &body(&["127.0.0.1:8081", &topo.backend(0, 8080).to_string()]),
    )
    .unwrap();
    assert_eq!(
        answers(&topo.client, listener, "/app"),
        BTreeSet::from(["200 be0".to_string(), "200 local".to_string()])
    );
}

/// The defect as reported: an instance registered in Consul at `127.0.0.1:9090` made the
/// public HTTP listener forward to lb's unauthenticated API.
#[test]
fn a_consul_instance_at_lbs_api_is_skipped_and_the_good_ones_serve() {
    let topo = Topology::two_armed(1).unwrap();
    let _remote = topo.start_backend(0, 8080, false).unwrap();
    let _local =
        Backend::start(&topo.lb, "local", "127.0.0.1:8081".parse().unwrap(), None).unwrap();
    let consul = lb_tests::consul::ConsulServer::start_in(&topo.lb, "127.0.0.1").unwrap();
    consul.register(
        "web",
        "web-0",
        &topo.backend(0, 8080).ip().to_string(),
        8080,
        "passing",
    );
    consul.register("web", "sneaky", "127.0.0.1", 9090, "passing");
    consul.register("web", "self", "10.202.1.1", 80, "passing");
    consul.register("web", "app", "127.0.0.1", 8081, "passing");
    let store = lb_tests::lbproc::temp_store();
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &[
            "--store",
            &store.url(),
            "--discovery-consul",
            &consul.url(),
            "--http",
            "0.0.0.0:80",
            // Even with loopback allowed, lb's own API is never a backend.
            "--allow-loopback-backends",
        ],
    )
    .unwrap();
    let created = lb
        .put_service(
            "web",
            &json!({"http": {"paths": ["/v1"]}, "discovery": {"kind": "consul", "service": "web"}}),
        )
        .unwrap();
    let good = vec!["10.202.2.11:8080".to_string(), "127.0.0.1:8081".to_string()];
    assert_eq!(created["backends"], json!(good));
    let listener = SocketAddr::from(([10, 202, 1, 1], 80));
    // /v1/services is a path of lb's API: only the backends answer it.
    assert_eq!(
        answers(&topo.client, listener, "/v1/services"),
        BTreeSet::from(["200 be0".to_string(), "200 local".to_string()])
    );
    let log = lb.log_text();
    for instance in ["127.0.0.1:9090", "10.202.1.1:80"] {
        assert!(
            log.lines()
                .any(|l| l.contains("skipping a discovered instance")
                    && l.contains("service=web")
                    && l.contains(&format!("instance={instance}"))),
            "{instance}: {log}"
        );
    }
    // An instance that registers later is held to the same rules.
    consul.register("web", "multicast", "224.0.0.1", 8080, "passing");
    consul.deregister("app");
    assert!(
        eventually(T, || lb.backends_of("web") == ["10.202.2.11:8080"]),
        "{:?}",
        lb.backends_of("web")
    );
    assert!(
        eventually(T, || lb.log_text().contains("instance=224.0.0.1:8080")),
        "{}",
        lb.log_text()
    );
}

#[test]
fn stored_documents_and_etcd_instances_that_point_at_lb_are_skipped_by_name() {
    let topo = Topology::two_armed(2).unwrap();
    let _backends = topo.start_backends(2, 8080, false).unwrap();
    let etcd = EtcdCluster::start_in(&topo.lb, "127.0.0.1").unwrap();
    let url = etcd.url();
    let prefix = unique("lbt");
    let doc = |vip: &str, backend: &str| {
        // Double-quoted for the shell, as `Netns::sh` runs it in single quotes.
        let json = json!({"schema": 1, "vip": vip, "protocol": "tcp", "backends": [backend], "table_size": 251});
        format!("\"{}\"", json.to_string().replace('"', "\\\""))
    };
    let be = |i: usize| topo.backend(i, 8080).to_string();
    // Written by something other than lb's API (another tool, an older lb).
    etcdctl(
        &topo.lb,
        &url,
        &format!(
            "put {prefix}/services/good {}",
            doc("10.202.9.100:80", &be(0))
        ),
    );
    etcdctl(
        &topo.lb,
        &url,
        &format!(
            "put {prefix}/services/looped {}",
            doc("10.202.9.100:81", "127.0.0.1:9090")
        ),
    );
    // Registered instances: two good, lb's API and lb's own address.
    let registry = format!("{prefix}/registry/web");
    etcdctl(&topo.lb, &url, &format!("put {registry}/i0 {}", be(0)));
    etcdctl(&topo.lb, &url, &format!("put {registry}/i1 {}", be(1)));
    etcdctl(
        &topo.lb,
        &url,
        &format!("put {registry}/api 127.0.0.1:9090"),
    );
    etcdctl(
        &topo.lb,
        &url,
        &format!("put {registry}/self 10.202.2.1:8080"),
    );

    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--store", &url, "--store-prefix", &prefix],
    )
    .unwrap();
    // Restore: the good service serves, the bad one is skipped with an error naming its key.
    assert_eq!(lb.backends_of("good"), [be(0)], "{}", lb.log_text());
    assert_eq!(status_of(&lb, "looped"), 404);
    let skipped = |key: &str| {
        lb.log_text()
            .lines()
            .any(|l| l.contains("skipping a stored service") && l.contains(&format!("key={key}")))
    };
    assert!(skipped("looped"), "{}", lb.log_text());
    // Watch: a document written while lb runs is held to the same rules.
    etcdctl(
        &topo.lb,
        &url,
        &format!(
            "put {prefix}/services/late {}",
            doc("10.202.9.100:82", "10.202.1.1:8080")
        ),
    );
    assert!(eventually(T, || skipped("late")), "{}", lb.log_text());
    assert_eq!(status_of(&lb, "late"), 404);

    // Discovery: the bad instances are skipped, each named; the good ones serve.
    let vip = SocketAddr::from(topo.vip(83));
    let created = lb
        .put_service(
            "web",
            &json!({"vip": vip.to_string(), "discovery": {"kind": "etcd", "service": "web"}}),
        )
        .unwrap();
    assert_eq!(created["backends"], json!([be(0), be(1)]));
    let seen: BTreeSet<String> = (0..30)
        .map(|_| http_get_once(&topo.client, vip, T).unwrap())
        .collect();
    assert_eq!(seen, BTreeSet::from(["be0".into(), "be1".into()]));
    for instance in ["127.0.0.1:9090", "10.202.2.1:8080"] {
        assert!(
            lb.log_text()
                .lines()
                .any(|l| l.contains("skipping a discovered instance")
                    && l.contains("service=web")
                    && l.contains(&format!("instance={instance}"))),
            "{instance}: {}",
            lb.log_text()
        );
    }
    // A later registration of lb's own address changes nothing; a good one is followed.
    etcdctl(&topo.lb, &url, &format!("put {registry}/lo 127.0.0.2:80"));
    etcdctl(&topo.lb, &url, &format!("del {registry}/i1"));
    assert!(
        eventually(T, || lb.backends_of("web") == [be(0)]),
        "{:?}",
        lb.backends_of("web")
    );
}

/// A socket bound in `ns`, kept open while the value lives.
fn tcp_listener_in(ns: &Netns, addr: &str) -> TcpListener {
    let addr = addr.to_string();
    ns.run(move || TcpListener::bind(addr).unwrap())
}

#[test]
fn a_vip_on_a_host_port_where_a_program_listens_is_refused_unless_overridden() {
    // One-armed: the VIP is the balancer's own address, as DFP's reqMode=tcp makes it.
    let topo = Topology::one_armed(1).unwrap();
    let _backends = topo.start_backends(1, 8080, true).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    // "sshd" on every address, and a program on the balancer's address only.
    let _sshd = tcp_listener_in(&topo.lb, "0.0.0.0:2222");
    let _db = tcp_listener_in(&topo.lb, "10.201.0.1:5432");
    let _dns = {
        let addr = "0.0.0.0:5353";
        topo.lb.run(move || UdpSocket::bind(addr).unwrap())
    };
    let be = topo.backend(0, 8080).to_string();
    let l4 = |port: u16, protocol: &str| json!({"vip": topo.vip(port).to_string(), "protocol": protocol, "backends": [be]});

    for (port, protocol) in [(2222, "tcp"), (5432, "tcp"), (5353, "udp")] {
        let (code, err) = put(&lb, "taken", &l4(port, protocol));
        assert_eq!(code, 409, "{port}/{protocol}: {err}");
        assert_eq!(err["field"], "vip", "{err}");
        assert!(
            err["error"]
                .as_str()
                .unwrap()
                .contains("override_local_listener"),
            "{err}"
        );
        assert_eq!(status_of(&lb, "taken"), 404);
    }
    // Another protocol, or a port nobody listens on, is free.
    lb.put_service("udp2222", &l4(2222, "udp")).unwrap();
    lb.put_service("free", &l4(2223, "tcp")).unwrap();
    // lb's own HTTP listener (0.0.0.0:80) is lb's to give: a warning, as before.
    lb.put_service("web", &l4(80, "tcp")).unwrap();

    // The override lets it through, and then the VIP is the service's.
    let mut forced = l4(2222, "tcp");
    forced["override_local_listener"] = json!(true);
    lb.put_service("ssh", &forced).unwrap();
    assert_eq!(
        http_get_once(&topo.client, topo.vip(2222).into(), T).unwrap(),
        "be0"
    );
    // Rewriting a service that already holds the port needs no override again.
    lb.put_service("ssh", &l4(2222, "tcp")).unwrap();

    // DFP: reqMode=tcp on the balancer's address, with its own parameter to override.
    let dfp = "/v1/docker-flow-proxy/reconfigure?serviceName=db&reqMode=tcp&srcPort=5432&port=8080&backends=10.201.0.11";
    let (code, body) = lb.request("GET", dfp, None).unwrap();
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["Status"], "NOK");
    assert_eq!(body["field"], "srcPort");
    assert_eq!(status_of(&lb, "db"), 404);
    let (code, body) = lb
        .request("GET", &format!("{dfp}&overrideLocalListener=true"), None)
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        http_get_once(&topo.client, topo.vip(5432).into(), T).unwrap(),
        "be0"
    );
}
