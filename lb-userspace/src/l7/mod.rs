//! The L7 fallback: an HTTP reverse proxy for the services XDP leaves to user space.
//!
//! Clients speak HTTP/1.1 (keep-alive, upgrades) or h2c with prior knowledge, or either
//! over TLS on the HTTPS listener (h2 by ALPN); backends are
//! reached over pooled keep-alive HTTP/1.1 connections, in the clear or over TLS. The route table is rebuilt and
//! swapped whole on every service or health change ([`Proxy::set_routes`]); requests read
//! it without locking.
//!
//! - `routes`: routes and the compiled table (host, then longest path prefix)
//! - `backend`: per-backend connection pools and requests in flight
//! - `backend_tls`: backends reached over TLS, checked or not
//! - `lease`: backend choice, and a request counted against its backend
//! - `sticky`: sticky sessions by a cookie lb inserts
//! - `forward`: one request, from routing to the response (and upgrades), and its one
//!   retry on another backend when the first could not take it
//! - `basic_auth`: a route's users (401 and a challenge for anyone else)
//! - `headers`: hop-by-hop removal, X-Forwarded-* (and whose are believed)
//! - `limits`: timeouts and caps on what a client may hold, and the refusals counted
//! - `path`: the normalised path routes are matched on and requests forwarded with
//! - `rewrite`: a route's header and path rewriting
//! - `compress`: gzip for the responses a route compresses
//! - `request_body`: a client's request body streaming to a backend
//! - `response_body`: the response streaming to the client
//! - `passthrough`: TLS passed whole to a backend chosen by SNI (`reqMode=sni`)
//! - `sni`: the server name of a ClientHello, peeked
//! - `server`: worker threads, accepting, graceful shutdown
//! - `conn`: one client connection (idle close, late heads, upgrades)
//! - `coarse_timeout`: a per-worker coarse clock that requests time out on
//! - `shard`: counters split per worker thread
//! - `stats`: counters
//! - `worker`: which worker thread the current thread is
mod backend;
mod backend_tls;
mod basic_auth;
mod coarse_timeout;
mod compress;
mod conn;
mod forward;
mod give_way;
mod headers;
mod lease;
mod limits;
mod passthrough;
mod path;
mod request_body;
mod response_body;
mod rewrite;
mod routes;
mod server;
mod shard;
mod sni;
mod stats;
mod sticky;
mod worker;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;

pub use backend_tls::BackendTls;
pub use compress::Compress;
pub use headers::{TrustedProxies, parse_cidr};
pub use limits::{Limits, raise_fd_limit};
pub use rewrite::{HeaderRules, PathRule, Rewrite};
pub use routes::{Balance, DomainPattern, PlainHttp, Route, RouteTimeouts, SniPattern};
pub use server::{Frontends, HttpsFrontend, PortListeners};
pub use stats::ProxyStats;

use coarse_timeout::CoarseTimeout;
use limits::{ConnectionCaps, Refusals};
use routes::{Registry, Table};
use shard::Padded;
use stats::Answers;

/// Timeouts and threads of the proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// To open a connection to a backend (then 504).
    pub connect_timeout: Duration,
    /// For a backend's response headers, counted from when the request has been sent in
    /// full (then 504); up to half of it later (see `coarse_timeout`).
    pub response_header_timeout: Duration,
    /// How long a keep-alive connection may sit idle, on the client side and in the
    /// backend pools.
    pub idle_timeout: Duration,
    /// Worker threads serving connections; 0: one per CPU.
    pub workers: usize,
    /// Clients whose X-Forwarded-* headers are kept (and appended to); none by default.
    pub trusted_proxies: TrustedProxies,
    /// What one client may cost: timeouts, sizes, connection caps.
    pub limits: Limits,
    /// The HTTPS listener's port, for redirects to HTTPS.
    pub https_port: u16,
    /// The ACME HTTP-01 challenges this node answers, before any route.
    pub acme_challenges: Arc<crate::acme::Challenges>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            response_header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            workers: 0,
            trusted_proxies: TrustedProxies::default(),
            limits: Limits::default(),
            https_port: 443,
            acme_challenges: Arc::default(),
        }
    }
}

/// The proxy engine: a route table, backend pools and counters. Serve it on any number of
/// listeners; each `serve` runs `workers` threads of its own.
pub struct Proxy {
    config: ProxyConfig,
    /// Worker threads per `serve`, each with its own backend connection pools.
    workers: usize,
    /// The route table, a copy per worker thread (see [`Lease`](lease::Lease)).
    tables: Box<[Padded<ArcSwap<Table>>]>,
    /// What the next table reuses; only `set_routes` and `stats` take the lock.
    registry: Mutex<Registry>,
    answers: Answers,
    /// Requests sent to a second backend because the first could not take them.
    redispatched: AtomicU64,
    refusals: Refusals,
    /// Client connections held, against `limits`' caps (shared by every `serve`).
    caps: Arc<ConnectionCaps>,
    /// A backend's time to answer (`config.response_header_timeout`), kept by the workers.
    response_head: CoarseTimeout,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Arc<Self> {
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => n,
        };
        Arc::new(Self {
            workers,
            tables: (0..workers)
                .map(|_| Padded(ArcSwap::from_pointee(Table::default())))
                .collect(),
            registry: Mutex::new(Registry::new(
                workers,
                config.limits.max_connections_per_backend,
            )),
            answers: Answers::default(),
            redispatched: AtomicU64::new(0),
            refusals: Refusals::default(),
            caps: ConnectionCaps::new(
                config.limits.connection_cap(),
                config.limits.max_connections_per_client,
            ),
            response_head: CoarseTimeout::new(config.response_header_timeout, workers),
            config,
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Replaces the whole route table. Backends that stay keep their pooled connections
    /// and in-flight counts; requests in flight finish on the backend they had.
    pub fn set_routes(&self, routes: Vec<Route>) {
        let mut registry = self.registry.lock().unwrap();
        let tables = registry.tables(&routes);
        for (slot, table) in self.tables.iter().zip(tables) {
            slot.0.store(Arc::new(table));
        }
    }

    /// The current worker's route table.
    fn table(&self) -> Arc<Table> {
        self.tables[worker::index() % self.tables.len()]
            .0
            .load_full()
    }

    /// Requests per service (every request routed to it, whatever the outcome), lb's own
    /// answers by status, clients refused or cut by the limits, and requests redispatched.
    pub fn stats(&self) -> ProxyStats {
        let registry = self.registry.lock().unwrap();
        let mut stats = ProxyStats::collect(&registry, &self.answers, &self.refusals);
        stats.redispatched = self.redispatched.load(Ordering::Relaxed);
        stats
    }
}
