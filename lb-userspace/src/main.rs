//! `lb`: an XDP load balancer. `lb run` loads the data plane, attaches it and serves the
//! HTTP API until SIGINT or SIGTERM.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use lb::{
    api_auth::{AccessPolicy, ApiToken},
    api_listen::ApiListen,
    daemon::{Config, Daemon, HttpsListen},
    dataplane::{CookieMode, Dataplane, Limits, Settings},
    l7::Limits as HttpLimits,
    net,
    secret::GroupKeys,
};
use tokio::signal::unix::{SignalKind, signal};

/// mimalloc rather than glibc's malloc: the HTTP proxy allocates and frees small buffers
/// and header maps on every request, from several worker threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "An XDP layer-4 load balancer with full NAT, driven over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once: the size of the run variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load and attach the XDP program and serve the HTTP API (needs root).
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Detach the XDP program and remove the pinned maps a stopped `lb run` left behind.
    Down(DownArgs),
    /// On a backend of "forwarding": "dsr" services: attach lb's decapsulation program,
    /// which strips the outer header of lb's IPIP packets for these VIPs (needs root).
    #[command(after_help = BACKEND_HELP)]
    Backend(BackendArgs),
}

#[derive(Args)]
struct BackendArgs {
    /// Interface the balancer's packets arrive on; repeat for several.
    #[arg(long = "iface", value_name = "IF", required_unless_present = "down")]
    ifaces: Vec<String>,
    /// A VIP this backend serves (its address, no port); repeat for several. Packets for
    /// other addresses pass untouched.
    #[arg(long = "vip", value_name = "ADDR", required_unless_present = "down")]
    vips: Vec<std::net::Ipv4Addr>,
    /// The bpffs directory the program's link and VIP map are pinned under.
    #[arg(long, default_value = "/sys/fs/bpf/lb-backend", value_name = "DIR")]
    bpffs: PathBuf,
    /// Detach the program and remove its pins.
    #[arg(long, conflicts_with_all = ["ifaces", "vips"])]
    down: bool,
}

const BACKEND_HELP: &str = "\
The program stays attached after the command exits (its link is pinned); run it again with
the full list to change the VIPs or interfaces (swapped in atomically), or --down to remove it.

The backend must also hold each VIP on a local device, and answer clients directly:
  ip addr add VIP/32 dev lo
  sysctl -w net.ipv4.conf.all.rp_filter=2    (only where the route back to clients is
                                             not through IF, which strict mode requires)
With the kernel's ipip module, a tunnel device does the same without this program:
  ip link add name ipip0 type ipip external && ip link set ipip0 up
  ip addr add 127.0.0.42/32 dev ipip0 && ip addr add VIP/32 dev lo";

#[derive(Args)]
struct DownArgs {
    /// The bpffs directory `lb run` pinned under.
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "DIR")]
    bpffs: PathBuf,
}

const RUN_HELP: &str = "\
The API (JSON):
  PUT    /v1/services/NAME  {\"vip\": \"10.0.0.100:80\", \"protocol\": \"tcp\", \"backends\": [\"10.0.1.11:8080\"]}
         or, instead of backends,  \"discovery\": {\"kind\": \"etcd\" | \"consul\", \"service\": \"web\"}
         an HTTP service (served on --http): {\"http\": {\"paths\": [\"/demo\"], \"domain\": \"example.com\"}, \"backends\": [...]}
         its http may add \"https_only\": true, \"users\": [{\"name\": \"admin\", \"password\": \"..\"}],
         \"request_headers\"/\"response_headers\": {\"delete\": [..], \"set\": {..}, \"add\": {..}},
         \"path_rewrite\": [{\"search\": \"^/demo/\", \"replace\": \"/\"}], \"allowed_methods\": [\"GET\"],
         \"tls\": {\"acme\": true} (a certificate for its domain, with --acme-directory)
         health checks: \"check\": {\"kind\": \"http\", \"path\": \"/health\", \"interval_ms\": 1000, \"rise\": 2, \"fall\": 3}
         a layer-4 service may return directly: \"forwarding\": \"dsr\" (IPIP; backends run `lb
         backend` or an ipip device) or \"dsr-l2\" (backends on lb's segment); default \"nat\"
  GET    /v1/services[/NAME]    DELETE /v1/services/NAME    GET /v1/stats
  PUT    /v1/certs/NAME  {\"cert\": PEM chain, \"key\": PEM key} (or one PEM with both): served on --https
  GET    /v1/certs[/NAME] (never the key)    DELETE /v1/certs/NAME
  GET    /v1/docker-flow-proxy/reconfigure?serviceName=..&servicePath=..&port=..&backends=..
         (and remove, reload, config?type=json, ping, PUT cert?certName=.., certs: Docker
         Flow Proxy's API)
  GET    /health (liveness)     GET /ready (200 once the stored services are restored; 503
         naming any part of lb that has stopped)

Access: with --api-token-file every call but /health and /ready sends the token (Bearer, or
as basic auth's password; --api-read-open opens the reads). Without it the API listens on
loopback or a Unix socket only (--api-insecure overrides). Calls that change something are
refused (403) when a browser marks them cross-site (Sec-Fetch-Site, Origin) or their Host is
not an IP address, localhost or an --api-host name.

The host: lb enables IPv4 forwarding on the interfaces it serves, keeps backends' next hops
resolved as managed neighbour entries, and pins its maps and XDP links under --bpffs (mounting
bpffs on /sys/fs/bpf if nothing is there). Inspect them with
`bpftool map dump pinned DIR/services`.

Restarts are hitless: on SIGINT, SIGTERM or a crash the program stays attached and keeps
forwarding with the pinned maps; the next `lb run` on the same --bpffs adopts them (when their
layout matches) and swaps its program in atomically. `lb down` detaches and removes it all.";

#[derive(Args)]
struct RunArgs {
    /// Interface to attach to; repeat for each interface clients or backends are reached
    /// through (replies from backends must arrive on an attached interface too).
    #[arg(long = "iface", required = true, value_name = "IF")]
    ifaces: Vec<String>,
    /// Where HTTP services are served (the L7 proxy), or `off`. XDP passes this
    /// listener's traffic to the kernel untouched.
    #[arg(long, default_value = "0.0.0.0:80", value_name = "ADDR|off")]
    http: String,
    /// Where HTTP services are served over TLS, or `off`. `auto`: --http's address on port
    /// 443, bound at start and listening once the store holds a certificate (`PUT
    /// /v1/certs/NAME`); a port already taken is then only a warning. SNI picks the
    /// certificate; ALPN offers h2 and http/1.1; TLS 1.2 and 1.3.
    #[arg(long, default_value = "auto", value_name = "ADDR|auto|off")]
    https: String,
    /// Threads serving HTTP (each with its own backend connection pools); 0 is one per
    /// CPU.
    #[arg(long, default_value_t = 0, value_name = "N")]
    http_workers: usize,
    /// Where the HTTP API listens: ADDR:PORT, or unix:/PATH for a Unix socket (created mode
    /// 0600, a stale one replaced, removed at stop). Without --api-token-file only a loopback
    /// address or a Unix socket is allowed, unless --api-insecure.
    #[arg(
        long,
        default_value = "127.0.0.1:9090",
        value_name = "ADDR:PORT|unix:/PATH"
    )]
    api: ApiListen,
    /// bpffs directory the maps are pinned under.
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "DIR")]
    bpffs: PathBuf,
    /// Source ports for the balancer's side of forwarded flows, a range per backend and
    /// SNAT address. Must not overlap the host's ephemeral range
    /// (net.ipv4.ip_local_port_range). Default: the widest range from 1024 up outside it
    /// (1024-32767 with Linux's default).
    #[arg(long, value_name = "MIN-MAX", value_parser = parse_range)]
    snat_ports: Option<(u16, u16)>,
    /// An address to use as SNAT source on the interface that has it (repeat for several:
    /// each multiplies the ports towards every backend). Interfaces with none of them use
    /// their first IPv4 address.
    #[arg(long = "snat-address", value_name = "IP")]
    snat_addresses: Vec<std::net::Ipv4Addr>,
    /// When lb answers SYNs itself with SYN cookies (no state until the client's ACK proves
    /// its address): `auto` above --syn-cookie-rate or --syn-cookie-occupancy, `always`,
    /// or `off`.
    #[arg(long, default_value = "auto", value_name = "auto|always|off")]
    syn_cookies: CookieArg,
    /// New SYNs a second (all CPUs) above which cookie mode turns on; 0: never by rate.
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    syn_cookie_rate: u32,
    /// Percent of a backend's SNAT ports in use above which cookie mode turns on; 0: never
    /// by occupancy.
    #[arg(long, default_value_t = 50, value_name = "PCT", value_parser = clap::value_parser!(u32).range(0..=100))]
    syn_cookie_occupancy: u32,
    /// Seconds a backend holds a connection it closed first in TIME_WAIT (60 on Linux,
    /// often 120 elsewhere). A port in it goes to a new SYN only if the backend would
    /// accept it (RFC 6191), else after this.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    backend_time_wait: u32,
    /// Where the configuration is kept: file:///DIR (embedded, the default),
    /// etcd://HOST:PORT[,HOST:PORT...] (etcd v3) or consul://HOST:PORT[,HOST:PORT...]
    /// (Consul's KV store); every address listed is failed over to. etcds:// and
    /// consuls:// speak TLS (see --store-ca-file). Every service stored there is restored
    /// at start.
    #[arg(long, default_value = "file:///var/lib/lb", value_name = "URL")]
    store: String,
    /// A file holding the ACL token (X-Consul-Token) for Consul: a consul:// store and
    /// --discovery-consul (surrounding whitespace is ignored). Its mode must be 0600 or
    /// 0400: a file group or others may read is refused at start.
    #[arg(long, value_name = "FILE")]
    store_token_file: Option<PathBuf>,
    /// Prefix of this balancer group's entries in the store: groups with different prefixes
    /// share a store without touching each other's services.
    #[arg(long, default_value = "lb", value_name = "PREFIX")]
    store_prefix: String,
    /// etcd registry for services with `"discovery": {"kind": "etcd"}`: instances are keys
    /// PREFIX/registry/SERVICE/INSTANCE holding ip:port. Default: the --store, when it is
    /// etcd.
    #[arg(long, value_name = "etcd[s]://HOST:PORT[,...]")]
    discovery_etcd: Option<String>,
    /// Consul agents for services with `"discovery": {"kind": "consul"}`, read through the
    /// health API (passing instances; with "include_warning", warning ones too). Default:
    /// the --store, when it is consul.
    #[arg(long, value_name = "consul[s]://HOST:PORT[,...]")]
    discovery_consul: Option<String>,
    /// A DNS server for services with `"discovery": {"kind": "dns"}` and Docker Flow Proxy
    /// reconfigures without backends (repeat for several; port 53 unless given). Each name
    /// is asked again when its answer's TTL runs out (at least every 30 s, at most every
    /// second). Default: the servers of the host's /etc/resolv.conf.
    #[arg(long = "dns", value_name = "IP[:PORT]", value_parser = parse_dns_server)]
    dns_servers: Vec<std::net::SocketAddr>,
    /// An ACME CA to order certificates from (RFC 8555 directory URL; `letsencrypt` for
    /// Let's Encrypt): for each --acme-domain and the http.domain of each service with
    /// "tls": {"acme": true}. lb answers the HTTP-01 challenge on --http (the CA must reach
    /// it on port 80), stores each certificate as `acme.DOMAIN` (served by every node) and
    /// renews it before it expires; one node orders at a time (a lock in the store).
    #[arg(long, value_name = "URL|letsencrypt")]
    acme_directory: Option<String>,
    /// The ACME account's contact address.
    #[arg(long, value_name = "EMAIL", requires = "acme_directory")]
    acme_email: Option<String>,
    /// A domain to order a certificate for, whatever the services say (repeatable).
    #[arg(
        long = "acme-domain",
        value_name = "DOMAIN",
        requires = "acme_directory"
    )]
    acme_domains: Vec<String>,
    /// PEM roots the ACME directory's own HTTPS is checked against, instead of the
    /// system's (a private CA).
    #[arg(long, value_name = "FILE", requires = "acme_directory")]
    acme_ca_file: Option<PathBuf>,
    /// Renew an ordered certificate this long before it expires (or at two thirds of its
    /// life, if that comes first).
    #[arg(long, default_value = "30d", value_name = "DURATION", value_parser = parse_duration)]
    acme_renew_before: std::time::Duration,
    /// The balancer's own address: the VIP of Docker Flow Proxy `reqMode=tcp` services.
    /// Default: the IPv4 address of the first --iface.
    #[arg(long, value_name = "IP")]
    address: Option<std::net::Ipv4Addr>,
    /// Capacity of the services map.
    #[arg(long, default_value_t = Limits::default().max_services)]
    max_services: u32,
    /// Capacity of the backends map (over all services).
    #[arg(long, default_value_t = Limits::default().max_backends)]
    max_backends: u32,
    /// Capacity of the shared Maglev slot array (about 8 bytes of kernel memory a slot).
    #[arg(long, default_value_t = Limits::default().maglev_slots)]
    maglev_slots: u32,
    /// Flows tracked at most: the capacity of the reverse-NAT map, and the size the
    /// connection-tracking table is made for (twice as many 64-byte slots).
    #[arg(long, default_value_t = Limits::default().conntrack_entries)]
    conntrack_entries: u32,
    /// Clients of the HTTP listener whose forwarding headers are believed: the proxies in
    /// front of lb, as CIDR blocks or addresses (comma-separated, or repeat the flag).
    /// Their X-Forwarded-For is kept and their address appended, and their
    /// X-Forwarded-Proto/-Host/-Port, X-Real-IP and Forwarded pass. Anyone else's
    /// X-Forwarded-For, -Proto and -Host are replaced by what lb saw and the others
    /// removed. Default: nobody is trusted.
    #[arg(
        long = "trusted-proxies",
        value_name = "CIDR[,CIDR...]",
        value_delimiter = ',',
        value_parser = lb::l7::parse_cidr
    )]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// How long the HTTP proxy tries to open a connection to a backend before it sends the
    /// request to another backend of the route (once), or answers 504.
    #[arg(long, default_value = "3s", value_name = "DURATION", value_parser = parse_duration)]
    http_backend_connect_timeout: Duration,
    /// How long the HTTP proxy waits for a backend's response headers, counted from when
    /// the request has been sent in full, before it answers 504 (looked at four times per
    /// timeout: up to half of it later).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    http_backend_response_timeout: Duration,
    /// Let HTTP services (served by the --http proxy) name backends at loopback addresses
    /// (127.0.0.0/8): apps on this host. Never lb's own API or HTTP listener, and never
    /// for layer-4 services. Default: off, every loopback backend is refused.
    #[arg(long)]
    allow_loopback_backends: bool,
    /// A file holding the API token (mode 0600 or 0400; surrounding whitespace ignored).
    /// Calls must send it as `Authorization: Bearer TOKEN` or as the password of basic auth
    /// (any user name, so `http://lb:TOKEN@host/...` works); /health and /ready never need
    /// it. Default: no token, and the API on loopback only.
    #[arg(long, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// Serve the API on a non-loopback --api address without --api-token-file: anyone who
    /// reaches it can repoint every VIP.
    #[arg(long)]
    api_insecure: bool,
    /// Reads (GET /v1/services[/NAME], /v1/stats, DFP config and ping) need no token; every
    /// change still does.
    #[arg(long)]
    api_read_open: bool,
    /// A DNS name the API is called by (repeat for several): calls that change something
    /// are refused under any other Host than these, IP addresses and localhost, so that a
    /// web page cannot reach the API through DNS rebinding. Default: none.
    #[arg(long = "api-host", value_name = "NAME", value_parser = parse_host_name)]
    api_hosts: Vec<String>,
    /// HTTP: the time a client has to send a request head in full (slowloris): the first
    /// from the connection's accept, each next one (HTTP/1.1 keep-alive) from the end of
    /// the one before, so an idle keep-alive connection waits this long for its next
    /// request; h2: its first stream. Then the connection is closed.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    http_header_timeout: Duration,
    /// HTTP: how long a request body may send nothing before the request is answered
    /// 408 and its backend connection closed.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    http_body_timeout: Duration,
    /// HTTP: how long a client may leave a response unread before its connection (and
    /// the backend's) is closed.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    http_response_timeout: Duration,
    /// HTTP: how long an upgraded connection (WebSocket) may carry nothing either way
    /// before both sides are closed.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_duration)]
    http_tunnel_timeout: Duration,
    /// HTTP: the largest request head in bytes (HTTP/1.1: at least 8192; h2: the header
    /// list); a larger one is answered 431.
    #[arg(long, default_value_t = HttpLimits::default().max_header_bytes, value_name = "BYTES")]
    http_max_header_bytes: usize,
    /// HTTP: client connections served at once; more are closed as they are accepted.
    /// 0: half the process's file descriptor limit (raised to its hard limit at start)
    /// less 1024, so that connections never run lb out of descriptors.
    #[arg(long, default_value_t = 0, value_name = "N")]
    http_max_connections: usize,
    /// HTTP: client connections from one address (IPv6: one /64) at once; more are
    /// closed as they are accepted. 0: no limit.
    #[arg(long, default_value_t = HttpLimits::default().max_connections_per_client, value_name = "N")]
    http_max_connections_per_client: usize,
    /// HTTP: connections open to one backend at once (pooled, in use and upgraded). At the
    /// cap an idle pooled one is closed to make room; with none idle, the request goes to
    /// another backend of its service, and is answered 503 when that one is full too.
    /// 0: no limit.
    #[arg(long, default_value_t = HttpLimits::default().max_connections_per_backend, value_name = "N")]
    http_max_connections_per_backend: usize,
    /// HTTP: streams an h2 connection may have open at once (more are refused with
    /// REFUSED_STREAM; a client that keeps causing resets gets GOAWAY).
    #[arg(long, default_value_t = HttpLimits::default().h2_max_streams, value_name = "N")]
    http2_max_streams: u32,
    /// PEM bundle of the CA certificates that etcds:// and consuls:// servers (the store's
    /// and the discovery registries') must present a certificate from, in place of the
    /// system's trusted roots. Default: the system's roots.
    #[arg(long, value_name = "FILE")]
    store_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcds:// and consuls:// servers that ask for one
    /// (mutual TLS), with --store-key-file. Default: none.
    #[arg(long, value_name = "FILE", requires = "store_key_file")]
    store_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM); readable by its owner alone (mode 0600
    /// or 0400).
    #[arg(long, value_name = "FILE", requires = "store_cert_file")]
    store_key_file: Option<PathBuf>,
    /// etcd user lb authenticates as (etcd's auth), for the store and --discovery-etcd,
    /// with --store-password-file. Default: none.
    #[arg(long, value_name = "NAME", requires = "store_password_file")]
    store_user: Option<String>,
    /// File holding the etcd user's password (one trailing newline is dropped); readable by
    /// its owner alone (mode 0600 or 0400). The password is never taken on the command line.
    #[arg(long, value_name = "FILE", requires = "store_user")]
    store_password_file: Option<PathBuf>,
}

/// A DNS name for --api-host: labels of letters, digits and `-`, lowercased, no port.
/// A DNS server: `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
fn parse_dns_server(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse().map_err(|_| format!("{s:?} is not IP or IP:PORT"))
}

fn parse_host_name(s: &str) -> Result<String, String> {
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if s.len() > 253 || !s.split('.').all(label_ok) {
        return Err(format!(
            "{s:?} is not a DNS name (letters, digits, '-' and '.'; no port)"
        ));
    }
    Ok(s.to_ascii_lowercase())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (like 10s, 500ms)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CookieArg {
    Auto,
    Always,
    Off,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or("expected MIN-MAX, like 61000-65535")?;
    let min: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let max: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if min == 0 || min > max {
        return Err("MIN must be at least 1 and not above MAX".into());
    }
    Ok((min, max))
}

/// The SNAT port range: the one given, which must not overlap the host's ephemeral ports,
/// or the widest one outside them.
fn snat_ports(args: &RunArgs) -> anyhow::Result<(u16, u16)> {
    let ephemeral = lb::snat::ephemeral_range();
    match args.snat_ports {
        Some(range) => {
            lb::snat::check_overlap(range, ephemeral).map_err(anyhow::Error::msg)?;
            Ok(range)
        }
        None => {
            lb::snat::default_range(ephemeral.unwrap_or((32768, 60999))).map_err(anyhow::Error::msg)
        }
    }
}

/// The data plane's settings from the flags, with `keys` as the group's secret.
fn settings(args: &RunArgs, ports: (u16, u16), keys: lb::secret::GroupKeys) -> Settings {
    Settings {
        snat_ports: ports,
        flow_key: keys.flow,
        cookie_key: keys.cookie,
        cookies: match args.syn_cookies {
            CookieArg::Auto => CookieMode::Auto {
                rate: args.syn_cookie_rate,
                occupancy: args.syn_cookie_occupancy * 10,
            },
            CookieArg::Always => CookieMode::Always,
            CookieArg::Off => CookieMode::Never,
        },
        time_wait_s: args.backend_time_wait,
    }
}

/// The ACL token in `--store-token-file`, if given: only for Consul, and the file must hold
/// one.
fn read_store_token(args: &RunArgs) -> anyhow::Result<Option<String>> {
    let Some(path) = &args.store_token_file else {
        return Ok(None);
    };
    if lb::store::consul_servers(&args.store).is_none() && args.discovery_consul.is_none() {
        bail!(
            "--store-token-file is for Consul (a consul:// or consuls:// --store, or --discovery-consul); --store {} takes no token",
            args.store
        );
    }
    let bytes = lb::secret_file::read("--store-token-file", path)?;
    let text = String::from_utf8_lossy(&bytes);
    let token = text.trim();
    if token.is_empty() {
        bail!("--store-token-file {}: the file is empty", path.display());
    }
    Ok(Some(token.to_string()))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let daemon = Daemon::start(config).await?;
    // Loaded and attached: the main thread keeps what the running parts use, like the others.
    lb::privileges::keep_only(lb::privileges::RUNNING)?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    daemon.shutdown().await;
    Ok(())
}

/// The daemon's configuration from the flags.
fn config(args: &RunArgs) -> anyhow::Result<Config> {
    let http: Option<std::net::SocketAddr> = match args.http.as_str() {
        "off" => None,
        addr => Some(
            addr.parse()
                .with_context(|| format!("--http {addr}: expected ADDR:PORT or off"))?,
        ),
    };
    let https = match (args.https.as_str(), http) {
        ("off", _) | ("auto", None) => HttpsListen::Off,
        ("auto", Some(http)) => {
            HttpsListen::OnceCertified(std::net::SocketAddr::new(http.ip(), 443))
        }
        (addr, _) => HttpsListen::At(
            addr.parse()
                .with_context(|| format!("--https {addr}: expected ADDR:PORT, auto or off"))?,
        ),
    };
    // Placeholder keys: the daemon takes the pinned or the group's.
    let keys = GroupKeys {
        flow: Default::default(),
        cookie: Default::default(),
    };
    Ok(Config {
        ifaces: args.ifaces.clone(),
        api: args.api.clone(),
        http,
        https,
        http_workers: args.http_workers,
        bpffs: args.bpffs.clone(),
        limits: Limits {
            max_services: args.max_services,
            max_backends: args.max_backends,
            maglev_slots: args.maglev_slots,
            conntrack_entries: args.conntrack_entries,
        },
        settings: settings(args, snat_ports(args)?, keys),
        snat_addresses: args.snat_addresses.clone(),
        store: args.store.clone(),
        store_prefix: args.store_prefix.clone(),
        store_token: read_store_token(args)?,
        discovery_etcd: args.discovery_etcd.clone(),
        discovery_consul: args.discovery_consul.clone(),
        dns_servers: args.dns_servers.clone(),
        address: args.address,
        trusted_proxies: args.trusted_proxies.clone(),
        http_backend_connect_timeout: args.http_backend_connect_timeout,
        http_backend_response_timeout: args.http_backend_response_timeout,
        allow_loopback_backends: args.allow_loopback_backends,
        api_access: AccessPolicy {
            token: args
                .api_token_file
                .as_deref()
                .map(ApiToken::from_file)
                .transpose()?,
            read_open: args.api_read_open,
            hosts: args.api_hosts.clone(),
        },
        api_insecure: args.api_insecure,
        http_limits: HttpLimits {
            header_timeout: args.http_header_timeout,
            body_timeout: args.http_body_timeout,
            response_timeout: args.http_response_timeout,
            tunnel_timeout: args.http_tunnel_timeout,
            max_header_bytes: args.http_max_header_bytes,
            max_connections: args.http_max_connections,
            max_connections_per_client: args.http_max_connections_per_client,
            max_connections_per_backend: args.http_max_connections_per_backend,
            h2_max_streams: args.http2_max_streams,
        },
        store_access: store_access(args)?,
        acme: acme(args)?,
    })
}

/// ACME, if --acme-directory asks for it.
fn acme(args: &RunArgs) -> anyhow::Result<Option<lb::acme::AcmeConfig>> {
    let Some(directory) = &args.acme_directory else {
        return Ok(None);
    };
    let directory = match directory.as_str() {
        "letsencrypt" => lb::acme::LETS_ENCRYPT.to_string(),
        url if url.starts_with("https://") => url.to_string(),
        other => anyhow::bail!("--acme-directory {other}: expected an https:// URL or letsencrypt"),
    };
    if args.http.as_str() == "off" {
        anyhow::bail!(
            "--acme-directory: the CA validates on the HTTP listener, which is off (--http)"
        );
    }
    let mut domains = Vec::new();
    for d in &args.acme_domains {
        let route = lb::model::HttpSpec {
            domain: Some(vec![d.clone()]),
            tls: Some(lb::model::RouteTls { acme: true }),
            ..Default::default()
        };
        let checked = route
            .validate()
            .map_err(|e| anyhow::anyhow!("--acme-domain {d}: {}", e.message))?;
        domains.extend(checked.domains);
    }
    Ok(Some(lb::acme::AcmeConfig {
        directory,
        email: args.acme_email.clone(),
        ca_file: args.acme_ca_file.clone(),
        domains,
        renew_before: args.acme_renew_before,
    }))
}

/// How etcd and Consul servers are reached, from the flags.
fn store_access(args: &RunArgs) -> anyhow::Result<lb::store::access::Access> {
    let flags = lb::store::access::AccessFlags {
        ca_file: args.store_ca_file.as_deref(),
        cert_file: args.store_cert_file.as_deref(),
        key_file: args.store_key_file.as_deref(),
        user: args.store_user.as_deref(),
        password_file: args.store_password_file.as_deref(),
    };
    let mut urls = vec![args.store.as_str()];
    urls.extend(args.discovery_etcd.as_deref());
    urls.extend(args.discovery_consul.as_deref());
    Ok(lb::store::access::from_flags(
        &flags,
        &urls,
        args.store_token_file.is_some(),
    )?)
}

fn down(args: DownArgs) -> anyhow::Result<()> {
    if !args.bpffs.exists() {
        eprintln!("lb: nothing pinned under {}", args.bpffs.display());
        return Ok(());
    }
    let backends = Dataplane::pinned_backends(&args.bpffs);
    let removed = Dataplane::remove_pins(&args.bpffs)?;
    let neighbours = net::release_next_hops(&backends);
    eprintln!(
        "lb: detached and removed {removed} pins under {} and {neighbours} next-hop entries",
        args.bpffs.display()
    );
    Ok(())
}

fn backend(args: BackendArgs) -> anyhow::Result<()> {
    if args.down {
        let removed = lb::decap::remove(&args.bpffs)?;
        eprintln!(
            "lb: detached the decapsulation program and removed {removed} pins under {}",
            args.bpffs.display()
        );
        return Ok(());
    }
    let detached = lb::decap::install(&args.bpffs, &args.ifaces, &args.vips)?;
    let vips: Vec<String> = args.vips.iter().map(ToString::to_string).collect();
    eprintln!(
        "lb: decapsulating IPIP for {} on {} (pinned under {}{})",
        vips.join(", "),
        args.ifaces.join(", "),
        args.bpffs.display(),
        if detached > 0 {
            format!("; detached from {detached} other interfaces")
        } else {
            String::new()
        }
    );
    for vip in lb::decap::vips_not_held(&args.vips) {
        eprintln!(
            "lb: warning: no interface holds {vip}: its packets are dropped by the stack until it does (ip addr add {vip}/32 dev lo)"
        );
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_)) {
        lb::privileges::enable();
    }
    // Its threads keep only what the running parts use; until the daemon has started, the
    // main thread (which loads and attaches the data plane) keeps the rest.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| lb::privileges::keep_only_in_thread(lb::privileges::RUNNING))
        .build()
        .expect("tokio runtime");
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Down(args) => down(args),
        Command::Backend(args) => backend(args),
    };
    if let Err(e) = result {
        // One line; a kernel refusal carries the verifier's log, which goes to the debug log.
        let full = format!("{e:#}");
        let first = full.lines().next().unwrap_or_default();
        if full.lines().nth(1).is_some() {
            tracing::debug!("{full}");
            eprintln!("lb: error: {first} (the whole message with RUST_LOG=debug)");
        } else {
            eprintln!("lb: error: {first}");
        }
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn args(store: &str, token_file: Option<&std::path::Path>) -> RunArgs {
        let mut argv = vec!["lb", "run", "--iface", "lo", "--store", store];
        if let Some(f) = token_file {
            argv.extend(["--store-token-file", f.to_str().unwrap()]);
        }
        match Cli::parse_from(argv).command {
            Command::Run(a) => a,
            Command::Down(_) | Command::Backend(_) => unreachable!("parsed a run command"),
        }
    }

    #[test]
    fn store_token_file() {
        let dir = std::env::temp_dir().join(format!("lb-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, empty) = (dir.join("good"), dir.join("empty"));
        std::fs::write(&good, " s3cret\n").unwrap();
        std::fs::write(&empty, "\n \n").unwrap();
        for f in [&good, &empty] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }

        let consul = "consul://127.0.0.1:8500";
        assert_eq!(read_store_token(&args(consul, None)).unwrap(), None);
        assert_eq!(
            read_store_token(&args(consul, Some(&good))).unwrap(),
            Some("s3cret".to_string())
        );
        let e = read_store_token(&args(consul, Some(&empty))).unwrap_err();
        assert!(format!("{e:#}").contains("empty"), "{e:#}");
        let e = read_store_token(&args(consul, Some(&dir.join("missing")))).unwrap_err();
        assert!(format!("{e:#}").contains("No such file"), "{e:#}");
        let e = read_store_token(&args("etcd://127.0.0.1:2379", Some(&good))).unwrap_err();
        assert!(e.to_string().contains("is for Consul"), "{e}");

        // Readable by group or others: refused, naming the file and its mode.
        for (mode, ok) in [
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&good, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = read_store_token(&args(consul, Some(&good)));
            if ok {
                assert_eq!(got.unwrap(), Some("s3cret".to_string()));
            } else {
                let e = format!("{:#}", got.unwrap_err());
                assert!(e.contains(&good.display().to_string()), "{e}");
                assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
