//! The client side: accepting connections, serving HTTP/1.1 and h2c on each, closing the
//! idle ones, and shutting down gracefully.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
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
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::Instant,
};

use super::Proxy;

/// How long in-flight requests (and upgraded connections) may go on once shutdown begins.
const GRACE: Duration = Duration::from_secs(5);

/// Per client connection: what each of its requests needs.
pub(crate) struct Conn {
    pub proxy: Arc<Proxy>,
    /// The client's IP as an X-Forwarded-For value, made once.
    pub client_ip: HeaderValue,
    /// Turns true when the server begins shutting down.
    pub shutdown: watch::Receiver<bool>,
    activity: Activity,
}

/// Requests in progress on a client connection and when the last one ended: what tells an
/// idle connection, for HTTP/1 and HTTP/2 alike.
struct Activity {
    born: Instant,
    active: AtomicUsize,
    /// Milliseconds after `born` when the last request finished.
    last_ms: AtomicU64,
}

impl Activity {
    /// How long the connection has had no request in progress; None while one is.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(now.duration_since(self.born).saturating_sub(last))
    }
}

/// A request in progress, until its response body is done with.
pub struct Active(Arc<Conn>);

impl Active {
    fn start(conn: &Arc<Conn>) -> Self {
        conn.activity.active.fetch_add(1, Ordering::Relaxed);
        Self(conn.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let a = &self.0.activity;
        a.last_ms
            .store(a.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.active.fetch_sub(1, Ordering::Release);
    }
}

/// Resolves once shutdown has begun and the grace period is over.
pub(crate) async fn drained(shutdown: &mut watch::Receiver<bool>) {
    // An error means the server is gone: as good as drained.
    let _ = shutdown.wait_for(|s| *s).await;
    tokio::time::sleep(GRACE).await;
}

impl Proxy {
    /// Serves HTTP on `listener` until `shutdown` resolves; then stops accepting, asks
    /// every connection to close once its requests are done, and waits for that a few
    /// seconds before closing what is left.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (drain, drain_rx) = watch::channel(false);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().keep_alive(true);
        let builder = Arc::new(builder);
        let sweeper = tokio::spawn(sweep_pools(self.clone()));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let conn = serve_connection(
                            self.clone(),
                            builder.clone(),
                            stream,
                            peer,
                            drain_rx.clone(),
                        );
                        conns.spawn(conn);
                    }
                    Err(e) => accept_failed(e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        drain.send_replace(true);
        let finished =
            tokio::time::timeout(GRACE, async { while conns.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(
                connections = conns.len(),
                "closing connections still busy after the shutdown grace period"
            );
        }
        conns.shutdown().await;
        sweeper.abort();
        Ok(())
    }
}

async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    // A client that gave up in the backlog is its own business; anything else (out of
    // file descriptors, most likely) gets a pause rather than a busy loop.
    if !matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
        tracing::warn!(error = %e, "accepting a connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let idle = proxy.config.idle_timeout;
    let conn = Arc::new(Conn {
        proxy,
        client_ip: HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header"),
        shutdown: shutdown.clone(),
        activity: Activity {
            born: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        },
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let conn = conn.clone();
            async move {
                let active = Active::start(&conn);
                let response = conn.proxy.forward(req, &conn).await;
                Ok::<_, Infallible>(response.map(|body| body.with_active(active)))
            }
        })
    };
    let http = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(http);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let (mut closing, mut draining) = (false, false);
    loop {
        tokio::select! {
            done = http.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(client = %peer, error = %e, "client connection ended");
                }
                return;
            }
            () = &mut timer => {
                let now = Instant::now();
                match conn.activity.idle_for(now) {
                    Some(quiet) if quiet >= idle => {
                        // Asked once to close (HTTP/2 GOAWAY); still there an idle period
                        // later (a client stalled in its request head): dropped.
                        if closing {
                            return;
                        }
                        http.as_mut().graceful_shutdown();
                        closing = true;
                        timer.as_mut().reset(now + idle);
                    }
                    Some(quiet) => timer.as_mut().reset(now + (idle - quiet)),
                    None => timer.as_mut().reset(now + idle),
                }
            }
            _ = shutdown.wait_for(|s| *s), if !draining => {
                draining = true;
                http.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Closes pooled backend connections that have been idle too long, even for backends no
/// request has gone to since.
async fn sweep_pools(proxy: Arc<Proxy>) {
    let idle = proxy.config.idle_timeout;
    let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let backends: Vec<_> = proxy
            .registry
            .lock()
            .unwrap()
            .backends
            .values()
            .cloned()
            .collect();
        for backend in backends {
            backend.sweep(idle);
        }
    }
}
