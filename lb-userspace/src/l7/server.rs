//! Serving: worker threads that accept and serve client connections, and the graceful
//! shutdown.
//!
//! The proxy runs on worker threads of its own, each with a single-threaded tokio runtime
//! (thread per core, as HAProxy's threads): a client connection, the backend connections
//! its requests use and its timers all stay on one thread, so a request involves no
//! wake-up of another thread and no work stealing, and the data plane is kept clear of
//! whatever else the daemon's runtime is busy with. (On a loopback benchmark this alone
//! changed little next to driving backend connections in the request's task, see
//! `backend`; it is what makes the per-worker tables, pools and counters possible.)
//!
//! Every worker accepts on the shared listening socket; one that holds more connections
//! than the least busy worker passes a new connection on to it, so keep-alive clients
//! spread evenly over the workers whichever thread happened to wake for them.
use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use super::{
    Proxy,
    backend::TICKS_PER_IDLE,
    conn::{Via, serve_connection},
    give_way,
    limits::{Admitted, H2_MAX_ERROR_RESETS, H2_MAX_PENDING_RESETS, MIN_HEADER_BUFFER},
    worker,
};
use crate::supervise::{Supervisor, panic_message};

/// How long in-flight requests (and upgraded connections) may go on once shutdown begins.
const GRACE: Duration = Duration::from_secs(5);

/// A connection accepted by one worker and served by another, with its place under the
/// connection caps and the listener it came in on.
type Handed = (std::net::TcpStream, SocketAddr, Admitted, Via);

/// What the workers accept on: the HTTP listener, the HTTPS one, which may open later
/// (when the first certificate comes), and the HTTP listeners routes have on ports of
/// their own, which open and close as routes ask.
pub struct Frontends {
    pub http: Option<TcpListener>,
    pub https: watch::Receiver<Option<HttpsFrontend>>,
    pub ports: watch::Receiver<PortListeners>,
}

/// The HTTP listeners routes have on ports of their own, by port.
pub type PortListeners = BTreeMap<u16, Arc<std::net::TcpListener>>;

impl Frontends {
    /// Plain HTTP on `listener` only.
    pub fn http(listener: TcpListener) -> Self {
        Self {
            http: Some(listener),
            https: watch::channel(None).1,
            ports: watch::channel(PortListeners::new()).1,
        }
    }
}

/// A connection accepted on a route's own port, by one of a worker's accept tasks.
type PortAccepted = (TcpStream, SocketAddr, u16);

/// Accepts on each of `listeners` (a worker's own handles on them) until the returned
/// tasks are dropped, sending what comes to `to`.
fn accept_on_ports(listeners: &PortListeners, to: &mpsc::Sender<PortAccepted>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for (&port, listener) in listeners {
        let listener = match listener.try_clone().and_then(TcpListener::from_std) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(port, error = %e, "taking the HTTP listener of a route's own port");
                continue;
            }
        };
        let to = to.clone();
        tasks.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        if to.send((stream, peer, port)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        });
    }
    tasks
}

/// The HTTPS listener and its TLS settings.
#[derive(Clone)]
pub struct HttpsFrontend {
    pub listener: Arc<std::net::TcpListener>,
    pub tls: Arc<rustls::ServerConfig>,
}

/// A connection from `listener`, or never when there is none.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A worker's own handle on the HTTPS listener and its TLS, if it is open.
fn https_listener(
    frontend: &mut watch::Receiver<Option<HttpsFrontend>>,
) -> std::io::Result<Option<(TcpListener, TlsAcceptor)>> {
    let Some(frontend) = frontend.borrow_and_update().clone() else {
        return Ok(None);
    };
    let listener = TcpListener::from_std(frontend.listener.try_clone()?)?;
    Ok(Some((listener, TlsAcceptor::from(frontend.tls))))
}

fn clone_listener(
    listener: Option<&std::net::TcpListener>,
) -> std::io::Result<Option<std::net::TcpListener>> {
    listener.map(std::net::TcpListener::try_clone).transpose()
}

/// What the workers of one `serve` know of each other.
struct Peers {
    /// Client connections each worker serves (or has been handed and not yet taken).
    load: Box<[AtomicUsize]>,
    /// Where each worker takes connections passed on by the others.
    inbox: Box<[mpsc::UnboundedSender<Handed>]>,
}

impl Peers {
    /// Which worker serves a connection that worker `me` has just accepted, counted in
    /// that worker's load at once: `me`, unless it has more than one connection more than
    /// the least busy worker (a little slack, so that short connections coming and going
    /// are not passed around for nothing), then that one. Counting at once is what spreads
    /// a burst of connections evenly, rather than sending all of it to the worker that was
    /// least busy when the burst began.
    fn claim(&self, me: usize) -> usize {
        let mine = self.load[me].load(Ordering::Relaxed);
        let (least, fewest) = self
            .load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .expect("at least one worker");
        let to = if mine <= fewest + 1 { me } else { least };
        self.load[to].fetch_add(1, Ordering::Relaxed);
        to
    }
}

impl Proxy {
    /// Serves HTTP and HTTPS on `frontends` until `shutdown` resolves; then stops
    /// accepting, asks every connection to close once its requests are done, and waits for
    /// that a few seconds before closing what is left. A worker that stops before then (an
    /// error or a panic) is reported to `supervisor` as "http worker N"; the others go on.
    pub async fn serve(
        self: Arc<Self>,
        frontends: Frontends,
        shutdown: impl Future<Output = ()> + Send + 'static,
        supervisor: Supervisor,
    ) -> std::io::Result<()> {
        let listener = frontends.http.map(TcpListener::into_std).transpose()?;
        let workers = self.workers;
        let (drain, drain_rx) = watch::channel(false);
        let (inbox, inbox_rx): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let peers = Arc::new(Peers {
            load: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            inbox: inbox.into(),
        });
        // Each worker thread says here when it ends, and how.
        let (exit, mut exits) = mpsc::unbounded_channel::<(usize, Result<(), String>)>();
        let mut running = 0;
        let mut started = Ok(());
        for (index, inbox) in inbox_rx.into_iter().enumerate() {
            let worker = Worker {
                proxy: self.clone(),
                index,
                peers: peers.clone(),
                drain: drain_rx.clone(),
                https: frontends.https.clone(),
                ports: frontends.ports.clone(),
            };
            let exit = exit.clone();
            let spawned = clone_listener(listener.as_ref()).and_then(|listener| {
                std::thread::Builder::new()
                    .name(format!("lb-l7-{index}"))
                    .spawn(move || {
                        // Client HTTP is parsed here: with no capability at all.
                        crate::privileges::keep_only_in_thread(crate::privileges::HTTP_WORKER);
                        let run = std::panic::AssertUnwindSafe(|| worker.run(listener, inbox));
                        let outcome = match std::panic::catch_unwind(run) {
                            Ok(ended) => ended.map_err(|e| e.to_string()),
                            Err(panic) => Err(format!("it panicked: {}", panic_message(panic))),
                        };
                        let _ = exit.send((index, outcome));
                    })
            });
            if let Err(e) = spawned {
                started = Err(e);
                break;
            }
            running += 1;
        }
        // The workers hold their own handles on the socket: it closes when they stop.
        drop(listener);
        let sweeper = tokio::spawn(sweep_pools(self.clone()));
        if started.is_ok() {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    Some((index, outcome)) = exits.recv() => {
                        running -= 1;
                        let why = outcome.err().unwrap_or_else(|| "it stopped".into());
                        supervisor.report(format!("http worker {index}"), why);
                    }
                }
            }
        }
        drain.send_replace(true);
        for _ in 0..running {
            match exits.recv().await {
                Some((_, Ok(()))) | None => {}
                Some((index, Err(e))) => tracing::error!("HTTP worker {index}: {e}"),
            }
        }
        sweeper.abort();
        started
    }
}

struct Worker {
    proxy: Arc<Proxy>,
    index: usize,
    peers: Arc<Peers>,
    drain: watch::Receiver<bool>,
    https: watch::Receiver<Option<HttpsFrontend>>,
    ports: watch::Receiver<PortListeners>,
}

impl Worker {
    fn run(
        self,
        listener: Option<std::net::TcpListener>,
        inbox: mpsc::UnboundedReceiver<Handed>,
    ) -> std::io::Result<()> {
        worker::set_index(self.index);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(give_way::before_park)
            .on_thread_unpark(give_way::after_unpark)
            .build()?;
        // Dropping the runtime afterwards ends whatever outlived the grace period.
        runtime.block_on(self.serve(listener, inbox))
    }

    async fn serve(
        self,
        listener: Option<std::net::TcpListener>,
        mut inbox: mpsc::UnboundedReceiver<Handed>,
    ) -> std::io::Result<()> {
        let http = listener.map(TcpListener::from_std).transpose()?;
        // The HTTPS listener, from the start or from when it opens (its first certificate).
        let mut https_rx = self.https.clone();
        let mut https = https_listener(&mut https_rx)?;
        let mut https_open = true;
        // The routes' own ports, each accepted on by a task of this worker's.
        let mut ports_rx = self.ports.clone();
        let (port_tx, mut port_accepted) = mpsc::channel::<PortAccepted>(64);
        let mut port_accepts = accept_on_ports(&ports_rx.borrow_and_update(), &port_tx);
        let mut ports_open = true;
        let builder = Arc::new(self.builder());
        // This worker's clock for the backends' response timeout; ends with the runtime.
        let proxy = self.proxy.clone();
        let index = self.index;
        tokio::spawn(async move { proxy.response_head.run(index).await });
        let mut conns = JoinSet::new();
        let mut drain = self.drain.clone();
        let draining = drain.wait_for(|d| *d);
        tokio::pin!(draining);
        loop {
            tokio::select! {
                _ = &mut draining => break,
                accepted = accept(http.as_ref()) => match accepted {
                    Ok((stream, peer)) => self.accepted(stream, peer, Via::Http, &mut conns, &builder),
                    Err(e) => accept_failed(e).await,
                },
                accepted = accept(https.as_ref().map(|(l, _)| l)) => match (accepted, &https) {
                    (Ok((stream, peer)), Some((_, tls))) => {
                        let via = Via::Https(tls.clone());
                        self.accepted(stream, peer, via, &mut conns, &builder);
                    }
                    (Ok(_), None) => {}
                    (Err(e), _) => accept_failed(e).await,
                },
                Some((stream, peer, port)) = port_accepted.recv() => {
                    self.accepted(stream, peer, Via::Port(port), &mut conns, &builder);
                }
                changed = https_rx.changed(), if https_open => match changed {
                    Ok(()) => https = https_listener(&mut https_rx)?,
                    Err(_) => https_open = false,
                },
                changed = ports_rx.changed(), if ports_open => match changed {
                    // The old tasks end as they are dropped, and with them this worker's
                    // handles on ports no route asks for any more.
                    Ok(()) => port_accepts = accept_on_ports(&ports_rx.borrow_and_update(), &port_tx),
                    Err(_) => ports_open = false,
                },
                Some((stream, peer, admitted, via)) = inbox.recv() => {
                    // Already counted in this worker's load by the one that passed it on.
                    match TcpStream::from_std(stream) {
                        Ok(stream) => {
                            self.spawn(&mut conns, &builder, stream, peer, admitted, via);
                        }
                        Err(e) => {
                            self.peers.load[self.index].fetch_sub(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "taking over a connection");
                        }
                    }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop((http, https, port_accepts));
        let finished =
            tokio::time::timeout(GRACE, async { while conns.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(
                connections = conns.len(),
                "closing connections still busy after the shutdown grace period"
            );
        }
        conns.shutdown().await;
        Ok(())
    }

    /// The HTTP/1.1 and h2 settings every client connection is served with.
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let limits = &self.proxy.config.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // No Date of our own: backends send theirs, and it would cost a clock read per
        // response. One flat write per response rather than writev of head and body:
        // measured 2-6 % more requests/s with small bodies (see `backend::connect`).
        // A head larger than the read buffer is answered 431 by hyper. Heads are timed by
        // `conn`, not by hyper's timer (a timer entry per request).
        builder
            .http1()
            .keep_alive(true)
            .auto_date_header(false)
            .writev(false)
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BUFFER));
        // A peer that stops answering pings is gone; the first stream is awaited by `conn`.
        builder
            .http2()
            .auto_date_header(false)
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.header_timeout)
            .keep_alive_timeout(limits.header_timeout)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(limits.h2_max_streams)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_ERROR_RESETS);
        builder
    }

    /// A connection accepted `via` one of the listeners: admitted under the caps, then
    /// served here or passed on.
    fn accepted(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        via: Via,
        conns: &mut JoinSet<()>,
        builder: &Arc<auto::Builder<TokioExecutor>>,
    ) {
        // Above a cap: closed at once (dropped), which costs the least.
        let admitted = self.proxy.caps.admit(peer.ip()).map_err(|why| {
            self.proxy.refusals.count(why);
            tracing::debug!(client = %peer, refused = why.name(), "connection refused");
        });
        if let Ok(admitted) = admitted
            && let Some((stream, admitted, via)) = self.pass_on(stream, peer, admitted, via)
        {
            self.spawn(conns, builder, stream, peer, admitted, via);
        }
    }

    /// Passes `stream` on to the worker that [`Peers::claim`]s it when that is another
    /// one; gives it back to serve here otherwise.
    fn pass_on(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: Admitted,
        via: Via,
    ) -> Option<(TcpStream, Admitted, Via)> {
        let to = self.peers.claim(self.index);
        if to == self.index {
            return Some((stream, admitted, via));
        }
        let load = &self.peers.load[to];
        match stream.into_std() {
            Ok(stream) => {
                // The other worker gone (shutting down): nobody serves it.
                if self.peers.inbox[to]
                    .send((stream, peer, admitted, via))
                    .is_err()
                {
                    load.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                load.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "passing a connection on");
            }
        }
        None
    }

    /// Serves `stream` here; the caller has counted it in this worker's load.
    fn spawn(
        &self,
        conns: &mut JoinSet<()>,
        builder: &Arc<auto::Builder<TokioExecutor>>,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: Admitted,
        via: Via,
    ) {
        let (proxy, builder, drain) = (self.proxy.clone(), builder.clone(), self.drain.clone());
        let peers = self.peers.clone();
        let index = self.index;
        conns.spawn(async move {
            serve_connection(proxy, &builder, stream, peer, drain, via).await;
            drop(admitted);
            peers.load[index].fetch_sub(1, Ordering::Relaxed);
        });
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

/// Advances the pools' clock and closes pooled backend connections that have been idle
/// too long, even for backends no request has gone to since.
async fn sweep_pools(proxy: Arc<Proxy>) {
    let tick = (proxy.config.idle_timeout / TICKS_PER_IDLE).max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let backends: Vec<_> = {
            let registry = proxy.registry.lock().unwrap();
            registry.pool_clock.fetch_add(1, Ordering::Relaxed);
            registry.backends.values().cloned().collect()
        };
        for backend in backends {
            backend.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(workers: usize) -> Peers {
        let (inbox, _): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        Peers {
            load: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            inbox: inbox.into(),
        }
    }

    fn loads(p: &Peers) -> Vec<usize> {
        p.load.iter().map(|l| l.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn a_burst_accepted_by_one_worker_is_spread_evenly() {
        // wrk opening its 64 keep-alive connections, all accepted by the worker that woke
        // first, before the others have taken any of those passed to them.
        let p = peers(2);
        for _ in 0..64 {
            p.claim(0);
        }
        let l = loads(&p);
        assert!(l[0].abs_diff(l[1]) <= 2, "{l:?}");
        let p = peers(4);
        for i in 0..64 {
            p.claim(i % 2);
        }
        let l = loads(&p);
        assert!(
            l.iter().max().unwrap() - l.iter().min().unwrap() <= 2,
            "{l:?}"
        );
    }

    #[test]
    fn a_worker_keeps_what_it_accepts_while_the_load_is_even() {
        let p = peers(2);
        assert_eq!(p.claim(1), 1);
        assert_eq!(p.claim(1), 1);
        assert_eq!(p.claim(1), 0, "two ahead: passed on");
        assert_eq!(loads(&p), vec![1, 2]);
    }
}
