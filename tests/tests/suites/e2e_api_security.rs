//! Nobody reconfigures lb without the right to: the API token (bearer or basic auth), the
//! loopback-only rule without one, `--api-read-open`, the browser guards (a cross-site GET
//! of DFP's `reconfigure` is refused and changes nothing), the Unix socket; and a fuzz test
//! of the API (random bodies, DFP queries and paths): never a 5xx, never a dropped
//! connection, and no change on a 4xx.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    fuzz_rng::Rng,
    lbproc::{LbProcess, lb_bin, output_within},
    netns::{Netns, in_netns},
    rawhttp::{self, Answer, Target},
    topology::Topology,
    unique,
};
use serde_json::{Value, json};

const TOKEN: &str = "0123456789abcdef-token";

/// A directory of the test's own (token files, sockets), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("lbt-api-"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A file holding `text`, with `mode`.
    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A request with these headers (Host 127.0.0.1:9090 unless given), answered.
fn call(
    lb: &LbProcess,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    let mut all: Vec<(&str, &str)> = Vec::new();
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        all.push(("Host", "127.0.0.1:9090"));
    }
    all.extend_from_slice(headers);
    lb.raw(rawhttp::request(
        method,
        target,
        &all,
        body.map(str::as_bytes),
    ))
    .unwrap()
}

/// Every service, read with the token.
fn services(lb: &LbProcess) -> Value {
    let bearer = format!("Bearer {TOKEN}");
    let answer = call(
        lb,
        "GET",
        "/v1/services",
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    answer.json()
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

const WEB: &str = r#"{"vip": "10.202.9.100:80", "backends": ["10.202.2.11:8080"]}"#;
const RECONFIGURE: &str = "/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo&port=8080&backends=10.202.2.11";

#[test]
fn without_the_token_a_call_is_a_401_and_with_it_as_bearer_or_basic_auth_it_succeeds() {
    let dir = TempDir::new();
    let token_file = dir.file("token", &format!("{TOKEN}\n"), 0o600);
    let topo = Topology::two_armed(1).unwrap();
    // With a token the API may listen beyond loopback.
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &[
            "--api",
            "0.0.0.0:9090",
            "--api-token-file",
            arg(&token_file),
        ],
    )
    .unwrap();
    let before = services(&lb);
    let bearer = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {TOKEN}x");
    for auth in [
        None,
        Some(wrong.as_str()),
        Some("Bearer "),
        Some(&*basic("lb", "nope")),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        for (method, target, body) in [
            ("PUT", "/v1/services/web", Some(WEB)),
            ("DELETE", "/v1/services/web", None),
            ("GET", RECONFIGURE, None),
            (
                "GET",
                "/v1/docker-flow-proxy/remove?serviceName=go-demo",
                None,
            ),
            ("GET", "/v1/services", None),
            ("GET", "/v1/stats", None),
        ] {
            let answer = call(&lb, method, target, &headers, body);
            let v = answer.json();
            assert_eq!(answer.status, 401, "{method} {target} with {auth:?}: {v}");
            assert_eq!(v["field"], "Authorization", "{v}");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            let challenges = answer.header_values("www-authenticate").join(", ");
            assert!(
                challenges.contains("Bearer") && challenges.contains("Basic"),
                "{challenges:?}"
            );
        }
    }
    assert_eq!(
        services(&lb),
        before,
        "a call without the token changed something"
    );
    // Liveness probes need none.
    assert_eq!(call(&lb, "GET", "/health", &[], None).status, 200);
    assert_eq!(call(&lb, "GET", "/ready", &[], None).status, 200);

    // Bearer.
    let answer = call(
        &lb,
        "PUT",
        "/v1/services/web",
        &[("Authorization", &bearer)],
        Some(WEB),
    );
    assert_eq!(answer.status, 200, "{}", answer.json());
    // Basic auth, any user name, as DFP clients send it from `http://user:TOKEN@host/...`.
    let answer = call(
        &lb,
        "GET",
        RECONFIGURE,
        &[("Authorization", &basic("deploy", TOKEN))],
        None,
    );
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(answer.json()["Status"], "OK");
    // The same through a URL with the token in it, as a deploy script writes it.
    let url = format!(
        "http://deploy:{TOKEN}@127.0.0.1:9090/v1/docker-flow-proxy/remove?serviceName=go-demo"
    );
    let status = in_netns(lb.ns_path(), move || {
        ureq::get(&url)
            .call()
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    });
    assert_eq!(status, Ok(200));
    let names: Vec<Value> = services(&lb)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("web")]);
    assert_eq!(
        call(
            &lb,
            "DELETE",
            "/v1/services/web",
            &[("Authorization", &bearer)],
            None
        )
        .status,
        204
    );
    assert_eq!(services(&lb), json!([]));
}

#[test]
fn a_cross_site_reconfigure_is_refused_and_changes_nothing() {
    let topo = Topology::two_armed(1).unwrap();
    // No token: the API on loopback, which a browser on the host reaches all the same.
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    lb.put_service("kept", &serde_json::from_str(WEB).unwrap())
        .unwrap();
    let before = services(&lb);
    let remove = "/v1/docker-flow-proxy/remove?serviceName=kept";
    let browser_attacks: [(&[(&str, &str)], &str); 5] = [
        (&[("Sec-Fetch-Site", "cross-site")], "Sec-Fetch-Site"),
        (&[("Sec-Fetch-Site", "same-site")], "Sec-Fetch-Site"),
        (&[("Origin", "http://evil.example")], "Origin"),
        (&[("Origin", "null")], "Origin"),
        // DNS rebinding: evil.example now resolves to 127.0.0.1, and the page is same-origin.
        (
            &[
                ("Host", "evil.example:9090"),
                ("Origin", "http://evil.example:9090"),
                ("Sec-Fetch-Site", "same-origin"),
            ],
            "Host",
        ),
    ];
    for (headers, field) in browser_attacks {
        for target in [RECONFIGURE, remove] {
            let answer = call(&lb, "GET", target, headers, None);
            let v = answer.json();
            assert_eq!(answer.status, 403, "{target} {headers:?}: {v}");
            assert_eq!(v["field"], field, "{v}");
            assert_eq!(v["Status"], "NOK", "{v}");
            assert_eq!(
                services(&lb),
                before,
                "{target} {headers:?} changed the services"
            );
        }
        // The native API's writes too.
        let answer = call(&lb, "DELETE", "/v1/services/kept", headers, None);
        assert_eq!(
            (answer.status, answer.json()["field"].clone()),
            (403, json!(field))
        );
    }
    assert_eq!(services(&lb), before);
    // What the guards let through: a page of the API's own origin, and a script (no browser
    // headers).
    let same_origin = [
        ("Origin", "http://127.0.0.1:9090"),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let answer = call(&lb, "GET", RECONFIGURE, &same_origin, None);
    assert_eq!(answer.status, 200, "{}", answer.json());
    let answer = call(&lb, "GET", remove, &[], None);
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(services(&lb).as_array().unwrap().len(), 1);
}

#[test]
fn api_host_names_the_dns_names_the_api_answers_to() {
    let topo = Topology::two_armed(1).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--api-host", "LB.internal"]).unwrap();
    let put =
        |host: &str| call(&lb, "PUT", "/v1/services/web", &[("Host", host)], Some(WEB)).status;
    assert_eq!(put("lb.internal:9090"), 200);
    assert_eq!(put("localhost:9090"), 200);
    assert_eq!(put("lb.internal.evil.example:9090"), 403);
    // HTTP/1.0 sends no Host: no browser does that, so it is let through.
    let answer = lb
        .raw(b"DELETE /v1/services/web HTTP/1.0\r\n\r\n".to_vec())
        .unwrap();
    assert_eq!(answer.status, 204, "{}", answer.json());
}

#[test]
fn read_open_lets_reads_through_without_the_token_but_no_change() {
    let dir = TempDir::new();
    let token_file = dir.file("token", TOKEN, 0o400);
    let topo = Topology::two_armed(1).unwrap();
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--api-token-file", arg(&token_file), "--api-read-open"],
    )
    .unwrap();
    let bearer = format!("Bearer {TOKEN}");
    let answer = call(
        &lb,
        "PUT",
        "/v1/services/web",
        &[("Authorization", &bearer)],
        Some(WEB),
    );
    assert_eq!(answer.status, 200);
    let before = services(&lb);
    for read in [
        "/v1/services",
        "/v1/services/web",
        "/v1/stats",
        "/v1/docker-flow-proxy/config?type=json",
        "/v1/docker-flow-proxy/ping",
    ] {
        let answer = call(&lb, "GET", read, &[], None);
        assert_eq!(answer.status, 200, "{read}: {}", answer.json());
    }
    assert_eq!(call(&lb, "GET", "/v1/services", &[], None).json(), before);
    for (method, target, body) in [
        (
            "PUT",
            "/v1/services/web",
            Some(r#"{"vip": "10.202.9.100:81", "backends": ["10.202.2.11:8080"]}"#),
        ),
        ("PUT", "/v1/services/other", Some(WEB)),
        ("DELETE", "/v1/services/web", None),
        ("GET", RECONFIGURE, None),
        ("GET", "/v1/docker-flow-proxy/remove?serviceName=web", None),
    ] {
        let answer = call(&lb, method, target, &[], body);
        assert_eq!(answer.status, 401, "{method} {target}: {}", answer.json());
        assert_eq!(
            services(&lb),
            before,
            "{method} {target} changed the services"
        );
    }
}

/// `lb run` with `args` in a namespace of its own: its exit code and stderr. It must exit at
/// once, before it has attached or pinned anything.
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    let ns = Netns::new(&unique("lbt-x")).unwrap();
    let bpffs = format!("/sys/fs/bpf/{}", unique("lbt-never"));
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path()))
        .arg(lb_bin())
        .args(["run", "--iface", "lo", "--bpffs", &bpffs])
        .args(args)
        .env("RUST_LOG", "off");
    let out = output_within(&mut cmd, Duration::from_secs(20)).unwrap();
    assert!(
        !Path::new(&bpffs).exists(),
        "a refused start pinned {bpffs}"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lb_refuses_a_non_loopback_api_without_a_token_and_a_token_file_others_can_read() {
    let (code, err) = refused_start(&["--api", "0.0.0.0:9090"]);
    assert_ne!(code, Some(0));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("0.0.0.0:9090")
            && err.contains("--api-token-file")
            && err.contains("--api-insecure"),
        "{err}"
    );
    let (code, err) = refused_start(&["--api", "10.9.9.9:9090"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("--api-insecure"), "{err}");

    let dir = TempDir::new();
    for (mode, text) in [(0o644, TOKEN), (0o640, TOKEN), (0o604, TOKEN)] {
        let file = dir.file(&format!("token{mode:o}"), text, mode);
        let (code, err) = refused_start(&["--api-token-file", arg(&file)]);
        assert_ne!(code, Some(0));
        assert!(
            err.contains(arg(&file)) && err.contains(&format!("{mode:04o}")),
            "{err}"
        );
    }
    let empty = dir.file("empty", "\n", 0o600);
    let (code, err) = refused_start(&["--api-token-file", arg(&empty)]);
    assert_ne!(code, Some(0));
    assert!(err.contains("empty") && err.contains(arg(&empty)), "{err}");
}

#[test]
fn api_insecure_serves_beyond_loopback_without_a_token() {
    let topo = Topology::two_armed(1).unwrap();
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--api", "0.0.0.0:9090", "--api-insecure"],
    )
    .unwrap();
    // Reached on the balancer's own address, from the client's namespace.
    let target = Target::Tcp("10.202.1.1:9090".parse().unwrap());
    let bytes = rawhttp::request("GET", "/v1/services", &[("Host", "10.202.1.1:9090")], None);
    let answer = in_netns(&topo.client.path(), move || {
        rawhttp::exchange(&target, &bytes, Duration::from_secs(5))
    })
    .unwrap();
    assert_eq!(answer.status, 200);
    drop(lb);
}

#[test]
fn the_api_on_a_unix_socket_is_mode_0600_answers_and_is_removed_at_stop() {
    let dir = TempDir::new();
    let socket = dir.0.join("api.sock");
    let listen = format!("unix:{}", socket.display());
    let token_file = dir.file("token", TOKEN, 0o600);
    let topo = Topology::two_armed(1).unwrap();
    let mut lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--api", &listen, "--api-token-file", arg(&token_file)],
    )
    .unwrap();
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The token still applies on the socket.
    assert_eq!(
        lb.request("PUT", "/v1/services/web", Some(WEB)).unwrap().0,
        401
    );
    lb.token = Some(TOKEN.into());
    let (status, v) = lb.request("PUT", "/v1/services/web", Some(WEB)).unwrap();
    assert_eq!(status, 200, "{v}");
    let (status, list) = lb.request("GET", "/v1/services", None).unwrap();
    assert_eq!((status, list[0]["name"].clone()), (200, json!("web")));
    // Nothing listens on TCP.
    let closed = in_netns(&topo.lb.path(), || {
        std::net::TcpStream::connect("127.0.0.1:9090").is_err()
    });
    assert!(closed, "the API listens on TCP too");
    assert!(lb.stop().unwrap().success());
    assert!(!socket.exists(), "the socket was left behind");
}

/// `.` and `..` would be path segments in every store. The fuzz test once found
/// `PUT /v1/services/%2e%2e` answered 503 by the file store (`..` is a directory), after
/// other writes; in Consul `..` wrote outside `services/`.
#[test]
fn dot_and_dot_dot_are_no_service_names_from_either_api() {
    let topo = Topology::two_armed(1).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    for name in ["..", ".", "%2e%2e", "%2E"] {
        let answer = call(&lb, "PUT", &format!("/v1/services/{name}"), &[], Some(WEB));
        let v = answer.json();
        assert_eq!(
            (answer.status, v["field"].clone()),
            (400, json!("name")),
            "{name}: {v}"
        );
        let reconfigure = format!(
            "/v1/docker-flow-proxy/reconfigure?serviceName={name}&servicePath=/demo&port=8080&backends=10.202.2.11"
        );
        let answer = call(&lb, "GET", &reconfigure, &[], None);
        let v = answer.json();
        assert_eq!(
            (answer.status, v["field"].clone()),
            (400, json!("serviceName")),
            "{name}: {v}"
        );
    }
    assert_eq!(services(&lb), json!([]));
}

/// Found by the fuzz test: a service put and deleted within one poll of the store's watch
/// came back for a moment, when the watch delivered the put after the delete.
#[test]
fn a_deleted_service_does_not_come_back_through_the_stores_watch() {
    let topo = Topology::two_armed(1).unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &[]).unwrap();
    for round in 0..20 {
        assert_eq!(
            call(&lb, "PUT", "/v1/services/web", &[], Some(WEB)).status,
            200
        );
        assert_eq!(
            call(&lb, "DELETE", "/v1/services/web", &[], None).status,
            204
        );
        let until = Instant::now() + Duration::from_millis(400);
        while Instant::now() < until {
            assert_eq!(
                services(&lb),
                json!([]),
                "round {round}: the deleted service is back"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Field names lb knows, at any level.
const FIELDS: &[&str] = &[
    "vip",
    "protocol",
    "backends",
    "discovery",
    "table_size",
    "http",
    "paths",
    "paths_exclude",
    "domain",
    "default_backend",
    "balance",
    "check",
    "kind",
    "path",
    "expect",
    "interval_ms",
    "timeout_ms",
    "rise",
    "fall",
    "port",
    "service",
    "include_warning",
    "schema",
    "name",
];

/// Strings that mean something somewhere.
const WORDS: &[&str] = &[
    "",
    "tcp",
    "udp",
    "sctp",
    "http",
    "none",
    "etcd",
    "consul",
    "round_robin",
    "least_outstanding",
    "10.202.9.100:80",
    "10.202.2.11:8080",
    "10.202.2.12:8080",
    "10.202.9.100",
    "0.0.0.0:0",
    "255.255.255.255:65535",
    "127.0.0.1:9090",
    "[::1]:80",
    "10.202.2.11:99999",
    "/demo",
    "/",
    "//",
    "/%2e%2e",
    "*.example.com",
    "example.com",
    "..",
    ".",
    "web",
    "\u{0}",
    "é",
    "\u{202e}",
    "1e999",
    "-1",
];

const NAMES: &[&str] = &[
    "web", "api", "db", "a.b", "x-1", "y_2", "..", ".", "%2e%2e", "%2E", "a%2Fb", "%00", "%ff",
    "web%20", "-", "_",
];

fn random_string(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => rng.pick(WORDS).to_string(),
        1 => "x".repeat(rng.pick(&[64, 1000, 70_000])),
        2 => (0..rng.below(30))
            .map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('?'))
            .collect(),
        _ => format!(
            "10.202.{}.{}:{}",
            rng.below(300),
            rng.below(300),
            rng.below(70_000)
        ),
    }
}

fn random_number(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => json!(rng.below(10)),
        1 => json!(rng.next_u64()),
        2 => json!(-(rng.below(1000) as i64)),
        3 => json!(rng.pick(&[65_537u64, 4_294_967_296, 251, 65_521, 0])),
        4 => json!(f64::from(rng.below(1000) as u32) / 7.0),
        _ => json!(1e300),
    }
}

fn random_json(rng: &mut Rng, depth: usize) -> Value {
    let leaf = depth == 0 || rng.chance(40);
    match (leaf, rng.below(6)) {
        (_, 0) => Value::Null,
        (_, 1) => json!(rng.chance(50)),
        (_, 2) => random_number(rng),
        (true, _) => json!(random_string(rng)),
        (false, 3) => Value::Array(
            (0..rng.below(5))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        (false, _) => {
            let mut object = serde_json::Map::new();
            for _ in 0..rng.below(6) {
                let key = if rng.chance(80) {
                    rng.pick(FIELDS).to_string()
                } else {
                    random_string(rng)
                };
                object.insert(key, random_json(rng, depth - 1));
            }
            Value::Object(object)
        }
    }
}

/// A service that is nearly right: a valid one with one field given a random value.
fn nearly_valid(rng: &mut Rng) -> Value {
    let mut spec = match rng.below(3) {
        0 => json!({"vip": "10.202.9.100:80", "protocol": "tcp", "backends": ["10.202.2.11:8080"]}),
        1 => {
            json!({"http": {"paths": ["/demo"], "domain": "example.com"}, "backends": ["10.202.2.11:8080"]})
        }
        _ => json!({"vip": "10.202.9.101:53", "protocol": "udp", "backends": ["10.202.2.12:53"],
                    "check": {"kind": "tcp", "interval_ms": 1000, "rise": 2, "fall": 3}}),
    };
    let value = random_json(rng, 3);
    let object = spec.as_object_mut().unwrap();
    let key = rng.pick(FIELDS).to_string();
    match object.get_mut(&key) {
        Some(Value::Object(inner)) if rng.chance(50) => {
            inner.insert(rng.pick(FIELDS).to_string(), value);
        }
        _ => {
            object.insert(key, value);
        }
    }
    spec
}

/// Percent-encodes some of `s`'s bytes (all that a request line cannot carry).
fn encode(rng: &mut Rng, s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || (b".-_~/:,".contains(&b) && !rng.chance(20)) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const DFP_PARAMS: &[&str] = &[
    "serviceName",
    "servicePath",
    "serviceDomain",
    "servicePathExclude",
    "isDefaultBackend",
    "reqMode",
    "srcPort",
    "port",
    "backends",
    "discovery",
    "type",
];

fn random_query(rng: &mut Rng) -> String {
    let mut pairs = Vec::new();
    if rng.chance(80) {
        pairs.push(format!("serviceName={}", rng.pick(NAMES)));
    }
    for _ in 0..rng.below(8) {
        let name = if rng.chance(85) {
            rng.pick(DFP_PARAMS).to_string()
        } else {
            random_string(rng)
        };
        let value = match rng.below(5) {
            0 => rng
                .pick(&[
                    "http", "tcp", "true", "false", "8080", "0", "65536", "json", "etcd",
                ])
                .to_string(),
            1 => "10.202.2.11,10.202.2.12:8081,,".to_string(),
            _ => random_string(rng),
        };
        let raw = rng.chance(10);
        let (name, value) = if raw {
            (name, value)
        } else {
            (encode(rng, &name), encode(rng, &value))
        };
        // Raw: whatever the request line can carry of it.
        let clean = |s: String| s.chars().filter(char::is_ascii_graphic).collect::<String>();
        pairs.push(format!("{}={}", clean(name), clean(value)));
        if rng.chance(10) {
            pairs.push(pairs.last().unwrap().clone());
        }
    }
    if rng.chance(5) {
        pairs.push("%zz=%".into());
    }
    pairs.join("&")
}

fn random_path(rng: &mut Rng) -> String {
    const SEGMENTS: &[&str] = &[
        "v1",
        "services",
        "docker-flow-proxy",
        "reconfigure",
        "remove",
        "config",
        "ping",
        "stats",
        "health",
        "ready",
        "..",
        ".",
        "%2e%2e",
        "%2E%2e",
        "%2f",
        "",
        "web",
        "%00",
        "%ff%fe",
    ];
    let mut path = String::new();
    for _ in 0..=rng.below(6) {
        path.push('/');
        path.push_str(rng.pick(SEGMENTS));
    }
    if rng.chance(5) {
        path.push('/');
        path.push_str(&"a".repeat(rng.pick(&[1000, 10_000, 100_000])));
    }
    if rng.chance(20) {
        path.push('?');
        path.push_str(&random_query(rng));
    }
    path
}

/// One random request: method, target, body.
fn random_request(rng: &mut Rng) -> (String, String, Option<Vec<u8>>) {
    match rng.below(10) {
        0..=3 => {
            let name = rng.pick(NAMES);
            let body = match rng.below(6) {
                0 => random_json(rng, 5).to_string().into_bytes(),
                1 => (0..rng.below(200)).map(|_| rng.next_u64() as u8).collect(),
                2 => {
                    let mut deep = String::new();
                    let n = rng.pick(&[10, 200, 10_000]);
                    deep.push_str(&"[".repeat(n));
                    deep.push_str(&"]".repeat(n));
                    deep.into_bytes()
                }
                _ => nearly_valid(rng).to_string().into_bytes(),
            };
            let method = rng
                .pick(&["PUT", "PUT", "PUT", "POST", "PATCH"])
                .to_string();
            (method, format!("/v1/services/{name}"), Some(body))
        }
        4..=6 => {
            let call = rng.pick(&[
                "reconfigure",
                "reconfigure",
                "reconfigure",
                "remove",
                "config",
                "ping",
            ]);
            (
                "GET".into(),
                format!("/v1/docker-flow-proxy/{call}?{}", random_query(rng)),
                None,
            )
        }
        7 => {
            let method = rng.pick(&["DELETE", "GET", "HEAD"]).to_string();
            (method, format!("/v1/services/{}", rng.pick(NAMES)), None)
        }
        _ => {
            let method = rng
                .pick(&["GET", "PUT", "DELETE", "POST", "HEAD", "OPTIONS"])
                .to_string();
            let body = (method == "PUT" || method == "POST")
                .then(|| random_json(rng, 3).to_string().into_bytes());
            (method, random_path(rng), body)
        }
    }
}

#[test]
fn api_fuzz_never_answers_5xx_never_drops_a_connection_and_changes_nothing_on_a_4xx() {
    let seed = lb_tests::fuzz_rng::seed();
    println!("seed {seed} (LB_FUZZ_SEED={seed} repeats this run)");
    let dir = TempDir::new();
    let token_file = dir.file("token", TOKEN, 0o600);
    let topo = Topology::two_armed(1).unwrap();
    let lb = LbProcess::start(
        &topo.lb,
        &topo.lb_ifaces,
        &["--api-token-file", arg(&token_file)],
    )
    .unwrap();
    let target = lb.api_target();
    let seconds = lb_tests::env_num("LB_FUZZ_SECONDS", 25).unwrap();
    let outcome = in_netns(lb.ns_path(), move || {
        fuzz(seed, &target, Duration::from_secs(seconds))
    });
    match outcome {
        Ok(n) => println!("{n} requests"),
        Err(why) => panic!("seed {seed}: {why}\nlb's log:\n{}", lb.log_text()),
    }
}

/// Sends random requests (with the token) for `run`: the number sent, or what went wrong.
fn fuzz(seed: u64, target: &Target, run: Duration) -> Result<usize, String> {
    let mut rng = Rng::new(seed);
    let bearer = format!("Bearer {TOKEN}");
    let headers = [
        ("Host", "127.0.0.1:9090"),
        ("Authorization", bearer.as_str()),
    ];
    let send = |method: &str, path: &str, body: Option<&[u8]>| {
        let bytes = rawhttp::request(method, path, &headers, body);
        rawhttp::exchange(target, &bytes, Duration::from_secs(10))
    };
    let list = || -> Result<Value, String> {
        let answer =
            send("GET", "/v1/services", None).map_err(|e| format!("GET /v1/services: {e:#}"))?;
        match answer.status {
            200 => Ok(answer.json()),
            s => Err(format!("GET /v1/services: {s} {}", answer.json())),
        }
    };
    let mut state = list()?;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < run {
        let (method, path, body) = random_request(&mut rng);
        sent += 1;
        let shown = |p: &str| {
            if p.len() > 300 {
                format!("{}... ({} bytes)", &p[..300], p.len())
            } else {
                p.to_string()
            }
        };
        let what = format!("request {sent}: {method} {}", shown(&path));
        let answer = send(&method, &path, body.as_deref())
            .map_err(|e| format!("{what}: no answer: {e:#}"))?;
        if answer.status >= 500 {
            return Err(format!(
                "{what} with body {:?}: {} {}",
                body.as_deref()
                    .map(String::from_utf8_lossy)
                    .map(|b| shown(&b)),
                answer.status,
                answer.json()
            ));
        }
        let now = list()?;
        if (400..500).contains(&answer.status) && now != state {
            return Err(format!(
                "{what}: {} {} changed the services from {state} to {now}",
                answer.status,
                answer.json()
            ));
        }
        state = now;
    }
    Ok(sent)
}
