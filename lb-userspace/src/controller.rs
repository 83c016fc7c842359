//! The desired state (services by name) and the one place that changes it: validate,
//! check against the other services, apply to the data plane, then record.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::stats::{Counters, DropReason};
use serde::Serialize;

use crate::{
    address_rules::{AddressRules, HostAddresses, Refusal},
    dataplane::{Dataplane, DataplaneError},
    health::{Checker, HealthEvent},
    model::{Protocol, Service, ServiceSpec, ValidationError, validate_name},
    next_hops::{NextHops, NextHopsDone},
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("no service named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// A layer-4 VIP on a host address and port where another program listens (a 409).
    #[error(transparent)]
    LocalListener(ValidationError),
}

#[derive(Debug, Serialize)]
pub struct CounterView {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counters> for CounterView {
    fn from(c: Counters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub address: String,
    /// Its share of the Maglev table, relative to the others'.
    pub weight: u32,
    /// "active", or "draining" (no new flows).
    pub state: crate::backend_entry::AdminState,
    /// Flows tracked to it (layer-4 services), as of the last sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<u32>,
    #[serde(flatten)]
    pub counters: CounterView,
    /// "up" or "down", from this node's health checks; "unchecked" for a backend removed
    /// and still draining.
    pub health: &'static str,
    /// A removed backend still draining: seconds until its remaining flows are cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_left_s: Option<u64>,
    /// When it last changed (RFC 3339), or when the backend was added (removed, for a
    /// draining one).
    pub since: String,
    /// Why the check that took it down failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The SNAT ports its flows hold (layer-4 services), as of the last sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_ports: Option<crate::dataplane::PortUse>,
}

/// `GET /v1/services/{name}`: the service as stored plus its counters.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub service: Service,
    pub counters: CounterView,
    pub backend_counters: Vec<BackendView>,
}

/// A backend's state as this node's checks see it.
#[derive(Debug, Clone)]
pub struct BackendHealth {
    pub up: bool,
    pub since: std::time::SystemTime,
    pub reason: Option<String>,
}

impl BackendHealth {
    fn up_now() -> Self {
        Self {
            up: true,
            since: std::time::SystemTime::now(),
            reason: None,
        }
    }
}

/// Where the HTTP services go whenever they change (the proxy's route table).
pub type RouteSink = Box<dyn Fn(Vec<HttpService>) + Send>;

/// An HTTP service and the backends it may use now (its healthy ones).
#[derive(Debug, Clone)]
pub struct HttpService {
    pub service: Service,
    pub healthy: Vec<SocketAddrV4>,
    /// A service removed since start: its route answers 503 (as HAProxy does for a
    /// backend that is gone) until another service takes its paths.
    pub removed: bool,
}

/// How many removed HTTP routes are remembered.
const REMOVED_ROUTES: usize = 256;

pub struct Controller {
    services: BTreeMap<String, Service>,
    /// (VIP, protocol) -> the layer-4 service that has it.
    vips: HashMap<(SocketAddrV4, Protocol), String>,
    /// VIP address -> how many of `vips` are on it (no backend may be one).
    vip_addrs: HashMap<Ipv4Addr, usize>,
    /// Backend address -> how many layer-4 services use it (for next-hop upkeep).
    backend_users: HashMap<Ipv4Addr, usize>,
    /// Service -> the backend addresses it counts in `backend_users`: its backends' and
    /// those still draining.
    held: HashMap<String, HashSet<Ipv4Addr>>,
    dataplane: Dataplane,
    neighbors: NextHops,
    /// While set, next hops of new backends are collected rather than resolved one
    /// service at a time (see `defer_neighbors`).
    deferred: Option<HashSet<Ipv4Addr>>,
    /// Service -> backend -> health.
    health: HashMap<String, HashMap<SocketAddrV4, BackendHealth>>,
    checker: Option<Checker>,
    /// Given the HTTP services whenever one of them or the health of its backends changes
    /// (the proxy's route table), before the change returns.
    http_routes: Option<RouteSink>,
    /// HTTP services removed since start, oldest first.
    removed_http: std::collections::VecDeque<Service>,
    /// The HTTP and HTTPS listeners' ports and the local addresses each listens on (read
    /// at start).
    http_listeners: Vec<(u16, Vec<Ipv4Addr>)>,
    /// The `--http` listener's address: routes with a port of their own (`http.port`)
    /// listen on its address; its own port is the same as none.
    http_frontend: Option<std::net::SocketAddr>,
    /// What backends may not be (lb itself), with the host's addresses kept current.
    rules: AddressRules,
}

fn ips(svc: &Service) -> HashSet<Ipv4Addr> {
    if svc.http.is_some() {
        // HTTP backends are reached through the kernel's stack, not from XDP.
        return HashSet::new();
    }
    svc.backends.iter().map(|b| *b.ip()).collect()
}

impl Controller {
    pub fn new(dataplane: Dataplane) -> Self {
        Self {
            services: BTreeMap::new(),
            vips: HashMap::new(),
            vip_addrs: HashMap::new(),
            backend_users: HashMap::new(),
            held: HashMap::new(),
            dataplane,
            neighbors: NextHops::default(),
            deferred: None,
            health: HashMap::new(),
            checker: None,
            http_routes: None,
            removed_http: std::collections::VecDeque::new(),
            http_listeners: Vec::new(),
            http_frontend: None,
            rules: AddressRules::default(),
        }
    }

    /// The address rules backends are held to from now on.
    pub fn set_address_rules(&mut self, rules: AddressRules) {
        self.rules = rules;
    }

    /// The host's addresses changed: backends are held to the new ones from now on.
    /// Services already served keep their backends (they were admitted under the old
    /// ones); each backend that is now lb's own is named in a warning.
    pub fn set_host_addresses(&mut self, host: HostAddresses) {
        if *self.rules.host() == host {
            return;
        }
        self.rules.set_host(host);
        let vips = |ip| self.is_vip(ip, None);
        for svc in self.services.values() {
            for b in &svc.backends {
                if let Some(why) =
                    self.rules
                        .refuse_backend(*b, svc.http.is_some(), svc.check_port(), &vips)
                {
                    tracing::warn!(service = %svc.name, backend = %b, reason = why.message(), "a backend now points at this host");
                }
            }
        }
    }

    /// Checks backends with `checker` from now on (every service applied); it reports each
    /// state change, for [`Controller::set_health`].
    pub fn start_health_checks(&mut self, mut checker: Checker) {
        for svc in self.services.values() {
            checker.sync(
                &svc.name,
                &svc.backends,
                &self.down_backends(svc),
                &svc.check,
            );
        }
        self.checker = Some(checker);
    }

    /// Where the HTTP proxy listens (HTTP, HTTPS): a layer-4 service on that address and
    /// port takes its traffic in XDP before the kernel sees it, which is worth a warning.
    pub fn add_http_listener(&mut self, addr: std::net::SocketAddr) {
        let local: Vec<Ipv4Addr> = match addr {
            std::net::SocketAddr::V4(a) if a.ip().is_unspecified() => {
                crate::net::interface_addresses()
                    .map(|m| m.values().flatten().map(|ip| Ipv4Addr::from(*ip)).collect())
                    .unwrap_or_default()
            }
            std::net::SocketAddr::V4(a) => vec![*a.ip()],
            std::net::SocketAddr::V6(_) => Vec::new(),
        };
        self.http_listeners.push((addr.port(), local));
    }

    /// lb's `--http` listener: where routes with a port of their own listen too.
    pub fn set_http_frontend(&mut self, addr: std::net::SocketAddr) {
        self.http_frontend = Some(addr);
    }

    fn shadows_http_listener(&self, vip: SocketAddrV4) -> bool {
        self.http_listeners
            .iter()
            .any(|(port, local)| *port == vip.port() && local.contains(vip.ip()))
    }

    /// Gives `sink` the HTTP services now, and again on every change to them (see
    /// [`Controller::http_services`]). It runs on the controller's thread, so a write
    /// returns only once its routes are in place: a request right after it is routed the
    /// new way.
    pub fn set_http_routes(&mut self, sink: RouteSink) {
        sink(self.http_services());
        self.http_routes = Some(sink);
    }

    fn http_changed(&self) {
        if let Some(sink) = &self.http_routes {
            sink(self.http_services());
        }
    }

    /// Every HTTP service with the backends it may use now, then the routes of removed
    /// ones that no live service overlaps.
    pub fn http_services(&self) -> Vec<HttpService> {
        let live: Vec<HttpService> = self
            .services
            .values()
            .filter(|s| s.http.is_some())
            .map(|s| HttpService {
                service: s.clone(),
                healthy: s
                    .backends
                    .iter()
                    .filter(|b| self.is_up(&s.name, b))
                    .copied()
                    .collect(),
                removed: false,
            })
            .collect();
        let overlaps = |gone: &Service| {
            let g = gone.http.as_ref().expect("http");
            live.iter().any(|l| {
                let r = l.service.http.as_ref().expect("http");
                r.port == g.port
                    && r.shares_a_host(g)
                    && (r.paths.iter().any(|p| g.paths.contains(p))
                        || (r.paths.is_empty() && g.paths.is_empty())
                        || (r.default_backend && g.default_backend))
            })
        };
        let gone: Vec<HttpService> = self
            .removed_http
            .iter()
            .filter(|g| !self.services.contains_key(&g.name) && !overlaps(g))
            .map(|g| HttpService {
                service: g.clone(),
                healthy: Vec::new(),
                removed: true,
            })
            .collect();
        live.into_iter().chain(gone).collect()
    }

    /// The backends of `svc` its checks have taken down.
    fn down_backends(&self, svc: &Service) -> Vec<SocketAddrV4> {
        svc.backends
            .iter()
            .filter(|b| !self.is_up(&svc.name, b))
            .copied()
            .collect()
    }

    fn is_up(&self, service: &str, backend: &SocketAddrV4) -> bool {
        self.health
            .get(service)
            .and_then(|h| h.get(backend))
            .is_none_or(|h| h.up)
    }

    /// A health check result: a backend that went down leaves its service's Maglev table
    /// or HTTP pool, one that came back returns.
    pub fn set_health(&mut self, event: &HealthEvent) {
        let Some(svc) = self.services.get(&event.service).cloned() else {
            return;
        };
        let Some(state) = self
            .health
            .get_mut(&event.service)
            .and_then(|h| h.get_mut(&event.backend))
        else {
            return;
        };
        if state.up == event.up {
            return;
        }
        *state = BackendHealth {
            up: event.up,
            since: std::time::SystemTime::now(),
            reason: (!event.up).then(|| event.reason.clone()),
        };
        if event.up {
            tracing::info!(service = %event.service, backend = %event.backend, "backend up");
        } else {
            tracing::warn!(service = %event.service, backend = %event.backend, reason = %event.reason, "backend down");
        }
        if svc.http.is_some() {
            self.http_changed();
        } else if let Err(e) = self.dataplane.set_health(
            &event.service,
            &self.down_backends(&svc).into_iter().collect(),
        ) {
            tracing::error!(service = %event.service, backend = %event.backend, "applying a health change: {e}");
        }
    }

    /// Leaves the data plane attached and forwarding (maps, links and backends' next
    /// hops) when this is dropped, for the next daemon to take over.
    pub fn keep_on_exit(&mut self) {
        self.dataplane.keep_on_exit();
        self.neighbors.keep_on_exit();
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Validates `spec` as the new version of service `name` (an API write), against the
    /// address rules, the other services and the host's listening sockets.
    pub fn check(&self, name: &str, spec: ServiceSpec) -> Result<Service, ControlError> {
        let override_listener = spec.override_local_listener.unwrap_or(false);
        let svc = spec.validate_after(name, self.services.get(name))?;
        let svc = self.admit(svc)?;
        if !override_listener {
            self.check_local_listener(&svc)?;
        }
        self.check_http_port(&svc)?;
        Ok(svc)
    }

    /// `svc` as it may be served: its backends held to the address rules (a listed one
    /// that breaks them refuses the service; a discovered one is skipped with a warning
    /// naming it), and its VIP and routes its own.
    pub fn admit(&self, svc: Service) -> Result<Service, ControlError> {
        self.admit_among(svc, &[])
    }

    /// `admit`, the services in `replaced` left out of the comparison (see `check_group`).
    fn admit_among(&self, mut svc: Service, replaced: &[String]) -> Result<Service, ControlError> {
        // The `--http` listener's own port is no port of the route's own.
        if let (Some(route), Some(main)) = (svc.http.as_mut(), self.http_frontend)
            && route.port == Some(main.port())
        {
            route.port = None;
        }
        let svc = match svc.discovery {
            Some(_) => {
                let kept = self.admit_instances(&svc, svc.backends.clone());
                if kept.len() == svc.backends.len() {
                    svc
                } else {
                    svc.with_discovered(kept).checked()?
                }
            }
            None => {
                let own = svc.l4_vip();
                let vips = |ip| self.is_vip(ip, own);
                for (i, b) in svc.backends.iter().enumerate() {
                    match self
                        .rules
                        .refuse_backend(*b, svc.http.is_some(), svc.check_port(), &vips)
                    {
                        None => {}
                        Some(Refusal::Address(why)) => {
                            return Err(ValidationError::new(format!("backends[{i}]"), why).into());
                        }
                        Some(Refusal::CheckPort(why)) => {
                            return Err(ValidationError::new(
                                "check.port",
                                format!("checks of backend {b}: {why}"),
                            )
                            .into());
                        }
                    }
                }
                svc
            }
        };
        self.check_against(&svc, replaced)?;
        Ok(svc)
    }

    /// Of the instances a discovery source lists for `svc`, those the address rules let
    /// it use; each other one is skipped with a warning naming it.
    pub fn admit_instances(&self, svc: &Service, found: Vec<SocketAddrV4>) -> Vec<SocketAddrV4> {
        let own = svc.l4_vip();
        let vips = |ip| self.is_vip(ip, own);
        found
            .into_iter()
            .filter(|b| {
                let refused =
                    self.rules
                        .refuse_backend(*b, svc.http.is_some(), svc.check_port(), &vips);
                if let Some(why) = &refused {
                    tracing::warn!(service = %svc.name, instance = %b, reason = why.message(), "skipping a discovered instance");
                }
                refused.is_none()
            })
            .collect()
    }

    /// Whether `ip` is the address of a layer-4 VIP, or of `also`.
    fn is_vip(&self, ip: Ipv4Addr, also: Option<SocketAddrV4>) -> bool {
        also.is_some_and(|v| *v.ip() == ip) || self.vip_addrs.contains_key(&ip)
    }

    fn add_vip(&mut self, vip: SocketAddrV4, protocol: Protocol, name: String) {
        if self.vips.insert((vip, protocol), name).is_none() {
            *self.vip_addrs.entry(*vip.ip()).or_default() += 1;
        }
    }

    fn remove_vip(&mut self, vip: SocketAddrV4, protocol: Protocol) {
        if self.vips.remove(&(vip, protocol)).is_some()
            && let Some(n) = self.vip_addrs.get_mut(vip.ip())
        {
            *n -= 1;
            if *n == 0 {
                self.vip_addrs.remove(vip.ip());
            }
        }
    }

    /// A VIP on one of the host's addresses takes every packet to its port before the
    /// kernel sees it: refused (409) where another program listens there, unless this
    /// service already had that VIP (it was let through then).
    fn check_local_listener(&self, svc: &Service) -> Result<(), ControlError> {
        let Some(vip) = svc.l4_vip() else {
            return Ok(());
        };
        if !self.rules.is_local(*vip.ip()) {
            return Ok(());
        }
        let had_it = self
            .services
            .get(&svc.name)
            .is_some_and(|p| p.l4_vip() == Some(vip) && p.protocol == svc.protocol);
        if had_it {
            return Ok(());
        }
        let conflict =
            |message: String| ControlError::LocalListener(ValidationError::new("vip", message));
        match crate::host_sockets::listener_at(vip, svc.protocol) {
            Ok(None) => Ok(()),
            Ok(Some(socket)) => Err(conflict(format!(
                "{vip} is an address of this host and a local socket listens on {socket} ({}): this VIP would take its traffic; \"override_local_listener\": true takes it anyway",
                svc.protocol.name()
            ))),
            Err(e) => Err(conflict(format!(
                "{vip} is an address of this host, and its listening sockets cannot be read ({e}); \"override_local_listener\": true takes the port anyway"
            ))),
        }
    }

    /// That lb can serve `svc`'s route on its own port (`http.port`): there is an `--http`
    /// listener whose address it takes, the port is not lb's HTTPS listener's, and lb
    /// listens there already (another route's) or could (nothing else holds the port, and
    /// lb may bind it).
    fn check_http_port(&self, svc: &Service) -> Result<(), ControlError> {
        let Some(port) = svc.http.as_ref().and_then(|r| r.port) else {
            return Ok(());
        };
        let refused = |why: String| ValidationError::new("http.port", format!("{port}: {why}"));
        let Some(main) = self.http_frontend else {
            let why = "lb's --http listener is off, and a route's own port listens on its address";
            return Err(refused(why.into()).into());
        };
        if self.http_listeners.iter().any(|(p, _)| *p == port) {
            return Err(refused("is the port of lb's HTTPS listener (--https)".into()).into());
        }
        let open = self
            .services
            .values()
            .any(|s| s.http.as_ref().is_some_and(|r| r.port == Some(port)));
        if open {
            return Ok(());
        }
        let addr = std::net::SocketAddr::new(main.ip(), port);
        match crate::listen::reserve(addr) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                Err(ControlError::LocalListener(refused(format!(
                    "lb cannot listen on {addr}: another socket holds it ({e})"
                ))))
            }
            Err(e) => Err(refused(format!("lb cannot listen on {addr}: {e}")).into()),
        }
    }

    /// That `svc`'s VIP and routes are its own: no other service serves them, and its VIP
    /// is no backend of a layer-4 service.
    pub fn check_against_others(&self, svc: &Service) -> Result<(), ControlError> {
        self.check_against(svc, &[])
    }

    /// `check_against_others`, the services named in `replaced` left out: they are being
    /// rewritten or removed in the same change.
    fn check_against(&self, svc: &Service, replaced: &[String]) -> Result<(), ControlError> {
        let counts = |other: &str| other != svc.name && !replaced.iter().any(|r| r == other);
        // Layer-4 backends are indexed; the scan names the service only on a hit.
        if let Some(vip) = svc.l4_vip()
            && self.backend_users.contains_key(vip.ip())
            && let Some(other) = self.services.values().find(|o| {
                counts(&o.name) && o.http.is_none() && o.backends.iter().any(|b| b.ip() == vip.ip())
            })
        {
            return Err(ValidationError::new(
                "vip",
                format!(
                    "{} is a backend of service {:?}: lb would forward to itself",
                    vip.ip(),
                    other.name
                ),
            )
            .into());
        }
        if let Some(vip) = svc.l4_vip()
            && let Some(other) = self.vips.get(&(vip, svc.protocol)).filter(|o| counts(o))
        {
            return Err(ValidationError::new(
                "vip",
                format!(
                    "{vip} {:?} is already served by service {other:?}",
                    svc.protocol
                ),
            )
            .into());
        }
        if svc.http.is_some() {
            for other in self.services.values().filter(|o| counts(&o.name)) {
                if let Some(e) = route_conflict(svc, other) {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Several services checked to be written together (DFP's destinations of one
    /// service), against the others and against each other; `replaced` are being
    /// rewritten or removed by the same change. The first refused comes back with its
    /// place in `group`.
    pub fn check_group(
        &self,
        group: Vec<(String, ServiceSpec)>,
        replaced: &[String],
    ) -> Result<Vec<Service>, (usize, ControlError)> {
        let mut checked: Vec<Service> = Vec::new();
        for (i, (name, spec)) in group.into_iter().enumerate() {
            let override_listener = spec.override_local_listener.unwrap_or(false);
            let in_group = |e| (i, e);
            let svc = spec
                .validate_after(&name, self.services.get(&name))
                .map_err(|e| in_group(e.into()))?;
            let svc = self.admit_among(svc, replaced).map_err(in_group)?;
            if !override_listener {
                self.check_local_listener(&svc).map_err(in_group)?;
            }
            self.check_http_port(&svc).map_err(in_group)?;
            for earlier in &checked {
                let same_vip = svc.l4_vip().is_some()
                    && svc.l4_vip() == earlier.l4_vip()
                    && svc.protocol == earlier.protocol;
                if same_vip {
                    let message =
                        format!("is also the VIP of {:?}, in the same change", earlier.name);
                    return Err(in_group(ValidationError::new("vip", message).into()));
                }
                if let Some(e) = route_conflict(&svc, earlier) {
                    return Err(in_group(e.into()));
                }
            }
            checked.push(svc);
        }
        Ok(checked)
    }

    /// From now until `resolve_deferred_neighbors`, new backends' next hops are collected
    /// and then resolved in one go: restoring thousands of services at start.
    pub fn defer_neighbors(&mut self) {
        self.deferred.get_or_insert_with(HashSet::new);
    }

    /// Resolves once the next-hop changes made so far are done.
    pub fn next_hops_done(&self) -> NextHopsDone {
        self.neighbors.done()
    }

    pub fn resolve_deferred_neighbors(&mut self) {
        if let Some(ips) = self.deferred.take() {
            self.neighbors.add(ips);
        }
    }

    /// Makes the data plane serve `svc` (already checked).
    pub fn apply(&mut self, svc: Service) -> Result<Service, ControlError> {
        let previous = self.services.get(&svc.name).cloned();
        let old = self.held.get(&svc.name).cloned().unwrap_or_default();
        let new_ips = ips(&svc);
        let first_users: Vec<Ipv4Addr> = new_ips
            .iter()
            .filter(|ip| !old.contains(ip) && !self.backend_users.contains_key(ip))
            .copied()
            .collect();
        // Next hops first, so the first packet to a new backend finds its MAC address.
        match &mut self.deferred {
            Some(queue) => queue.extend(first_users.iter().copied()),
            None => self.neighbors.add(first_users.iter().copied()),
        }
        // Backends that stay keep their health, unless the check changed: a new check
        // starts from scratch, every backend up.
        let same_check = previous.as_ref().is_some_and(|p| p.check == svc.check);
        let down: HashSet<SocketAddrV4> = if same_check {
            self.down_backends(&svc).into_iter().collect()
        } else {
            HashSet::new()
        };
        let applied = match svc.l4_vip() {
            Some(_) => self.dataplane.upsert(&svc, &down),
            // Now an HTTP service: out of the maps if it was a layer-4 one.
            None => self.dataplane.remove(&svc.name).map(|_| Vec::new()),
        };
        if let Some(vip) = svc.l4_vip()
            && svc.protocol == Protocol::Tcp
            && self.shadows_http_listener(vip)
        {
            tracing::warn!(service = %svc.name, %vip, "this VIP takes the traffic of lb's HTTP or HTTPS listener (--http, --https) on that address: XDP sees it first");
        }
        let started_down = match applied {
            Ok(down) => down,
            Err(e) => {
                match &mut self.deferred {
                    Some(queue) => queue.retain(|ip| !first_users.contains(ip)),
                    None => self.neighbors.remove(first_users),
                }
                return Err(e.into());
            }
        };
        self.hold_backends(&svc.name, new_ips);
        if let Some(previous) = &previous
            && let Some(vip) = previous.l4_vip()
        {
            self.remove_vip(vip, previous.protocol);
        }
        if let Some(vip) = svc.l4_vip() {
            self.add_vip(vip, svc.protocol, svc.name.clone());
        }
        // Health: kept for backends that stay (unless the check changed), new ones up.
        let states = self.health.entry(svc.name.clone()).or_default();
        states.retain(|b, _| same_check && svc.backends.contains(b));
        for b in &svc.backends {
            states.entry(*b).or_insert_with(BackendHealth::up_now);
        }
        // Down before a restart (taken out of the adopted table): down until checks pass.
        for b in &started_down {
            if let Some(h) = states.get_mut(b) {
                h.up = false;
                h.reason = Some("down before lb restarted; waiting for its checks to pass".into());
            }
        }
        let down = self.down_backends(&svc);
        if let Some(checker) = &mut self.checker {
            checker.sync(&svc.name, &svc.backends, &down, &svc.check);
        }
        let http = svc.http.is_some() || previous.is_some_and(|p| p.http.is_some());
        self.services.insert(svc.name.clone(), svc.clone());
        if http {
            self.http_changed();
        }
        Ok(svc)
    }

    /// Makes service `name` hold the next hops of `ips` and of its draining backends, and
    /// no others.
    fn hold_backends(&mut self, name: &str, mut ips: HashSet<Ipv4Addr>) {
        if let Some(inst) = self.dataplane.installed(name) {
            ips.extend(inst.draining.iter().map(|d| *d.addr.ip()));
        }
        let old = self.held.remove(name).unwrap_or_default();
        for ip in ips.difference(&old) {
            *self.backend_users.entry(*ip).or_default() += 1;
        }
        self.release_backends(old.difference(&ips).copied().collect());
        if !ips.is_empty() {
            self.held.insert(name.to_string(), ips);
        }
    }

    /// Retires the draining backends that are done (no flows left, or out of time), and
    /// lets go of next hops only they needed.
    pub fn end_drains(&mut self) -> Result<(), crate::dataplane::DataplaneError> {
        for name in self.dataplane.end_drains(std::time::Instant::now())? {
            let ips = self.services.get(&name).map(ips).unwrap_or_default();
            self.hold_backends(&name, ips);
        }
        Ok(())
    }

    /// Drops one use of each of `gone`; next hops no service needs any more are let go.
    fn release_backends(&mut self, gone: Vec<Ipv4Addr>) {
        let mut unused = Vec::new();
        for ip in gone {
            if let Some(n) = self.backend_users.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.backend_users.remove(&ip);
                    unused.push(ip);
                }
            }
        }
        // Each address on its own: a restore calls this once per service, while the queue
        // holds every backend seen so far (a scan of it per call made a cold start
        // quadratic).
        if let Some(queue) = &mut self.deferred {
            for ip in &unused {
                queue.remove(ip);
            }
        }
        self.neighbors.remove(unused);
    }

    /// What a service occupies in the maps.
    pub fn installed(&self, name: &str) -> Option<&crate::dataplane::Installed> {
        self.dataplane.installed(name)
    }

    /// Kernel memory taken by the maps, in bytes.
    pub fn memory(&self) -> u64 {
        self.dataplane.map_memory().iter().map(|(_, b)| b).sum()
    }

    pub fn get_service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn delete(&mut self, name: &str) -> Result<(), ControlError> {
        validate_name(name)?;
        let Some(svc) = self.services.get(name).cloned() else {
            return Err(ControlError::NotFound(name.to_string()));
        };
        self.dataplane.remove(name)?;
        self.services.remove(name);
        if let Some(vip) = svc.l4_vip() {
            self.remove_vip(vip, svc.protocol);
        }
        self.hold_backends(name, HashSet::new());
        self.health.remove(name);
        if let Some(checker) = &mut self.checker {
            checker.stop(name);
        }
        if svc.http.is_some() {
            self.removed_http.retain(|g| g.name != svc.name);
            self.removed_http.push_back(svc);
            if self.removed_http.len() > REMOVED_ROUTES {
                self.removed_http.pop_front();
            }
            self.http_changed();
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<Service> {
        self.services.values().cloned().collect()
    }

    /// How many services there are (what `list` would hold, without the copies).
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn get(&self, name: &str) -> Result<ServiceView, ControlError> {
        let service = self
            .services
            .get(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?
            .clone();
        let (counters, per_backend) = self.dataplane.counters(name).unwrap_or_default();
        let ports = self.dataplane.port_uses(name).unwrap_or_default();
        let backend_counters = service
            .backends
            .iter()
            .map(|addr| {
                let c = per_backend
                    .iter()
                    .find(|(a, _)| a == addr)
                    .map(|(_, c)| *c)
                    .unwrap_or_default();
                let h = self
                    .health
                    .get(name)
                    .and_then(|h| h.get(addr))
                    .cloned()
                    .unwrap_or_else(BackendHealth::up_now);
                let options = service.options(addr);
                let snat_ports = ports.iter().find(|(a, _)| a == addr).map(|(_, p)| *p);
                BackendView {
                    address: addr.to_string(),
                    weight: options.weight,
                    state: options.state,
                    flows: snat_ports.map(|p| p.in_use),
                    counters: c.into(),
                    health: if h.up { "up" } else { "down" },
                    drain_left_s: None,
                    since: humantime::format_rfc3339_millis(h.since).to_string(),
                    reason: h.reason,
                    snat_ports,
                }
            })
            .chain(self.draining_views(name, &per_backend, &ports))
            .collect();
        Ok(ServiceView {
            service,
            counters: counters.into(),
            backend_counters,
        })
    }

    /// The backends of service `name` that a write removed and that still drain.
    fn draining_views(
        &self,
        name: &str,
        per_backend: &[(SocketAddrV4, lb_common::stats::Counters)],
        ports: &[(SocketAddrV4, crate::dataplane::PortUse)],
    ) -> Vec<BackendView> {
        let Some(inst) = self.dataplane.installed(name) else {
            return Vec::new();
        };
        let now = std::time::Instant::now();
        inst.draining
            .iter()
            .map(|d| {
                let counters = per_backend.iter().find(|(a, _)| *a == d.addr);
                let snat_ports = ports.iter().find(|(a, _)| *a == d.addr).map(|(_, p)| *p);
                BackendView {
                    address: d.addr.to_string(),
                    weight: 0,
                    state: crate::backend_entry::AdminState::Draining,
                    flows: snat_ports.map(|p| p.in_use),
                    counters: counters.map(|(_, c)| *c).unwrap_or_default().into(),
                    health: "unchecked",
                    drain_left_s: Some(d.until.saturating_duration_since(now).as_secs()),
                    since: humantime::format_rfc3339_millis(d.began).to_string(),
                    reason: None,
                    snat_ports,
                }
            })
            .collect()
    }

    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        self.dataplane.drops()
    }

    pub fn flood(&self) -> crate::dataplane::FloodView {
        self.dataplane.flood_view()
    }
}

/// How `svc`'s route collides with `other`'s, if it does (on the same listener): both the
/// default backend, a path on a shared host under the same conditions, or a whole domain.
fn route_conflict(svc: &Service, other: &Service) -> Option<ValidationError> {
    let (route, theirs) = (svc.http.as_ref()?, other.http.as_ref()?);
    // Each HTTP listener routes on its own.
    if route.port != theirs.port {
        return None;
    }
    if route.default_backend && theirs.default_backend {
        return Some(ValidationError::new(
            "http.default_backend",
            format!("service {:?} is the default backend already", other.name),
        ));
    }
    // Routes that ask different conditions of a request (headers, user agents) may share
    // paths.
    if route.shares_a_host(theirs)
        && route.conditions() == theirs.conditions()
        && let Some(p) = route.paths.iter().find(|p| theirs.paths.contains(p))
    {
        return Some(ValidationError::new(
            "http.paths",
            format!("{p} on this domain is routed to service {:?}", other.name),
        ));
    }
    if let Some(d) = route.domains.iter().find(|d| theirs.domains.contains(d))
        && route.paths.is_empty()
        && theirs.paths.is_empty()
    {
        return Some(ValidationError::new(
            "http.domain",
            format!("{d:?} is routed to service {:?}", other.name),
        ));
    }
    None
}
