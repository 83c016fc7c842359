//! Routes, and the compiled table that picks one for a request: by host first, then by the
//! longest path prefix. Prefixes are normalised as request paths are (see `path`), and a
//! request is looked up by its normalised path.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
};

use super::{
    backend::{Backend, PoolClock},
    backend_tls::{BackendTls, TlsConnector},
    basic_auth::BasicAuth,
    compress::Compress,
    path,
    rewrite::Rewrite,
    shard::Sharded,
    sticky::Sticky,
};

/// How a route spreads requests over its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Balance {
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight (across all routes), ties in turn.
    LeastOutstanding,
}

/// One service's place in the URL space and where its requests go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// The service name, for counters and logs.
    pub service: String,
    /// Path prefixes: "/demo" matches "/demo" and "/demo/..." but not "/demox"; a prefix
    /// ending in '/' matches whatever starts with it. Empty: any path.
    pub paths: Vec<String>,
    /// Prefixes (same rule) that must not reach this route.
    pub paths_exclude: Vec<String>,
    /// "example.com" (exact, case-insensitive, the Host's port ignored), "*.example.com"
    /// (any subdomain, not example.com itself) or "*example.com" (any host ending so).
    /// Empty: any host.
    pub domains: Vec<String>,
    /// The healthy backends now; empty: lb answers 503.
    pub backends: Vec<SocketAddr>,
    pub balance: Balance,
    /// Takes the requests no route matches (instead of a 404).
    pub default_backend: bool,
    /// Only these methods are forwarded (empty: any); others are answered 403.
    pub allowed_methods: Vec<http::Method>,
    /// These are answered 403.
    pub denied_methods: Vec<http::Method>,
    /// What a request that came in the clear (not over TLS) gets.
    pub plain_http: PlainHttp,
    /// HTTP basic auth: (user, password hash); empty: none.
    pub users: Vec<(String, String)>,
    /// Headers and path rewritten after routing.
    pub rewrite: Option<Arc<Rewrite>>,
    /// The backends are reached over TLS.
    pub backend_tls: Option<BackendTls>,
    /// The backends speak HTTP/2 (gRPC): h2c, or h2 over `backend_tls`.
    pub backend_h2: bool,
    /// A TLS service: connections to the HTTPS listener whose SNI is a domain (or one of
    /// `sni`) are passed to the backends whole, not terminated (DFP's `reqMode=sni`). No
    /// paths.
    pub tls_passthrough: bool,
    pub sni: Vec<SniPattern>,
    /// Only requests with each of these headers, with that value exactly (DFP's
    /// `serviceHeader`), take this route.
    pub match_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Only requests whose User-Agent holds one of these (lower case, without case; DFP's
    /// `userAgent`) take this route.
    pub match_user_agents: Vec<String>,
    /// Requests for these hosts are redirected (301) to the first domain (DFP's
    /// `redirectFromDomain`).
    pub redirect_from: Vec<String>,
    pub timeouts: RouteTimeouts,
    /// Requests carrying this cookie go to the backend it names; lb inserts it (DFP's
    /// `sessionType=sticky-server`).
    pub sticky_cookie: Option<String>,
    /// Responses gzipped for clients that accept it (DFP's `compressionAlgo`).
    pub compress: Option<Compress>,
    /// Served only on the plain HTTP listener at this port (DFP's `srcPort`), not on the
    /// main HTTP and HTTPS listeners.
    pub port: Option<u16>,
}

/// A route's own timeouts, in place of the proxy's (none: the proxy's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteTimeouts {
    /// For the backend's response head (DFP's `timeoutServer`).
    pub server: Option<std::time::Duration>,
    /// For an idle upgraded connection or TLS passed through (DFP's `timeoutTunnel`).
    pub tunnel: Option<std::time::Duration>,
}

/// How a route's domain matches a request's host (or a passed-through TLS server name),
/// without case and without the Host's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainPattern<'a> {
    /// `example.com`: that name only.
    Exact(&'a str),
    /// `*.example.com`: any subdomain, not `example.com` itself.
    Subdomains(&'a str),
    /// `*example.com` (DFP's wildcard, HAProxy's `hdr_end`): any name that ends so,
    /// `example.com` and `myexample.com` included.
    EndsWith(&'a str),
}

impl<'a> DomainPattern<'a> {
    pub fn parse(domain: &'a str) -> Self {
        if let Some(parent) = domain.strip_prefix("*.") {
            DomainPattern::Subdomains(parent)
        } else if let Some(suffix) = domain.strip_prefix('*') {
            DomainPattern::EndsWith(suffix)
        } else {
            DomainPattern::Exact(domain)
        }
    }

    /// The name it is written with, without its wildcard.
    pub fn name(self) -> &'a str {
        match self {
            DomainPattern::Exact(n) | DomainPattern::Subdomains(n) | DomainPattern::EndsWith(n) => {
                n
            }
        }
    }
}

/// A server name a passthrough route takes (lower case), as HAProxy's `req_ssl_sni -m
/// str|beg|end|reg` compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniPattern {
    Exact(String),
    Begins(String),
    Ends(String),
    /// A regular expression found anywhere in the name (validated with the service).
    Regex(String),
}

/// A pattern ready to match.
enum SniMatcher {
    Begins(Box<str>),
    Ends(Box<str>),
    Regex(regex::Regex),
}

impl SniMatcher {
    fn matches(&self, name: &str) -> bool {
        match self {
            SniMatcher::Begins(p) => name.starts_with(&**p),
            SniMatcher::Ends(p) => name.ends_with(&**p),
            SniMatcher::Regex(r) => r.is_match(name),
        }
    }
}

/// What a route does with a request that came over plain HTTP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PlainHttp {
    #[default]
    Serve,
    /// Redirected to the same URL over HTTPS, with this status (DFP's `httpsOnly`).
    Redirect(http::StatusCode),
    /// Answered 403 (DFP's `denyHttp`).
    Deny,
}

/// A route as the request path uses it: shared backend handles and counters, no strings to
/// build per request.
pub(crate) struct Target {
    pub service: Arc<str>,
    pub backends: Box<[Arc<Backend>]>,
    pub balance: Balance,
    /// Round robin position (and the tie breaker of least outstanding). Each worker has a
    /// table of its own, so this is the worker's turn: the workers together still spread
    /// evenly.
    pub cursor: AtomicUsize,
    pub requests: Arc<Sharded>,
    excludes: Box<[Box<str>]>,
    allowed_methods: Box<[http::Method]>,
    denied_methods: Box<[http::Method]>,
    pub plain_http: PlainHttp,
    pub auth: Option<Arc<BasicAuth>>,
    pub rewrite: Option<Arc<Rewrite>>,
    match_headers: Box<[(http::HeaderName, http::HeaderValue)]>,
    match_user_agents: Box<[Box<str>]>,
    pub timeouts: RouteTimeouts,
    pub sticky: Option<Sticky>,
    pub compress: Option<Compress>,
}

impl Target {
    /// Whether the route asks more of a request than its host and path.
    fn is_conditional(&self) -> bool {
        !(self.match_headers.is_empty() && self.match_user_agents.is_empty())
    }

    /// Whether a request with `headers` meets the route's conditions.
    fn accepts(&self, headers: &http::HeaderMap) -> bool {
        if !self
            .match_headers
            .iter()
            .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
        {
            return false;
        }
        if self.match_user_agents.is_empty() {
            return true;
        }
        let Some(agent) = headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let agent = agent.to_ascii_lowercase();
        self.match_user_agents.iter().any(|a| agent.contains(&**a))
    }

    fn excluded(&self, path: &str) -> bool {
        self.excludes.iter().any(|p| prefix_matches(p, path))
    }

    /// Whether the route forwards requests of `method` (else lb answers 403, as
    /// HAProxy's `http-request deny` under DFP's `allowedMethods`/`deniedMethods` does).
    pub fn permits(&self, method: &http::Method) -> bool {
        (self.allowed_methods.is_empty() || self.allowed_methods.contains(method))
            && !self.denied_methods.contains(method)
    }
}

/// Routes that share a host rule, as (prefix, target) with the longest prefix first.
#[derive(Default)]
struct Tier {
    entries: Vec<(Box<str>, usize)>,
}

impl Tier {
    fn push_all(&mut self, prefixes: &[String], target: usize) {
        self.entries
            .extend(prefixes.iter().map(|p| (p.as_str().into(), target)));
    }

    fn sort(&mut self, targets: &[Target]) {
        // Longest first; of two equal prefixes a route with conditions (headers, user
        // agents) first, the others in turn as listed (stable).
        self.entries.sort_by_key(|(prefix, t)| {
            (
                std::cmp::Reverse(prefix.len()),
                !targets[*t].is_conditional(),
            )
        });
    }

    fn find(&self, targets: &[Target], path: &str, headers: &http::HeaderMap) -> Option<usize> {
        self.entries
            .iter()
            .find(|(prefix, t)| {
                let target = &targets[*t];
                prefix_matches(prefix, path) && !target.excluded(path) && target.accepts(headers)
            })
            .map(|&(_, t)| t)
    }
}

/// The compiled route table, swapped whole on every change.
#[derive(Default)]
pub(crate) struct Table {
    targets: Vec<Target>,
    /// The routes of the main HTTP and the HTTPS listeners.
    main: Router,
    /// The routes of each HTTP listener a route has on a port of its own.
    ports: HashMap<u16, Router>,
    /// TLS passed through by SNI: lower-case domain (for `*.domain`, the parent) -> its
    /// route.
    passthrough_exact: HashMap<Box<str>, usize>,
    passthrough_wildcard: HashMap<Box<str>, usize>,
    /// Patterns, tried in turn after the names.
    passthrough_patterns: Vec<(SniMatcher, usize)>,
}

/// What routes the requests of one listener: hosts, then paths, then the default; and the
/// hosts redirected.
#[derive(Default)]
struct Router {
    /// Lower-case domain -> its routes.
    exact: HashMap<Box<str>, Tier>,
    /// "example.com" for "*.example.com" -> its routes.
    wildcard: HashMap<Box<str>, Tier>,
    /// "example.com" for "*example.com", and its routes; the longest first.
    suffixes: Vec<(Box<str>, Tier)>,
    any_host: Tier,
    default: Option<usize>,
    /// Lower-case host -> the domain its requests are redirected to.
    redirects: HashMap<Box<str>, Box<str>>,
}

/// A backend's address, how it is reached over TLS, and whether it speaks HTTP/2.
pub(crate) type BackendKey = (SocketAddr, Option<BackendTls>, bool);

/// Shared per-name state a new table reuses from the one before: backends keep their
/// pooled connections and in-flight counts, services their counters.
#[derive(Default)]
pub(crate) struct Registry {
    /// By address, and how they are reached: a backend that one route reaches over TLS
    /// and another in the clear is two.
    pub backends: HashMap<BackendKey, Arc<Backend>>,
    /// Each backend TLS setting, compiled once.
    connectors: HashMap<(BackendTls, bool), Option<Arc<TlsConnector>>>,
    pub services: HashMap<Arc<str>, Arc<Sharded>>,
    pub pool_clock: PoolClock,
    /// Worker threads: each gets a table, and each backend a pool per worker.
    pub workers: usize,
    /// The most connections open to one backend; 0: no cap.
    pub max_backend_connections: usize,
    /// Each service's basic auth, kept while its users stay the same (with the
    /// credentials it has seen pass).
    auths: HashMap<Arc<str>, Arc<BasicAuth>>,
}

impl Registry {
    pub fn new(workers: usize, max_backend_connections: usize) -> Self {
        Self {
            workers,
            max_backend_connections,
            ..Self::default()
        }
    }

    /// A table for each worker from `routes`, sharing backends and counters, and leaving
    /// in the registry only the backends they use.
    pub fn tables(&mut self, routes: &[Route]) -> Vec<Table> {
        let tables = (0..self.workers.max(1))
            .map(|_| Table::build(routes, self))
            .collect();
        let used: HashSet<BackendKey> = routes
            .iter()
            .flat_map(|r| {
                r.backends
                    .iter()
                    .map(|a| (*a, r.backend_tls.clone(), r.backend_h2))
            })
            .collect();
        self.backends.retain(|key, _| used.contains(key));
        let tls_used: HashSet<(BackendTls, bool)> = routes
            .iter()
            .filter_map(|r| Some((r.backend_tls.clone()?, r.backend_h2)))
            .collect();
        self.connectors.retain(|key, _| tls_used.contains(key));
        let guarded: HashSet<&str> = routes
            .iter()
            .filter(|r| !r.users.is_empty())
            .map(|r| r.service.as_str())
            .collect();
        self.auths.retain(|service, _| guarded.contains(&**service));
        tables
    }

    fn auth(&mut self, service: &Arc<str>, users: &[(String, String)]) -> Option<Arc<BasicAuth>> {
        if users.is_empty() {
            return None;
        }
        let auth = self
            .auths
            .entry(service.clone())
            .or_insert_with(|| Arc::new(BasicAuth::new(service, users)));
        if !auth.is_for(users) {
            *auth = Arc::new(BasicAuth::new(service, users));
        }
        Some(auth.clone())
    }

    /// The backend at `addr` reached as `tls` says; none when that TLS setting cannot be
    /// used (validated with the service, so only logged here).
    fn backend(
        &mut self,
        addr: SocketAddr,
        tls: Option<&BackendTls>,
        h2: bool,
    ) -> Option<Arc<Backend>> {
        let connector = match tls {
            None => None,
            Some(tls) => Some(
                self.connectors
                    .entry((tls.clone(), h2))
                    .or_insert_with(|| match tls.connector(h2) {
                        Ok(c) => Some(Arc::new(c)),
                        Err(e) => {
                            tracing::error!(%addr, "backend TLS: {e}");
                            None
                        }
                    })
                    .clone()?,
            ),
        };
        let (workers, clock, max) = (self.workers, &self.pool_clock, self.max_backend_connections);
        let backend = self
            .backends
            .entry((addr, tls.cloned(), h2))
            .or_insert_with(|| {
                Arc::new(Backend::new(
                    addr,
                    workers,
                    clock.clone(),
                    max,
                    connector,
                    h2,
                ))
            })
            .clone();
        Some(backend)
    }
}

impl Table {
    /// Builds a table from `routes`, taking backends and counters from `registry` (adding
    /// what is new).
    fn build(routes: &[Route], registry: &mut Registry) -> Table {
        let mut table = Table::default();
        for route in routes {
            let service: Arc<str> = route.service.as_str().into();
            let workers = registry.workers;
            let requests = registry
                .services
                .entry(service.clone())
                .or_insert_with(|| Arc::new(Sharded::new(workers)))
                .clone();
            let backends: Box<[Arc<Backend>]> = route
                .backends
                .iter()
                .filter_map(|a| registry.backend(*a, route.backend_tls.as_ref(), route.backend_h2))
                .collect();
            let sticky = route
                .sticky_cookie
                .as_deref()
                .map(|name| Sticky::new(name, &service, backends.iter().map(|b| b.addr)));
            let index = table.targets.len();
            let auth = registry.auth(&service, &route.users);
            table.targets.push(Target {
                service,
                backends,
                balance: route.balance,
                cursor: AtomicUsize::new(0),
                requests,
                excludes: route
                    .paths_exclude
                    .iter()
                    .map(|p| normalized_prefix(p).into())
                    .collect(),
                allowed_methods: route.allowed_methods.clone().into(),
                denied_methods: route.denied_methods.clone().into(),
                plain_http: route.plain_http,
                auth,
                rewrite: route.rewrite.clone(),
                match_headers: route.match_headers.clone().into(),
                match_user_agents: route
                    .match_user_agents
                    .iter()
                    .map(|a| a.to_ascii_lowercase().into())
                    .collect(),
                timeouts: route.timeouts,
                sticky,
                compress: route.compress.clone(),
            });
            if route.tls_passthrough {
                table.add_passthrough(route, index);
                continue;
            }
            let router = match route.port {
                None => &mut table.main,
                Some(port) => table.ports.entry(port).or_default(),
            };
            if let Some(to) = route.domains.first() {
                for from in &route.redirect_from {
                    router
                        .redirects
                        .entry(from.to_ascii_lowercase().into())
                        .or_insert_with(|| to.as_str().into());
                }
            }
            if route.default_backend && router.default.is_none() {
                router.default = Some(index);
            }
            let prefixes: Vec<String> = if route.paths.is_empty() {
                vec![String::new()]
            } else {
                route.paths.iter().map(|p| normalized_prefix(p)).collect()
            };
            if route.domains.is_empty() {
                router.any_host.push_all(&prefixes, index);
            }
            for domain in &route.domains {
                router.tier(domain).push_all(&prefixes, index);
            }
        }
        let targets = &table.targets;
        for router in std::iter::once(&mut table.main).chain(table.ports.values_mut()) {
            router.sort(targets);
        }
        table
    }

    pub fn target(&self, index: usize) -> &Target {
        &self.targets[index]
    }

    /// What routes the requests of the listener at `port` (none: the main HTTP and the
    /// HTTPS listeners); none when no route is on it (any longer).
    fn router(&self, port: Option<u16>) -> Option<&Router> {
        match port {
            None => Some(&self.main),
            Some(port) => self.ports.get(&port),
        }
    }

    /// The domain requests for `host` on the listener at `port` are redirected to, if any.
    pub fn redirect(&self, port: Option<u16>, host: Option<&str>) -> Option<&str> {
        self.router(port)?.redirect(host)
    }

    /// The route for a request that came in on the listener at `port` (see
    /// [`Router::lookup`]).
    pub fn lookup(
        &self,
        port: Option<u16>,
        host: Option<&str>,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<usize> {
        self.router(port)?
            .lookup(&self.targets, host, path, headers)
    }

    fn add_passthrough(&mut self, route: &Route, index: usize) {
        for d in route.domains.iter().map(|d| d.to_ascii_lowercase()) {
            match DomainPattern::parse(&d) {
                DomainPattern::Exact(name) => {
                    self.passthrough_exact.entry(name.into()).or_insert(index);
                }
                DomainPattern::Subdomains(parent) => {
                    self.passthrough_wildcard
                        .entry(parent.into())
                        .or_insert(index);
                }
                DomainPattern::EndsWith(suffix) => self
                    .passthrough_patterns
                    .push((SniMatcher::Ends(suffix.into()), index)),
            }
        }
        for pattern in &route.sni {
            let matcher = match pattern {
                SniPattern::Exact(name) => {
                    self.passthrough_exact
                        .entry(name.as_str().into())
                        .or_insert(index);
                    continue;
                }
                SniPattern::Begins(p) => SniMatcher::Begins(p.as_str().into()),
                SniPattern::Ends(p) => SniMatcher::Ends(p.as_str().into()),
                SniPattern::Regex(r) => match regex::Regex::new(r) {
                    Ok(r) => SniMatcher::Regex(r),
                    Err(e) => {
                        tracing::error!(service = %route.service, "sni regex: {e}");
                        continue;
                    }
                },
            };
            self.passthrough_patterns.push((matcher, index));
        }
    }

    /// Whether any route passes TLS through (else the HTTPS listener need not look at
    /// the ClientHello).
    pub fn has_passthrough(&self) -> bool {
        !(self.passthrough_exact.is_empty()
            && self.passthrough_wildcard.is_empty()
            && self.passthrough_patterns.is_empty())
    }

    /// The route that TLS naming `server_name` (lower case) is passed through to: the
    /// exact name, else the closest wildcard, else the first pattern that matches.
    pub fn passthrough(&self, server_name: &str) -> Option<usize> {
        self.passthrough_exact
            .get(server_name)
            .copied()
            .or_else(|| {
                parents(server_name).find_map(|p| self.passthrough_wildcard.get(p).copied())
            })
            .or_else(|| {
                self.passthrough_patterns
                    .iter()
                    .find(|(m, _)| m.matches(server_name))
                    .map(|&(_, t)| t)
            })
    }
}

impl Router {
    /// The routes of hosts `domain` matches.
    fn tier(&mut self, domain: &str) -> &mut Tier {
        let domain = domain.to_ascii_lowercase();
        match DomainPattern::parse(&domain) {
            DomainPattern::Exact(name) => self.exact.entry(name.into()).or_default(),
            DomainPattern::Subdomains(parent) => self.wildcard.entry(parent.into()).or_default(),
            DomainPattern::EndsWith(suffix) => {
                let at = match self.suffixes.iter().position(|(s, _)| **s == *suffix) {
                    Some(at) => at,
                    None => {
                        self.suffixes.push((suffix.into(), Tier::default()));
                        self.suffixes.len() - 1
                    }
                };
                &mut self.suffixes[at].1
            }
        }
    }

    /// Orders every tier's entries (see [`Tier::sort`]), and the suffixes longest first.
    fn sort(&mut self, targets: &[Target]) {
        self.suffixes
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        for tier in self
            .exact
            .values_mut()
            .chain(self.wildcard.values_mut())
            .chain(self.suffixes.iter_mut().map(|(_, tier)| tier))
            .chain([&mut self.any_host])
        {
            tier.sort(targets);
        }
    }

    /// The domain requests for `host` are redirected to, if any.
    fn redirect(&self, host: Option<&str>) -> Option<&str> {
        if self.redirects.is_empty() {
            return None;
        }
        let mut buf = [0u8; 256];
        let host = normalize_host(host?, &mut buf)?;
        self.redirects.get(host).map(|to| &**to)
    }

    /// The route for a request. Host rules rank first (exact domain, then the closest
    /// `*.` wildcard, then the longest `*` suffix, then routes for any host), and within
    /// a rank the longest path prefix wins; a rank none of whose prefixes fits gives way
    /// to the next. Then the default.
    fn lookup(
        &self,
        targets: &[Target],
        host: Option<&str>,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<usize> {
        let mut found = None;
        if !(self.exact.is_empty() && self.wildcard.is_empty() && self.suffixes.is_empty()) {
            let mut buf = [0u8; 256];
            if let Some(host) = host.and_then(|h| normalize_host(h, &mut buf)) {
                found = self
                    .exact
                    .get(host)
                    .and_then(|tier| tier.find(targets, path, headers))
                    .or_else(|| {
                        parents(host).find_map(|parent| {
                            self.wildcard.get(parent)?.find(targets, path, headers)
                        })
                    })
                    .or_else(|| {
                        self.suffixes
                            .iter()
                            .filter(|(suffix, _)| host.ends_with(&**suffix))
                            .find_map(|(_, tier)| tier.find(targets, path, headers))
                    });
            }
        }
        found
            .or_else(|| self.any_host.find(targets, path, headers))
            .or(self.default)
    }
}

/// A configured prefix in the form request paths are matched in: `/%7Euser` must match
/// the request `/~user`, which is normalised to that. One that cannot be normalised (an
/// encoded separator, which no routed request has) stays as written.
fn normalized_prefix(prefix: &str) -> String {
    path::normalize(prefix).map_or_else(|_| prefix.to_string(), std::borrow::Cow::into_owned)
}

/// "/demo" matches "/demo" and "/demo/x", not "/demox"; "/demo/" and "" match by plain
/// prefix.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.is_empty()
            || prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// The host part of a Host header, lower case, without port or trailing dot; None when it
/// cannot be a domain name we route on (too long, not ASCII).
fn normalize_host<'b>(host: &str, buf: &'b mut [u8; 256]) -> Option<&'b str> {
    let name = if host.starts_with('[') {
        // An IPv6 literal keeps its brackets; only a port after them goes.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
    let out = buf.get_mut(..name.len())?;
    for (o, c) in out.iter_mut().zip(name) {
        *o = c.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// "a.b.example.com" -> "b.example.com", "example.com", "com": the domains a wildcard
/// route can be for, closest first.
fn parents(host: &str) -> impl Iterator<Item = &str> {
    host.match_indices('.').map(move |(i, _)| &host[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(service: &str, domain: Option<&str>, paths: &[&str]) -> Route {
        Route {
            service: service.into(),
            paths: paths.iter().map(std::string::ToString::to_string).collect(),
            domains: domain.map(Into::into).into_iter().collect(),
            backends: vec!["127.0.0.1:1".parse().unwrap()],
            ..Route::default()
        }
    }

    fn pick(table: &Table, host: &str, path: &str) -> Option<String> {
        let t = table.lookup(None, Some(host), path, &http::HeaderMap::new())?;
        Some(table.target(t).service.to_string())
    }

    fn build(routes: Vec<Route>) -> Table {
        Table::build(&routes, &mut Registry::new(1, 0))
    }

    #[test]
    fn prefixes_stop_at_segment_boundaries() {
        assert!(prefix_matches("/demo", "/demo"));
        assert!(prefix_matches("/demo", "/demo/x"));
        assert!(!prefix_matches("/demo", "/demox"));
        assert!(prefix_matches("/demo/", "/demo/x"));
        assert!(!prefix_matches("/demo/", "/demo"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("", "/anything"));
    }

    #[test]
    fn longest_prefix_wins() {
        let table = build(vec![
            route("root", None, &["/"]),
            route("api", None, &["/api"]),
            route("v2", None, &["/api/v2"]),
        ]);
        assert_eq!(pick(&table, "h", "/api/v2/x").as_deref(), Some("v2"));
        assert_eq!(pick(&table, "h", "/api/v1").as_deref(), Some("api"));
        assert_eq!(pick(&table, "h", "/apix").as_deref(), Some("root"));
    }

    #[test]
    fn hosts_rank_exact_then_wildcard_then_any() {
        let table = build(vec![
            route("any", None, &["/x"]),
            route("wild", Some("*.Example.com"), &[]),
            route("deep", Some("*.b.example.com"), &[]),
            route("exact", Some("www.example.com"), &["/api"]),
        ]);
        assert_eq!(
            pick(&table, "WWW.example.com:8080", "/api/1").as_deref(),
            Some("exact")
        );
        // The exact domain has no route for /other: the wildcard takes it.
        assert_eq!(
            pick(&table, "www.example.com", "/other").as_deref(),
            Some("wild")
        );
        assert_eq!(
            pick(&table, "a.b.example.com", "/x").as_deref(),
            Some("deep")
        );
        assert_eq!(pick(&table, "example.com", "/x").as_deref(), Some("any"));
        assert_eq!(pick(&table, "example.com", "/y"), None);
        assert_eq!(pick(&table, "[::1]:80", "/x").as_deref(), Some("any"));
        let any = table
            .lookup(None, None, "/x", &http::HeaderMap::new())
            .map(|t| &*table.target(t).service);
        assert_eq!(any, Some("any"));
    }

    #[test]
    fn each_listener_routes_on_its_own() {
        let on = |port: Option<u16>, mut r: Route| {
            r.port = port;
            r
        };
        let mut redirected = route("moved", Some("new.example.com"), &["/"]);
        redirected.redirect_from = vec!["old.example.com".into()];
        let table = build(vec![
            route("main", None, &["/demo"]),
            on(Some(8081), route("side", None, &["/demo"])),
            on(Some(8081), route("side-default", None, &["/other"])),
            on(Some(8082), redirected),
        ]);
        let at = |port, path| {
            let t = table.lookup(port, Some("example.com"), path, &http::HeaderMap::new())?;
            Some(table.target(t).service.to_string())
        };
        assert_eq!(at(None, "/demo").as_deref(), Some("main"));
        assert_eq!(at(Some(8081), "/demo").as_deref(), Some("side"));
        assert_eq!(at(Some(8081), "/other").as_deref(), Some("side-default"));
        // Nothing leaks between listeners, nor to a port no route is on (any more).
        assert_eq!(at(None, "/other"), None);
        assert_eq!(at(Some(8081), "/nothing"), None);
        assert_eq!(at(Some(9999), "/demo"), None);
        assert_eq!(
            table.redirect(Some(8082), Some("old.example.com")),
            Some("new.example.com")
        );
        assert_eq!(table.redirect(None, Some("old.example.com")), None);
    }

    #[test]
    fn a_route_takes_each_of_its_domains_and_suffixes_rank_after_wildcards() {
        let mut shop = route("shop", None, &["/"]);
        shop.domains = vec!["shop.example.com".into(), "shop.example.net".into()];
        let mut tail = route("tail", None, &["/"]);
        // DFP's `*domain.com`: any host that ends so, the name itself included.
        tail.domains = vec!["*example.org".into()];
        let mut longer = route("longer", None, &["/"]);
        longer.domains = vec!["*b.example.org".into()];
        let table = build(vec![
            shop,
            tail,
            longer,
            route("wild", Some("*.example.org"), &["/only"]),
        ]);
        assert_eq!(
            pick(&table, "shop.example.com", "/").as_deref(),
            Some("shop")
        );
        assert_eq!(
            pick(&table, "SHOP.example.net:80", "/a").as_deref(),
            Some("shop")
        );
        assert_eq!(pick(&table, "example.net", "/"), None);
        assert_eq!(pick(&table, "example.org", "/").as_deref(), Some("tail"));
        assert_eq!(pick(&table, "myexample.org", "/").as_deref(), Some("tail"));
        assert_eq!(
            pick(&table, "a.b.example.org", "/").as_deref(),
            Some("longer")
        );
        // The wildcard ranks first where it has the path, and gives way where not.
        assert_eq!(
            pick(&table, "a.example.org", "/only").as_deref(),
            Some("wild")
        );
        assert_eq!(pick(&table, "a.example.org", "/x").as_deref(), Some("tail"));
        assert_eq!(pick(&table, "example.org.evil", "/"), None);
    }

    #[test]
    fn excludes_and_default() {
        let mut api = route("api", None, &["/api"]);
        api.paths_exclude = vec!["/api/internal".into()];
        let mut fallback = route("fallback", None, &["/only"]);
        fallback.default_backend = true;
        let table = build(vec![api, fallback]);
        assert_eq!(pick(&table, "h", "/api/x").as_deref(), Some("api"));
        assert_eq!(
            pick(&table, "h", "/api/internal/x").as_deref(),
            Some("fallback")
        );
        assert_eq!(pick(&table, "h", "/nothing").as_deref(), Some("fallback"));
    }

    #[test]
    fn no_spelling_of_an_excluded_path_gets_past_it() {
        let mut app = route("app", None, &["/"]);
        app.paths_exclude = vec!["/admin".into(), "/%7Eops".into()];
        let table = build(vec![app]);
        let routed = |raw: &str| {
            let normal = path::normalize(raw).unwrap();
            pick(&table, "h", &normal)
        };
        for raw in [
            "/admin",
            "/%61dmin",
            "//admin",
            "/x/../admin",
            "/./admin",
            "/admin/",
            "/%61dmin/x",
            "/~ops",
            "/%7eops/x",
        ] {
            assert_eq!(routed(raw), None, "{raw}");
        }
        assert_eq!(routed("/administrator").as_deref(), Some("app"));
        assert_eq!(routed("/x/../public").as_deref(), Some("app"));
    }

    #[test]
    fn passed_through_by_exact_name_then_wildcard_then_pattern_and_never_routed_as_http() {
        let pass = |service: &str, domain: Option<&str>, sni: Vec<SniPattern>| Route {
            tls_passthrough: true,
            sni,
            ..route(service, domain, &[])
        };
        let table = Registry::new(1, 0).tables(&[
            pass("db", Some("db.example.com"), vec![]),
            pass("wild", Some("*.example.com"), vec![]),
            pass("test", None, vec![SniPattern::Begins("test.".into())]),
            pass("api", None, vec![SniPattern::Regex("(?i)^api\\.".into())]),
            pass("tail", Some("*foobar.org"), vec![]),
            route("web", Some("db.example.com"), &["/"]),
        ]);
        let table = &table[0];
        let to = |name: &str| {
            table
                .passthrough(name)
                .map(|t| table.target(t).service.to_string())
        };
        assert!(table.has_passthrough());
        assert_eq!(to("db.example.com").as_deref(), Some("db"));
        assert_eq!(to("x.example.com").as_deref(), Some("wild"));
        assert_eq!(to("test.example.com").as_deref(), Some("wild"));
        assert_eq!(to("test.foobar.net").as_deref(), Some("test"));
        assert_eq!(to("api.foobar.net").as_deref(), Some("api"));
        assert_eq!(to("web.foobar.net"), None);
        assert_eq!(to("foobar.org").as_deref(), Some("tail"));
        assert_eq!(to("x.myfoobar.org").as_deref(), Some("tail"));
        // Plain HTTP to the passthrough name reaches the HTTP route, not the TLS one.
        let http = table
            .lookup(None, Some("db.example.com"), "/x", &http::HeaderMap::new())
            .unwrap();
        assert_eq!(&*table.target(http).service, "web");
    }

    #[test]
    fn rebuilding_keeps_backends_and_counters() {
        let mut registry = Registry::new(2, 0);
        let first = registry.tables(&[route("a", None, &[])]);
        let second = registry.tables(&[route("a", None, &["/"])]);
        assert_eq!(first.len(), 2);
        let backend = |tables: &[Table], w: usize| tables[w].target(0).backends[0].clone();
        assert!(Arc::ptr_eq(&backend(&first, 0), &backend(&first, 1)));
        assert!(Arc::ptr_eq(&backend(&first, 0), &backend(&second, 1)));
        let requests = |tables: &[Table]| tables[0].target(0).requests.clone();
        assert!(Arc::ptr_eq(&requests(&first), &requests(&second)));
        registry.tables(&[]);
        assert!(registry.backends.is_empty());
        assert_eq!(registry.services.len(), 1);
    }
}
