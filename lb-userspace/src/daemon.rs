//! `lb run` as a library: [`Daemon::start`] loads and attaches the data plane, restores the
//! services from the store and starts every background part under a [`Supervisor`];
//! [`Daemon::shutdown`] stops them in order and leaves the data plane forwarding for the
//! next daemon.
use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

use crate::{
    acme,
    address_rules::{AddressRules, Listener},
    api,
    api_auth::AccessPolicy,
    api_listen::{self, ApiListen, ApiListener},
    controller::{Controller, HttpService},
    dataplane::{Dataplane, Limits, Settings},
    discovery,
    http_ports::HttpPorts,
    l7,
    listen::{LISTEN_BACKLOG, listen, reserve},
    net,
    owner::ControllerHandle,
    reconcile::Reconciler,
    retry::{Backoff, until_ok},
    secret::GroupKeys,
    store::{Keyspace, Store, StoreError, access::Access},
    supervise::Supervisor,
    tls,
};

/// What `lb run` was asked for.
pub struct Config {
    /// Interfaces to attach to.
    pub ifaces: Vec<String>,
    /// Where the HTTP API listens.
    pub api: ApiListen,
    /// Where HTTP services are served (the L7 proxy), if anywhere.
    pub http: Option<SocketAddr>,
    /// Where they are served over TLS, with the store's certificates.
    pub https: HttpsListen,
    /// Threads serving HTTP; 0 is one per CPU.
    pub http_workers: usize,
    /// bpffs directory the maps are pinned under.
    pub bpffs: PathBuf,
    pub limits: Limits,
    /// The data plane's settings; its keys are replaced by those an earlier daemon pinned
    /// (or fresh ones), then by the group's from the store.
    pub settings: Settings,
    /// `--snat-address`: the SNAT sources wanted on the interfaces that have them.
    pub snat_addresses: Vec<Ipv4Addr>,
    /// The store's URL, its key prefix and (Consul) ACL token.
    pub store: String,
    pub store_prefix: String,
    pub store_token: Option<String>,
    /// Discovery registries, when not the store itself.
    pub discovery_etcd: Option<String>,
    pub discovery_consul: Option<String>,
    /// `--dns`: the servers DNS discovery asks; none: the host's resolv.conf ones.
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// The balancer's own address (the VIP of DFP's tcp services).
    pub address: Option<Ipv4Addr>,
    /// Clients of the HTTP listener whose X-Forwarded-* headers are kept.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The HTTP proxy's time to open a backend connection, and to get response headers.
    pub http_backend_connect_timeout: std::time::Duration,
    pub http_backend_response_timeout: std::time::Duration,
    /// HTTP services may name backends at loopback addresses (apps on this host).
    pub allow_loopback_backends: bool,
    /// Who may call the API: its token, whether reads are open, the host names it answers
    /// to.
    pub api_access: AccessPolicy,
    /// `--api-insecure`: serve the API beyond loopback without a token.
    pub api_insecure: bool,
    /// What one HTTP client may cost the L7 proxy.
    pub http_limits: l7::Limits,
    /// How every etcd and Consul server (store and discovery) is reached: TLS and the etcd
    /// user.
    pub store_access: Access,
    /// `--acme-directory`: certificates ordered from an ACME CA.
    pub acme: Option<crate::acme::AcmeConfig>,
}

/// Where the HTTPS listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpsListen {
    Off,
    /// Bound at start.
    At(SocketAddr),
    /// Bound at start, listening once the store holds a certificate (the default: --http's
    /// address, port 443): a node with no certificate refuses HTTPS connections.
    OnceCertified(SocketAddr),
}

impl HttpsListen {
    fn addr(self) -> Option<SocketAddr> {
        match self {
            HttpsListen::Off => None,
            HttpsListen::At(a) | HttpsListen::OnceCertified(a) => Some(a),
        }
    }
}

/// A running daemon.
pub struct Daemon {
    supervisor: Supervisor,
    controller: ControllerHandle,
    /// Tells the API server and the HTTP listener to stop.
    stop: watch::Sender<bool>,
    api: JoinHandle<()>,
    http: Option<JoinHandle<()>>,
    /// Parts that only stop by being aborted.
    background: Vec<AbortHandle>,
    bpffs: PathBuf,
}

impl Daemon {
    /// Binds the listeners, loads and attaches the data plane, opens the store and starts
    /// serving; services are restored in the background (`/ready` says when).
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        for iface in &config.ifaces {
            net::ifindex(iface)?;
        }
        api_listen::check_listen(
            &config.api,
            config.api_access.token.is_some(),
            config.api_insecure,
        )?;
        // Listeners first: a port in use must not cost a running data plane anything.
        let api_listener = api_listen::bind(&config.api).await?;
        let http_listener = match config.http {
            None => None,
            Some(addr) => Some((
                addr,
                listen(addr).with_context(|| {
                    format!("binding the HTTP listener to {addr} (--http; `--http off` for none)")
                })?,
            )),
        };
        let https_listener = match config.https {
            HttpsListen::At(addr) => Some(bind_https(addr)?),
            _ => None,
        };
        // Bound now, while lb may bind a port below 1024; listening once a certificate is
        // stored, which takes no privilege.
        let https_reserved = match config.https {
            HttpsListen::OnceCertified(addr) => match reserve(addr) {
                Ok(socket) => Some(socket),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "HTTPS will not be served: its port cannot be bound (--https ADDR:PORT picks another, `--https off` for none)");
                    None
                }
            },
            _ => None,
        };
        let (dataplane, keys) = load_dataplane(&config)?;
        let store = open_store(&config).await?;
        let cert_store = open_store_keyspace(&config, Keyspace::Certs).await?;
        let cert_table = Arc::new(tls::CertTable::default());
        let acme_store = match config.acme {
            Some(_) => Some(open_store_keyspace(&config, Keyspace::Acme).await?),
            None => None,
        };
        let acme_challenges = Arc::new(acme::Challenges::default());
        let (acme_wanted, acme_wanted_rx) = watch::channel(BTreeSet::new());
        // Whether a route passes TLS through: the HTTPS listener opens for it too.
        let (passthrough, passthrough_rx) = watch::channel(false);
        let mut controller = Controller::new(dataplane);
        // From here on the data plane outlives this process: a restart takes it over.
        controller.keep_on_exit();
        for addr in http_listener
            .iter()
            .map(|(a, _)| *a)
            .chain(config.https.addr())
        {
            controller.add_http_listener(addr);
        }
        if let Some((addr, _)) = &http_listener {
            controller.set_http_frontend(*addr);
        }
        controller.set_address_rules(address_rules(&config)?);
        let controller = ControllerHandle::start(controller);
        let supervisor = Supervisor::default();
        // Ends once the keys are settled.
        let group_keys = tokio::spawn(adopt_group_keys(
            store.clone(),
            controller.clone(),
            config.settings.clone(),
            keys,
        ));
        let sources = discovery_sources(&config).await?;
        let reconciler = Reconciler::new(store, controller.clone(), sources);
        let mut background = vec![
            group_keys.abort_handle(),
            supervisor
                .spawn("store", reconciler.clone().run())
                .abort_handle(),
            supervisor
                .spawn(
                    "interface addresses",
                    follow_addresses(controller.clone(), config.snat_addresses.clone()),
                )
                .abort_handle(),
            supervisor
                .spawn("flow sweeper", sweep(controller.clone()))
                .abort_handle(),
            supervisor
                .spawn(
                    "certificates",
                    tls::follow::follow(cert_store.clone(), cert_table.clone()),
                )
                .abort_handle(),
        ];
        let certs = crate::api_certs::Certs::new(cert_store, cert_table.clone());
        if let (Some(acme_config), Some(acme_store)) = (&config.acme, acme_store) {
            background.push(
                supervisor
                    .spawn(
                        "acme challenges",
                        acme::challenges::follow(acme_store.clone(), acme_challenges.clone()),
                    )
                    .abort_handle(),
            );
            let manager = acme::Manager {
                config: acme_config.clone(),
                store: acme_store,
                certs: certs.clone(),
                table: cert_table.clone(),
                challenges: acme_challenges.clone(),
                wanted: acme_wanted_rx,
            };
            background.push(supervisor.spawn("acme", manager.run()).abort_handle());
            tracing::info!(directory = %acme_config.directory, domains = ?acme_config.domains, "ordering certificates over ACME");
        }
        let (stop, stopped) = watch::channel(false);
        let mut proxy = None;
        let mut http = None;
        if http_listener.is_some() || config.https != HttpsListen::Off {
            // Client connections are capped below the descriptor limit, not by it.
            l7::raise_fd_limit();
            let engine = l7::Proxy::new(l7::ProxyConfig {
                workers: config.http_workers,
                connect_timeout: config.http_backend_connect_timeout,
                response_header_timeout: config.http_backend_response_timeout,
                trusted_proxies: l7::TrustedProxies::new(config.trusted_proxies.clone()),
                limits: config.http_limits.clone(),
                https_port: config.https.addr().map_or(443, |a| a.port()),
                acme_challenges: acme_challenges.clone(),
                ..l7::ProxyConfig::default()
            });
            let routes = engine.clone();
            // Routes with ports of their own listen on the --http listener's address.
            let (http_ports, port_listeners) = match &http_listener {
                Some((addr, _)) => {
                    let (ports, listeners) =
                        HttpPorts::new(addr.ip(), tokio::runtime::Handle::current());
                    (Some(ports), listeners)
                }
                None => (None, watch::channel(l7::PortListeners::new()).1),
            };
            controller
                .call(move |c| {
                    c.set_http_routes(Box::new(move |services| {
                        if let Some(ports) = &http_ports {
                            ports.follow(&own_ports(&services));
                        }
                        routes.set_routes(services.iter().map(route).collect());
                        passthrough.send_if_modified(|held| {
                            let now = services.iter().any(|s| {
                                !s.removed
                                    && s.service.http.as_ref().is_some_and(|r| r.tls_passthrough)
                            });
                            std::mem::replace(held, now) != now
                        });
                        let wanted = acme_domains(&services);
                        acme_wanted.send_if_modified(|held| {
                            let changed = *held != wanted;
                            *held = wanted;
                            changed
                        });
                    }));
                })
                .await?;
            let (https_tx, https_rx) = watch::channel(None);
            let tls = tls::server_config(cert_table.clone());
            match (config.https, https_listener) {
                (HttpsListen::At(addr), Some(listener)) => {
                    https_tx.send_replace(Some(https_frontend(listener, tls)?));
                    tracing::info!(%addr, "serving HTTP services over TLS");
                }
                (HttpsListen::OnceCertified(addr), _) => {
                    if let Some(socket) = https_reserved {
                        background.push(
                            tokio::spawn(open_https_once_certified(
                                addr,
                                socket,
                                cert_table.clone(),
                                passthrough_rx,
                                tls,
                                https_tx,
                            ))
                            .abort_handle(),
                        );
                    }
                }
                _ => {}
            }
            let frontends = l7::Frontends {
                http: http_listener.map(|(addr, listener)| {
                    tracing::info!(%addr, "serving HTTP services");
                    listener
                }),
                https: https_rx,
                ports: port_listeners,
            };
            http = Some(supervisor.spawn(
                "http listener",
                serve_http(
                    engine.clone(),
                    frontends,
                    stopped.clone(),
                    supervisor.clone(),
                ),
            ));
            proxy = Some(engine);
        }
        let address = config.address.or_else(|| first_address(&config.ifaces[0]));
        let router = api::router(
            reconciler,
            api::Extras {
                balancer: crate::dfp::Balancer {
                    address,
                    http_port: config.http.map(|a| a.port()),
                    https_port: config.https.addr().map(|a| a.port()),
                },
                proxy,
                supervisor: supervisor.clone(),
                access: Arc::new(config.api_access.clone()),
                certs,
            },
        );
        let api = supervisor.spawn("api", serve_api(api_listener, router, stopped));
        tracing::info!(api = %config.api, ifaces = ?config.ifaces, bpffs = %config.bpffs.display(), "lb is running");
        Ok(Self {
            supervisor,
            controller,
            stop,
            api,
            http,
            background,
            bpffs: config.bpffs,
        })
    }

    /// Stops serving the API, gives in-flight HTTP requests a few seconds, stops every
    /// other part and drops the controller (the data plane stays attached).
    pub async fn shutdown(self) {
        self.supervisor.shutting_down();
        let _ = self.stop.send(true);
        let _ = self.api.await;
        if let Some(http) = self.http {
            let _ = tokio::time::timeout(Duration::from_secs(6), http).await;
        }
        for task in self.background {
            task.abort();
        }
        self.controller.close().await;
        tracing::info!(
            bpffs = %self.bpffs.display(),
            "stopped; XDP stays attached and forwarding until the next `lb run` takes over (`lb down` removes it)"
        );
    }
}

/// Loads the data plane (adopting what an earlier daemon pinned), configures and attaches
/// it; with the keys it runs with for now.
fn load_dataplane(config: &Config) -> anyhow::Result<(Dataplane, GroupKeys)> {
    let mut dataplane = Dataplane::load(&config.bpffs, &config.limits)?;
    // The keys an earlier daemon left keep flows where they are until the store says which
    // are the group's.
    let keys = match dataplane.pinned_keys() {
        Some((flow, cookie)) => GroupKeys { flow, cookie },
        None => GroupKeys::random().context("reading random bytes for the group's keys")?,
    };
    dataplane.configure(&with_keys(config.settings.clone(), keys))?;
    dataplane.set_iface_addrs(&snat_addresses(&config.snat_addresses)?)?;
    for iface in &config.ifaces {
        net::enable_forwarding(iface)?;
        if net::tx_by_redirect(iface) {
            dataplane.set_tx_by_redirect(net::ifindex(iface)?)?;
        }
        dataplane.attach(iface)?;
    }
    dataplane.detach_others();
    Ok((dataplane, keys))
}

fn with_keys(settings: Settings, keys: GroupKeys) -> Settings {
    Settings {
        flow_key: keys.flow,
        cookie_key: keys.cookie,
        ..settings
    }
}

/// The SNAT addresses per interface (ifindex), as `--snat-address` asks.
fn snat_addresses(wanted: &[Ipv4Addr]) -> anyhow::Result<HashMap<u32, Vec<[u8; 4]>>> {
    net::snat_addresses(&net::interface_addresses()?, wanted).map_err(anyhow::Error::msg)
}

/// The first IPv4 address of `iface`.
fn first_address(iface: &str) -> Option<Ipv4Addr> {
    let index = net::ifindex(iface).ok()?;
    let addrs = net::interface_addresses().ok()?;
    addrs.get(&index)?.first().map(|a| Ipv4Addr::from(*a))
}

/// Opens the store, retrying with backoff while its server cannot be reached (saying which
/// and why); a bad URL, a TLS failure or refused credentials are an error at once.
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    open_store_keyspace(config, Keyspace::Services).await
}

async fn open_store_keyspace(
    config: &Config,
    keyspace: Keyspace,
) -> anyhow::Result<Arc<dyn Store>> {
    let token = config
        .store_token
        .clone()
        .filter(|_| crate::store::consul_servers(&config.store).is_some());
    while_unreachable("cannot reach the store", || {
        crate::store::open_keyspace(
            &config.store,
            &config.store_prefix,
            token.clone(),
            &config.store_access,
            keyspace,
        )
    })
    .await
}

fn bind_https(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    listen(addr).with_context(|| {
        format!("binding the HTTPS listener to {addr} (--https; `--https off` for none)")
    })
}

fn https_frontend(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<l7::HttpsFrontend> {
    Ok(l7::HttpsFrontend {
        listener: Arc::new(listener.into_std()?),
        tls,
    })
}

/// Listens on the HTTPS socket bound at start once there is a certificate to serve, or a
/// route whose TLS is passed through.
async fn open_https_once_certified(
    addr: SocketAddr,
    socket: tokio::net::TcpSocket,
    certs: Arc<tls::CertTable>,
    mut passthrough: watch::Receiver<bool>,
    tls: Arc<rustls::ServerConfig>,
    https: watch::Sender<Option<l7::HttpsFrontend>>,
) {
    tokio::select! {
        () = certs.wait_for_one() => {}
        Ok(_) = passthrough.wait_for(|p| *p) => {}
    }
    let opened = match socket.listen(LISTEN_BACKLOG) {
        Ok(listener) => https_frontend(listener, tls),
        Err(e) => Err(anyhow::Error::from(e).context(format!("listening on {addr} for HTTPS"))),
    };
    match opened {
        Ok(frontend) => {
            https.send_replace(Some(frontend));
            tracing::info!(%addr, "serving HTTP services over TLS (a certificate is stored, or TLS is passed through)");
            // The workers follow the sender: kept until the daemon stops.
            std::future::pending::<()>().await;
        }
        Err(e) => tracing::error!("{e:#}; HTTPS is not served"),
    }
}

/// Calls `attempt` again, backing off, while it fails with [`StoreError::Unavailable`]
/// (logged as "`what`: why"); any other error is returned.
async fn while_unreachable<T, F>(what: &str, mut attempt: impl FnMut() -> F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(StoreError::Unavailable(why)) => {
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "{what}: {why}");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Takes the group's keys from the store (or puts `keys` there if the group has none yet),
/// retrying until the store answers: meanwhile the data plane keeps the keys it has (a
/// restarted node's pinned ones), so a store that is away stops nothing from serving.
async fn adopt_group_keys(
    store: Arc<dyn Store>,
    controller: ControllerHandle,
    settings: Settings,
    keys: GroupKeys,
) {
    let group = until_ok(
        "the group's secret in the store",
        Duration::from_millis(200),
        Duration::from_secs(10),
        || crate::secret::shared(store.as_ref(), keys),
    )
    .await;
    if group == keys {
        return;
    }
    tracing::info!("using the group's keys from the store");
    let settings = with_keys(settings, group);
    let configured = controller
        .call(move |c| c.dataplane().configure(&settings))
        .await;
    if let Ok(Err(e)) = configured {
        tracing::error!("configuring the data plane with the group's keys: {e}");
    }
}

/// The discovery sources named by the flags, or by the store's URL.
async fn discovery_sources(config: &Config) -> anyhow::Result<discovery::Sources> {
    let mut sources = discovery::Sources::default();
    let access = &config.store_access;
    let store_if = |is: fn(&str) -> bool| is(&config.store).then(|| config.store.clone());
    if let Some(url) = config
        .discovery_consul
        .clone()
        .or_else(|| store_if(|u| crate::store::consul_servers(u).is_some()))
    {
        let (addrs, https) =
            discovery::consul_addrs(&url).map_err(|e| anyhow::anyhow!("--discovery-consul {e}"))?;
        let token = config.store_token.clone();
        let client = crate::store::consul_client(addrs, https, token, access).await?;
        sources.consul = Some(client);
    }
    if let Some(url) = config
        .discovery_etcd
        .clone()
        .or_else(|| store_if(|u| crate::store::etcd_endpoints(u).is_some()))
    {
        let endpoints =
            discovery::etcd_endpoints(&url).map_err(|e| anyhow::anyhow!("--discovery-etcd {e}"))?;
        let prefix = &config.store_prefix;
        sources.etcd = Some(
            while_unreachable("cannot reach the etcd registry", || {
                discovery::etcd::EtcdRegistry::connect(&endpoints, prefix, access)
            })
            .await?,
        );
    }
    sources.dns = match discovery::dns::DnsResolver::new(&config.dns_servers) {
        Ok(resolver) => Some(resolver),
        Err(e) if config.dns_servers.is_empty() => {
            // Only services discovered by DNS need it: they are refused, with the reason.
            tracing::warn!(error = %e, "no DNS discovery: the host's resolv.conf could not be read (give --dns)");
            None
        }
        Err(e) => anyhow::bail!("--dns: {e}"),
    };
    Ok(sources)
}

/// What backends are held to: never lb itself (its addresses, SNAT sources and
/// listeners), loopback only where the flag allows it.
fn address_rules(config: &Config) -> anyhow::Result<AddressRules> {
    let mut listeners = Vec::new();
    // An API on a Unix socket is reached by no backend address.
    if let ApiListen::Tcp(addr) = config.api {
        listeners.push(Listener {
            what: "lb's API",
            addr,
        });
    }
    if let Some(addr) = config.http {
        listeners.push(Listener {
            what: "lb's HTTP listener",
            addr,
        });
    }
    if let Some(addr) = config.https.addr() {
        listeners.push(Listener {
            what: "lb's HTTPS listener",
            addr,
        });
    }
    let mut rules = AddressRules::new(
        config.snat_addresses.clone(),
        listeners,
        config.allow_loopback_backends,
    );
    rules.set_host(net::host_addresses()?);
    Ok(rules)
}

/// Interface addresses can change under us: keeps the SNAT sources, and the host's
/// addresses that backends may not be, current.
async fn follow_addresses(controller: ControllerHandle, wanted: Vec<Ipv4Addr>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tick.tick().await;
        match net::host_addresses() {
            Ok(host) => {
                if controller
                    .call(move |c| c.set_host_addresses(host))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the host's addresses"),
        }
        let addrs = match snat_addresses(&wanted) {
            Ok(addrs) => addrs,
            Err(e) => {
                tracing::warn!(error = %e, "reading interface addresses");
                continue;
            }
        };
        match controller
            .call(move |c| c.dataplane().set_iface_addrs(&addrs))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "updating interface addresses"),
            Err(_) => return,
        }
    }
}

/// Once a second, flows that are over leave the maps and their ports go back, and
/// draining backends whose flows are all over (or out of time) are retired.
async fn sweep(controller: ControllerHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 0u64.. {
        tick.tick().await;
        let swept = controller
            .call(move |c| {
                if n % 60 == 59 {
                    c.dataplane().forget_port_tables()?;
                }
                c.dataplane().sweep()?;
                c.end_drains()
            })
            .await;
        match swept {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping the flow maps"),
            Err(_) => return,
        }
    }
}

/// The domains of the HTTP services that ask for an ACME certificate.
fn acme_domains(services: &[HttpService]) -> BTreeSet<String> {
    services
        .iter()
        .filter(|s| !s.removed)
        .filter_map(|s| s.service.http.as_ref())
        .filter(|r| r.tls.acme)
        .flat_map(|r| r.domains.iter().cloned())
        .collect()
}

/// The ports of their own the live HTTP routes ask for.
fn own_ports(services: &[HttpService]) -> BTreeSet<u16> {
    services
        .iter()
        .filter(|s| !s.removed)
        .filter_map(|s| s.service.http.as_ref()?.port)
        .collect()
}

/// The proxy's route for an HTTP service.
fn route(s: &HttpService) -> l7::Route {
    let r = s.service.http.as_ref().expect("an HTTP service");
    l7::Route {
        service: s.service.name.clone(),
        paths: r.paths.clone(),
        paths_exclude: r.paths_exclude.clone(),
        domains: r.domains.clone(),
        backends: s.healthy.iter().map(|&b| SocketAddr::V4(b)).collect(),
        balance: match r.balance {
            crate::model::Balance::RoundRobin => l7::Balance::RoundRobin,
            crate::model::Balance::LeastOutstanding => l7::Balance::LeastOutstanding,
        },
        default_backend: r.default_backend,
        // Validated as methods when the service was.
        allowed_methods: methods(&r.allowed_methods),
        denied_methods: methods(&r.denied_methods),
        plain_http: if r.deny_http {
            l7::PlainHttp::Deny
        } else if r.https_only {
            let code = r.https_redirect_code.unwrap_or(302);
            l7::PlainHttp::Redirect(
                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::FOUND),
            )
        } else {
            l7::PlainHttp::Serve
        },
        users: r
            .users
            .iter()
            .map(|u| (u.name.clone(), u.password_hash.clone()))
            .collect(),
        rewrite: rewrite(r),
        backend_tls: r
            .backend_tls
            .as_ref()
            .map(crate::model::BackendTlsSpec::to_l7),
        backend_h2: r.backend_protocol == crate::model::BackendProtocol::H2,
        tls_passthrough: r.tls_passthrough,
        // Validated as header names and values when the service was.
        match_headers: r
            .match_headers
            .iter()
            .filter_map(|(n, v)| {
                Some((
                    http::HeaderName::from_bytes(n.as_bytes()).ok()?,
                    http::HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect(),
        match_user_agents: r.match_user_agents.clone(),
        redirect_from: r.redirect_from.clone(),
        sticky_cookie: r.sticky_cookie.clone(),
        compress: r.compression.as_ref().map(|c| l7::Compress {
            types: c.types.clone(),
        }),
        timeouts: l7::RouteTimeouts {
            server: r.server_timeout_ms.map(std::time::Duration::from_millis),
            tunnel: r.tunnel_timeout_ms.map(std::time::Duration::from_millis),
        },
        sni: r
            .sni
            .as_ref()
            .map(crate::model::SniSpec::to_l7)
            .unwrap_or_default(),
        port: r.port,
    }
}

/// The route's rewriting, compiled (validated with the service); None when it has none.
fn rewrite(r: &crate::model::HttpRoute) -> Option<Arc<l7::Rewrite>> {
    let rules = |edits: &crate::model::HeaderEdits| {
        let named = |n: &String| http::HeaderName::from_bytes(n.as_bytes()).ok();
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .filter_map(|(n, v)| Some((named(n)?, http::HeaderValue::from_str(v).ok()?)))
                .collect()
        };
        l7::HeaderRules {
            delete: edits.delete.iter().filter_map(named).collect(),
            set: pairs(&edits.set),
            add: pairs(&edits.add),
        }
    };
    let rewrite = l7::Rewrite {
        request: rules(&r.request_headers),
        response: rules(&r.response_headers),
        path: r
            .path_rewrite
            .iter()
            .filter_map(|p| {
                Some(l7::PathRule {
                    search: compiled(&p.search)?,
                    replace: p.replace.clone(),
                })
            })
            .collect(),
    };
    (!rewrite.is_empty()).then(|| Arc::new(rewrite))
}

/// A path rewrite's pattern, compiled once: the routes are rebuilt whole on every change
/// of an HTTP service or of a backend's health, and compiling every service's patterns
/// each time would cost milliseconds per thousand services.
fn compiled(pattern: &str) -> Option<regex::Regex> {
    /// Patterns seen; cleared when it grows past this (those of removed services).
    const MOST: usize = 4096;
    static CACHE: std::sync::LazyLock<std::sync::Mutex<HashMap<String, regex::Regex>>> =
        std::sync::LazyLock::new(Default::default);
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(re) = cache.get(pattern) {
        return Some(re.clone());
    }
    let re = crate::model::path_regex(pattern).ok()?;
    if cache.len() >= MOST {
        cache.clear();
    }
    cache.insert(pattern.to_string(), re.clone());
    Some(re)
}

fn methods(names: &[String]) -> Vec<http::Method> {
    names
        .iter()
        .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
        .collect()
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve_http(
    proxy: Arc<l7::Proxy>,
    frontends: l7::Frontends,
    stop: watch::Receiver<bool>,
    supervisor: Supervisor,
) {
    if let Err(e) = proxy.serve(frontends, stopped(stop), supervisor).await {
        tracing::error!("the HTTP listener failed: {e}");
    }
}

/// Serves the API until `stop`; a Unix socket's file goes with it.
async fn serve_api(listener: ApiListener, router: axum::Router, stop: watch::Receiver<bool>) {
    let served = match listener {
        ApiListener::Tcp(listener) => {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped(stop))
                .await
        }
        ApiListener::Unix(listener, _file) => {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped(stop))
                .await
        }
    };
    if let Err(e) = served {
        tracing::error!("the API server failed: {e}");
    }
}
