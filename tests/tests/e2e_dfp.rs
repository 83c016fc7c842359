//! Docker Flow Proxy's API, replayed as its users' scripts call it: reconfigure, traffic,
//! remove; the documented errors; the configuration as JSON.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{lbproc::LbProcess, servers::http_get_once, topology::Topology};
use serde_json::json;

const T: Duration = Duration::from_secs(3);

#[test]
fn a_tcp_service_reconfigured_the_dfp_way_is_forwarded_by_xdp() {
    // One-armed: the balancer's own address (10.201.0.1) is the VIP of tcp services.
    let topo = Topology::one_armed(2).unwrap();
    let _backends = topo.start_backends(2, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let ips = format!("{},{}", topo.backend_addrs[0], topo.backend_addrs[1]);
    let (code, body) = lb
        .request(
            "GET",
            &format!("/v1/docker-flow-proxy/reconfigure?serviceName=db&reqMode=tcp&srcPort=5432&port=8080&backends={ips}"),
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["Status"], "OK");
    assert_eq!(body["ServiceName"], "db");
    assert_eq!(body["SrcPort"], "5432");
    assert_eq!(body["Port"], "8080");
    // The native API sees the same service: an L4 VIP on the balancer's address.
    let (_, native) = lb.request("GET", "/v1/services/db", None).unwrap();
    assert_eq!(native["vip"], "10.201.0.1:5432");
    let vip = SocketAddr::from(([10, 201, 0, 1], 5432));
    let seen: std::collections::BTreeSet<String> = (0..30)
        .map(|_| http_get_once(&topo.client, vip, T).unwrap())
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (code, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(config[0]["ServiceName"], "db");
    assert_eq!(config[0]["ReqMode"], "tcp");
    let (code, ping) = lb
        .request("GET", "/v1/docker-flow-proxy/ping", None)
        .unwrap();
    assert_eq!((code, ping["Status"].as_str()), (200, Some("OK")));

    let (code, body) = lb
        .request("GET", "/v1/docker-flow-proxy/remove?serviceName=db", None)
        .unwrap();
    assert_eq!((code, body["Status"].as_str()), (200, Some("OK")), "{body}");
    assert_eq!(lb.request("GET", "/v1/services/db", None).unwrap().0, 404);
    assert!(http_get_once(&topo.client, vip, Duration::from_millis(500)).is_err());
    // Removing what is not there is OK too, as in DFP.
    let (code, _) = lb
        .request("GET", "/v1/docker-flow-proxy/remove?serviceName=db", None)
        .unwrap();
    assert_eq!(code, 200);
}

#[test]
fn dfp_errors_are_its_documented_statuses_and_change_nothing() {
    let topo = Topology::one_armed(1).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let be = topo.backend_addrs[0];
    let cases = [
        (
            "reconfigure?servicePath=/demo&port=8080",
            400,
            "serviceName",
        ),
        (
            "reconfigure?serviceName=go-demo&port=8080&backends=10.201.0.11",
            409,
            "servicePath",
        ),
        (
            "reconfigure?serviceName=db&reqMode=tcp&port=8080&backends=10.201.0.11",
            400,
            "srcPort",
        ),
        (
            "reconfigure?serviceName=db&reqMode=tcp&srcPort=5432&backends=10.201.0.11",
            400,
            "port",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080",
            400,
            "backends",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=80800&backends=10.201.0.11",
            400,
            "port",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=demo&port=8080&backends=10.201.0.11",
            400,
            "servicePath",
        ),
        (
            "reconfigure?serviceName=go/demo&servicePath=/demo&port=8080&backends=10.201.0.11",
            400,
            "serviceName",
        ),
        (
            "reconfigure?serviceName=go-demo&reqMode=sni&port=8080&backends=10.201.0.11",
            400,
            "reqMode",
        ),
        ("remove", 400, "serviceName"),
        ("config?type=haproxy", 400, "type"),
    ];
    for (query, status, field) in cases {
        let query = query.replace("10.201.0.11", &be.to_string());
        let (code, body) = lb
            .request("GET", &format!("/v1/docker-flow-proxy/{query}"), None)
            .unwrap();
        assert_eq!(code, status, "{query}: {body}");
        assert_eq!(body["Status"], "NOK", "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
        assert!(!body["Message"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        lb.request("GET", "/v1/services", None).unwrap().1,
        json!([]),
        "nothing was created"
    );
}
