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
//! Every worker accepts on the shared listening socket; one that holds clearly more
//! connections than the least busy worker passes a new connection on to it.
use std::{
    cell::Cell,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::{rt::TokioExecutor, server::conn::auto};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};

use super::{Proxy, backend::TICKS_PER_IDLE, conn::serve_connection};

/// How long in-flight requests (and upgraded connections) may go on once shutdown begins.
const GRACE: Duration = Duration::from_secs(5);

thread_local! {
    /// The index of the worker this thread is, which picks its backend connection pools.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker the current thread is (0 outside workers).
pub(crate) fn worker_index() -> usize {
    WORKER.with(Cell::get)
}

/// What the workers of one `serve` know of each other.
struct Peers {
    /// Client connections each worker serves.
    load: Box<[AtomicUsize]>,
    /// Where each worker takes connections passed on by the others.
    inbox: Box<[mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>]>,
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
        let listener = listener.into_std()?;
        let workers = self.workers;
        let (drain, drain_rx) = watch::channel(false);
        let (inbox, inbox_rx): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let peers = Arc::new(Peers {
            load: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            inbox: inbox.into(),
        });
        let mut finished = Vec::with_capacity(workers);
        let mut started = Ok(());
        for (index, inbox) in inbox_rx.into_iter().enumerate() {
            let worker = Worker {
                proxy: self.clone(),
                index,
                peers: peers.clone(),
                drain: drain_rx.clone(),
            };
            let (done, done_rx) = oneshot::channel();
            let spawned = listener.try_clone().and_then(|listener| {
                std::thread::Builder::new()
                    .name(format!("lb-l7-{index}"))
                    .spawn(move || {
                        let _ = done.send(worker.run(listener, inbox));
                    })
            });
            if let Err(e) = spawned {
                started = Err(e);
                break;
            }
            finished.push(done_rx);
        }
        // The workers hold their own handles on the socket: it closes when they stop.
        drop(listener);
        let sweeper = tokio::spawn(sweep_pools(self.clone()));
        if started.is_ok() {
            shutdown.await;
        }
        drain.send_replace(true);
        for done in finished {
            match done.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => started = started.and(Err(e)),
                Err(_) => tracing::error!("an L7 worker thread panicked"),
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
}

impl Worker {
    fn run(
        self,
        listener: std::net::TcpListener,
        inbox: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    ) -> std::io::Result<()> {
        WORKER.with(|w| w.set(self.index));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Dropping the runtime afterwards ends whatever outlived the grace period.
        runtime.block_on(self.serve(listener, inbox))
    }

    async fn serve(
        self,
        listener: std::net::TcpListener,
        mut inbox: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    ) -> std::io::Result<()> {
        let listener = TcpListener::from_std(listener)?;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // No Date of our own: backends send theirs, and it would cost a clock read per
        // response. One flat write per response rather than writev of head and body:
        // measured 2-6 % more requests/s with small bodies (see `backend::connect`).
        builder
            .http1()
            .keep_alive(true)
            .auto_date_header(false)
            .writev(false);
        builder.http2().auto_date_header(false);
        let builder = Arc::new(builder);
        let mut conns = JoinSet::new();
        let mut drain = self.drain.clone();
        let draining = drain.wait_for(|d| *d);
        tokio::pin!(draining);
        loop {
            tokio::select! {
                _ = &mut draining => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Some(stream) = self.pass_on(stream, peer) {
                            self.spawn(&mut conns, &builder, stream, peer);
                        }
                    }
                    Err(e) => accept_failed(e).await,
                },
                Some((stream, peer)) = inbox.recv() => {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => self.spawn(&mut conns, &builder, stream, peer),
                        Err(e) => tracing::warn!(error = %e, "taking over a connection"),
                    }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
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

    /// Passes `stream` on to the least busy worker when this one has clearly more
    /// connections; gives it back to serve here otherwise.
    fn pass_on(&self, stream: TcpStream, peer: SocketAddr) -> Option<TcpStream> {
        let load = &self.peers.load;
        let mine = load[self.index].load(Ordering::Relaxed);
        let (least, fewest) = load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .expect("at least one worker");
        if mine <= fewest + 4 + fewest / 4 {
            return Some(stream);
        }
        match stream.into_std() {
            Ok(stream) => {
                // The other worker gone (shutting down): nobody serves it.
                let _ = self.peers.inbox[least].send((stream, peer));
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "passing a connection on");
                None
            }
        }
    }

    fn spawn(
        &self,
        conns: &mut JoinSet<()>,
        builder: &Arc<auto::Builder<TokioExecutor>>,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let (proxy, builder, drain) = (self.proxy.clone(), builder.clone(), self.drain.clone());
        let peers = self.peers.clone();
        let index = self.index;
        peers.load[index].fetch_add(1, Ordering::Relaxed);
        conns.spawn(async move {
            serve_connection(proxy, &builder, stream, peer, drain).await;
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
