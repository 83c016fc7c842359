//! Health checks steer traffic: a backend that stops answering leaves the rotation after
//! the fall threshold (no request fails after that, none goes to it), and comes back after
//! the rise threshold once it answers again; for layer-4 services through XDP as for HTTP.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    eventually,
    lbproc::LbProcess,
    servers::{Backend, ClientLoad, HttpConn, http_get_once},
    topology::Topology,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(3);

/// The health of each backend of `name`, as `GET /v1/services/{name}` reports it.
fn health(lb: &LbProcess, name: &str) -> Vec<(String, String)> {
    let (_, v) = lb
        .request("GET", &format!("/v1/services/{name}"), None)
        .unwrap();
    v["backend_counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["health"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn backend_view(lb: &LbProcess, name: &str, addr: &str) -> Value {
    let (_, v) = lb
        .request("GET", &format!("/v1/services/{name}"), None)
        .unwrap();
    v["backend_counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .cloned()
        .unwrap()
}

#[test]
fn a_failing_backend_leaves_the_maglev_table_and_returns() {
    let topo = Topology::two_armed(3).unwrap();
    let start = |i: usize| topo.start_backend(i, 8080, false).unwrap();
    let mut backends: Vec<Option<Backend>> = (0..3).map(|i| Some(start(i))).collect();
    let store = lb_tests::lbproc::temp_store();
    let url = store.url();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--store", &url]).unwrap();
    let all: Vec<String> = (0..3).map(|i| topo.backend(i, 8080).to_string()).collect();
    let check = json!({"kind": "http", "path": "/", "interval_ms": 200, "timeout_ms": 150, "rise": 2, "fall": 2});
    lb.put_service(
        "web",
        &json!({"vip": topo.vip(80).to_string(), "backends": all, "check": check}),
    )
    .unwrap();
    let vip = SocketAddr::from(topo.vip(80));
    let answering = |n: usize| -> (BTreeSet<String>, usize) {
        let mut seen = BTreeSet::new();
        let mut failed = 0;
        for _ in 0..n {
            match http_get_once(&topo.client, vip, T) {
                Ok(b) => {
                    seen.insert(b);
                }
                Err(_) => failed += 1,
            }
        }
        (seen, failed)
    };
    assert_eq!(answering(40).0.len(), 3);

    // be1 dies under load. After the fall threshold it is down, and from then on no
    // request fails or reaches it.
    let load = ClientLoad::start(&topo.client, vip).unwrap();
    assert!(
        load.wait_answered(20, Duration::from_secs(5)),
        "no load flowing"
    );
    backends[1] = None;
    let be1 = all[1].clone();
    assert!(
        eventually(Duration::from_secs(5), || health(&lb, "web")
            .iter()
            .any(|(a, h)| *a == be1 && h == "down")),
        "{:?}",
        health(&lb, "web")
    );
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();
    // Connections to be1 fail until the checks take it out (the API may report it down
    // a moment before the table changes); none after.
    let late: Vec<_> = report
        .failures
        .iter()
        .filter(|f| !f.kept && f.at > down + Duration::from_millis(300))
        .collect();
    assert!(
        late.is_empty(),
        "{} new connections failed after be1 was down: {late:?}",
        late.len()
    );
    assert!(report.answered >= 20, "the load stopped: {report:?}");
    // The long-lived connection breaks only if it was be1's.
    if !report.kept_backends.contains("be1") {
        assert!(report.failures.iter().all(|f| !f.kept), "{report:?}");
    }
    let view = backend_view(&lb, "web", &be1);
    assert!(
        view["reason"].as_str().unwrap().contains("connect"),
        "{view}"
    );
    assert!(view["since"].as_str().unwrap().ends_with('Z'), "{view}");
    let (seen, failed) = answering(60);
    assert_eq!(failed, 0, "requests failed after be1 was taken out");
    assert_eq!(seen, BTreeSet::from(["be0".into(), "be2".into()]));
    assert!(lb.log_text().contains("backend down"));

    // lb restarts meanwhile (kill -9): the adopted table had be1 out, so it stays out
    // until its checks pass; no request fails in between.
    let pins = lb.kill();
    let lb = LbProcess::start_on(&topo.lb, &topo.lb_ifaces, &["--store", &url], pins).unwrap();
    let view = backend_view(&lb, "web", &be1);
    assert_eq!(view["health"], "down", "{view}");
    let (seen, failed) = answering(60);
    assert_eq!(failed, 0, "requests failed after the restart");
    assert_eq!(seen, BTreeSet::from(["be0".into(), "be2".into()]));

    // It comes back: after the rise threshold it gets new connections again.
    backends[1] = Some(start(1));
    assert!(
        eventually(Duration::from_secs(5), || health(&lb, "web")
            .iter()
            .all(|(_, h)| h == "up")),
        "{:?}",
        health(&lb, "web")
    );
    let (seen, failed) = answering(60);
    assert_eq!(failed, 0);
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// A backend its check takes down keeps its established connections by default
/// (`"on_down": "drain"`, HAProxy's default): they still reach it while no new one does.
/// With `"on_down": "shutdown"` they are balanced again at once.
#[test]
fn a_backend_taken_down_keeps_its_connections_unless_on_down_is_shutdown() {
    let topo = Topology::two_armed(3).unwrap();
    // The service on 8080; the check on 8081, a listener of its own that can fail alone.
    let _served: Vec<Backend> = (0..3)
        .map(|i| topo.start_backend(i, 8080, false).unwrap())
        .collect();
    let mut checked: Vec<Option<Backend>> = (0..3)
        .map(|i| Some(topo.start_backend(i, 8081, false).unwrap()))
        .collect();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let all: Vec<String> = (0..3).map(|i| topo.backend(i, 8080).to_string()).collect();
    let check = json!({"kind": "tcp", "port": 8081, "interval_ms": 200, "timeout_ms": 150, "rise": 2, "fall": 2});
    let body = json!({"vip": topo.vip(80).to_string(), "backends": all, "check": check});
    lb.put_service("web", &body).unwrap();
    let vip = SocketAddr::from(topo.vip(80));
    let mut on_be1: Vec<HttpConn> = Vec::new();
    for _ in 0..60 {
        let mut c = HttpConn::connect(&topo.client, vip, T).unwrap();
        if c.get().unwrap() == "be1" {
            on_be1.push(c);
        }
    }
    assert!(
        on_be1.len() >= 5,
        "{} connections reached be1",
        on_be1.len()
    );

    checked[1] = None;
    assert!(
        eventually(Duration::from_secs(5), || backend_view(&lb, "web", &all[1])
            ["health"]
            == "down"),
        "{:?}",
        health(&lb, "web")
    );
    for (i, c) in on_be1.iter_mut().enumerate() {
        let who = c
            .get()
            .unwrap_or_else(|e| panic!("connection {i} to the down backend broke: {e:#}"));
        assert_eq!(who, "be1", "connection {i} left its backend");
    }
    for i in 0..40 {
        let who = http_get_once(&topo.client, vip, T).unwrap();
        assert_ne!(who, "be1", "new connection {i} reached the down backend");
    }

    // The same service with "on_down": "shutdown": the down backend's connections are
    // balanced again (to backends that reset them).
    let mut shutdown = body.clone();
    shutdown["on_down"] = json!("shutdown");
    lb.put_service("web", &shutdown).unwrap();
    for (i, c) in on_be1.iter_mut().enumerate() {
        let answer = c.get();
        assert!(
            answer.is_err(),
            "connection {i} still reached the down backend: {answer:?}"
        );
    }
    let (_, view) = lb.request("GET", "/v1/services/web", None).unwrap();
    assert_eq!(view["on_down"], "shutdown", "{view}");
}
