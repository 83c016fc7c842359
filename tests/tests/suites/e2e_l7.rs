//! The L7 fallback end to end: HTTP services on lb's `--http` listener routed by path and
//! by host, keep-alive, large streamed bodies both ways, WebSocket upgrades, forwarding
//! headers, lb's own answers; a backend that fails leaves the pool after the fall
//! threshold; and Docker Flow Proxy's documented flow.
use std::{
    collections::BTreeSet,
    io::{BufRead, Read, Write},
    net::SocketAddr,
    time::Duration,
};

use lb_tests::{
    eventually,
    lbproc::LbProcess,
    servers::{Backend, HttpConn},
    topology::Topology,
};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

/// lb's HTTP listener in the two-armed topology: its client-side address.
fn listener() -> SocketAddr {
    SocketAddr::from(([10, 202, 1, 1], 80))
}

fn start_lb(topo: &Topology) -> LbProcess {
    LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--http", &listener().to_string()],
    )
    .unwrap()
}

fn backends(topo: &Topology, n: usize) -> Vec<Backend> {
    topo.start_backends(n, 8080, false).unwrap()
}

/// One request on a new connection: status and body.
fn get(topo: &Topology, path: &str, host: &str) -> (u16, String) {
    let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
    c.send("GET", path, host, b"").unwrap()
}

#[test]
fn http_services_are_routed_by_path_and_host() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = backends(&topo, 3);
    let lb = start_lb(&topo);
    let be = |i: usize| topo.backend(i, 8080).to_string();
    lb.put_service(
        "demo",
        &json!({"http": {"paths": ["/demo"]}, "backends": [be(0), be(1)]}),
    )
    .unwrap();
    lb.put_service(
        "api",
        &json!({"http": {"paths": ["/api", "/v2/api"]}, "backends": [be(2)]}),
    )
    .unwrap();
    lb.put_service(
        "site",
        &json!({"http": {"domain": "www.example.com"}, "backends": [be(2)]}),
    )
    .unwrap();
    lb.put_service(
        "wild",
        &json!({"http": {"domain": "*.example.org", "paths": ["/demo"]}, "backends": [be(1)]}),
    )
    .unwrap();

    // By path: /demo and /demo/..., spread over both backends; /demox is not /demo.
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let (code, body) = get(&topo, "/demo/hello", "lb");
        assert_eq!(code, 200, "{body}");
        seen.insert(body);
    }
    assert_eq!(seen, BTreeSet::from(["be0".into(), "be1".into()]));
    assert_eq!(get(&topo, "/demo", "lb").0, 200);
    assert_eq!(get(&topo, "/demox", "lb").0, 404);
    assert_eq!(get(&topo, "/v2/api/x", "lb"), (200, "be2".into()));
    // By host, exact and wildcard (with a port in Host, and any case).
    assert_eq!(
        get(&topo, "/anything", "WWW.example.com:80"),
        (200, "be2".into())
    );
    assert_eq!(get(&topo, "/demo/x", "a.example.org"), (200, "be1".into()));
    // lb's own answer, with a body.
    let (code, body) = get(&topo, "/nowhere", "lb");
    assert_eq!(code, 404);
    assert!(!body.is_empty());

    // Keep-alive: many requests on one client connection.
    let mut conn = HttpConn::connect(&topo.client, listener(), T).unwrap();
    for _ in 0..50 {
        let (code, _) = conn.send("GET", "/api/x", "lb", b"").unwrap();
        assert_eq!(code, 200);
    }

    // Forwarding headers reach the backend, hop-by-hop ones do not.
    let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
    let head = "GET /api/headers HTTP/1.1\r\nHost: lb.test\r\nConnection: keep-alive, x-private\r\nX-Private: 1\r\nContent-Length: 0\r\n\r\n";
    c.stream().write_all(head.as_bytes()).unwrap();
    let body = read_answer(&mut c);
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("x-forwarded-for: 10.202.1.10"), "{body}");
    assert!(lower.contains("x-forwarded-proto: http"), "{body}");
    assert!(lower.contains("x-forwarded-host: lb.test"), "{body}");
    assert!(!lower.contains("x-private"), "{body}");

    // A large body streamed up, and one streamed down.
    let size: usize = 64 << 20;
    let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
    let head = format!("POST /api/upload HTTP/1.1\r\nHost: lb\r\nContent-Length: {size}\r\n\r\n");
    c.stream().write_all(head.as_bytes()).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut sum = 0u64;
    for _ in 0..size / chunk.len() {
        c.stream().write_all(&chunk).unwrap();
    }
    for _ in 0..size {
        sum = sum.wrapping_mul(31).wrapping_add(7);
    }
    assert_eq!(read_answer(&mut c), format!("be2 {size} {sum}"));
    let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
    let (code, big) = c
        .send("GET", &format!("/api/big/{size}"), "lb", b"")
        .unwrap();
    assert_eq!((code, big.len()), (200, size));

    // A WebSocket upgrade passes through and echoes.
    let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
    let head = "GET /api/ws HTTP/1.1\r\nHost: lb\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    c.stream().write_all(head.as_bytes()).unwrap();
    let mut status = String::new();
    c.reader().read_line(&mut status).unwrap();
    assert!(status.contains(" 101 "), "{status}");
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        c.reader().read_line(&mut line).unwrap();
    }
    c.stream().write_all(b"ping through the proxy").unwrap();
    let mut echo = vec![0u8; 22];
    c.reader().read_exact(&mut echo).unwrap();
    assert_eq!(echo, b"ping through the proxy");

    // A removed service's route answers 503; a path never routed 404.
    assert_eq!(
        lb.request("DELETE", "/v1/services/demo", None).unwrap().0,
        204
    );
    assert_eq!(get(&topo, "/demo/hello", "lb").0, 503);
    assert_eq!(get(&topo, "/never", "lb").0, 404);
}

/// Reads one answer with a Content-Length from `c` and returns its body.
fn read_answer(c: &mut HttpConn) -> String {
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        c.reader().read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    c.reader().read_exact(&mut body).unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// A write is in effect when it answers: the request right after a PUT is routed to the
/// new service, and the one right after a DELETE no longer is (the route table used to be
/// swapped in a moment later, by a task of its own).
#[test]
fn a_route_serves_as_soon_as_its_put_answers_and_stops_as_soon_as_its_delete_does() {
    let topo = Topology::two_armed(1).unwrap();
    let _backends = backends(&topo, 1);
    let lb = start_lb(&topo);
    let be0 = topo.backend(0, 8080).to_string();
    for i in 0..40 {
        let path = format!("/s{i}");
        lb.put_service(
            &format!("s{i}"),
            &json!({"http": {"paths": [path]}, "backends": [be0]}),
        )
        .unwrap();
        assert_eq!(
            get(&topo, &path, "lb"),
            (200, "be0".into()),
            "after PUT {i}"
        );
        let (code, _) = lb
            .request("DELETE", &format!("/v1/services/s{i}"), None)
            .unwrap();
        assert_eq!(code, 204);
        // A removed route answers 503 (no backend) rather than falling through to others.
        assert_eq!(get(&topo, &path, "lb").0, 503, "after DELETE {i}");
    }
}

#[test]
fn a_failing_backend_leaves_the_http_pool_and_returns() {
    let topo = Topology::two_armed(3).unwrap();
    let start = |i: usize| topo.start_backend(i, 8080, false).unwrap();
    let mut running: Vec<Option<Backend>> = (0..3).map(|i| Some(start(i))).collect();
    let lb = start_lb(&topo);
    let all: Vec<String> = (0..3).map(|i| topo.backend(i, 8080).to_string()).collect();
    let check = json!({"kind": "http", "path": "/health", "interval_ms": 200, "timeout_ms": 150, "rise": 2, "fall": 2});
    lb.put_service(
        "demo",
        &json!({"http": {"paths": ["/demo"]}, "backends": all, "check": check}),
    )
    .unwrap();
    let round = |n: usize| -> (BTreeSet<String>, usize) {
        let mut seen = BTreeSet::new();
        let mut failed = 0;
        let mut conn = HttpConn::connect(&topo.client, listener(), T).unwrap();
        for _ in 0..n {
            match conn.send("GET", "/demo/x", "lb", b"") {
                Ok((200, b)) => {
                    seen.insert(b);
                }
                _ => {
                    failed += 1;
                    conn = HttpConn::connect(&topo.client, listener(), T).unwrap();
                }
            }
        }
        (seen, failed)
    };
    assert_eq!(round(30).0.len(), 3);
    running[1] = None;
    let be1 = all[1].clone();
    assert!(eventually(Duration::from_secs(5), || {
        let (_, v) = lb.request("GET", "/v1/services/demo", None).unwrap();
        v["backend_counters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["address"] == be1.as_str() && b["health"] == "down")
    }));
    let (seen, failed) = round(60);
    assert_eq!(failed, 0, "requests failed after be1 left the pool");
    assert_eq!(seen, BTreeSet::from(["be0".into(), "be2".into()]));
    running[1] = Some(start(1));
    assert!(eventually(Duration::from_secs(5), || round(12).0.len() == 3));
}

#[test]
fn docker_flow_proxy_documented_flow() {
    let topo = Topology::two_armed(2).unwrap();
    let _backends = backends(&topo, 2);
    let lb = start_lb(&topo);
    let ips = format!("{},{}", topo.backend_addrs[0], topo.backend_addrs[1]);
    let (code, body) = lb
        .request(
            "GET",
            &format!("/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends={ips}"),
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["Status"], "OK");
    assert_eq!(body["ServiceDest"][0]["ServicePath"], json!(["/demo"]));
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let (code, who) = get(&topo, "/demo/hello", "lb");
        assert_eq!(code, 200);
        seen.insert(who);
    }
    assert_eq!(seen.len(), 2);
    let (code, _) = lb
        .request(
            "GET",
            "/v1/docker-flow-proxy/remove?serviceName=go-demo",
            None,
        )
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(get(&topo, "/demo/hello", "lb").0, 503);
    // The 400 and 409 cases.
    let (code, body) = lb
        .request(
            "GET",
            "/v1/docker-flow-proxy/reconfigure?servicePath=/demo",
            None,
        )
        .unwrap();
    assert_eq!((code, body["field"].as_str()), (400, Some("serviceName")));
    let (code, _) = lb
        .request(
            "GET",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&port=8080&backends={ips}"
            ),
            None,
        )
        .unwrap();
    assert_eq!(code, 409);
}
