//! Services whose backends come from a registry or DNS: lb follows it, so scaling a
//! service up or down needs no API call, and the store holds the source, not the
//! instances.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    dns::DnsServer, etcd::EtcdCluster, etcd::etcdctl, eventually, lbproc::LbProcess,
    servers::http_get_once, topology::Topology, unique,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(3);

/// Which backends answer 40 new connections to `vip`.
fn answering(topo: &Topology, vip: SocketAddr) -> BTreeSet<String> {
    (0..40)
        .map(|_| http_get_once(&topo.client, vip, T).unwrap())
        .collect()
}

#[test]
fn a_service_scaled_through_the_etcd_registry_is_followed_without_an_api_call() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    let etcd = EtcdCluster::start_in(&topo.lb, "127.0.0.1").unwrap();
    let url = etcd.url();
    let prefix = unique("lbt");
    let registry = format!("{prefix}/registry/web");
    let be = |i: usize| topo.backend(i, 8080).to_string();
    // Two instances before the service exists; the second under a lease, as a
    // registrator would write it.
    etcdctl(&topo.lb, &url, &format!("put {registry}/i0 {}", be(0)));
    let lease = etcdctl(&topo.lb, &url, "lease grant 300");
    let lease = lease.split_whitespace().nth(1).unwrap().to_string();
    etcdctl(
        &topo.lb,
        &url,
        &format!("put --lease={lease} {registry}/i1 {}", be(1)),
    );
    // A value that is not ip:port is skipped.
    etcdctl(
        &topo.lb,
        &url,
        &format!("put {registry}/junk not-an-address"),
    );

    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--store", &url, "--store-prefix", &prefix],
    )
    .unwrap();
    let vip = SocketAddr::from(topo.vip(80));
    let created = lb
        .put_service(
            "web",
            &json!({"vip": vip.to_string(), "discovery": {"kind": "etcd", "service": "web"}}),
        )
        .unwrap();
    assert_eq!(created["backends"], json!([be(0), be(1)]));
    assert_eq!(
        created["discovery"],
        json!({"kind": "etcd", "service": "web"})
    );
    assert_eq!(
        answering(&topo, vip),
        BTreeSet::from(["be0".into(), "be1".into()])
    );
    // The store keeps the source, not the instances.
    let stored = etcdctl(
        &topo.lb,
        &url,
        &format!("get --print-value-only {prefix}/services/web"),
    );
    let doc: Value = serde_json::from_str(stored.trim()).unwrap();
    assert_eq!(doc["backends"], json!([]));
    assert_eq!(doc["discovery"]["service"], "web");

    // Scale up: a third instance registers.
    etcdctl(&topo.lb, &url, &format!("put {registry}/i2 {}", be(2)));
    assert!(
        eventually(T, || lb.backends_of("web").len() == 3),
        "{:?}",
        lb.backends_of("web")
    );
    assert_eq!(
        answering(&topo, vip),
        BTreeSet::from(["be0".into(), "be1".into(), "be2".into()])
    );
    // Scale down: the lease of the second instance ends (its process died).
    etcdctl(&topo.lb, &url, &format!("lease revoke {lease}"));
    assert!(
        eventually(T, || lb.backends_of("web") == [be(0), be(2)]),
        "{:?}",
        lb.backends_of("web")
    );
    assert_eq!(
        answering(&topo, vip),
        BTreeSet::from(["be0".into(), "be2".into()])
    );
    assert!(lb.log_text().contains("not ip:port"), "{}", lb.log_text());

    // A bad source is a 400 naming the field, and changes nothing.
    let (code, err) = lb
        .request(
            "PUT",
            "/v1/services/other",
            Some(&json!({"vip": topo.vip(81).to_string(), "discovery": {"kind": "consul", "service": "web"}}).to_string()),
        )
        .unwrap();
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["field"], "discovery.kind");
    let (code, err) = lb
        .request(
            "PUT",
            "/v1/services/other",
            Some(&json!({"vip": topo.vip(81).to_string(), "backends": [be(0)], "discovery": {"kind": "etcd", "service": "web"}}).to_string()),
        )
        .unwrap();
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["field"], "backends");
    assert_eq!(
        lb.request("GET", "/v1/services/other", None).unwrap().0,
        404
    );

    // After a restart the service follows the registry again.
    let pins = lb.kill();
    let lb = LbProcess::start_on(
        &topo.lb,
        &topo.lb_ifaces,
        &["--store", &url, "--store-prefix", &prefix],
        pins,
    )
    .unwrap();
    assert_eq!(lb.backends_of("web"), [be(0), be(2)]);
    etcdctl(&topo.lb, &url, &format!("del {registry}/i0"));
    assert!(
        eventually(T, || lb.backends_of("web") == [be(2)]),
        "{:?}",
        lb.backends_of("web")
    );
    assert_eq!(answering(&topo, vip), BTreeSet::from(["be2".into()]));
}

#[test]
fn a_service_from_consul_follows_its_health_checks() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    // Consul (the test server) is both the store and the catalogue, behind an ACL token.
    let consul = lb_tests::consul::ConsulServer::start_in(&topo.lb, "127.0.0.1")
        .unwrap()
        .with_token("s3cret");
    let secrets = lb_tests::lbproc::temp_store();
    std::fs::create_dir_all(&*secrets).unwrap();
    let token_file = secrets.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    // lb refuses a token file that group or others may read.
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let ip = |i: usize| topo.backend(i, 8080).ip().to_string();
    let be = |i: usize| topo.backend(i, 8080).to_string();
    consul.register("web", "web-0", &ip(0), 8080, "passing");
    consul.register("web", "web-1", &ip(1), 8080, "passing");
    consul.register("web", "web-2", &ip(2), 8080, "warning");

    let url = consul.url();
    let token_arg = token_file.to_str().unwrap();
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--store", &url, "--store-token-file", token_arg],
    )
    .unwrap();
    let vip = SocketAddr::from(topo.vip(80));
    let created = lb
        .put_service(
            "web",
            &json!({"vip": vip.to_string(), "discovery": {"kind": "consul", "service": "web"}}),
        )
        .unwrap();
    // Passing only, by default.
    assert_eq!(created["backends"], json!([be(0), be(1)]));
    assert_eq!(
        answering(&topo, vip),
        BTreeSet::from(["be0".into(), "be1".into()])
    );
    // A service that asks for it takes warning instances too.
    let vip81 = SocketAddr::from(topo.vip(81));
    let lenient = lb
        .put_service(
            "web-lenient",
            &json!({"vip": vip81.to_string(), "discovery": {"kind": "consul", "service": "web", "include_warning": true}}),
        )
        .unwrap();
    assert_eq!(lenient["backends"], json!([be(0), be(1), be(2)]));

    // A failing check takes the instance out of both; recovery puts it back.
    consul.set_status("web-1", "critical");
    assert!(
        eventually(T, || lb.backends_of("web") == [be(0)]
            && lb.backends_of("web-lenient") == [be(0), be(2)]),
        "{:?} {:?}",
        lb.backends_of("web"),
        lb.backends_of("web-lenient")
    );
    assert_eq!(answering(&topo, vip), BTreeSet::from(["be0".into()]));
    consul.set_status("web-1", "passing");
    consul.deregister("web-0");
    assert!(
        eventually(T, || lb.backends_of("web") == [be(1)]),
        "{:?}",
        lb.backends_of("web")
    );
    assert_eq!(answering(&topo, vip), BTreeSet::from(["be1".into()]));
    // The store is Consul's KV: the service is there, with its source.
    let stored = consul
        .kv_get_raw("lb/services/web")
        .expect("stored in Consul's KV");
    let doc: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(
        doc["discovery"],
        json!({"kind": "consul", "service": "web"})
    );
}

#[test]
fn a_service_found_by_dns_follows_its_records_as_swarm_serves_them() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    // Swarm's tasks.<service>: an A record per task, TTL 0.
    let dns = DnsServer::start_in(&topo.lb, Ipv4Addr::LOCALHOST).unwrap();
    let ip = |i: usize| topo.backend_addrs[i];
    let be = |i: usize| topo.backend(i, 8080).to_string();
    dns.set("tasks.web", &[ip(0), ip(1)]).unwrap();
    // `--dns IP`: port 53.
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--dns", "127.0.0.1"]).unwrap();
    let vip = SocketAddr::from(topo.vip(80));
    let created = lb
        .put_service(
            "web",
            &json!({"vip": vip.to_string(), "discovery": {"kind": "dns", "name": "tasks.web", "port": 8080}}),
        )
        .unwrap();
    assert_eq!(created["backends"], json!([be(0), be(1)]));
    assert_eq!(
        created["discovery"],
        json!({"kind": "dns", "service": "tasks.web", "port": 8080})
    );
    assert_eq!(
        answering(&topo, vip),
        BTreeSet::from(["be0".into(), "be1".into()])
    );

    // Scaled up, then down: the records change, lb follows within the refresh.
    dns.set("tasks.web", &[ip(0), ip(1), ip(2)]).unwrap();
    assert!(
        eventually(T, || lb.backends_of("web").len() == 3),
        "{:?}",
        lb.backends_of("web")
    );
    dns.set("tasks.web", &[ip(1), ip(2)]).unwrap();
    assert!(
        eventually(T, || lb.backends_of("web") == [be(1), be(2)]),
        "{:?}",
        lb.backends_of("web")
    );
    assert_eq!(
        answering(&topo, vip),
        BTreeSet::from(["be1".into(), "be2".into()])
    );

    // The DNS server gone: the instances found last are kept, and the failure logged.
    drop(dns);
    assert!(
        eventually(Duration::from_secs(15), || lb
            .log_text()
            .contains("dns name tasks.web")),
        "{}",
        lb.log_text()
    );
    assert_eq!(lb.backends_of("web"), [be(1), be(2)]);

    // A DNS source without its port is a 400 naming it.
    let (code, err) = lb
        .request(
            "PUT",
            "/v1/services/other",
            Some(&json!({"vip": topo.vip(81).to_string(), "discovery": {"kind": "dns", "name": "tasks.web"}}).to_string()),
        )
        .unwrap();
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["field"], "discovery.port");
}
