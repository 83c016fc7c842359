//! HTTPS in namespaces, as a user runs it: certificates stored through the API (native and
//! DFP's), SNI choosing among them, h2 and HTTP/1.1 by ALPN, TLS 1.2 and 1.3, a certificate
//! replaced while a connection made with the old one keeps going, bad certificates refused
//! naming the part at fault, plain HTTP redirected or denied per service, and a fresh node
//! with only the store's address serving the same HTTPS routes after the first is killed.
//! Requests come from curl (what a user types) and from a rustls client where the test must
//! see the certificate a handshake got.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use lb_tests::{
    curl::{Curl, curl},
    etcd::EtcdCluster,
    eventually,
    lbproc::LbProcess,
    netns::Netns,
    pki::Pki,
    topology::Topology,
    unique,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};

const LB: &str = "10.202.1.1";

/// `https://NAME/PATH` resolved to lb's address.
fn https(ns: &Netns, pki: &Pki, name: &str, path: &str, extra: &[&str]) -> Curl {
    let resolve = format!("{name}:443:{LB}");
    let url = format!("https://{name}{path}");
    let ca = pki.ca().display().to_string();
    let mut args = vec!["--cacert", &ca, "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(ns, &args)
}

/// Whether `https://NAME/PATH` answers 200 within `within` (lb follows the store's
/// certificates and services a moment after they are written).
fn https_ok_within(ns: &Netns, pki: &Pki, name: &str, path: &str, within: Duration) -> bool {
    eventually(within, || https(ns, pki, name, path, &[]).status == 200)
}

fn put_cert(lb: &LbProcess, name: &str, cert: &str, key: &str) -> (u16, Value) {
    let body = json!({"cert": cert, "key": key}).to_string();
    lb.request("PUT", &format!("/v1/certs/{name}"), Some(&body))
        .unwrap()
}

/// A TLS connection kept open by the test, with the certificate its handshake got.
struct TlsConn {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsConn {
    fn open(ns: &Netns, pki: &Pki, name: &str) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(pki.ca())? {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let addr: SocketAddr = format!("{LB}:443").parse()?;
        let tcp = ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let server = ServerName::try_from(name.to_string())?;
        let conn = rustls::ClientConnection::new(Arc::new(config), server)?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Self { stream })
    }

    /// The leaf certificate the server sent.
    fn leaf(&self) -> Vec<u8> {
        self.stream.conn.peer_certificates().expect("a certificate")[0].to_vec()
    }

    /// One keep-alive GET: status and body.
    fn get(&mut self, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
        write!(self.stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
        self.stream.flush()?;
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut buf)?;
            anyhow::ensure!(n > 0, "closed before an answer");
            received.extend_from_slice(&buf[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&received)? {
                let length: usize = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                    .unwrap_or(0);
                if received.len() >= head + length {
                    let body = String::from_utf8_lossy(&received[head..head + length]);
                    return Ok((response.code.unwrap_or(0), body.into_owned()));
                }
            }
        }
    }
}

fn refused(lb: &LbProcess, kind: &str) -> u64 {
    let stats = lb.request("GET", "/v1/stats", None).unwrap().1;
    stats["http"]["refused"][kind].as_u64().unwrap_or(0)
}

#[test]
fn https_with_certificates_from_the_api_chosen_by_sni_and_replaced_live() {
    let topo = Topology::two_armed(2).unwrap();
    let _backends = topo.start_backends(2, 8080, false).unwrap();
    let pki = Pki::new(&[]).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--http", &format!("{LB}:80")]).unwrap();
    let be = |i: usize| topo.backend(i, 8080).to_string();
    lb.put_service(
        "web",
        &json!({"http": {"paths": ["/web"]}, "backends": [be(0), be(1)]}),
    )
    .unwrap();

    // No certificate yet: no port 443 (`--https auto`).
    let c = https(&topo.client, &pki, "example.com", "/web/x", &[]);
    assert!(!c.ok && c.stderr.contains("onnect"), "{c:?}");

    let (site, site_key) = pki
        .leaf(&["example.com", "*.example.org"], -60, 90 * 86_400)
        .unwrap();
    let (status, view) = put_cert(&lb, "site", &site, &site_key);
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["domains"], json!(["example.com", "*.example.org"]));
    let (other, other_key) = pki.leaf(&["other.test"], -60, 90 * 86_400).unwrap();
    // DFP's call: chain and key in one PEM body.
    let combined = format!("{other}{other_key}");
    let answer = lb
        .raw(lb_tests::rawhttp::request(
            "PUT",
            "/v1/docker-flow-proxy/cert?certName=other",
            &[("Host", "localhost")],
            Some(combined.as_bytes()),
        ))
        .unwrap();
    assert_eq!(
        (answer.status, answer.json()),
        (200, json!({"Status": "OK", "Message": "", "Certs": null}))
    );

    // Served by SNI, each name checked by curl against the certificate it got: h2 by ALPN,
    // HTTP/1.1 when asked, TLS 1.2 as well as 1.3, and the backend told it was HTTPS.
    assert!(https_ok_within(
        &topo.client,
        &pki,
        "example.com",
        "/web/x",
        Duration::from_secs(5)
    ));
    let c = https(&topo.client, &pki, "example.com", "/web/headers", &[]);
    assert_eq!((c.status, c.version.as_str()), (200, "2"), "{c:?}");
    let headers = c.body.to_ascii_lowercase();
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    let c = https(
        &topo.client,
        &pki,
        "www.example.org",
        "/web/x",
        &["--http1.1"],
    );
    assert_eq!((c.status, c.version.as_str()), (200, "1.1"), "{c:?}");
    let c = https(
        &topo.client,
        &pki,
        "other.test",
        "/web/x",
        &["--tls-max", "1.2"],
    );
    assert_eq!(c.status, 200, "{c:?}");
    // A name no certificate covers gets the default (the first by name), which curl refuses.
    let c = https(&topo.client, &pki, "nothing.test", "/web/x", &[]);
    assert!(!c.ok && c.stderr.contains("certificate"), "{c:?}");

    // Both APIs list them, with the chain and never the key.
    let (_, list) = lb.request("GET", "/v1/certs", None).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other", "site"]);
    let (_, one) = lb.request("GET", "/v1/certs/site", None).unwrap();
    assert!(one["cert"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    assert!(!one.to_string().contains("PRIVATE KEY"), "{one}");
    let (_, dfp) = lb
        .request("GET", "/v1/docker-flow-proxy/certs", None)
        .unwrap();
    assert_eq!(dfp["Certs"].as_array().unwrap().len(), 2, "{dfp}");
    assert!(!dfp.to_string().contains("PRIVATE KEY"), "{dfp}");

    // Bad certificates: a 400 naming the part, and nothing changes.
    let (_, stray_key) = pki.leaf(&["example.com"], -60, 86_400).unwrap();
    let (expired, expired_key) = pki.leaf(&["example.com"], -2 * 86_400, -86_400).unwrap();
    for (cert, key, field, says) in [
        (site.as_str(), stray_key.as_str(), "key", "does not match"),
        (expired.as_str(), expired_key.as_str(), "cert", "expired"),
        ("not a pem", site_key.as_str(), "cert", "no PEM certificate"),
        (site.as_str(), "", "key", "no PEM private key"),
    ] {
        let (status, e) = put_cert(&lb, "site", cert, key);
        assert_eq!(status, 400, "{e}");
        assert_eq!(e["field"], field, "{e}");
        assert!(e["error"].as_str().unwrap().contains(says), "{e}");
    }
    let (_, still) = lb.request("GET", "/v1/certs/site", None).unwrap();
    assert_eq!(still["cert"], one["cert"]);

    // Replaced while a connection made with the old one is open: that connection keeps
    // going, and the next handshake gets the new certificate, with no restart.
    let mut old = TlsConn::open(&topo.client, &pki, "example.com").unwrap();
    assert_eq!(old.get("example.com", "/web/x").unwrap().0, 200);
    let old_leaf = old.leaf();
    let (renewed, renewed_key) = pki
        .leaf(&["example.com", "*.example.org"], -60, 180 * 86_400)
        .unwrap();
    assert_eq!(put_cert(&lb, "site", &renewed, &renewed_key).0, 200);
    let fresh = TlsConn::open(&topo.client, &pki, "example.com").unwrap();
    assert_ne!(
        fresh.leaf(),
        old_leaf,
        "the new certificate is served at once"
    );
    for _ in 0..3 {
        assert_eq!(old.get("example.com", "/web/x").unwrap().0, 200);
    }

    // A handshake that fails is counted; deleting a certificate stops serving it.
    let before = refused(&lb, "tls_handshake");
    topo.client.run(|| {
        let mut s = TcpStream::connect((LB, 443)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    });
    assert!(eventually(Duration::from_secs(3), || refused(
        &lb,
        "tls_handshake"
    ) > before));
    assert_eq!(
        lb.request("DELETE", "/v1/certs/other", None).unwrap().0,
        204
    );
    assert_eq!(
        lb.request("DELETE", "/v1/certs/other", None).unwrap().0,
        404
    );
    let c = https(&topo.client, &pki, "other.test", "/web/x", &[]);
    assert!(!c.ok, "{c:?}");
}

#[test]
fn plain_http_is_redirected_or_denied_per_service() {
    let topo = Topology::two_armed(1).unwrap();
    let _backends = topo.start_backends(1, 8080, false).unwrap();
    let pki = Pki::new(&[]).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--http", &format!("{LB}:80")]).unwrap();
    let (cert, key) = pki.leaf(&["example.com"], -60, 86_400).unwrap();
    assert_eq!(put_cert(&lb, "site", &cert, &key).0, 200);
    let be = topo.backend(0, 8080).to_string();
    lb.put_service(
        "secure",
        &json!({"http": {"paths": ["/secure"], "https_only": true}, "backends": [be]}),
    )
    .unwrap();
    lb.put_service(
        "open",
        &json!({"http": {"paths": ["/open"]}, "backends": [be]}),
    )
    .unwrap();
    // DFP's parameters: a 301 redirect, and a service HTTP may not reach at all.
    let dfp = |q: &str| {
        lb.request(
            "GET",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?{q}&port=8080&backends={}",
                topo.backend(0, 8080).ip()
            ),
            None,
        )
        .unwrap()
    };
    assert_eq!(
        dfp("serviceName=moved&servicePath=/moved&httpsOnly=true&httpsRedirectCode=301").0,
        200
    );
    assert_eq!(
        dfp("serviceName=closed&servicePath=/closed&denyHttp=true").0,
        200
    );
    let (status, e) = dfp("serviceName=bad&servicePath=/bad&httpsOnly=true&httpsRedirectCode=200");
    assert_eq!(
        (status, e["field"].as_str()),
        (400, Some("httpsRedirectCode")),
        "{e}"
    );

    let http = |path: &str| {
        curl(
            &topo.client,
            &["-H", "Host: example.com", &format!("http://{LB}{path}")],
        )
    };
    let c = http("/secure/a?b=c");
    assert_eq!(c.status, 302, "{c:?}");
    assert_eq!(c.location, "https://example.com/secure/a?b=c");
    let c = http("/moved/x");
    assert_eq!(
        (c.status, c.location.as_str()),
        (301, "https://example.com/moved/x"),
        "{c:?}"
    );
    let c = http("/closed/x");
    assert_eq!(c.status, 403, "{c:?}");
    assert!(c.body.contains("HTTPS only"), "{c:?}");
    assert_eq!(http("/open/x").status, 200);
    // Followed, the redirect lands on HTTPS and is served.
    let (plain, tls) = (
        format!("example.com:80:{LB}"),
        format!("example.com:443:{LB}"),
    );
    let ca = pki.ca().display().to_string();
    let c = curl(
        &topo.client,
        &[
            "--cacert",
            &ca,
            "-L",
            "--resolve",
            &plain,
            "--resolve",
            &tls,
            "http://example.com/secure/x",
        ],
    );
    assert_eq!(c.status, 200, "{c:?}");
    for path in ["/secure/x", "/moved/x", "/closed/x", "/open/x"] {
        let c = https(&topo.client, &pki, "example.com", path, &[]);
        assert_eq!(c.status, 200, "{path}: {c:?}");
    }
    // DFP's serviceCert: the certificate comes with the service, stored under its name.
    let (shop, shop_key) = pki.leaf(&["shop.test"], -60, 86_400).unwrap();
    let encoded: String = format!("{shop}{shop_key}")
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = lb
        .request(
            "PUT",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?serviceName=shop&serviceDomain=shop.test&port=8080&backends={}&serviceCert={encoded}",
                topo.backend(0, 8080).ip()
            ),
            None,
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(https(&topo.client, &pki, "shop.test", "/", &[]).status, 200);
    let (_, cert) = lb.request("GET", "/v1/certs/shop", None).unwrap();
    assert_eq!(cert["domains"], json!(["shop.test"]), "{cert}");
    let (status, e) = lb
        .request(
            "PUT",
            "/v1/docker-flow-proxy/reconfigure?serviceName=shop2&serviceDomain=shop2.test&port=8080&backends=10.202.2.11&serviceCert=garbage",
            None,
        )
        .unwrap();
    assert_eq!(
        (status, e["field"].as_str()),
        (400, Some("serviceCert")),
        "{e}"
    );
    assert_eq!(
        lb.request("GET", "/v1/services/shop2", None).unwrap().0,
        404
    );

    // The view says so.
    let (_, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert_eq!(
        config["moved"]["ServiceDest"][0]["HttpsOnly"], true,
        "{config}"
    );
    assert_eq!(
        config["closed"]["ServiceDest"][0]["DenyHttp"], true,
        "{config}"
    );
}

#[test]
fn a_fresh_node_with_only_the_store_address_serves_the_same_https() {
    // Two sites built alike; etcd reachable from both balancers.
    let sites: Vec<Topology> = (0..2).map(|_| Topology::two_armed(1).unwrap()).collect();
    let (_control, etcd) = EtcdCluster::for_sites(&sites).unwrap();
    let mut backends = Vec::new();
    for topo in &sites {
        backends.push(topo.start_backend(0, 8080, false).unwrap());
    }
    let pki = Pki::new(&[]).unwrap();
    let prefix = unique("lbt");
    let url = etcd.url();
    let args = [
        "--store",
        url.as_str(),
        "--store-prefix",
        &prefix,
        "--http",
        "10.202.1.1:80",
    ];
    let first = LbProcess::start(&sites[0].lb, &sites[0].lb_ifaces, &args).unwrap();
    let (cert, key) = pki.leaf(&["shop.example"], -60, 86_400).unwrap();
    assert_eq!(put_cert(&first, "shop", &cert, &key).0, 200);
    let be = sites[0].backend(0, 8080).to_string();
    first
        .put_service(
            "shop",
            &json!({"http": {"domain": "shop.example", "https_only": true}, "backends": [be]}),
        )
        .unwrap();
    assert!(https_ok_within(
        &sites[0].client,
        &pki,
        "shop.example",
        "/",
        Duration::from_secs(5)
    ));
    let leaf = TlsConn::open(&sites[0].client, &pki, "shop.example")
        .unwrap()
        .leaf();
    // The node dies; a new one, told nothing but the store's address, takes over.
    drop(first.kill());
    let second = LbProcess::start(&sites[1].lb, &sites[1].lb_ifaces, &args).unwrap();
    assert!(https_ok_within(
        &sites[1].client,
        &pki,
        "shop.example",
        "/",
        Duration::from_secs(10)
    ));
    let again = TlsConn::open(&sites[1].client, &pki, "shop.example").unwrap();
    assert_eq!(again.leaf(), leaf, "the same certificate");
    let c = curl(
        &sites[1].client,
        &["-H", "Host: shop.example", "http://10.202.1.1/"],
    );
    assert_eq!(
        (c.status, c.location.as_str()),
        (302, "https://shop.example/"),
        "{c:?}"
    );
    drop(second);
}

#[test]
fn backends_over_tls_checked_against_a_ca_by_name_or_not_at_all() {
    let topo = Topology::two_armed(1).unwrap();
    let backend_ip = topo.backend_addrs[0].to_string();
    // The backend's certificate names its address and backend.internal, under the test CA.
    let pki = Pki::new(&[&backend_ip, "backend.internal"]).unwrap();
    let backend = topo.backend(0, 8443);
    let _tls_backend = lb_tests::servers::TlsBackend::start(
        &topo.backends[0],
        "b0",
        backend.into(),
        pki.server_config().unwrap(),
    )
    .unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--http", &format!("{LB}:80")]).unwrap();
    let ca = std::fs::read_to_string(pki.ca()).unwrap();
    let other_ca = std::fs::read_to_string(pki.other_ca()).unwrap();
    let put = |name: &str, path: &str, backend_tls: Value| {
        let body = json!({"http": {"paths": [path], "backend_tls": backend_tls}, "backends": [backend.to_string()]});
        lb.request(
            "PUT",
            &format!("/v1/services/{name}"),
            Some(&body.to_string()),
        )
        .unwrap()
    };
    let get = |path: &str| curl(&topo.client, &[&format!("http://{LB}{path}")]);

    // Checked against the route's CA, for the backend's address.
    assert_eq!(put("by-ca", "/ca", json!({"ca": ca})).0, 200);
    // Checked for a name the certificate has, and for one it lacks.
    assert_eq!(
        put(
            "by-name",
            "/name",
            json!({"ca": ca, "server_name": "backend.internal"})
        )
        .0,
        200
    );
    assert_eq!(
        put(
            "wrong-name",
            "/wrong",
            json!({"ca": ca, "server_name": "other.internal"})
        )
        .0,
        200
    );
    // Against another CA, and against the system's roots: refused.
    assert_eq!(put("other-ca", "/other", json!({"ca": other_ca})).0, 200);
    assert_eq!(put("system", "/system", json!({})).0, 200);
    // Not checked at all (DFP's sslVerifyNone, which also turns TLS on).
    let (status, answer) = lb
        .request(
            "GET",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?serviceName=insecure&servicePath=/insecure&port=8443&backends={backend_ip}&sslVerifyNone=true"
            ),
            None,
        )
        .unwrap();
    assert_eq!(status, 200, "{answer}");

    for path in ["/ca/x", "/name/x", "/insecure/x"] {
        let got = get(path);
        assert_eq!(got.status, 200, "{path}: {got:?}\n{}", lb.log_text());
        assert_eq!(got.body, format!("tls b0 {path} proto=http\n"), "{path}");
    }
    for path in ["/wrong/x", "/other/x", "/system/x"] {
        let got = get(path);
        assert_eq!(got.status, 502, "{path}: {got:?}");
    }
    assert!(
        lb.log_text().contains("backend TLS failed"),
        "{}",
        lb.log_text()
    );

    // A CA that is no certificate, a name that is no name, and a CA with no checking:
    // refused naming the field, nothing stored.
    for (tls, field) in [
        (json!({"ca": "junk"}), "http.backend_tls.ca"),
        (
            json!({"server_name": "no such name!"}),
            "http.backend_tls.server_name",
        ),
        (json!({"verify": false, "ca": ca}), "http.backend_tls.ca"),
    ] {
        let (status, answer) = put("bad", "/bad", tls);
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["field"], field, "{answer}");
    }
    assert_eq!(lb.request("GET", "/v1/services/bad", None).unwrap().0, 404);
    lb.stop().unwrap();
}

#[test]
fn tls_passed_through_by_sni_while_other_names_are_terminated() {
    let topo = Topology::two_armed(1).unwrap();
    let _plain = topo.start_backends(1, 8080, false).unwrap();
    // The backend terminates TLS itself, with a certificate lb never holds.
    let pki = Pki::new(&[
        "db.example.test",
        "db2.example.test",
        "test.foobar.net",
        "api.foobar.net",
    ])
    .unwrap();
    let tls_backend = topo.backend(0, 8443);
    let _tls = lb_tests::servers::TlsBackend::start(
        &topo.backends[0],
        "b0",
        tls_backend.into(),
        pki.server_config().unwrap(),
    )
    .unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--http", &format!("{LB}:80")]).unwrap();
    lb.put_service(
        "db",
        &json!({"http": {"domain": "db.example.test", "tls_passthrough": true}, "backends": [tls_backend.to_string()]}),
    )
    .unwrap();
    // No certificate is stored: the passthrough route alone opens port 443. The backend's
    // own certificate comes back, and it saw no X-Forwarded-Proto: lb did not terminate.
    assert!(https_ok_within(
        &topo.client,
        &pki,
        "db.example.test",
        "/x",
        Duration::from_secs(10)
    ));
    let got = https(&topo.client, &pki, "db.example.test", "/x", &[]);
    assert_eq!(got.body, "tls b0 /x proto=\n", "{got:?}");

    // Another name on the same listener is terminated by lb with a stored certificate.
    let (cert, key) = pki.leaf(&["web.example.test"], -60, 86_400).unwrap();
    assert_eq!(put_cert(&lb, "web", &cert, &key).0, 200);
    lb.put_service(
        "web",
        &json!({"http": {"domain": "web.example.test", "paths": ["/"]}, "backends": [topo.backend(0, 8080).to_string()]}),
    )
    .unwrap();
    assert!(https_ok_within(
        &topo.client,
        &pki,
        "web.example.test",
        "/y",
        Duration::from_secs(10)
    ));
    let got = https(&topo.client, &pki, "web.example.test", "/y", &[]);
    assert!(!got.body.starts_with("tls "), "terminated by lb: {got:?}");

    // DFP's reqMode=sni does the same; on another port it is refused.
    let be = topo.backend_addrs[0];
    let dfp = |query: &str| {
        lb.request(
            "GET",
            &format!("/v1/docker-flow-proxy/reconfigure?{query}"),
            None,
        )
        .unwrap()
    };
    let (status, answer) = dfp(&format!(
        "serviceName=db2&reqMode=sni&serviceDomain=db2.example.test&srcPort=443&port=8443&backends={be}"
    ));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ServiceDest"][0]["ReqMode"], "sni", "{answer}");
    assert!(https_ok_within(
        &topo.client,
        &pki,
        "db2.example.test",
        "/z",
        Duration::from_secs(10)
    ));
    // DFP's SNI tutorial: names matched by their beginning and by a regular expression,
    // given in servicePath.
    for (service, path_type, path) in [
        ("test", "req_ssl_sni%20-i%20-m%20beg", "test."),
        ("api", "req_ssl_sni%20-i%20-m%20reg", "%5E(api%5C.)"),
    ] {
        let (status, answer) = dfp(&format!(
            "serviceName={service}&reqMode=sni&pathType={path_type}&servicePath={path}&srcPort=443&port=8443&backends={be}"
        ));
        assert_eq!(status, 200, "{answer}");
    }
    for name in ["test.foobar.net", "api.foobar.net"] {
        assert!(
            https_ok_within(&topo.client, &pki, name, "/sleep", Duration::from_secs(10)),
            "{name}: {:?}",
            https(&topo.client, &pki, name, "/sleep", &[])
        );
        let got = https(&topo.client, &pki, name, "/sleep", &[]);
        assert_eq!(got.body, "tls b0 /sleep proto=\n", "{name}");
    }
    let (status, answer) = dfp(&format!(
        "serviceName=db3&reqMode=sni&serviceDomain=db3.example.test&srcPort=8443&port=8443&backends={be}"
    ));
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "srcPort", "{answer}");

    // Paths mean nothing in TLS lb does not open: refused, naming the field.
    let body = json!({"http": {"domain": "x.example.test", "paths": ["/a"], "tls_passthrough": true}, "backends": [tls_backend.to_string()]});
    let (status, answer) = lb
        .request("PUT", "/v1/services/bad", Some(&body.to_string()))
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "http.tls_passthrough", "{answer}");
    lb.stop().unwrap();
}
