//! One client connection: HTTP/1.1 or h2c served on it, closed when idle or when the
//! server drains, and turned into a tunnel when a request upgrades it.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpStream, sync::watch, time::Instant};

use super::Proxy;

/// Each client connection looks at its activity this many times per idle timeout, and
/// closes when it saw none for that many looks in a row: after between one and one and a
/// quarter idle timeouts.
const LOOKS: u32 = 4;

type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Per client connection: what each of its requests needs.
pub(crate) struct Conn {
    pub proxy: Arc<Proxy>,
    /// The client's IP as an X-Forwarded-For value, made once.
    pub client_ip: HeaderValue,
    /// Whether the client is a trusted proxy, whose X-Forwarded-* headers are kept.
    pub client_trusted: bool,
    activity: Activity,
    /// Set by a request whose upgrade the backend accepted; run once hyper lets go of
    /// the connection.
    tunnel: Mutex<Option<Tunnel>>,
}

impl Conn {
    pub fn set_tunnel(&self, tunnel: impl Future<Output = ()> + Send + 'static) {
        *self.tunnel.lock().unwrap() = Some(Box::pin(tunnel));
    }
}

/// Requests in progress on a client connection, and how many ever started: what tells an
/// idle connection, for HTTP/1 and HTTP/2 alike, without reading the clock per request.
#[derive(Default)]
struct Activity {
    active: AtomicUsize,
    started: AtomicU64,
}

/// A request in progress, until its response body is done with.
pub(crate) struct Active(Arc<Conn>);

impl Active {
    fn start(conn: Arc<Conn>) -> Self {
        conn.activity.active.fetch_add(1, Ordering::Relaxed);
        conn.activity.started.fetch_add(1, Ordering::Relaxed);
        Self(conn)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.activity.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one client connection to its end: closed by the client, idle for too long,
/// closed gracefully once `drain` turns true, or upgraded and then tunnelled to its end.
pub(crate) async fn serve_connection(
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    mut drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let idle = proxy.config.idle_timeout;
    let client_trusted = proxy.config.trusted_proxies.trusts(peer.ip());
    let conn = Arc::new(Conn {
        proxy,
        client_ip: HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header"),
        client_trusted,
        activity: Activity::default(),
        tunnel: Mutex::new(None),
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let active = Active::start(conn.clone());
            async move {
                let response = active.0.proxy.forward(req, &active.0).await;
                Ok::<_, Infallible>(response.map(|body| body.with_active(active)))
            }
        })
    };
    let http = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(http);
    let look = (idle / LOOKS).max(Duration::from_millis(10));
    let mut looks = tokio::time::interval_at(Instant::now() + look, look);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let draining = async move {
        // An error means the server is gone: as good as a drain.
        let _ = drain.wait_for(|d| *d).await;
    };
    tokio::pin!(draining);
    let (mut seen, mut quiet, mut closing, mut drained) = (0, 0, false, false);
    loop {
        tokio::select! {
            done = http.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(client = %peer, error = %e, "client connection ended");
                }
                break;
            }
            _ = looks.tick() => {
                let started = conn.activity.started.load(Ordering::Relaxed);
                if started != seen || conn.activity.active.load(Ordering::Relaxed) > 0 {
                    (seen, quiet) = (started, 0);
                    continue;
                }
                quiet += 1;
                if quiet < LOOKS {
                    continue;
                }
                // Asked once to close (HTTP/2 GOAWAY); still there an idle period later
                // (a client stalled in its request head): dropped.
                if closing {
                    return;
                }
                http.as_mut().graceful_shutdown();
                (closing, quiet) = (true, 0);
            }
            () = &mut draining, if !drained => {
                drained = true;
                http.as_mut().graceful_shutdown();
            }
        }
    }
    let tunnel = conn.tunnel.lock().unwrap().take();
    if let Some(tunnel) = tunnel {
        tunnel.await;
    }
}
