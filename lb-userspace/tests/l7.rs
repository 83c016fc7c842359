//! The L7 proxy end to end on loopback: test backends (hyper, or raw TCP where the test
//! needs to misbehave), a proxy serving on a fresh port, and clients speaking HTTP/1.1 or
//! h2c to it.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb::l7::{Balance, Proxy, ProxyConfig, ProxyStats, Route, TrustedProxies, parse_cidr};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::oneshot,
    time::{sleep, timeout},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = BoxBody<Bytes, BoxError>;

const T: Duration = Duration::from_secs(10);

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

fn text(status: StatusCode, data: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(full(data));
    *r.status_mut() = status;
    r
}

// ---- backends ----

struct Backend {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

/// A hyper HTTP/1.1 backend answering with `handler`.
async fn backend<F, Fut>(handler: F) -> Backend
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend { addr, accepted }
}

/// Answers "NAME PATH"; "/slow..." after half a second; "/headers" with the request's
/// version and headers, and some hop-by-hop headers of its own.
async fn named(name: &'static str) -> Backend {
    backend(move |req: Request<Incoming>| async move {
        let path = req.uri().path().to_string();
        if path.starts_with("/slow") {
            sleep(Duration::from_millis(500)).await;
        }
        if path == "/headers" {
            let mut dump = format!("{:?}\n", req.version());
            for (k, v) in req.headers() {
                dump.push_str(&format!("{k}: {}\n", v.to_str().unwrap()));
            }
            let mut r = text(StatusCode::OK, dump);
            for (k, v) in [
                ("connection", "x-bar"),
                ("x-bar", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("trailer", "x-t"),
                ("upgrade", "h2c"),
                ("x-kept", "1"),
            ] {
                r.headers_mut().insert(k, v.parse().unwrap());
            }
            return r;
        }
        text(StatusCode::OK, format!("{name} {path}"))
    })
    .await
}

/// A raw backend that runs `f` on each accepted connection.
async fn raw_backend<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(f(stream));
        }
    });
    addr
}

/// Reads an HTTP head (through the blank line) from `r`.
async fn read_head(r: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap() == 0 {
            return head;
        }
        head.push_str(&line);
        if line == "\r\n" {
            return head;
        }
    }
}

// ---- the proxy ----

struct Running {
    proxy: Arc<Proxy>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn config() -> ProxyConfig {
    ProxyConfig {
        connect_timeout: Duration::from_millis(500),
        response_header_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
        workers: 2,
        ..ProxyConfig::default()
    }
}

async fn start(config: ProxyConfig, routes: Vec<Route>) -> Running {
    let proxy = Proxy::new(config);
    proxy.set_routes(routes);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(proxy.clone().serve(
        lb::l7::Frontends::http(listener),
        async move {
            let _ = stopped.await;
        },
        lb::supervise::Supervisor::default(),
    ));
    Running {
        proxy,
        addr,
        stop: Some(stop),
        served,
    }
}

fn route(service: &str, paths: &[&str], backends: &[&Backend]) -> Route {
    Route {
        service: service.into(),
        paths: paths.iter().map(std::string::ToString::to_string).collect(),
        backends: backends.iter().map(|b| b.addr).collect(),
        ..Route::default()
    }
}

// ---- clients ----

struct Client {
    sender: SendRequest<TestBody>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    async fn send(&mut self, req: Request<TestBody>) -> Response<Incoming> {
        self.sender.ready().await.unwrap();
        timeout(T, self.sender.send_request(req))
            .await
            .unwrap()
            .unwrap()
    }

    async fn get(&mut self, host: &str, path: &str) -> (StatusCode, HeaderMap, String) {
        let (status, headers, body) = self.get_with(host, path, &[]).await;
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    /// A GET with `headers` besides Host; the body as it came.
    async fn get_with(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = Request::get(path).header("host", host);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = self.send(req).await;
        let (parts, body) = resp.into_parts();
        let body = timeout(T, body.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        (parts.status, parts.headers, body)
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
    let (status, _, body) = Client::connect(addr).await.get(host, path).await;
    (status, body)
}

async fn body_of(addr: SocketAddr, host: &str, path: &str) -> String {
    let (status, body) = get(addr, host, path).await;
    assert_eq!(status, StatusCode::OK, "{host}{path}: {body}");
    body
}

// ---- routing ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_routing_longest_prefix_wins() {
    let (web, demo, api) = (named("web").await, named("demo").await, named("api").await);
    let p = start(
        config(),
        vec![
            route("web", &["/"], &[&web]),
            route("demo", &["/demo"], &[&demo]),
            route("api", &["/demo/api", "/api"], &[&api]),
        ],
    )
    .await;
    assert_eq!(body_of(p.addr, "h", "/").await, "web /");
    assert_eq!(body_of(p.addr, "h", "/demo").await, "demo /demo");
    assert_eq!(body_of(p.addr, "h", "/demo/x?q=1").await, "demo /demo/x");
    assert_eq!(body_of(p.addr, "h", "/demox").await, "web /demox");
    assert_eq!(
        body_of(p.addr, "h", "/demo/api/v1").await,
        "api /demo/api/v1"
    );
    assert_eq!(body_of(p.addr, "h", "/api").await, "api /api");
    let stats = p.proxy.stats();
    assert_eq!(stats.requests["web"], 2);
    assert_eq!(stats.requests["demo"], 2);
    assert_eq!(stats.requests["api"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_routing_exact_wildcard_and_paths() {
    let (apex, wild, v1, any) = (
        named("apex").await,
        named("wild").await,
        named("v1").await,
        named("any").await,
    );
    let with_domain = |mut r: Route, d: &str| {
        r.domains = vec![d.into()];
        r
    };
    let p = start(
        config(),
        vec![
            route("any", &["/any"], &[&any]),
            with_domain(route("apex", &[], &[&apex]), "example.com"),
            with_domain(route("wild", &[], &[&wild]), "*.example.com"),
            with_domain(route("v1", &["/v1"], &[&v1]), "api.example.com"),
        ],
    )
    .await;
    assert_eq!(body_of(p.addr, "Example.COM:8080", "/x").await, "apex /x");
    // A domain route with no paths takes every path, even one another route names.
    assert_eq!(body_of(p.addr, "example.com", "/any").await, "apex /any");
    assert_eq!(body_of(p.addr, "www.example.com", "/x").await, "wild /x");
    assert_eq!(body_of(p.addr, "a.b.example.com", "/").await, "wild /");
    assert_eq!(
        body_of(p.addr, "api.example.com", "/v1/users").await,
        "v1 /v1/users"
    );
    assert_eq!(body_of(p.addr, "api.example.com", "/v2").await, "wild /v2");
    assert_eq!(body_of(p.addr, "other.org", "/any").await, "any /any");
    assert_eq!(
        get(p.addr, "other.org", "/x").await,
        (StatusCode::NOT_FOUND, "no route for /x\n".into())
    );
    assert_eq!(
        get(p.addr, "badexample.com", "/x").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclude_paths_and_default_backend() {
    let (api, fallback) = (named("api").await, named("fallback").await);
    let mut api_route = route("api", &["/api"], &[&api]);
    api_route.paths_exclude = vec!["/api/private".into()];
    let mut fallback_route = route("fallback", &["/fallback"], &[&fallback]);
    fallback_route.default_backend = true;
    let p = start(config(), vec![api_route.clone(), fallback_route]).await;
    assert_eq!(body_of(p.addr, "h", "/api/x").await, "api /api/x");
    assert_eq!(
        body_of(p.addr, "h", "/api/privatex").await,
        "api /api/privatex"
    );
    assert_eq!(
        body_of(p.addr, "h", "/api/private/x").await,
        "fallback /api/private/x"
    );
    assert_eq!(
        body_of(p.addr, "h", "/elsewhere").await,
        "fallback /elsewhere"
    );

    // Without a default route the excluded path has nowhere to go.
    p.proxy.set_routes(vec![api_route]);
    assert_eq!(
        get(p.addr, "h", "/api/private").await,
        (StatusCode::NOT_FOUND, "no route for /api/private\n".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_a_route_does_not_allow_are_answered_403() {
    let (ro, open) = (named("ro").await, named("open").await);
    let mut read_only = route("ro", &["/ro"], &[&ro]);
    read_only.allowed_methods = vec![Method::GET, Method::HEAD];
    let mut no_delete = route("open", &["/open"], &[&open]);
    no_delete.denied_methods = vec![Method::DELETE];
    let p = start(config(), vec![read_only, no_delete]).await;
    let status = |method: Method, path: &'static str| async move {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "h")
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = Client::connect(p.addr).await.send(req).await;
        let status = resp.status();
        let body = timeout(T, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        (status, String::from_utf8(body.to_bytes().to_vec()).unwrap())
    };
    assert_eq!(status(Method::GET, "/ro/x").await.0, StatusCode::OK);
    assert_eq!(
        status(Method::POST, "/ro/x").await,
        (
            StatusCode::FORBIDDEN,
            "method POST is not allowed for service ro\n".into()
        )
    );
    assert_eq!(status(Method::POST, "/open/x").await.0, StatusCode::OK);
    assert_eq!(
        status(Method::DELETE, "/open/x").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(p.proxy.stats().answers[&403], 2);
}

// ---- lb's own answers ----

/// A port that refuses connections: bound and not listening, so that it refuses for as long
/// as the returned socket is kept (a port merely closed could be given to the next test
/// listener, and answer).
fn refusing_port() -> (SocketAddr, TcpSocket) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// A listener whose accept queue is full, so that new connections hang in SYN_SENT; the
/// returned streams must be kept alive.
async fn unanswering_port() -> (SocketAddr, TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => return (addr, listener, held),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_answers_have_bodies_and_counters() {
    let (refusing, _bound) = refusing_port();
    let refused = Backend {
        addr: refusing,
        accepted: Default::default(),
    };
    // Reads the request head, then closes without a word.
    let hang_up = raw_backend(|s| async move {
        let mut r = BufReader::new(s);
        read_head(&mut r).await;
    })
    .await;
    // Reads the request head and never answers.
    let silent = raw_backend(|s| async move {
        let mut r = BufReader::new(s);
        read_head(&mut r).await;
        sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (unanswering, _listener, _held) = unanswering_port().await;
    let addr = |a| Backend {
        addr: a,
        accepted: Default::default(),
    };
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.response_header_timeout = Duration::from_millis(300);
    let p = start(
        cfg,
        vec![
            route("empty", &["/empty"], &[]),
            route("refused", &["/refused"], &[&refused]),
            route("hangup", &["/hangup"], &[&addr(hang_up)]),
            route("silent", &["/silent"], &[&addr(silent)]),
            route("unanswering", &["/unanswering"], &[&addr(unanswering)]),
        ],
    )
    .await;
    let cases = [
        ("/nothing", 404, "no route for /nothing\n"),
        ("/empty", 503, "service empty has no healthy backend\n"),
        ("/refused", 502, "service refused: backend failed\n"),
        ("/hangup", 502, "service hangup: backend failed\n"),
        ("/silent", 504, "service silent: backend timed out\n"),
        (
            "/unanswering",
            504,
            "service unanswering: backend timed out\n",
        ),
    ];
    for (path, status, body) in cases {
        let (s, headers, b) = Client::connect(p.addr).await.get("h", path).await;
        assert_eq!((s.as_u16(), b.as_str()), (status, body), "{path}");
        assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    }
    let stats = p.proxy.stats();
    assert_eq!(
        stats.answers,
        [
            (301, 0),
            (302, 0),
            (303, 0),
            (307, 0),
            (308, 0),
            (400, 0),
            (401, 0),
            (403, 0),
            (404, 1),
            (502, 2),
            (503, 1),
            (504, 2)
        ]
        .into_iter()
        .collect()
    );
    for service in ["empty", "refused", "hangup", "silent", "unanswering"] {
        assert_eq!(stats.requests[service], 1, "{service}");
    }
    // Serializes as the API will show it.
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["answers"]["504"], 2);
}

// ---- backend connections and balancing ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_backend_connections() {
    let web = named("web").await;
    let p = start(config(), vec![route("web", &[], &[&web])]).await;
    let mut client = Client::connect(p.addr).await;
    for i in 0..20 {
        let (status, _, body) = client.get("h", &format!("/{i}")).await;
        assert_eq!((status, body), (StatusCode::OK, format!("web /{i}")));
    }
    assert_eq!(web.accepted.load(Ordering::SeqCst), 1);
    // New client connections, the same pooled backend connections: at most one per worker
    // thread (each has its own pools).
    for _ in 0..10 {
        body_of(p.addr, "h", "/").await;
    }
    assert!(web.accepted.load(Ordering::SeqCst) <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_backend_closed_are_not_used() {
    // Answers one request per connection with keep-alive, then closes it soon after, as
    // a backend with a short keep-alive timeout does.
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = raw_backend(move |s| {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            read_head(&mut r).await;
            let body = format!("conn {n}");
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            w.write_all((head + &body).as_bytes()).await.unwrap();
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let web = Backend {
        addr,
        accepted: accepted.clone(),
    };
    let mut cfg = config();
    cfg.workers = 1;
    let p = start(cfg, vec![route("web", &[], &[&web])]).await;
    let mut client = Client::connect(p.addr).await;
    for i in 1..=3 {
        let (status, _, body) = client.get("h", "/").await;
        assert_eq!((status, body), (StatusCode::OK, format!("conn {i}")));
        sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(p.proxy.stats().answers[&502], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let backends = [named("a").await, named("b").await, named("c").await];
    let p = start(
        config(),
        vec![route(
            "web",
            &[],
            &[&backends[0], &backends[1], &backends[2]],
        )],
    )
    .await;
    let mut client = Client::connect(p.addr).await;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let (_, _, body) = client.get("h", "/").await;
        *counts.entry(body).or_insert(0) += 1;
    }
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [("a /".into(), 10), ("b /".into(), 10), ("c /".into(), 10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_prefers_an_idle_backend() {
    let (a, b) = (named("a").await, named("b").await);
    let mut r = route("web", &[], &[&a, &b]);
    r.balance = Balance::LeastOutstanding;
    let p = start(config(), vec![r]).await;
    let addr = p.addr;
    let slow = tokio::spawn(async move { body_of(addr, "h", "/slow").await });
    sleep(Duration::from_millis(100)).await;
    let mut client = Client::connect(p.addr).await;
    let mut fast = Vec::new();
    for _ in 0..10 {
        fast.push(client.get("h", "/").await.2);
    }
    let slow = slow.await.unwrap();
    let slow_backend = &slow[..1];
    let idle_backend = if slow_backend == "a" { "b" } else { "a" };
    assert!(
        fast.iter().all(|b| *b == format!("{idle_backend} /")),
        "slow request on {slow_backend}, the others went to {fast:?}"
    );
}

// ---- streaming ----

const CHUNK: usize = 1 << 20;
const BIG: usize = 64 << 20;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Set in the child process that runs one test alone (see [`in_a_process_of_its_own`]).
const ALONE: &str = "LB_TEST_ALONE";

/// Runs test `name` of this binary again, alone, in a child process of its own, and
/// checks that it passed there: a process-wide figure such as peak RSS then counts that
/// test's memory only, not that of the tests beside it or before it. True in the child,
/// which does the test's work.
fn in_a_process_of_its_own(name: &str) -> bool {
    if std::env::var_os(ALONE).is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name}, run alone: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

#[test]
fn large_bodies_stream_both_ways() {
    if !in_a_process_of_its_own("large_bodies_stream_both_ways") {
        return;
    }
    // The peak so far is the start-up's; from here on it is this test's.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(stream_both_ways());
}

async fn stream_both_ways() {
    // Set by the backend when the first upload bytes reach it; by the client when the
    // first download bytes reach it. Each side waits for the other's mark before sending
    // its last chunk, which deadlocks (and times out) if the proxy buffers whole bodies.
    let upload_started = Arc::new(AtomicBool::new(false));
    let download_started = Arc::new(AtomicBool::new(false));
    let (up, down) = (upload_started.clone(), download_started.clone());
    let web = backend(move |req: Request<Incoming>| {
        let (up, down) = (up.clone(), down.clone());
        async move {
            let mut body = req.into_body();
            let mut received = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    received += data.len();
                    up.store(true, Ordering::SeqCst);
                }
            }
            let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'd'; CHUNK]);
                for i in 0..BIG / CHUNK {
                    if i == BIG / CHUNK - 1 {
                        wait_for(&down).await;
                    }
                    if tx.send_data(chunk.clone()).await.is_err() {
                        return;
                    }
                }
            });
            let mut r = Response::new(rx.boxed());
            r.headers_mut()
                .insert("x-received", received.to_string().parse().unwrap());
            r
        }
    })
    .await;
    let p = start(config(), vec![route("web", &[], &[&web])]).await;
    let before = peak_rss_kib();

    let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
    let up = upload_started.clone();
    let sending = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'u'; CHUNK]);
        for i in 0..BIG / CHUNK {
            if i == BIG / CHUNK - 1 {
                wait_for(&up).await;
            }
            tx.send_data(chunk.clone()).await.unwrap();
        }
    });
    let req = Request::post("/upload")
        .header("host", "h")
        .body(rx.boxed())
        .unwrap();
    let mut client = Client::connect(p.addr).await;
    let resp = timeout(Duration::from_secs(60), client.send(req))
        .await
        .unwrap();
    sending.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-received"], BIG.to_string().as_str());
    let mut body = resp.into_body();
    let mut received = 0usize;
    while let Some(frame) = timeout(T, body.frame()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(data.iter().all(|&b| b == b'd'));
            received += data.len();
            download_started.store(true, Ordering::SeqCst);
        }
    }
    assert_eq!(received, BIG);
    // 128 MiB went through; the process (proxy, client and backend) grew by far less.
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(grown_mib < 32, "peak RSS grew by {grown_mib} MiB");
}

async fn wait_for(flag: &AtomicBool) {
    timeout(T, async {
        while !flag.load(Ordering::SeqCst) {
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the other side never started receiving: the body was buffered, not streamed");
}

// ---- upgrades ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_spliced() {
    // Answers an upgrade with 101 and echoes every byte after it.
    let echo = raw_backend(|s| async move {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let head = read_head(&mut r).await.to_ascii_lowercase();
        assert!(head.contains("upgrade: websocket\r\n"), "{head}");
        assert!(head.contains("connection: upgrade\r\n"), "{head}");
        w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let echo = Backend {
        addr: echo,
        accepted: Default::default(),
    };
    let p = start(config(), vec![route("ws", &[], &[&echo])]).await;

    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let head = timeout(T, read_head(&mut r))
        .await
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket\r\n"), "{head}");
    assert!(head.contains("connection: upgrade\r\n"), "{head}");
    for msg in [&b"ping"[..], b"hello, tunnel", &[0u8, 1, 2, 255]] {
        w.write_all(msg).await.unwrap();
        let mut back = vec![0; msg.len()];
        timeout(T, r.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg);
    }
    drop(w);
    let mut rest = Vec::new();
    timeout(T, r.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty());
}

// ---- headers ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_set_and_hop_by_hop_removed() {
    let web = named("web").await;
    // The test client is a proxy lb trusts: its X-Forwarded-For is kept.
    let mut cfg = config();
    cfg.trusted_proxies = TrustedProxies::new([parse_cidr("127.0.0.0/8").unwrap()]);
    let p = start(cfg, vec![route("web", &[], &[&web])]).await;
    let mut client = Client::connect(p.addr).await;
    let mut req = Request::get("/headers")
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    for (k, v) in [
        ("host", "Example.com:8080"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x-t"),
        ("upgrade", "foo"),
        ("x-forwarded-for", "192.0.2.1"),
        ("x-end-to-end", "1"),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    let resp = client.send(req).await;
    for hop in [
        "connection",
        "x-bar",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
    ] {
        assert!(!resp.headers().contains_key(hop), "response kept {hop}");
    }
    assert_eq!(resp.headers()["x-kept"], "1");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8(body.to_vec()).unwrap();
    let mut lines = seen.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1"));
    let headers: Vec<&str> = lines.collect();
    for want in [
        "host: Example.com:8080",
        "x-forwarded-for: 192.0.2.1, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: Example.com:8080",
        "x-end-to-end: 1",
    ] {
        assert!(
            headers.contains(&want),
            "backend saw {headers:?}, not {want:?}"
        );
    }
    for hop in [
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !headers.iter().any(|h| h.starts_with(&format!("{hop}:"))),
            "backend saw {hop}: {headers:?}"
        );
    }
}

/// What the "/headers" backend saw of a GET of `path` with `headers`, as lines.
async fn seen_headers(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Vec<String> {
    let mut req = Request::get(path)
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().append(name, v.parse().unwrap());
    }
    let resp = Client::connect(addr).await.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_of_untrusted_clients_are_replaced() {
    let web = named("web").await;
    let claims = [
        ("host", "example.com"),
        ("x-forwarded-for", "192.0.2.1"),
        ("x-forwarded-for", "192.0.2.2"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "bank.example"),
        ("x-forwarded-port", "443"),
        ("x-real-ip", "192.0.2.1"),
        ("forwarded", "for=192.0.2.1"),
    ];
    // By default nobody is trusted; trusting another network changes nothing for us.
    for trusted in [vec![], vec![parse_cidr("10.0.0.0/8").unwrap()]] {
        let mut cfg = config();
        cfg.trusted_proxies = TrustedProxies::new(trusted);
        let p = start(cfg, vec![route("web", &[], &[&web])]).await;
        let seen = seen_headers(p.addr, "/headers", &claims).await;
        let forwarded: Vec<&str> = seen
            .iter()
            .map(String::as_str)
            .filter(|h| h.starts_with("x-") || h.starts_with("forwarded"))
            .collect();
        assert_eq!(
            forwarded,
            [
                "x-forwarded-for: 127.0.0.1",
                "x-forwarded-proto: http",
                "x-forwarded-host: example.com"
            ],
            "{seen:?}"
        );
    }
    // A trusted proxy's pass, with the address lb saw appended.
    let mut cfg = config();
    cfg.trusted_proxies = TrustedProxies::new([parse_cidr("127.0.0.1").unwrap()]);
    let p = start(cfg, vec![route("web", &[], &[&web])]).await;
    let seen = seen_headers(p.addr, "/headers", &claims).await;
    for want in [
        "x-forwarded-for: 192.0.2.1, 192.0.2.2, 127.0.0.1",
        "x-forwarded-proto: https",
        "x-forwarded-host: bank.example",
        "x-forwarded-port: 443",
        "x-real-ip: 192.0.2.1",
        "forwarded: for=192.0.2.1",
    ] {
        assert!(seen.iter().any(|h| h == want), "{want}: {seen:?}");
    }
}

// ---- a backend that fails ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_redispatched_to_another_backend() {
    let good = named("good").await;
    let (refusing, _bound) = refusing_port();
    let refused = Backend {
        addr: refusing,
        accepted: Default::default(),
    };
    for balance in [Balance::RoundRobin, Balance::LeastOutstanding] {
        let mut web = route("web", &[], &[&refused, &good]);
        web.balance = balance;
        let p = start(config(), vec![web]).await;
        for i in 0..20 {
            let (status, body) = get(p.addr, "h", &format!("/{i}")).await;
            assert_eq!((status, body), (StatusCode::OK, format!("good /{i}")));
        }
        let stats = p.proxy.stats();
        assert!(stats.redispatched >= 5, "{balance:?}: {stats:?}");
        assert_eq!(stats.requests["web"], 20, "counted once each");
        assert!(stats.answers.values().all(|&n| n == 0), "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_refuses_the_answer_is_502_after_one_retry() {
    let refused = |a| Backend {
        addr: a,
        accepted: Default::default(),
    };
    let ((a, _a_bound), (b, _b_bound)) = (refusing_port(), refusing_port());
    let (a, b) = (refused(a), refused(b));
    let p = start(config(), vec![route("web", &[], &[&a, &b])]).await;
    for _ in 0..4 {
        assert_eq!(
            get(p.addr, "h", "/").await,
            (
                StatusCode::BAD_GATEWAY,
                "service web: backend failed\n".into()
            )
        );
    }
    let stats = p.proxy.stats();
    assert_eq!((stats.redispatched, stats.answers[&502]), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_backend_took_is_never_sent_again() {
    // Each reads the request head, counts it, and hangs up without answering.
    let heads = Arc::new(AtomicUsize::new(0));
    let hang_up = || {
        let heads = heads.clone();
        raw_backend(move |s| {
            let heads = heads.clone();
            async move {
                let mut r = BufReader::new(s);
                if !read_head(&mut r).await.is_empty() {
                    heads.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let addr = |a| Backend {
        addr: a,
        accepted: Default::default(),
    };
    let (a, b) = (addr(hang_up().await), addr(hang_up().await));
    let p = start(config(), vec![route("web", &[], &[&a, &b])]).await;
    for (i, method) in ["POST", "GET", "POST"].into_iter().enumerate() {
        let req = Request::builder()
            .method(method)
            .uri("/order")
            .header("host", "h")
            .body(full("pay once"))
            .unwrap();
        let resp = Client::connect(p.addr).await.send(req).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{method}");
        assert_eq!(heads.load(Ordering::SeqCst), i + 1, "{method} sent twice");
    }
    assert_eq!(p.proxy.stats().redispatched, 0);
}

// ---- paths ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_paths_match_however_they_are_spelled() {
    let (app, other) = (named("app").await, named("other").await);
    let mut app_route = route("app", &["/"], &[&app]);
    app_route.paths_exclude = vec!["/admin".into()];
    let p = start(
        config(),
        vec![app_route, route("other", &["/other"], &[&other])],
    )
    .await;
    for raw in [
        "/admin",
        "/%61dmin",
        "//admin",
        "/x/../admin",
        "/./admin",
        "/%2e/admin/x",
    ] {
        let (status, body) = get(p.addr, "h", raw).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{raw}: {body}");
    }
    // Routed, and forwarded, by the normalised path; the query is kept as sent.
    assert_eq!(body_of(p.addr, "h", "/x/../public").await, "app /public");
    assert_eq!(
        body_of(p.addr, "h", "/%6Fther//x?a=%2F").await,
        "other /other/x"
    );
    let seen = seen_headers(p.addr, "/a/%2e%2e/headers?q=1", &[("host", "h")]).await;
    assert_eq!(seen[0], "HTTP/1.1", "{seen:?}");
    // An encoded separator is refused, and counted.
    for raw in ["/x%2F..%2Fadmin", "/admin%2f", "/%5cadmin"] {
        let (status, body) = get(p.addr, "h", raw).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw}: {body}");
        assert!(body.contains("encoded path separator"), "{body}");
    }
    assert_eq!(p.proxy.stats().answers[&400], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let (web, demo) = (named("web").await, named("demo").await);
    let p = start(
        config(),
        vec![
            route("web", &["/"], &[&web]),
            route("demo", &["/demo"], &[&demo]),
        ],
    )
    .await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Several streams at once on the one connection.
    let mut pending = Vec::new();
    for path in ["/demo/a", "/b", "/headers"] {
        let req = Request::get(format!("http://h2.example:8080{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        pending.push(sender.send_request(req));
    }
    let mut bodies = Vec::new();
    for resp in pending {
        let resp = timeout(T, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        bodies.push(String::from_utf8(body.to_vec()).unwrap());
    }
    assert_eq!(bodies[0], "demo /demo/a");
    assert_eq!(bodies[1], "web /b");
    // The backend got HTTP/1.1 with a Host made from the :authority.
    assert!(bodies[2].starts_with("HTTP/1.1\n"), "{}", bodies[2]);
    assert!(
        bodies[2].contains("\nhost: h2.example:8080\n"),
        "{}",
        bodies[2]
    );
    assert!(
        bodies[2].contains("\nx-forwarded-host: h2.example:8080\n"),
        "{}",
        bodies[2]
    );
}

// ---- changes and lifetimes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_routes_during_requests_does_not_break_them() {
    let (old, new) = (named("old").await, named("new").await);
    let p = start(config(), vec![route("web", &[], &[&old])]).await;
    let mut in_flight = Vec::new();
    for i in 0..8 {
        let addr = p.addr;
        in_flight.push(tokio::spawn(async move {
            get(addr, "h", &format!("/slow/{i}")).await
        }));
    }
    sleep(Duration::from_millis(150)).await;
    // The old backend leaves the table while its requests are in flight.
    p.proxy.set_routes(vec![route("web", &[], &[&new])]);
    for (i, request) in in_flight.into_iter().enumerate() {
        assert_eq!(
            request.await.unwrap(),
            (StatusCode::OK, format!("old /slow/{i}"))
        );
    }
    assert_eq!(body_of(p.addr, "h", "/after").await, "new /after");
    // And back: the counter is the service's, kept across tables.
    p.proxy.set_routes(vec![route("web", &[], &[&old, &new])]);
    assert_eq!(p.proxy.stats().requests["web"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let web = named("web").await;
    let mut cfg = config();
    cfg.idle_timeout = Duration::from_millis(300);
    let p = start(cfg, vec![route("web", &[], &[&web])]).await;
    let mut stream = TcpStream::connect(p.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut all = Vec::new();
    // The response, then EOF once the connection has been idle long enough.
    timeout(T, stream.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("web /"),
        "{text}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "closed after {waited:?}"
    );
    // The pooled backend connection aged out too: the next request opens a new one.
    sleep(Duration::from_millis(400)).await;
    body_of(p.addr, "h", "/").await;
    assert_eq!(web.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    let web = named("web").await;
    let mut p = start(config(), vec![route("web", &[], &[&web])]).await;
    let addr = p.addr;
    let slow = tokio::spawn(async move { get(addr, "h", "/slow").await });
    sleep(Duration::from_millis(100)).await;
    p.stop.take().unwrap().send(()).unwrap();
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "web /slow".into()));
    timeout(T, &mut p.served).await.unwrap().unwrap().unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

#[test]
fn stats_start_at_zero() {
    let proxy = Proxy::new(ProxyConfig::default());
    let stats: ProxyStats = proxy.stats();
    assert!(stats.requests.is_empty());
    assert!(stats.answers.values().all(|&n| n == 0));
}

// ---- compression ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_of_listed_types_are_gzipped_for_clients_that_accept_it() {
    let page = "<p>lb compresses what it is asked to</p>\n".repeat(2000);
    let served = page.clone();
    let b = backend(move |req: Request<Incoming>| {
        let page = served.clone();
        async move {
            let (kind, body) = match req.uri().path() {
                "/png" => ("image/png", page),
                "/encoded" => ("text/html", page),
                _ => ("text/html; charset=utf-8", page),
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert("content-type", kind.parse().unwrap());
            r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            if req.uri().path() == "/encoded" {
                r.headers_mut()
                    .insert("content-encoding", "br".parse().unwrap());
            }
            r
        }
    })
    .await;
    let mut r = route("web", &["/"], &[&b]);
    r.compress = Some(lb::l7::Compress {
        types: vec!["text/html".into()],
    });
    let p = start(config(), vec![r]).await;
    let fetch = |path: &'static str, accept: Option<&'static str>| async move {
        let accept: Vec<_> = accept.map(|a| ("accept-encoding", a)).into_iter().collect();
        let (_, headers, body) = Client::connect(p.addr)
            .await
            .get_with("h", path, &accept)
            .await;
        (headers, body)
    };
    let (headers, body) = fetch("/page", Some("gzip, deflate")).await;
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(headers["vary"], "Accept-Encoding");
    assert_eq!(headers["etag"], "W/\"v1\"");
    assert!(headers.get("content-length").is_none());
    assert!(body.len() < page.len() / 10, "{} bytes", body.len());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text).unwrap();
    assert_eq!(text, page);
    // Not for a client that does not take it, a type not listed, or a body already
    // encoded.
    for (path, accept) in [
        ("/page", None),
        ("/page", Some("gzip;q=0, br")),
        ("/png", Some("gzip")),
        ("/encoded", Some("gzip")),
    ] {
        let (headers, body) = fetch(path, accept).await;
        assert_ne!(
            headers.get("content-encoding").map(|v| v.to_str().unwrap()),
            Some("gzip"),
            "{path} {accept:?}"
        );
        assert_eq!(body.len(), page.len(), "{path} {accept:?}");
        assert_eq!(headers["etag"], "\"v1\"");
    }
}
