//! Backends: choosing one for a request, and each one's pool of keep-alive connections.
//!
//! Our own pool over `hyper::client::conn::http1` rather than hyper-util's legacy `Client`:
//! the balancer must pick the backend itself (that client picks by URI authority), tell a
//! connect timeout (504) from a refusal (502), resend a request that a stale pooled
//! connection never took, and keep per-backend in-flight counts that least-outstanding reads.
//! The pool is a LIFO stack per backend behind a mutex held for a push or a pop: the most
//! recently used connection is the warmest and the least likely to have been closed by the
//! backend, and the ones at the bottom age out.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{body::UpstreamBody, routes::Balance, routes::Target};

pub(crate) type Sender = SendRequest<UpstreamBody>;

/// Idle connections kept per backend beyond which returned ones are closed.
const MAX_IDLE: usize = 1024;

/// Why no response came from a backend.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("backend {0} sent no response header in time")]
    HeaderTimeout(SocketAddr),
    #[error("request to {0}: {1}")]
    Request(SocketAddr, #[source] hyper::Error),
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::ConnectTimeout(_) | Self::HeaderTimeout(_))
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

pub(crate) struct Backend {
    pub addr: SocketAddr,
    /// Requests sent and not finished (response body not fully passed on yet).
    outstanding: AtomicUsize,
    idle: Mutex<Vec<Idle>>,
}

impl Backend {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            outstanding: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// A pooled connection that is still open and younger than `max_idle`, newest first.
    fn take_idle(&self, max_idle: Duration) -> Option<Sender> {
        loop {
            let Idle { sender, since } = self.idle.lock().unwrap().pop()?;
            if !sender.is_closed() && since.elapsed() < max_idle {
                return Some(sender);
            }
        }
    }

    /// Returns a connection whose last response was read to the end.
    pub fn put_idle(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes pooled connections idle for `max_idle` or more (the oldest are at the bottom).
    pub fn sweep(&self, max_idle: Duration) {
        let mut idle = self.idle.lock().unwrap();
        let keep_from = idle
            .iter()
            .position(|i| i.since.elapsed() < max_idle)
            .unwrap_or(idle.len());
        let expired: Vec<Idle> = idle.drain(..keep_from).collect();
        idle.retain(|i| !i.sender.is_closed());
        drop(idle);
        // Closing happens as the senders drop, outside the lock.
        drop(expired);
    }

    /// A connection ready for a request: a pooled one, or a new one. The flag tells which,
    /// since only a pooled connection may turn out stale.
    pub async fn connection(
        &self,
        connect_timeout: Duration,
        max_idle: Duration,
    ) -> Result<(Sender, bool), UpstreamError> {
        while let Some(mut sender) = self.take_idle(max_idle) {
            // Usually ready at once; a connection returned the moment its response ended
            // may need its task to catch up.
            if sender.is_ready() {
                return Ok((sender, true));
            }
            if let Ok(Ok(())) = tokio::time::timeout(connect_timeout, sender.ready()).await {
                return Ok((sender, true));
            }
        }
        Ok((self.connect(connect_timeout).await?, false))
    }

    async fn connect(&self, timeout: Duration) -> Result<Sender, UpstreamError> {
        let addr = self.addr;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(addr))?
            .map_err(|e| UpstreamError::Connect(addr, e))?;
        // Requests and responses are written whole; Nagle would only add latency.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Request(addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %addr, error = %e, "backend connection ended");
            }
        });
        Ok(sender)
    }
}

/// A request in flight to a backend: counted in its outstanding requests until dropped.
pub(crate) struct Lease {
    pub backend: Arc<Backend>,
}

impl Lease {
    fn new(backend: &Arc<Backend>) -> Self {
        backend.outstanding.fetch_add(1, Ordering::Relaxed);
        Self {
            backend: backend.clone(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks the backend for one request of `target`; None when it has none.
pub(crate) fn pick(target: &Target) -> Option<Lease> {
    let backends = &target.backends;
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let turn = target.cursor.fetch_add(1, Ordering::Relaxed);
    let chosen = match target.balance {
        Balance::RoundRobin => &backends[turn % n],
        Balance::LeastOutstanding => {
            // Scan from a rotating start so that ties (an idle pool) still take turns.
            let start = turn % n;
            (0..n)
                .map(|i| &backends[(start + i) % n])
                .min_by_key(|b| b.outstanding())
                .expect("n > 0")
        }
    };
    Some(Lease::new(chosen))
}
