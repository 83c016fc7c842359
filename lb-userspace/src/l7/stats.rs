//! Counters: requests per service, and the answers lb gives itself.
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use http::StatusCode;
use serde::Serialize;

use super::{limits::Refusals, routes::Registry};

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    /// Requests routed to each service (including those answered 503, 502 or 504).
    pub requests: BTreeMap<String, u64>,
    /// lb's own answers by status: 301, 302, 303, 307, 308 (to HTTPS), 400 (a path with an
    /// encoded separator), 401 (no user's credentials), 403 (a method the route does not
    /// allow, or plain HTTP to a route that denies it), 404 (no route), 503 (no backend),
    /// 502 (backend failed), 504 (backend timed out).
    pub answers: BTreeMap<u16, u64>,
    /// Requests retried on another backend after the first refused the connection (or
    /// closed it before taking the request).
    pub redispatched: u64,
    /// Clients refused or cut by a limit, by kind: header_timeout, header_too_large (431),
    /// body_timeout (408), response_timeout, tunnel_timeout, connections and
    /// client_connections (closed at accept), h2_resets (GOAWAY), backend_connections
    /// (503: every backend tried at its connection cap), tls_handshake (failed or late).
    pub refused: BTreeMap<String, u64>,
    /// Connections open to each backend ("IP:port"): pooled, in use and upgraded.
    pub backend_connections: BTreeMap<String, usize>,
}

/// The statuses lb answers with itself.
#[derive(Default)]
pub(crate) struct Answers {
    bad_path: AtomicU64,
    forbidden: AtomicU64,
    not_found: AtomicU64,
    no_backend: AtomicU64,
    bad_gateway: AtomicU64,
    gateway_timeout: AtomicU64,
    unauthorized: AtomicU64,
    /// 301, 302, 303, 307, 308.
    redirects: [AtomicU64; REDIRECTS.len()],
}

const REDIRECTS: [StatusCode; 5] = [
    StatusCode::MOVED_PERMANENTLY,
    StatusCode::FOUND,
    StatusCode::SEE_OTHER,
    StatusCode::TEMPORARY_REDIRECT,
    StatusCode::PERMANENT_REDIRECT,
];

impl Answers {
    pub fn count(&self, status: StatusCode) {
        let counter = match status {
            StatusCode::BAD_REQUEST => &self.bad_path,
            StatusCode::FORBIDDEN => &self.forbidden,
            StatusCode::NOT_FOUND => &self.not_found,
            StatusCode::SERVICE_UNAVAILABLE => &self.no_backend,
            StatusCode::BAD_GATEWAY => &self.bad_gateway,
            StatusCode::GATEWAY_TIMEOUT => &self.gateway_timeout,
            StatusCode::UNAUTHORIZED => &self.unauthorized,
            other => match REDIRECTS.iter().position(|r| *r == other) {
                Some(i) => &self.redirects[i],
                None => return,
            },
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl ProxyStats {
    pub(crate) fn collect(registry: &Registry, answers: &Answers, refusals: &Refusals) -> Self {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Self {
            requests: registry
                .services
                .iter()
                .map(|(name, c)| (name.to_string(), c.sum()))
                .collect(),
            answers: BTreeMap::from([
                (301, load(&answers.redirects[0])),
                (302, load(&answers.redirects[1])),
                (303, load(&answers.redirects[2])),
                (307, load(&answers.redirects[3])),
                (308, load(&answers.redirects[4])),
                (401, load(&answers.unauthorized)),
                (400, load(&answers.bad_path)),
                (403, load(&answers.forbidden)),
                (404, load(&answers.not_found)),
                (502, load(&answers.bad_gateway)),
                (503, load(&answers.no_backend)),
                (504, load(&answers.gateway_timeout)),
            ]),
            redispatched: 0,
            refused: refusals.snapshot(),
            // A backend reached both in the clear and over TLS counts once, with both.
            backend_connections: registry.backends.iter().fold(
                Default::default(),
                |mut all, ((addr, _, _), b)| {
                    *all.entry(addr.to_string()).or_default() += b.connections();
                    all
                },
            ),
        }
    }
}
