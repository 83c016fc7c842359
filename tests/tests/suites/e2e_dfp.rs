//! Docker Flow Proxy's API, replayed as its users' scripts call it: reconfigure (by GET and
//! POST), traffic, reload, remove; the documented errors, and the documented parameters lb
//! does not honour refused; the configuration as DFP's JSON and as text; instances found
//! through DNS as in Swarm.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    dns::DnsServer,
    eventually,
    lbproc::LbProcess,
    servers::{HttpConn, http_get_once},
    topology::Topology,
};
use serde_json::json;

const T: Duration = Duration::from_secs(3);

#[test]
fn a_tcp_service_reconfigured_the_dfp_way_is_forwarded_by_xdp() {
    // One-armed: the balancer's own address (10.201.0.1) is the VIP of tcp services.
    let topo = Topology::one_armed(2).unwrap();
    let _backends = topo.start_backends(2, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let ips = format!("{},{}", topo.backend_addrs[0], topo.backend_addrs[1]);
    // DFP takes POST as well as GET, parameters in the query either way.
    let (code, body) = lb
        .request(
            "POST",
            &format!("/v1/docker-flow-proxy/reconfigure?serviceName=db&reqMode=tcp&srcPort=5432&port=8080&backends={ips}&distribute=true&colour=blue"),
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["Status"], "OK");
    assert_eq!(body["ServiceName"], "db");
    assert_eq!(body["ServiceDest"][0]["SrcPort"], 5432);
    assert_eq!(body["ServiceDest"][0]["Port"], "8080");
    assert_eq!(body["ServiceDest"][0]["ReqMode"], "tcp");
    // A name DFP does not document is ignored, and said so.
    assert_eq!(
        body["Warnings"],
        json!(["colour: not a Docker Flow Proxy parameter; ignored"])
    );
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
    // DFP's shape: an object keyed by service name.
    assert_eq!(config["db"]["ServiceName"], "db", "{config}");
    assert_eq!(config["db"]["ServiceDest"][0]["ReqMode"], "tcp");
    assert_eq!(config.as_object().unwrap().len(), 1);
    // Without a type: text, for a person to read.
    let (code, text) = lb
        .request("GET", "/v1/docker-flow-proxy/config", None)
        .unwrap();
    let text = text.as_str().unwrap_or_default().to_string();
    assert_eq!(code, 200);
    assert!(
        text.contains("service db") && text.contains("tcp   10.201.0.1:5432"),
        "{text}"
    );
    // reload lists the store again: the same service, still forwarded.
    let (code, body) = lb
        .request("PUT", "/v1/docker-flow-proxy/reload", None)
        .unwrap();
    assert_eq!((code, body["Status"].as_str()), (200, Some("OK")), "{body}");
    assert!(http_get_once(&topo.client, vip, T).is_ok());
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
        // No backends: found through DNS, as in Swarm, on the port given.
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo",
            400,
            "port",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&discoveryType=SRV",
            400,
            "discoveryType",
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
            "reconfigure?serviceName=go-demo&reqMode=udp&port=8080&backends=10.201.0.11",
            400,
            "reqMode",
        ),
        // TLS passed through needs the names it is for.
        (
            "reconfigure?serviceName=go-demo&reqMode=sni&port=8080&backends=10.201.0.11",
            400,
            "serviceDomain",
        ),
        // Documented by DFP, not done by lb: refused, never dropped behind an OK.
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.201.0.11&checkTcp=true",
            400,
            "checkTcp",
        ),
        // Done, and bad values refused naming them.
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.201.0.11&users=admin",
            400,
            "users",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.201.0.11&users=admin:notahash&usersPassEncrypted=true",
            400,
            "users",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.201.0.11&usersSecret=no-such-secret",
            400,
            "usersSecret",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.201.0.11&denyHttp=maybe",
            400,
            "denyHttp",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&srcPort=eighty&port=8080&backends=10.201.0.11",
            400,
            "srcPort",
        ),
        // A listener of its own where lb's API listens: lb could not listen there.
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&srcPort=9090&port=8080&backends=10.201.0.11",
            409,
            "srcPort",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.201.0.11&timeoutServer=soon",
            400,
            "timeoutServer",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.201.0.11&timeoutTunnel=0",
            400,
            "timeoutTunnel",
        ),
        (
            "reconfigure?serviceName=go-demo&reqMode=sni&serviceDomain=db.test&port=8080&backends=10.201.0.11&timeoutServer=5",
            400,
            "timeoutServer",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath.1=/demo&port.1=8080&servicePath.3=/x&backends=10.201.0.11",
            400,
            "servicePath.3",
        ),
        (
            "reconfigure?serviceName=go-demo&servicePath=/demo&pathType=path_reg&port=8080&backends=10.201.0.11",
            400,
            "pathType",
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

/// DFP's own first example, as its docs give it: no backends, the instances are what
/// Swarm's DNS says the service is, here `tasks.go-demo` (`discoveryType=DNS`).
#[test]
fn dfp_s_first_example_finds_its_instances_through_dns() {
    let topo = Topology::two_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    let dns = DnsServer::start_in(&topo.lb, Ipv4Addr::LOCALHOST).unwrap();
    let ip = |i: usize| topo.backend_addrs[i];
    dns.set("tasks.go-demo", &[ip(0), ip(1)]).unwrap();
    let listener = SocketAddr::from(([10, 202, 1, 1], 80));
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--http", &listener.to_string(), "--dns", "127.0.0.1:53"],
    )
    .unwrap();
    let (code, body) = lb
        .request(
            "GET",
            "/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&discoveryType=DNS",
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let be = |i: usize| topo.backend(i, 8080).to_string();
    assert_eq!(body["Backends"], json!([be(0), be(1)]), "{body}");
    let (_, native) = lb.request("GET", "/v1/services/go-demo", None).unwrap();
    assert_eq!(
        native["discovery"],
        json!({"kind": "dns", "service": "tasks.go-demo", "port": 8080})
    );
    let who = |n: usize| -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                let mut c = HttpConn::connect(&topo.client, listener, T).unwrap();
                let (code, body) = c.send("GET", "/demo/hello", "lb", b"").unwrap();
                assert_eq!(code, 200, "{body}");
                body
            })
            .collect()
    };
    assert_eq!(who(10), BTreeSet::from(["be0".into(), "be1".into()]));
    // A task is added: it gets requests without a call to lb.
    dns.set("tasks.go-demo", &[ip(0), ip(1), ip(2)]).unwrap();
    assert!(
        eventually(T, || lb.backends_of("go-demo").len() == 3),
        "{:?}",
        lb.backends_of("go-demo")
    );
    assert_eq!(who(15).len(), 3);

    // allowedMethods: a read-only route; any other method is answered 403, as DFP's
    // HAProxy denies it.
    let (code, body) = lb
        .request(
            "PUT",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?serviceName=reports&servicePath=/reports&port=8080&backends={}&allowedMethods=GET,HEAD",
                topo.backend_addrs[2]
            ),
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["ServiceDest"][0]["AllowedMethods"],
        json!(["GET", "HEAD"])
    );
    let mut c = HttpConn::connect(&topo.client, listener, T).unwrap();
    assert_eq!(c.send("GET", "/reports/x", "lb", b"").unwrap().0, 200);
    let mut c = HttpConn::connect(&topo.client, listener, T).unwrap();
    let (code, text) = c.send("POST", "/reports/x", "lb", b"{}").unwrap();
    assert_eq!(code, 403, "{text}");

    // outboundHostname: a service running elsewhere, found under that host name.
    dns.set("legacy.example.internal", &[ip(2)]).unwrap();
    let (code, body) = lb
        .request(
            "GET",
            "/v1/docker-flow-proxy/reconfigure?serviceName=legacy&servicePath=/legacy&port=8080&outboundHostname=legacy.example.internal",
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["Backends"], json!([be(2)]), "{body}");
    let mut c = HttpConn::connect(&topo.client, listener, T).unwrap();
    assert_eq!(
        c.send("GET", "/legacy/x", "lb", b"").unwrap(),
        (200, "be2".to_string())
    );
}

/// A Docker secret (`/run/secrets/dfp_users_NAME`) for a test, removed on drop, with
/// `/run/secrets` itself if the test made it.
struct SecretFile {
    path: std::path::PathBuf,
    made_dir: bool,
}

impl SecretFile {
    fn write(name: &str, text: &str) -> Self {
        let dir = std::path::Path::new("/run/secrets");
        let made_dir = !dir.exists();
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("dfp_users_{name}"));
        std::fs::write(&path, text).unwrap();
        Self { path, made_dir }
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if self.made_dir {
            let _ = std::fs::remove_dir(std::path::Path::new("/run/secrets"));
        }
    }
}

/// DFP's basic auth examples: `users` in the clear, hashes from `mkpasswd -m sha-512`
/// (`usersPassEncrypted`), and users read from a Docker secret (`usersSecret`). Only those
/// users get through; the store keeps hashes, never a password.
#[test]
fn dfp_users_guard_a_service_with_basic_auth() {
    let topo = Topology::one_armed(1).unwrap();
    let _backends = topo.start_backends(1, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let be = topo.backend_addrs[0];
    // `openssl passwd -6 -salt saltsaltsalt password1`, as `mkpasswd -m sha-512` makes it.
    let hash = "$6$saltsaltsalt$u9YMl6Ha1eAa1Vl5wiqeJes.HljTizdGIGgmTGTX4Tifu8VM14tmnqb7HK/0z6d7vd3lK1IoYHYI4qJIBNIUk.";
    let secret = lb_tests::unique("lbt");
    let secret_file = SecretFile::write(&secret, &format!("carol:{hash}\ndave:{hash}\n"));
    let reconfigure = |q: &str| {
        let (code, body) = lb
            .request(
                "GET",
                &format!("/v1/docker-flow-proxy/reconfigure?port=8080&backends={be}&{q}"),
                None,
            )
            .unwrap();
        assert_eq!(code, 200, "{q}: {body}");
    };
    reconfigure("serviceName=plain&servicePath=/plain&users=admin:s3cret,bob:pa:ss");
    reconfigure(&format!(
        "serviceName=hashed&servicePath=/hashed&usersPassEncrypted=true&users=erin:{}",
        hash.replace('$', "%24")
    ));
    reconfigure(&format!(
        "serviceName=secret&servicePath=/secret&usersPassEncrypted=true&usersSecret={secret}"
    ));
    drop(secret_file);
    let get = |path: &str, user: Option<&str>| {
        let mut args = vec!["-D", "-"];
        if let Some(u) = user {
            args.extend(["-u", u]);
        }
        let url = format!("http://{}{path}", topo.vip);
        args.push(&url);
        lb_tests::curl::curl(&topo.client, &args)
    };
    for (path, good, bad) in [
        ("/plain/x", "admin:s3cret", "admin:secret"),
        ("/plain/x", "bob:pa:ss", "bob:s3cret"),
        ("/hashed/x", "erin:password1", "erin:password2"),
        ("/secret/x", "carol:password1", "carol:s3cret"),
        ("/secret/x", "dave:password1", "admin:s3cret"),
    ] {
        assert_eq!(get(path, Some(good)).status, 200, "{path} {good}");
        let refused = get(path, Some(bad));
        assert_eq!(refused.status, 401, "{path} {bad}: {refused:?}");
        let none = get(path, None);
        assert_eq!(none.status, 401, "{path}: {none:?}");
        let service = path.split('/').nth(1).unwrap();
        assert!(
            none.body
                .contains(&format!("www-authenticate: Basic realm=\"{service}\"")),
            "{none:?}"
        );
    }
    // Five tries, each refused twice (wrong credentials, none): lb's own 401s, counted.
    let (_, stats) = lb.request("GET", "/v1/stats", None).unwrap();
    assert!(
        stats["http"]["answers"]["401"].as_u64().unwrap() == 10,
        "{stats}"
    );
    // The same counters for Prometheus.
    let (code, metrics) = lb.request("GET", "/metrics", None).unwrap();
    let text = metrics.as_str().unwrap_or_default();
    assert_eq!(code, 200, "{text}");
    for family in [
        "lb_http_requests_total{service=\"plain\"}",
        "lb_http_answers_total{status=\"401\"}",
        "lb_xdp_drops_total{reason=",
        "lb_services 3",
        "# EOF",
    ] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }
    // What is kept is a hash: the clear password is nowhere in the service or DFP's view.
    let (_, svc) = lb.request("GET", "/v1/services/plain", None).unwrap();
    let users = &svc["http"]["users"];
    assert_eq!(users[0]["name"], "admin", "{svc}");
    assert!(
        users[0]["password_hash"]
            .as_str()
            .unwrap()
            .starts_with("$6$")
    );
    assert!(!svc.to_string().contains("s3cret"), "{svc}");
    let (_, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert!(!config.to_string().contains("s3cret"), "{config}");
}

/// DFP's rewriting parameters: headers added, set and deleted both ways, and the path the
/// backend is asked for rewritten (`reqPathSearchReplace`); what lb cannot do as asked
/// (HAProxy expressions, framing headers, a bad expression) is refused naming it.
#[test]
fn dfp_header_and_path_rewrites_reach_the_backend_and_the_client() {
    let topo = Topology::one_armed(1).unwrap();
    let _backends = topo.start_backends(1, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let be = topo.backend_addrs[0];
    let reconfigure = |q: &str| {
        lb.request(
            "GET",
            &format!("/v1/docker-flow-proxy/reconfigure?serviceName=rw&servicePath=/rw&port=8080&backends={be}&{q}"),
            None,
        )
        .unwrap()
    };
    for (q, field) in [
        ("addReqHeader=X-Port%20%25%5Bdst_port%5D", "addReqHeader"),
        ("setReqHeader=Content-Length%205", "setReqHeader"),
        ("delResHeader=Transfer-Encoding", "delResHeader"),
        ("addResHeader=NoValue", "addResHeader"),
        ("reqPathSearchReplace=(%5B,x", "reqPathSearchReplace"),
    ] {
        let (code, body) = reconfigure(q);
        assert_eq!(
            (code, body["field"].as_str()),
            (400, Some(field)),
            "{q}: {body}"
        );
    }
    let (code, body) = reconfigure(
        "addReqHeader=X-Added%20one,X-Also:%20two&setReqHeader=X-Set-Me%20new&delReqHeader=X-Drop-Me\
         &addResHeader=X-Res-Added%20yes&setResHeader=X-Backend%20hidden&delResHeader=Content-Type\
         &reqPathSearchReplace=%5E/rw/(%5Ba-z%5D%2B)/,/v2/%5C1/",
    );
    assert_eq!(code, 200, "{body}");
    let url = format!("http://{}/rw/api/headers?q=1", topo.vip);
    let c = lb_tests::curl::curl(
        &topo.client,
        &["-D", "-", "-H", "X-Drop-Me: 1", "-H", "X-Set-Me: old", &url],
    );
    assert_eq!(c.status, 200, "{c:?}");
    let seen = c.body.to_ascii_lowercase();
    // The backend echoes the request it got after the response head curl dumped.
    assert!(seen.contains("get /v2/api/headers?q=1 http/1.1"), "{seen}");
    for line in [
        "x-added: one",
        "x-also: two",
        "x-set-me: new",
        "x-res-added: yes",
        "x-backend: hidden",
    ] {
        assert!(seen.contains(line), "{line} missing: {seen}");
    }
    for gone in [
        "x-drop-me",
        "x-set-me: old",
        "content-type",
        "x-backend: be0",
    ] {
        assert!(!seen.contains(gone), "{gone} still there: {seen}");
    }
    // The native view of the same service.
    let (_, svc) = lb.request("GET", "/v1/services/rw", None).unwrap();
    assert_eq!(
        svc["http"]["path_rewrite"],
        json!([{"search": "^/rw/([a-z]+)/", "replace": "/v2/${1}/"}])
    );
    assert_eq!(
        svc["http"]["request_headers"]["delete"],
        json!(["X-Drop-Me"])
    );
}

#[test]
fn dfp_service_header_and_user_agent_route_one_path_to_several_services() {
    let topo = Topology::one_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let reconfigure = |name: &str, i: usize, q: &str| {
        let be = topo.backend_addrs[i];
        lb.request(
            "GET",
            &format!("/v1/docker-flow-proxy/reconfigure?serviceName={name}&servicePath=/demo&port=8080&backends={be}{q}"),
            None,
        )
        .unwrap()
    };
    // DFP's examples: the same path for everyone, version 2 for requests that say so,
    // and another service for some user agents.
    for (name, i, q) in [
        ("demo", 0, ""),
        ("demo-v2", 1, "&serviceHeader=X-Version:2,name:viktor"),
        ("demo-bots", 2, "&userAgent=googlebot,iphone"),
    ] {
        let (code, body) = reconfigure(name, i, q);
        assert_eq!(code, 200, "{name}: {body}");
    }
    let url = format!("http://{}/demo", topo.vip);
    let get = |headers: &[&str]| {
        let mut args: Vec<&str> = headers.iter().flat_map(|h| ["-H", *h]).collect();
        args.push(&url);
        let c = lb_tests::curl::curl(&topo.client, &args);
        assert_eq!(c.status, 200, "{headers:?}: {c:?}");
        c.body
    };
    assert_eq!(get(&[]), "be0");
    assert_eq!(get(&["X-Version: 2", "name: viktor"]), "be1");
    // Every header must be there, with its value.
    assert_eq!(get(&["X-Version: 2"]), "be0");
    assert_eq!(get(&["X-Version: 3", "name: viktor"]), "be0");
    assert_eq!(
        get(&["User-Agent: Mozilla/5.0 (compatible; Googlebot/2.1)"]),
        "be2"
    );
    assert_eq!(
        get(&["User-Agent: Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)"]),
        "be2"
    );
    assert_eq!(get(&["User-Agent: curl/8"]), "be0");

    // A second unconditional service on the same path is still refused by its claim.
    let (code, body) = reconfigure("demo-again", 1, "");
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("servicePath")),
        "{body}"
    );
    // redirectFromDomain: requests for the old names go to the service's domain, same
    // path and query, with a 301.
    let (code, body) = lb
        .request(
            "GET",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?serviceName=site&serviceDomain=example.test&port=8080&backends={}&redirectFromDomain=www.example.test,old.example.test",
                topo.backend_addrs[0]
            ),
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    for host in ["www.example.test", "OLD.example.test:80"] {
        let c = lb_tests::curl::curl(
            &topo.client,
            &[
                "-H",
                &format!("Host: {host}"),
                &format!("http://{}/a/b?c=1", topo.vip),
            ],
        );
        assert_eq!(
            (c.status, c.location.as_str()),
            (301, "http://example.test/a/b?c=1"),
            "{host}: {c:?}"
        );
    }
    let c = lb_tests::curl::curl(
        &topo.client,
        &[
            "-H",
            "Host: example.test",
            &format!("http://{}/a", topo.vip),
        ],
    );
    assert_eq!((c.status, c.body.as_str()), (200, "be0"), "{c:?}");
    let (code, body) = reconfigure("bad", 1, "&serviceHeader=NoColon");
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("serviceHeader")),
        "{body}"
    );
    lb.stop().unwrap();
}

#[test]
fn dfp_several_domains_subdomains_by_algo_and_wildcard_domains_route_by_host() {
    let topo = Topology::one_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let reconfigure = |name: &str, i: usize, q: &str| {
        let be = topo.backend_addrs[i];
        lb.request(
            "GET",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?serviceName={name}&port=8080&backends={be}{q}"
            ),
            None,
        )
        .unwrap()
    };
    for (name, i, q) in [
        ("shop", 0, "&serviceDomain=shop.test,store.test"),
        (
            "docs",
            1,
            "&serviceDomain=docs.test&serviceDomainAlgo=hdr_dom(host)",
        ),
        // DFP's wildcard: any host ending so.
        // srcPort naming lb's own --http port (80 here) is where it serves anyway.
        ("tail", 2, "&serviceDomain=*example.test&srcPort=80"),
    ] {
        let (code, body) = reconfigure(name, i, q);
        assert_eq!(code, 200, "{name}: {body}");
    }
    let get = |host: &str| {
        let c = lb_tests::curl::curl(
            &topo.client,
            &[
                "-H",
                &format!("Host: {host}"),
                &format!("http://{}/x", topo.vip),
            ],
        );
        (c.status, c.body)
    };
    for (host, to) in [
        ("shop.test", "be0"),
        ("STORE.test:80", "be0"),
        ("docs.test", "be1"),
        ("api.docs.test", "be1"),
        ("example.test", "be2"),
        ("www.example.test", "be2"),
        ("myexample.test", "be2"),
    ] {
        assert_eq!(get(host), (200, to.to_string()), "{host}");
    }
    for host in ["www.shop.test", "docs.test.evil", "example.test.evil"] {
        assert_eq!(get(host).0, 404, "{host}");
    }
    // Each name is claimed: another service cannot take store.test.
    let (code, body) = reconfigure("store", 1, "&serviceDomain=store.test");
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("serviceDomain")),
        "{body}"
    );
    assert_eq!(get("store.test"), (200, "be0".to_string()));
    // What lb does not compare is refused, naming the parameter.
    for algo in ["req.ssl_sni", "hdr_beg(host)", "hdr(x-host)"] {
        let (code, body) = reconfigure(
            "odd",
            1,
            &format!("&serviceDomain=odd.test&serviceDomainAlgo={algo}"),
        );
        assert_eq!(
            (code, body["field"].as_str()),
            (400, Some("serviceDomainAlgo")),
            "{algo}: {body}"
        );
    }
    let (_, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert_eq!(
        config["shop"]["ServiceDest"][0]["ServiceDomain"],
        json!(["shop.test", "store.test"])
    );
    let (_, svc) = lb.request("GET", "/v1/services/docs", None).unwrap();
    assert_eq!(svc["http"]["domain"], json!(["docs.test", "*.docs.test"]));
    // DFP's per-service timeouts, in seconds, are the route's own (tested at work in
    // lb-userspace's l7_limits).
    let (code, body) = reconfigure(
        "slow",
        1,
        "&serviceDomain=slow.test&timeoutServer=90&timeoutTunnel=7200",
    );
    assert_eq!(code, 200, "{body}");
    // compressionAlgo/compressionType: the backends' text/plain gzipped for curl.
    let (code, body) = reconfigure(
        "zip",
        1,
        "&serviceDomain=zip.test&compressionAlgo=gzip&compressionType=text/html%20text/plain",
    );
    assert_eq!(code, 200, "{body}");
    let c = lb_tests::curl::curl(
        &topo.client,
        &[
            "--compressed",
            "-D",
            "-",
            "-H",
            "Host: zip.test",
            &format!("http://{}/x", topo.vip),
        ],
    );
    let (head, body) = c.body.split_once("\r\n\r\n").expect("a head");
    assert!(
        head.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{head}"
    );
    assert_eq!(body, "be1");
    for (q, field) in [
        ("&compressionAlgo=br", "compressionAlgo"),
        ("&compressionType=text/html", "compressionAlgo"),
        (
            "&compressionAlgo=gzip&compressionType=html",
            "compressionType",
        ),
    ] {
        let (code, body) = reconfigure("zip2", 1, &format!("&serviceDomain=zip2.test{q}"));
        assert_eq!(
            (code, body["field"].as_str()),
            (400, Some(field)),
            "{q}: {body}"
        );
    }
    let (_, svc) = lb.request("GET", "/v1/services/slow", None).unwrap();
    assert_eq!(
        (
            &svc["http"]["server_timeout_ms"],
            &svc["http"]["tunnel_timeout_ms"]
        ),
        (&json!(90_000), &json!(7_200_000))
    );
    // DFP's view shows them as DFP keeps them.
    let (_, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert_eq!(
        (
            &config["slow"]["TimeoutServer"],
            &config["slow"]["TimeoutTunnel"]
        ),
        (&json!("90"), &json!("7200"))
    );
    assert_eq!(
        (
            &config["zip"]["CompressionAlgo"],
            &config["zip"]["CompressionType"]
        ),
        (&json!("gzip"), &json!("text/html text/plain"))
    );
    lb.stop().unwrap();
}

/// DFP's `sessionType=sticky-server`: lb inserts a cookie named after the service that
/// names the backend that answered; a client that sends it back stays there, and the
/// backend never sees it.
#[test]
fn dfp_sticky_server_keeps_a_client_on_its_backend_by_a_cookie_lb_inserts() {
    let topo = Topology::one_armed(3).unwrap();
    let _backends = topo.start_backends(3, 8080, false).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let backends: Vec<String> = topo.backend_addrs.iter().map(ToString::to_string).collect();
    let (code, body) = lb
        .request(
            "GET",
            &format!(
                "/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends={}&sessionType=sticky-server",
                backends.join(",")
            ),
            None,
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let url = format!("http://{}/demo", topo.vip);
    // (body, the Set-Cookie pair if any, Cache-Control) of one request.
    let get = |cookie: Option<&str>, url: &str| {
        let mut args = vec!["-D", "-"];
        let header;
        if let Some(c) = cookie {
            header = format!("Cookie: {c}");
            args.extend(["-H", &header]);
        }
        args.push(url);
        let c = lb_tests::curl::curl(&topo.client, &args);
        assert_eq!(c.status, 200, "{c:?}");
        let (head, body) = c.body.split_once("\r\n\r\n").expect("a head");
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let set = header("set-cookie").map(|v| v.split(';').next().unwrap().to_string());
        (body.to_string(), set, header("cache-control"))
    };
    let (first, set, cache) = get(None, &url);
    let pair = set.expect("a sticky cookie");
    assert!(pair.starts_with("go-demo="), "{pair}");
    assert_eq!(cache.as_deref(), Some("private"));
    for _ in 0..8 {
        let (body, set, _) = get(Some(&format!("theme=dark; {pair}")), &url);
        assert_eq!((body.as_str(), set), (first.as_str(), None));
    }
    // Without it, requests spread as before.
    let spread: std::collections::BTreeSet<String> = (0..6).map(|_| get(None, &url).0).collect();
    assert!(spread.len() >= 2, "{spread:?}");
    // The backend gets the client's other cookies, not lb's.
    let (echo, _, _) = get(
        Some(&format!("theme=dark; {pair}")),
        &format!("{url}/headers"),
    );
    let echo = echo.to_ascii_lowercase();
    assert!(echo.contains("cookie: theme=dark"), "{echo}");
    assert!(!echo.contains("go-demo="), "{echo}");
    // A value lb did not give (a backend since gone) is replaced.
    let (_, set, _) = get(Some("go-demo=0123456789abcdef"), &url);
    assert!(set.is_some_and(|s| s.starts_with("go-demo=")));
    let (_, svc) = lb.request("GET", "/v1/services/go-demo", None).unwrap();
    assert_eq!(svc["http"]["sticky_cookie"], "go-demo");
    let (_, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert_eq!(config["go-demo"]["SessionType"], "sticky-server");
    lb.stop().unwrap();
}

#[test]
fn dfp_indexed_destinations_are_served_each_and_removed_together() {
    // One service, two ports of its instances: HTTP on 8080 under /app, and on 9090 a
    // tcp destination on the balancer's port 5433 (DFP's `.N` forms).
    let topo = Topology::one_armed(1).unwrap();
    let _web = topo.start_backends(1, 8080, false).unwrap();
    let other = topo.backend(0, 9090);
    let _admin = lb_tests::servers::Backend::start(
        &topo.backends[0],
        "be0-9090",
        SocketAddr::from(other),
        None,
    )
    .unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let be = topo.backend_addrs[0];
    let reconfigure = |q: &str| {
        lb.request(
            "GET",
            &format!("/v1/docker-flow-proxy/reconfigure?serviceName=multi&backends={be}{q}"),
            None,
        )
        .unwrap()
    };
    let get = |path: &str| {
        let c = lb_tests::curl::curl(&topo.client, &[&format!("http://{}{path}", topo.vip)]);
        (c.status, c.body)
    };
    let tcp = SocketAddr::from(([10, 201, 0, 1], 5433));

    // The plain form first: one destination, the service itself.
    let (code, body) = reconfigure("&servicePath=/old&port=8080");
    assert_eq!(code, 200, "{body}");
    assert_eq!(get("/old/x"), (200, "be0".to_string()));

    // Then two indexed destinations; the plain `port` stands for the one `.1` leaves out.
    let (code, body) =
        reconfigure("&port=8080&servicePath.1=/app&reqMode.2=tcp&srcPort.2=5433&port.2=9090");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ServiceName"], "multi");
    let dests = body["ServiceDest"].as_array().unwrap();
    assert_eq!(dests.len(), 2, "{body}");
    assert_eq!(
        (&dests[0]["Index"], &dests[0]["ReqMode"], &dests[0]["Port"]),
        (&json!(1), &json!("http"), &json!("8080"))
    );
    assert_eq!(
        (
            &dests[1]["Index"],
            &dests[1]["ReqMode"],
            &dests[1]["SrcPort"]
        ),
        (&json!(2), &json!("tcp"), &json!(5433))
    );
    assert_eq!(get("/app/x"), (200, "be0".to_string()));
    assert_eq!(http_get_once(&topo.client, tcp, T).unwrap(), "be0-9090");
    // The plain destination is gone, replaced by the indexed ones: its path answers 503,
    // as any removed service's does, with no backend behind it.
    let old = get("/old/x");
    assert_eq!(old.0, 503, "{old:?}");
    // Each destination is a native service of its own.
    let (code, native) = lb.request("GET", "/v1/services/multi.2", None).unwrap();
    assert_eq!(
        (code, native["vip"].as_str()),
        (200, Some("10.201.0.1:5433"))
    );
    assert_eq!(
        lb.request("GET", "/v1/services/multi", None).unwrap().0,
        404
    );
    // DFP's configuration shows one service with both destinations.
    let (_, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert_eq!(config.as_object().unwrap().len(), 1, "{config}");
    assert_eq!(config["multi"]["ServiceDest"].as_array().unwrap().len(), 2);

    // A refused destination changes nothing, and is named as given: here `.2` asks for
    // the path `.1` has.
    let (code, body) = reconfigure("&port=8080&servicePath.1=/app&servicePath.2=/app");
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("servicePath.2")),
        "{body}"
    );
    let (code, body) = reconfigure("&servicePath.1=/app&port.1=8080&port.2=zero&servicePath.2=/z");
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("port.2")),
        "{body}"
    );
    let (code, body) = reconfigure("&port=8080&servicePath.1=/app&servicePath.3=/c");
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("servicePath.3")),
        "{body}"
    );
    assert_eq!(get("/app/x"), (200, "be0".to_string()));
    assert_eq!(http_get_once(&topo.client, tcp, T).unwrap(), "be0-9090");

    // One destination fewer: `.2` goes.
    let (code, body) = reconfigure("&port=8080&servicePath.1=/app");
    assert_eq!(code, 200, "{body}");
    assert!(http_get_once(&topo.client, tcp, Duration::from_millis(500)).is_err());
    assert_eq!(
        lb.request("GET", "/v1/services/multi.2", None).unwrap().0,
        404
    );

    // remove takes the service with every destination.
    let (code, body) = lb
        .request(
            "GET",
            "/v1/docker-flow-proxy/remove?serviceName=multi",
            None,
        )
        .unwrap();
    assert_eq!((code, body["Message"].as_str()), (200, Some("")), "{body}");
    assert_eq!(get("/app/x").0, 503);
    assert_eq!(
        lb.request("GET", "/v1/services/multi.1", None).unwrap().0,
        404
    );
}

#[test]
fn dfp_src_port_serves_http_destinations_on_listeners_of_their_own() {
    // DFP opens a frontend per `srcPort`: lb opens an HTTP listener on that port while a
    // route asks for it. Two services share the path /demo, one on lb's HTTP port 80 and
    // one on 8081, each with its own backend.
    let topo = Topology::one_armed(1).unwrap();
    let _web = topo.start_backends(1, 8080, false).unwrap();
    let _admin = lb_tests::servers::Backend::start(
        &topo.backends[0],
        "be0-9090",
        SocketAddr::from(topo.backend(0, 9090)),
        None,
    )
    .unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    let be = topo.backend_addrs[0];
    let reconfigure = |name: &str, q: &str| {
        lb.request(
            "GET",
            &format!("/v1/docker-flow-proxy/reconfigure?serviceName={name}&backends={be}{q}"),
            None,
        )
        .unwrap()
    };
    let get = |port: u16, path: &str| {
        let c = lb_tests::curl::curl(
            &topo.client,
            &[&format!("http://{}:{port}{path}", topo.vip)],
        );
        (c.status, c.body)
    };
    let refused = |port: u16| {
        let addr = SocketAddr::from((topo.vip, port));
        http_get_once(&topo.client, addr, Duration::from_millis(500)).is_err()
    };

    let (code, body) = reconfigure("side", "&servicePath=/demo&srcPort=8081&port=8080");
    assert_eq!(code, 200, "{body}");
    let (code, body) = reconfigure("main", "&servicePath=/demo&srcPort=80&port=9090");
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(8081, "/demo/x"), (200, "be0".to_string()));
    assert_eq!(get(80, "/demo/x"), (200, "be0-9090".to_string()));
    // Natively, `http.port`; the --http listener's own port is stored as none.
    let (_, side) = lb.request("GET", "/v1/services/side", None).unwrap();
    assert_eq!(side["http"]["port"], 8081, "{side}");
    let (_, main) = lb.request("GET", "/v1/services/main", None).unwrap();
    assert!(main["http"].get("port").is_none(), "{main}");
    let (_, config) = lb
        .request("GET", "/v1/docker-flow-proxy/config?type=json", None)
        .unwrap();
    assert_eq!(
        config["side"]["ServiceDest"][0]["SrcPort"], 8081,
        "{config}"
    );

    // A path taken on the same port is refused and changes nothing.
    let (code, body) = reconfigure("dup", "&servicePath=/demo&srcPort=8081&port=9090");
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("servicePath")),
        "{body}"
    );
    assert_eq!(get(8081, "/demo/x"), (200, "be0".to_string()));

    // DFP's indexed form: one destination per port; each port routes only its own.
    let (code, body) = reconfigure(
        "multi",
        "&servicePath.1=/a&srcPort.1=8082&port.1=8080&servicePath.2=/b&port.2=9090",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(8082, "/a"), (200, "be0".to_string()));
    assert_eq!(get(80, "/b"), (200, "be0-9090".to_string()));
    assert_eq!(get(8082, "/b").0, 404);
    assert_eq!(get(80, "/a").0, 404);

    // Moved to another port: the old one closes once no route asks for it.
    let (code, body) = reconfigure("side", "&servicePath=/demo&srcPort=8083&port=8080");
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(8083, "/demo/x"), (200, "be0".to_string()));
    assert!(refused(8081), "8081 still listens");
    // Removed: its port closes too; the others stay.
    let (code, _) = lb
        .request("GET", "/v1/docker-flow-proxy/remove?serviceName=side", None)
        .unwrap();
    assert_eq!(code, 200);
    assert!(refused(8083), "8083 still listens");
    assert_eq!(get(8082, "/a"), (200, "be0".to_string()));
    assert_eq!(get(80, "/demo/x"), (200, "be0-9090".to_string()));
}
