//! The L7 proxy's limits on loopback: each timeout ends what it should, in time, each cap
//! refuses what is above it, and each refusal is counted in the stats.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb::l7::{Limits, Proxy, ProxyConfig, Route, RouteTimeouts};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    time::{sleep, timeout},
};

type TestBody = BoxBody<Bytes, Infallible>;

const T: Duration = Duration::from_secs(10);

/// A hyper backend: "/big" answers `BIG` bytes, "/hold" waits `HOLD` before answering
/// (counting the requests waiting at once), "/post" reads the body and tells its size.
struct Backend {
    addr: SocketAddr,
    /// The most requests for "/hold" there ever were at once.
    peak: Arc<AtomicUsize>,
    /// Connections that ended.
    closed: Arc<AtomicUsize>,
}

const BIG: usize = 64 << 20;
const HOLD: Duration = Duration::from_millis(500);

async fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (now, peak, closed) = <(Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>)>::default();
    let b = Backend {
        addr,
        peak: peak.clone(),
        closed: closed.clone(),
    };
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (now, peak, closed) = (now.clone(), peak.clone(), closed.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (now, peak) = (now.clone(), peak.clone());
                    async move {
                        let body: TestBody = match req.uri().path() {
                            "/big" => Full::new(Bytes::from(vec![b'x'; BIG])).boxed(),
                            "/hold" => {
                                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(n, Ordering::SeqCst);
                                sleep(HOLD).await;
                                now.fetch_sub(1, Ordering::SeqCst);
                                Full::new(Bytes::from("held")).boxed()
                            }
                            "/post" => {
                                let got = req.into_body().collect().await;
                                let n = got.map_or(0, |b| b.to_bytes().len());
                                Full::new(Bytes::from(format!("got {n}"))).boxed()
                            }
                            _ => Full::new(Bytes::from("ok")).boxed(),
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    b
}

struct Running {
    proxy: Arc<Proxy>,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(limits: Limits, backend: SocketAddr) -> Running {
    start_with_backends(limits, vec![backend]).await
}

async fn start_with_backends(limits: Limits, backends: Vec<SocketAddr>) -> Running {
    start_with(config(limits), backends).await
}

fn config(limits: Limits) -> ProxyConfig {
    ProxyConfig {
        connect_timeout: Duration::from_millis(500),
        workers: 2,
        limits,
        ..ProxyConfig::default()
    }
}

async fn start_with(config: ProxyConfig, backends: Vec<SocketAddr>) -> Running {
    let proxy = Proxy::new(config);
    proxy.set_routes(vec![Route {
        service: "web".into(),
        backends,
        ..Route::default()
    }]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(proxy.clone().serve(
        lb::l7::Frontends::http(listener),
        async move {
            let _ = stopped.await;
        },
        lb::supervise::Supervisor::default(),
    ));
    Running {
        proxy,
        addr,
        _stop: stop,
    }
}

impl Running {
    fn refused(&self, what: &str) -> u64 {
        self.proxy.stats().refused[what]
    }
}

/// Reads until the proxy closes the connection; what it sent and when it closed.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Instant) {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(T, stream.read(&mut buf))
            .await
            .expect("never closed")
        {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&all).into(), Instant::now()),
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

fn short(header: Duration) -> Limits {
    Limits {
        header_timeout: header,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_stuck_mid_header_is_closed_on_time_and_counted() {
    let b = backend().await;
    let p = start(short(Duration::from_millis(600)), b.addr).await;

    // Part of a head, then nothing.
    let mut mid = TcpStream::connect(p.addr).await.unwrap();
    let opened = Instant::now();
    mid.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    for s in [&mut mid, &mut silent] {
        let (_, closed) = read_until_closed(s).await;
        let after = closed - opened;
        assert!(
            after >= Duration::from_millis(550) && after < Duration::from_millis(1500),
            "closed after {after:?}"
        );
    }
    assert_eq!(p.refused("header_timeout"), 2);

    // A head trickled a byte at a time is closed just the same, however steady.
    let mut trickle = TcpStream::connect(p.addr).await.unwrap();
    let opened = Instant::now();
    let head =
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut sent = 0;
    for byte in head {
        if trickle.write_all(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        sleep(Duration::from_millis(50)).await;
    }
    assert!(sent < head.len(), "the whole head got through");
    let after = read_until_closed(&mut trickle).await.1 - opened;
    assert!(
        after < Duration::from_millis(1500),
        "closed after {after:?}"
    );
    assert_eq!(p.refused("header_timeout"), 3);

    // A keep-alive connection that goes quiet after a request is closed, but is no
    // refusal.
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let (text, _) = read_until_closed(&mut idle).await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
        "{text}"
    );
    assert_eq!(p.refused("header_timeout"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_stuck_mid_its_next_head_is_closed_on_time_and_counted() {
    let b = backend().await;
    let p = start(short(Duration::from_millis(600)), b.addr).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // Served, and kept open: the first answer whole, then the next head's first bytes.
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"ok") {
        let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    let begun = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let (text, closed) = read_until_closed(&mut s).await;
    assert_eq!(text, "", "nothing answered to a head that never ended");
    let after = closed - begun;
    assert!(
        after >= Duration::from_millis(500) && after < Duration::from_millis(1500),
        "closed after {after:?}"
    );
    assert_eq!(p.refused("header_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_between_streams_lasts_the_idle_timeout_not_the_header_timeout() {
    let b = backend().await;
    let config = ProxyConfig {
        idle_timeout: Duration::from_millis(1600),
        ..config(short(Duration::from_millis(400)))
    };
    let p = start_with(config, vec![b.addr]).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let opened = Instant::now();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let get = |mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>| async move {
        let req = Request::get("http://h/").body(Empty::new()).unwrap();
        let resp = timeout(T, sender.send_request(req)).await.unwrap();
        resp.map(|r| r.status())
    };
    assert_eq!(get(sender.clone()).await.unwrap(), StatusCode::OK);
    // Quiet for twice the header timeout: still open, and serving.
    sleep(Duration::from_millis(800)).await;
    assert_eq!(get(sender.clone()).await.unwrap(), StatusCode::OK);
    let served = Instant::now();
    // Closed once idle for its timeout (and at most a quarter more, and some slack).
    let ended = timeout(T, ended).await.unwrap().unwrap();
    let idle = ended - served;
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_millis(2600),
        "closed after {idle:?} idle ({:?} open)",
        ended - opened
    );
    assert_eq!(p.refused("header_timeout"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_too_large_is_answered_431_and_counted() {
    let b = backend().await;
    let limits = Limits {
        max_header_bytes: 16 << 10,
        ..Limits::default()
    };
    let p = start(limits, b.addr).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let big = "a".repeat(20 << 10);
    // The proxy may answer and close before it has read all of it.
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await;
    let (text, _) = read_until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    // Counted when the connection ends, just after the answer is out.
    assert!(
        eventually(|| p.refused("header_too_large") == 1).await,
        "refused: {}",
        p.refused("header_too_large")
    );

    // Below the limit: served.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let fits = "a".repeat(10 << 10);
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX-Big: {fits}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (text, _) = read_until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(p.refused("header_too_large"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_above_a_clients_cap_are_closed_at_once_and_counted() {
    let b = backend().await;
    let limits = Limits {
        max_connections_per_client: 3,
        ..Limits::default()
    };
    let p = start(limits, b.addr).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        // Served: a request goes through.
        s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut fourth = TcpStream::connect(p.addr).await.unwrap();
    let _ = fourth.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let (text, _) = read_until_closed(&mut fourth).await;
    assert_eq!(text, "", "the fourth connection was served");
    assert_eq!(p.refused("client_connections"), 1);

    // One closed: room for another.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await;
        if read_until_closed(&mut s)
            .await
            .0
            .starts_with("HTTP/1.1 200")
        {
            ok = true;
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a freed place was never given again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_of_all_connections_is_kept() {
    let b = backend().await;
    let limits = Limits {
        max_connections: 4,
        ..Limits::default()
    };
    let p = start(limits, b.addr).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut fifth = TcpStream::connect(p.addr).await.unwrap();
    let (text, _) = read_until_closed(&mut fifth).await;
    assert_eq!(text, "");
    assert_eq!(p.refused("connections"), 1);
    assert_eq!(p.refused("client_connections"), 0);
}

/// `n` requests for "/hold" at once, each on a connection of its own: their statuses.
async fn hold_at_once(p: &Running, n: usize) -> Vec<u16> {
    let requests = (0..n).map(|_| {
        let addr = p.addr;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /hold HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let (text, _) = read_until_closed(&mut s).await;
            text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
        })
    });
    let mut statuses = Vec::new();
    for r in requests.collect::<Vec<_>>() {
        statuses.push(r.await.unwrap());
    }
    statuses.sort_unstable();
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_backend_are_capped_and_the_overflow_goes_elsewhere_or_gets_503() {
    let (b1, b2) = (backend().await, backend().await);
    let limits = Limits {
        max_connections_per_backend: 2,
        ..Limits::default()
    };
    // One backend: two requests at once are served, the others answered 503 at once.
    let p = start(limits.clone(), b1.addr).await;
    let statuses = hold_at_once(&p, 5).await;
    assert_eq!(statuses, [200, 200, 503, 503, 503]);
    assert_eq!(b1.peak.load(Ordering::SeqCst), 2);
    assert_eq!(p.refused("backend_connections"), 3);
    let open = || p.proxy.stats().backend_connections[&b1.addr.to_string()];
    assert!(open() <= 2, "{} connections open", open());
    // Once they are done, their connections (pooled now, or closed to make room for a
    // new one on another worker) serve what comes next.
    for _ in 0..10 {
        assert_eq!(hold_at_once(&p, 2).await, [200, 200]);
    }
    assert_eq!(p.refused("backend_connections"), 3);
    assert!(open() <= 2, "{} connections open", open());

    // Two backends: a request the first cannot take goes to the other (the route's
    // redispatch), so four are served at once, and only the fifth is refused.
    let p = start_with_backends(limits, vec![b1.addr, b2.addr]).await;
    b1.peak.store(0, Ordering::SeqCst);
    let statuses = hold_at_once(&p, 5).await;
    assert_eq!(statuses, [200, 200, 200, 200, 503]);
    assert_eq!(b1.peak.load(Ordering::SeqCst), 2);
    assert_eq!(b2.peak.load(Ordering::SeqCst), 2);
    assert_eq!(p.refused("backend_connections"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_is_answered_408_and_frees_the_backend() {
    let b = backend().await;
    let limits = Limits {
        body_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let p = start(limits, b.addr).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let sent = Instant::now();
    s.write_all(b"POST /post HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    let after = sent.elapsed();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        after >= Duration::from_millis(450) && after < Duration::from_millis(1500),
        "answered after {after:?}"
    );
    assert_eq!(p.refused("body_timeout"), 1);
    // The backend connection that carried the body is closed, not pooled half-sent.
    let closed = timeout(T, async {
        while b.closed.load(Ordering::SeqCst) == 0 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the backend connection was kept");

    // A body that keeps coming, however slowly, is not cut.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /post HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..8 {
        sleep(Duration::from_millis(200)).await;
        s.write_all(b"x").await.unwrap();
    }
    let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("got 8"),
        "{text}"
    );
    assert_eq!(p.refused("body_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_does_not_read_is_cut_on_time() {
    let b = backend().await;
    let limits = Limits {
        response_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let p = start(limits, b.addr).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    // Never read: the socket buffers fill and the response stops moving.
    let sent = Instant::now();
    timeout(T, async {
        while b.closed.load(Ordering::SeqCst) == 0 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the backend connection was never closed");
    let after = sent.elapsed();
    assert!(
        after >= Duration::from_millis(700) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
    assert_eq!(p.refused("response_timeout"), 1);
    // What the client now reads ends short of the body.
    let mut got = Vec::new();
    let _ = timeout(T, s.read_to_end(&mut got)).await.unwrap();
    assert!(got.len() < BIG, "the whole response came");

    // A client that reads slowly but steadily gets all of it.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut total = 0;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        total += n;
        sleep(Duration::from_millis(40)).await;
    }
    assert!(total > BIG, "{total}");
    assert_eq!(p.refused("response_timeout"), 1);
}

/// A backend that accepts any upgrade and echoes.
async fn upgrade_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await
                    .unwrap();
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    echo
}

/// Asks `proxy` for a WebSocket upgrade on `host`; the stream, switched.
async fn upgraded(proxy: SocketAddr, host: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"), "{host}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed() {
    let echo = upgrade_echo().await;
    let limits = Limits {
        tunnel_timeout: Duration::from_millis(600),
        ..Limits::default()
    };
    let p = start(limits, echo).await;
    let mut s = upgraded(p.addr, "h").await;
    let mut buf = [0u8; 1024];
    // The tunnel holds its backend connection's place under the backend's cap.
    let open = || p.proxy.stats().backend_connections[&echo.to_string()];
    assert_eq!(open(), 1);
    // Busy for longer than the timeout: kept.
    for _ in 0..6 {
        sleep(Duration::from_millis(200)).await;
        s.write_all(b"ping").await.unwrap();
        let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"ping");
    }
    // Then quiet: closed.
    let quiet = Instant::now();
    let (_, closed) = read_until_closed(&mut s).await;
    let after = closed - quiet;
    assert!(
        after >= Duration::from_millis(550) && after < Duration::from_secs(2),
        "closed after {after:?}"
    );
    assert_eq!(p.refused("tunnel_timeout"), 1);
    assert!(
        eventually(|| open() == 0).await,
        "the tunnel's place was never given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_s_own_timeouts_replace_the_proxy_s_for_it_alone() {
    let b = backend().await;
    let echo = upgrade_echo().await;
    // The proxy's: a minute for an answer, an hour for an idle tunnel.
    let p = start(Limits::default(), b.addr).await;
    let own = RouteTimeouts {
        server: Some(Duration::from_millis(200)),
        tunnel: Some(Duration::from_millis(400)),
    };
    let route = |service: &str, domain: &str, to: SocketAddr, timeouts| Route {
        service: service.into(),
        domains: vec![domain.into()],
        backends: vec![to],
        timeouts,
        ..Route::default()
    };
    p.proxy.set_routes(vec![
        route("quick", "quick.test", b.addr, own),
        route("patient", "patient.test", b.addr, RouteTimeouts::default()),
        route("ws-quick", "ws-quick.test", echo, own),
        route("ws", "ws.test", echo, RouteTimeouts::default()),
    ]);
    let addr = p.addr;
    let hold = |host: &'static str| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!("GET /hold HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let (text, closed) = read_until_closed(&mut s).await;
        (text, closed - started)
    };
    // The backend takes HOLD (500 ms): past the route's 200 ms, within the proxy's.
    let (text, took) = hold("quick.test").await;
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(took < HOLD, "answered after {took:?}");
    let (text, _) = hold("patient.test").await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("held"),
        "{text}"
    );

    let mut quick = upgraded(p.addr, "ws-quick.test").await;
    let mut patient = upgraded(p.addr, "ws.test").await;
    let quiet = Instant::now();
    let (_, closed) = read_until_closed(&mut quick).await;
    let after = closed - quiet;
    assert!(
        after >= Duration::from_millis(350) && after < Duration::from_secs(2),
        "closed after {after:?}"
    );
    // The other tunnel, as quiet as long, is still open.
    patient.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 16];
    let n = timeout(T, patient.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"ping");
}

async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_above_the_cap_are_not_served_at_once() {
    let b = backend().await;
    let limits = Limits {
        h2_max_streams: 5,
        ..Limits::default()
    };
    let p = start(limits, b.addr).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // One request first, so that the client has the proxy's SETTINGS (the cap) before
    // the rest.
    let req = Request::get("http://h/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = timeout(T, sender.clone().send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let requests = (0..20).map(|_| {
        let mut sender = sender.clone();
        async move {
            let req = Request::get("http://h/hold")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = timeout(T, sender.send_request(req)).await.unwrap().unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.unwrap().to_bytes()
        }
    });
    let started = Instant::now();
    let bodies = futures_util::future::join_all(requests).await;
    assert!(bodies.iter().all(|b| b == "held"));
    // 20 requests, 5 at a time, each held 500 ms: four rounds.
    assert_eq!(b.peak.load(Ordering::SeqCst), 5);
    assert!(started.elapsed() >= HOLD * 4, "{:?}", started.elapsed());
}

/// The proxy's frames on `s` until it closes or is quiet for `quiet`: (type, stream,
/// error code of RST_STREAM and GOAWAY).
async fn frames(s: &mut TcpStream, quiet: Duration) -> Vec<(u8, u32, Option<u32>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(Ok(n)) = timeout(quiet, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        let kind = got[at + 3];
        let stream = u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]);
        let p = &got[at + 9..(at + 9 + len).min(got.len())];
        let code = match kind {
            0x3 if p.len() >= 4 => Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
            0x7 if p.len() >= 8 => Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]])),
            _ => None,
        };
        out.push((kind, stream, code));
        at += 9 + len;
    }
    out
}

/// The client preface and an empty SETTINGS.
fn preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out
}

/// HPACK for GET http://h/hold: :method GET, :scheme http (static table), :path and
/// :authority as literals.
const GET_HOLD: [u8; 12] = [
    0x82, 0x86, 0x04, 0x05, b'/', b'h', b'o', b'l', b'd', 0x01, 0x01, b'h',
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_above_the_cap_are_refused() {
    let b = backend().await;
    let limits = Limits {
        h2_max_streams: 5,
        ..Limits::default()
    };
    let p = start(limits, b.addr).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // A client that ignores the cap: 12 streams at once.
    let mut out = preface();
    for i in 0..12u32 {
        out.extend(frame(0x1, 0x5, 2 * i + 1, &GET_HOLD));
    }
    s.write_all(&out).await.unwrap();
    let got = frames(&mut s, HOLD * 3).await;
    let refused = got
        .iter()
        .filter(|(kind, _, code)| *kind == 0x3 && *code == Some(0x7))
        .count();
    let answered = got.iter().filter(|(kind, _, _)| *kind == 0x1).count();
    assert_eq!((refused, answered), (7, 5), "{got:?}");
    assert_eq!(b.peak.load(Ordering::SeqCst), 5);
}

/// An h2 frame: length, type, flags, stream and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_gets_the_connection_closed_and_counted() {
    let b = backend().await;
    let p = start(Limits::default(), b.addr).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // 1,000 streams each opened (GET /hold, which the backend takes its time over) and
    // cancelled at once: the cost is the server's, the client's nothing.
    let mut out = preface();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        out.extend(frame(0x1, 0x5, id, &GET_HOLD));
        out.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    // The proxy may hang up before it has read it all.
    let _ = s.write_all(&out).await;
    let got = frames(&mut s, T).await;
    let goaway = got.iter().find(|(kind, _, _)| *kind == 0x7);
    assert_eq!(
        goaway.map(|g| g.2),
        Some(Some(0xb)),
        "no GOAWAY ENHANCE_YOUR_CALM: {got:?}"
    );
    let counted = timeout(T, async {
        while p.refused("h2_resets") == 0 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(counted.is_ok(), "not counted");
    // Far fewer than the 1,000 streams reached the backend.
    assert!(b.peak.load(Ordering::SeqCst) <= 100);
}

/// A TCP backend that echoes what it gets, for TLS passed through (lb never reads it).
async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The ClientHello a TLS client asking for `name` sends first.
fn client_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passed_through_holds_its_place_under_the_backend_s_cap() {
    let echo = tcp_echo().await;
    let limits = Limits {
        max_connections_per_backend: 1,
        ..Limits::default()
    };
    let proxy = Proxy::new(config(limits));
    proxy.set_routes(vec![Route {
        service: "db".into(),
        backends: vec![echo],
        domains: vec!["db.test".into()],
        tls_passthrough: true,
        ..Route::default()
    }]);
    // The HTTPS listener, with a certificate for the names it would terminate.
    let cert = rcgen::generate_simple_self_signed(vec!["web.test".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let frontend = lb::l7::HttpsFrontend {
        listener: Arc::new(listener),
        tls: Arc::new(tls),
    };
    let (_keep, https) = tokio::sync::watch::channel(Some(frontend));
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(proxy.clone().serve(
        lb::l7::Frontends {
            http: None,
            https,
            ports: tokio::sync::watch::channel(lb::l7::PortListeners::new()).1,
        },
        async move {
            let _ = stopped.await;
        },
        lb::supervise::Supervisor::default(),
    ));
    let hello = client_hello("db.test");
    let passed = || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut echoed = vec![0u8; hello.len()];
        let read = timeout(T, s.read_exact(&mut echoed)).await.unwrap();
        (s, read.is_ok() && echoed == hello)
    };
    let open = || proxy.stats().backend_connections[&echo.to_string()];
    // The first passes through whole (the echo sends the hello back) and holds the place.
    let (first, ok) = passed().await;
    assert!(ok, "the hello did not come back through");
    assert_eq!(open(), 1);
    // The second finds the backend at its cap: closed, and counted.
    let (_second, ok) = passed().await;
    assert!(!ok, "a second tunnel went past the cap of one");
    assert_eq!(proxy.stats().refused["backend_connections"], 1);
    // Once the first ends, its place is given back and the next passes.
    drop(first);
    assert!(
        eventually(|| open() == 0).await,
        "the tunnel's place was never given back"
    );
    let (_third, ok) = passed().await;
    assert!(ok);
}
