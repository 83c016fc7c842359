//! One client connection: HTTP/1.1 or h2 (h2c, or over TLS) served on it, closed when idle,
//! when a request head (or the TLS handshake) is late, when it stops reading a response, or
//! when the server drains, and turned into a tunnel when a request upgrades it.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderValue, Version};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use super::{
    Proxy,
    limits::{CountedIo, IoCounters, Refusal},
};

/// Each client connection looks at its activity this many times per timeout (the
/// shortest of idle, header and response), and closes when it saw none for an idle
/// timeout of looks in a row: after between one and one and a quarter idle timeouts.
const LOOKS: u32 = 4;

type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Per client connection: what each of its requests needs.
pub(crate) struct Conn {
    pub proxy: Arc<Proxy>,
    /// The client's IP as an X-Forwarded-For value, made once.
    pub client_ip: HeaderValue,
    /// Whether the client is a trusted proxy, whose X-Forwarded-* headers are kept.
    pub client_trusted: bool,
    /// Whether the client came over TLS (lb's HTTPS listener).
    pub https: bool,
    /// The port of the route's own HTTP listener the client came in on (none: the main
    /// HTTP or the HTTPS listener): which routes it may take.
    pub port: Option<u16>,
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
/// And what went through its socket: what tells a client that stopped reading.
#[derive(Default)]
struct Activity {
    active: AtomicUsize,
    started: AtomicU64,
    io: Arc<IoCounters>,
    /// Bytes read from the client when its last request finished.
    read_when_done: AtomicU64,
    /// The client speaks h2 (told by its first request).
    h2: AtomicBool,
}

/// A request in progress, until its response body is done with.
pub(crate) struct Active(Arc<Conn>);

impl Active {
    fn start(conn: Arc<Conn>, version: Version) -> Self {
        let activity = &conn.activity;
        activity.active.fetch_add(1, Ordering::Relaxed);
        if activity.started.fetch_add(1, Ordering::Relaxed) == 0 && version == Version::HTTP_2 {
            activity.h2.store(true, Ordering::Relaxed);
        }
        Self(conn)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let activity = &self.0.activity;
        let read = activity.io.read.load(Ordering::Relaxed);
        activity.read_when_done.store(read, Ordering::Relaxed);
        activity.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The listener a client connection came in on.
#[derive(Clone)]
pub(crate) enum Via {
    /// The main HTTP listener.
    Http,
    /// The HTTPS listener, with its TLS.
    Https(TlsAcceptor),
    /// The HTTP listener that routes have on this port of their own.
    Port(u16),
}

/// Serves one client connection to its end: closed by the client, idle for too long, a
/// request head late (HTTP/1.1; h2: its first stream), a response it stopped reading,
/// closed gracefully once `drain` turns true, or upgraded and then tunnelled to its end.
pub(crate) async fn serve_connection(
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: watch::Receiver<bool>,
    via: Via,
) {
    let _ = stream.set_nodelay(true);
    let accepted = Instant::now();
    let Via::Https(tls) = &via else {
        return serve_http(proxy, builder, stream, peer, drain, accepted, &via).await;
    };
    // A TLS service named by the ClientHello is passed through, not terminated.
    let stream = if proxy.table().has_passthrough() {
        match super::passthrough::serve(&proxy, stream, peer).await {
            Some(stream) => stream,
            None => return,
        }
    } else {
        stream
    };
    // The handshake counts against the time to the first request head.
    let handshake = tokio::time::timeout(proxy.config.limits.header_timeout, tls.accept(stream));
    match handshake.await {
        Ok(Ok(stream)) => serve_http(proxy, builder, stream, peer, drain, accepted, &via).await,
        Ok(Err(e)) => {
            proxy.refusals.count(Refusal::TlsHandshake);
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            proxy.refusals.count(Refusal::TlsHandshake);
            tracing::debug!(client = %peer, "no TLS handshake in time");
        }
    }
}

/// [`serve_connection`] once the connection speaks HTTP (in the clear or over TLS).
async fn serve_http<S>(
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    peer: SocketAddr,
    mut drain: watch::Receiver<bool>,
    accepted: Instant,
    via: &Via,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle = proxy.config.idle_timeout;
    let client_trusted = proxy.config.trusted_proxies.trusts(peer.ip());
    let limits = proxy.config.limits.clone();
    let conn = Arc::new(Conn {
        proxy,
        client_ip: HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header"),
        client_trusted,
        https: matches!(via, Via::Https(_)),
        port: match via {
            Via::Port(port) => Some(*port),
            Via::Http | Via::Https(_) => None,
        },
        activity: Activity::default(),
        tunnel: Mutex::new(None),
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let active = Active::start(conn.clone(), req.version());
            async move {
                let response = active.0.proxy.forward(req, &active.0).await;
                Ok::<_, Infallible>(response.map(|body| body.with_active(active)))
            }
        })
    };
    let io = CountedIo::new(stream, conn.activity.io.clone());
    let http = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(http);
    let shortest = idle.min(limits.header_timeout).min(limits.response_timeout);
    let look = (shortest / LOOKS).max(Duration::from_millis(10));
    let idle_looks = u32::try_from(idle.as_nanos().div_ceil(look.as_nanos())).unwrap_or(u32::MAX);
    let mut looks = tokio::time::interval_at(Instant::now() + look, look);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let draining = async move {
        // An error means the server is gone: as good as a drain.
        let _ = drain.wait_for(|d| *d).await;
    };
    tokio::pin!(draining);
    let (mut seen, mut quiet, mut closing, mut drained) = (0, 0, false, false);
    // Since when the connection has waited for a request head: its accept, then (HTTP/1.1)
    // the first look that found its last request done. Timed here rather than by hyper,
    // whose timer costs a clock read and a timer entry per request.
    let mut waiting = Some(accepted);
    // Set when a look finds the client's socket stalled: the moment its response timeout
    // runs out, so that it is cut then and not up to a look later.
    let stall_deadline = tokio::time::sleep_until(accepted);
    tokio::pin!(stall_deadline);
    let mut stall_armed = false;
    loop {
        tokio::select! {
            done = http.as_mut() => {
                if let Err(e) = done {
                    let limited = conn.refusal(&*e);
                    tracing::debug!(client = %peer, error = %e, ?limited, "client connection ended");
                }
                break;
            }
            () = &mut stall_deadline, if stall_armed => {
                // Still stalled since then (or again, since later: looked at anew).
                stall_armed = false;
                if conn.stalled_past(limits.response_timeout) {
                    tracing::debug!(client = %peer, "the client stopped reading its response");
                    return;
                }
            }
            _ = looks.tick() => {
                let activity = &conn.activity;
                let now = Instant::now();
                let started = activity.started.load(Ordering::Relaxed);
                let busy = activity.active.load(Ordering::Relaxed) > 0;
                // Between requests the wait for a head is timed; h2 streams come as
                // they come, and only the first one is awaited.
                waiting = match waiting {
                    _ if busy || (started > 0 && activity.h2.load(Ordering::Relaxed)) => None,
                    Some(since) if started == seen => Some(since),
                    _ => Some(now),
                };
                if let Some(since) = waiting
                    && now.duration_since(since) >= limits.header_timeout
                {
                    // Part of a head came (or no request ever did): too slow, counted.
                    // Nothing since the last request: a keep-alive connection's idle end.
                    if conn.head_begun() {
                        conn.proxy.refusals.count(Refusal::HeaderTimeout);
                        tracing::debug!(client = %peer, "no request head in time");
                    }
                    return;
                }
                // Its response timeout passed by then, the deadline fires at once.
                if let Some(since) = activity.io.stalled_since() {
                    stall_deadline.as_mut().reset(since + limits.response_timeout);
                    stall_armed = true;
                }
                if started != seen || busy {
                    (seen, quiet) = (started, 0);
                    continue;
                }
                quiet += 1;
                if quiet < idle_looks {
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

impl Conn {
    /// Whether the client's socket has been stalled (full, next to nothing taken) for
    /// `timeout`; counted if so.
    fn stalled_past(&self, timeout: Duration) -> bool {
        let stalled = self
            .activity
            .io
            .stalled_since()
            .is_some_and(|since| since.elapsed() >= timeout);
        if stalled {
            self.proxy.refusals.count(Refusal::ResponseTimeout);
        }
        stalled
    }

    /// Whether a request head has begun and not been received in full: the connection's
    /// first, or bytes came after its last request was done.
    fn head_begun(&self) -> bool {
        let activity = &self.activity;
        activity.started.load(Ordering::Relaxed) == 0
            || activity.io.read.load(Ordering::Relaxed)
                > activity.read_when_done.load(Ordering::Relaxed)
    }

    /// Which limit (if any) ended the connection with `error`, counted.
    fn refusal(&self, error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
        let hyper = error.downcast_ref::<hyper::Error>()?;
        let why = if hyper.is_parse_too_large() {
            Refusal::HeaderTooLarge
        } else if is_h2_calm_down(hyper) {
            Refusal::H2Resets
        } else {
            return None;
        };
        self.proxy.refusals.count(why);
        Some(why)
    }
}

/// Whether the connection ended with our GOAWAY ENHANCE_YOUR_CALM: h2's answer to a
/// client resetting too many streams.
fn is_h2_calm_down(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = e.source();
    }
    false
}
