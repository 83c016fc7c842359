//! The L7 fallback when backends fail, end to end in namespaces: 502 when every backend
//! refuses, 504 when one never answers, a reset in mid-response that the client sees as
//! an abort (and lb serving on), no failed request while a dead backend is still in its
//! health check's fall window (the request goes to another backend), the excluded path
//! however it is spelled, and X-Forwarded-For from trusted proxies only.
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    eventually,
    lbproc::LbProcess,
    netns::Netns,
    servers::{Backend, HttpConn},
    topology::Topology,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

/// lb's HTTP listener in the two-armed topology: its client-side address.
fn listener() -> SocketAddr {
    SocketAddr::from(([10, 202, 1, 1], 80))
}

fn start_lb(topo: &Topology, extra: &[&str]) -> LbProcess {
    let mut args = vec!["--http".to_string(), listener().to_string()];
    args.extend(extra.iter().map(ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    LbProcess::start(&topo.lb, &topo.lb_ifaces, &args).unwrap()
}

fn http_stats(lb: &LbProcess) -> Value {
    let (code, v) = lb.request("GET", "/v1/stats", None).unwrap();
    assert_eq!(code, 200, "{v}");
    v["http"].clone()
}

/// What a [`RawServer`] does with each connection it accepts.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers every request (keep-alive) with its name.
    Answer(&'static str),
    /// Reads the request and never answers.
    Silent,
    /// Sends a 200 head, part of the body (of a Content-Length, or chunked), then resets.
    ResetMidBody { chunked: bool },
}

/// A server in a backend namespace that can be killed as a crash kills one: its listening
/// socket and every connection closed at once.
struct RawServer {
    stop: Arc<AtomicBool>,
    listener: Arc<Mutex<Option<TcpListener>>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl RawServer {
    fn start(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> Self {
        let l = ns.run(move || TcpListener::bind(addr)).unwrap();
        l.set_nonblocking(true).unwrap();
        let listener = Arc::new(Mutex::new(Some(l)));
        let conns = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, conns, stop) = (listener.clone(), conns.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let accepted = match &*listener.lock().unwrap() {
                        Some(l) => l.accept(),
                        None => return,
                    };
                    match accepted {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            // Kept to close at a kill; not those that reset themselves,
                            // whose reset needs their last descriptor closed.
                            if !matches!(behaviour, Behaviour::ResetMidBody { .. }) {
                                conns.lock().unwrap().push(s.try_clone().unwrap());
                            }
                            std::thread::spawn(move || serve(s, behaviour));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self {
            stop,
            listener,
            conns,
            thread: Some(thread),
        }
    }

    /// Closes the listening socket (new connections are refused) and every connection.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.listener.lock().unwrap().take();
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads one request head; false at the end of the stream.
fn read_head(r: &mut BufReader<TcpStream>) -> bool {
    let mut line = String::new();
    let mut any = false;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line == "\r\n" && any => return true,
            Ok(_) => any = true,
        }
    }
}

fn serve(s: TcpStream, behaviour: Behaviour) {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    match behaviour {
        Behaviour::Answer(name) => {
            while read_head(&mut r) {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                    name.len()
                );
                if w.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        }
        Behaviour::Silent => {
            if read_head(&mut r) {
                // Until the connection goes.
                let _ = r.read_to_end(&mut Vec::new());
            }
        }
        Behaviour::ResetMidBody { chunked } => {
            if !read_head(&mut r) {
                return;
            }
            let part = vec![b'x'; 10_000];
            let head: &[u8] = if chunked {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            };
            let _ = w.write_all(head);
            if chunked {
                let _ = w.write_all(format!("{:x}\r\n", part.len()).as_bytes());
                let _ = w.write_all(&part);
                let _ = w.write_all(b"\r\n");
            } else {
                let _ = w.write_all(&part);
            }
            std::thread::sleep(Duration::from_millis(200));
            // SO_LINGER 0: the close sends a reset, not a FIN.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and a linger struct of the size given.
            unsafe {
                libc::setsockopt(
                    w.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
    }
}

/// Sends `GET path` on a new connection and reads until the connection ends (or `T`):
/// the head, the body bytes received, and whether the body was complete by its framing.
fn get_to_the_end(topo: &Topology, path: &str) -> (String, Vec<u8>, bool) {
    let to = listener();
    let s = topo
        .client
        .run(move || TcpStream::connect_timeout(&to, T))
        .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut r = BufReader::new(s);
    let req = format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n");
    r.get_mut().write_all(req.as_bytes()).unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return (head, Vec::new(), false);
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 65536];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert!(
                    started.elapsed() < T,
                    "the response neither finished nor ended: {e}"
                );
                break;
            }
        }
        let lower = head.to_ascii_lowercase();
        let whole = match lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
        {
            Some(n) => body.len() == n.trim().parse::<usize>().unwrap(),
            None => body.ends_with(b"\r\n0\r\n\r\n"),
        };
        if whole {
            return (head, body, true);
        }
    }
    (head, body, false)
}

#[test]
fn refused_silent_and_reset_backends() {
    let topo = Topology::two_armed(3).unwrap();
    let lb = start_lb(&topo, &["--http-backend-response-timeout", "1s"]);
    let at = |i: usize, port: u16| SocketAddr::from(topo.backend(i, port));
    let _ok = RawServer::start(&topo.backends[2], at(2, 8080), Behaviour::Answer("ok"));
    let _silent = RawServer::start(&topo.backends[0], at(0, 8082), Behaviour::Silent);
    let _reset = RawServer::start(
        &topo.backends[1],
        at(1, 8083),
        Behaviour::ResetMidBody { chunked: false },
    );
    let _reset_chunked = RawServer::start(
        &topo.backends[1],
        at(1, 8084),
        Behaviour::ResetMidBody { chunked: true },
    );
    // No health checks: what lb does with the request itself is under test.
    let none = json!({"kind": "none"});
    let service = |path: &str, backends: Vec<SocketAddr>| {
        let backends: Vec<String> = backends.iter().map(ToString::to_string).collect();
        json!({"http": {"paths": [path]}, "backends": backends, "check": none})
    };
    lb.put_service("ok", &service("/ok", vec![at(2, 8080)]))
        .unwrap();
    lb.put_service(
        "refused",
        &service("/refused", vec![at(0, 8081), at(1, 8081)]),
    )
    .unwrap();
    lb.put_service("silent", &service("/silent", vec![at(0, 8082)]))
        .unwrap();
    lb.put_service("reset", &service("/reset", vec![at(1, 8083)]))
        .unwrap();
    lb.put_service("chunked", &service("/chunked", vec![at(1, 8084)]))
        .unwrap();
    let get = |path: &str| {
        let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
        c.send("GET", path, "lb", b"").unwrap()
    };
    assert_eq!(get("/ok"), (200, "ok".into()));

    // Every backend refuses: tried on both, then 502.
    let (code, body) = get("/refused");
    assert_eq!(
        (code, body.as_str()),
        (502, "service refused: backend failed\n")
    );
    let stats = http_stats(&lb);
    assert_eq!(stats["redispatched"], 1, "{stats}");
    assert_eq!(stats["answers"]["502"], 1, "{stats}");

    // A backend that takes the request and never answers: 504 after the response timeout.
    let asked = Instant::now();
    let (code, body) = get("/silent");
    let waited = asked.elapsed();
    assert_eq!(
        (code, body.as_str()),
        (504, "service silent: backend timed out\n")
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    // It was sent, so it was not sent again.
    assert_eq!(http_stats(&lb)["redispatched"], 1);

    // A reset in mid-response: the client gets the head and part of the body, then the
    // connection ends, short of what the framing promised.
    for path in ["/reset", "/chunked"] {
        let (head, body, whole) = get_to_the_end(&topo, path);
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(!whole, "{path}: a truncated response passed off as whole");
        assert!(
            body.len() >= 10_000 && body.len() < 100_000,
            "{path}: {}",
            body.len()
        );
    }
    // lb serves on, on new connections and old.
    assert_eq!(get("/ok"), (200, "ok".into()));
    let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
    for _ in 0..5 {
        assert_eq!(c.send("GET", "/ok", "lb", b"").unwrap(), (200, "ok".into()));
    }
}

#[test]
fn requests_in_a_dead_backends_fall_window_go_to_another_backend() {
    let topo = Topology::two_armed(3).unwrap();
    let lb = start_lb(&topo, &[]);
    let names = ["be0", "be1", "be2"];
    let mut servers: Vec<RawServer> = (0..3)
        .map(|i| {
            let addr = SocketAddr::from(topo.backend(i, 8080));
            RawServer::start(&topo.backends[i], addr, Behaviour::Answer(names[i]))
        })
        .collect();
    let all: Vec<String> = (0..3).map(|i| topo.backend(i, 8080).to_string()).collect();
    // Down only after five failed checks a second apart: about five seconds in which lb
    // still counts the dead backend in.
    let check =
        json!({"kind": "tcp", "interval_ms": 1000, "timeout_ms": 500, "rise": 2, "fall": 5});
    lb.put_service(
        "demo",
        &json!({"http": {"paths": ["/demo"]}, "backends": all, "check": check}),
    )
    .unwrap();
    let health = |addr: &str| -> String {
        let (_, v) = lb.request("GET", "/v1/services/demo", None).unwrap();
        let backends = v["backend_counters"].as_array().unwrap().clone();
        let b = backends.iter().find(|b| b["address"] == addr).unwrap();
        b["health"].as_str().unwrap_or_default().to_string()
    };

    // A keep-alive connection and a new connection per request, in turn.
    let mut kept = HttpConn::connect(&topo.client, listener(), T).unwrap();
    let mut one = |i: usize| -> Result<String, String> {
        let answer = if i.is_multiple_of(2) {
            kept.send("GET", "/demo/x", "lb", b"")
        } else {
            HttpConn::connect(&topo.client, listener(), T)
                .and_then(|mut c| c.send("GET", "/demo/x", "lb", b""))
        };
        match answer {
            Ok((200, who)) => Ok(who),
            Ok((code, body)) => Err(format!("request {i}: {code} {body}")),
            Err(e) => Err(format!("request {i}: {e:#}")),
        }
    };
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        seen.insert(one(i).unwrap());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    servers[1].kill();
    let killed = Instant::now();
    let (mut failures, mut after) = (Vec::new(), BTreeSet::new());
    let mut i = 0;
    while killed.elapsed() < Duration::from_millis(2000) {
        match one(i) {
            Ok(who) => {
                after.insert(who);
            }
            Err(e) => failures.push(e),
        }
        i += 1;
    }
    // Still in the fall window: the requests that reached be1's address were not saved
    // by the health check.
    assert_eq!(health(&all[1]), "up", "the check took be1 out already");
    assert!(
        failures.is_empty(),
        "{} of {i} failed, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(after, BTreeSet::from(["be0".into(), "be2".into()]));
    let stats = http_stats(&lb);
    let redispatched = stats["redispatched"].as_u64().unwrap();
    assert!(redispatched >= 1, "{stats}");
    assert!(i > 20, "only {i} requests in the window");

    // Then the check takes it out, and the requests stop trying it.
    assert!(eventually(Duration::from_secs(8), || health(&all[1]) == "down"));
    for j in 0..20 {
        one(i + j).unwrap();
    }
    assert_eq!(
        http_stats(&lb)["redispatched"].as_u64().unwrap(),
        redispatched
    );
}

/// The request head the "/headers" backend of tests/src/servers.rs saw for `head`.
fn seen_by_backend(topo: &Topology, head: &str) -> String {
    let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
    c.stream().write_all(head.as_bytes()).unwrap();
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
    String::from_utf8_lossy(&body).to_ascii_lowercase()
}

#[test]
fn excluded_paths_and_forwarding_headers() {
    let topo = Topology::two_armed(1).unwrap();
    let _backend: Backend = topo.start_backend(0, 8080, false).unwrap();
    let spoofed = "X-Forwarded-For: 192.0.2.66\r\nX-Real-IP: 192.0.2.66\r\nX-Forwarded-Proto: https\r\nContent-Length: 0\r\n\r\n";
    // Trusting a network the client is not in.
    for (trusted, client_is_trusted) in [("10.202.9.0/24", false), ("10.202.1.10", true)] {
        let lb = start_lb(&topo, &["--trusted-proxies", trusted]);
        lb.put_service(
            "app",
            &json!({"http": {"paths": ["/"], "paths_exclude": ["/admin"]},
                    "backends": [topo.backend(0, 8080).to_string()]}),
        )
        .unwrap();
        let get = |path: &str| {
            let mut c = HttpConn::connect(&topo.client, listener(), T).unwrap();
            c.send("GET", path, "lb", b"").unwrap()
        };
        assert_eq!(get("/public"), (200, "be0".into()));
        for path in [
            "/admin",
            "/%61dmin",
            "//admin",
            "/x/../admin",
            "/./admin",
            "/admin/x",
        ] {
            let (code, body) = get(path);
            assert_eq!(code, 404, "{path} got past the exclude: {body}");
            assert!(body.starts_with("no route for /admin"), "{path}: {body}");
        }
        let (code, body) = get("/%2Fadmin");
        assert_eq!(code, 400, "{body}");
        // The backend is asked for the path lb matched.
        let seen = seen_by_backend(
            &topo,
            &format!("GET /a/../b/%2e/headers HTTP/1.1\r\nHost: lb\r\n{spoofed}"),
        );
        assert!(seen.starts_with("get /b/headers http/1.1"), "{seen}");
        if client_is_trusted {
            assert!(
                seen.contains("x-forwarded-for: 192.0.2.66, 10.202.1.10\r\n"),
                "{seen}"
            );
            assert!(seen.contains("x-real-ip: 192.0.2.66\r\n"), "{seen}");
            assert!(seen.contains("x-forwarded-proto: https\r\n"), "{seen}");
        } else {
            assert!(seen.contains("x-forwarded-for: 10.202.1.10\r\n"), "{seen}");
            assert!(!seen.contains("192.0.2.66"), "{seen}");
            assert!(seen.contains("x-forwarded-proto: http\r\n"), "{seen}");
        }
        lb.stop().unwrap();
    }
}
