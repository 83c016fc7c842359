//! ACME against a real CA, pebble, in namespaces: a service asks for a certificate for its
//! domain, lb answers the CA's HTTP-01 request on its HTTP listener (even though the
//! service redirects plain HTTP to HTTPS), stores the certificate and serves it; a stored
//! certificate close to expiry is renewed. The CA resolves the domain through a real DNS
//! server (dnsmasq) to lb's address, as it would on the Internet.
use std::{net::Ipv4Addr, time::Duration};

use lb_tests::{
    curl::{Curl, curl},
    dns::DnsServer,
    eventually,
    lbproc::LbProcess,
    pebble::Pebble,
    pki::Pki,
    topology::Topology,
};
use serde_json::{Value, json};

const LB: &str = "10.202.1.1";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 202, 1, 10);
const DOMAIN: &str = "app.example.test";

/// `https://DOMAIN/PATH` from the client, trusting the roots in `ca`.
fn https(topo: &Topology, ca: &std::path::Path, path: &str) -> Curl {
    let resolve = format!("{DOMAIN}:443:{LB}");
    let url = format!("https://{DOMAIN}{path}");
    let ca = ca.display().to_string();
    curl(
        &topo.client,
        &["--cacert", &ca, "--resolve", &resolve, &url],
    )
}

fn cert_view(lb: &LbProcess, name: &str) -> Option<Value> {
    match lb.request("GET", &format!("/v1/certs/{name}"), None) {
        Ok((200, view)) => Some(view),
        _ => None,
    }
}

#[test]
fn a_service_asking_for_acme_gets_a_certificate_served_and_renewed_before_expiry() {
    let topo = Topology::two_armed(1).unwrap();
    let _backends = topo.start_backends(1, 8080, false).unwrap();
    let pki = Pki::new(&[]).unwrap();
    let dns = DnsServer::start_in(&topo.client, CLIENT).unwrap();
    dns.set(DOMAIN, &[LB.parse().unwrap()]).unwrap();
    let pebble = Pebble::start_in(&topo.client, CLIENT, 80, dns.addr(), &pki).unwrap();
    let roots = pki
        .write("pebble-roots.pem", &pebble.roots(&topo.client).unwrap())
        .unwrap();
    let ca = pki.ca().display().to_string();
    let directory = pebble.directory();
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &[
            "--http",
            &format!("{LB}:80"),
            "--acme-directory",
            &directory,
            "--acme-ca-file",
            &ca,
            "--acme-email",
            "ops@example.test",
        ],
    )
    .unwrap();
    let backend = topo.backend(0, 8080).to_string();

    // A wildcard cannot be validated over HTTP, and a route with no domain names nothing:
    // both refused, naming the field.
    for http in [
        json!({"domain": "*.example.test", "tls": {"acme": true}}),
        json!({"paths": ["/x"], "tls": {"acme": true}}),
    ] {
        let body = json!({"http": http, "backends": [backend]}).to_string();
        let (status, answer) = lb.request("PUT", "/v1/services/bad", Some(&body)).unwrap();
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["field"], "http.tls.acme", "{answer}");
    }

    lb.put_service(
        "app",
        &json!({
            "http": {"domain": DOMAIN, "paths": ["/"], "https_only": true, "tls": {"acme": true}},
            "backends": [backend],
        }),
    )
    .unwrap();
    let name = format!("acme.{DOMAIN}");
    assert!(
        eventually(Duration::from_secs(60), || cert_view(&lb, &name).is_some()),
        "no certificate ordered; lb: {}\npebble: {}",
        lb.log_text(),
        pebble.log()
    );
    let view = cert_view(&lb, &name).unwrap();
    assert_eq!(view["domains"], json!([DOMAIN]), "{view}");
    // Served over HTTPS, chaining to the CA's root (curl checks it against pebble's roots).
    assert!(
        eventually(Duration::from_secs(10), || https(&topo, &roots, "/hello")
            .status
            == 200),
        "{:?}",
        https(&topo, &roots, "/hello")
    );
    // Plain HTTP still goes to HTTPS: only the CA's tokens were answered over it.
    let plain = curl(
        &topo.client,
        &[
            "--resolve",
            &format!("{DOMAIN}:80:{LB}"),
            &format!("http://{DOMAIN}/hello"),
        ],
    );
    assert_eq!(plain.status, 302, "{plain:?}");
    assert!(
        pebble.log().contains("validate w/ HTTP"),
        "pebble validated over HTTP-01: {}",
        pebble.log()
    );
    let first_expiry = view["expires"].as_str().unwrap().to_string();

    // A certificate under that name that expires in an hour (issued by another CA, a day
    // ago) is due: lb orders a new one from the CA and replaces it.
    let (soon, soon_key) = pki.leaf(&[DOMAIN], -86_400, 3600).unwrap();
    let body = json!({"cert": soon, "key": soon_key}).to_string();
    let (status, answer) = lb
        .request("PUT", &format!("/v1/certs/{name}"), Some(&body))
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let renewed = eventually(Duration::from_secs(60), || {
        cert_view(&lb, &name).is_some_and(|v| {
            let expires = v["expires"].as_str().unwrap_or("").to_string();
            expires != answer["expires"].as_str().unwrap_or("") && expires >= first_expiry
        })
    });
    assert!(
        renewed,
        "not renewed: {:?}; lb: {}",
        cert_view(&lb, &name),
        lb.log_text()
    );
    assert_eq!(https(&topo, &roots, "/hello").status, 200);
    lb.stop().unwrap();
}
