//! DNS as a discovery source, as Docker Swarm serves it: a service's instances are the A
//! records of a name (`tasks.<service>` lists every task of a Swarm service), all on the
//! port the service gives. The name is asked again when its answer's TTL runs out (within
//! [`REFRESH_MIN`] and [`REFRESH_MAX`]), of the `--dns` servers, or of the host's
//! resolv.conf ones, as HAProxy's `resolvers` section does.
use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use hickory_resolver::{
    ResolveError, TokioResolver,
    config::{NameServerConfig, ResolverConfig},
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
};
use tokio::sync::mpsc;

use super::instances::{Instances, SourceError};
use crate::retry::Backoff;

/// A name is asked again no sooner than this (dnsmasq gives its own records a TTL of 0)...
pub const REFRESH_MIN: Duration = Duration::from_secs(1);
/// ...and no later than this, whatever its TTL.
pub const REFRESH_MAX: Duration = Duration::from_secs(30);

pub struct DnsResolver {
    resolver: TokioResolver,
    /// The servers asked, for errors.
    servers: String,
}

impl DnsResolver {
    /// A resolver asking `servers`, or those of the host's resolv.conf when there are none.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, ResolveError> {
        let provider = TokioConnectionProvider::default();
        let mut builder = if servers.is_empty() {
            TokioResolver::builder(provider)?
        } else {
            let mut config = ResolverConfig::new();
            for &addr in servers {
                config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, provider)
        };
        let opts = builder.options_mut();
        // A server that does not answer is told soon; the watch asks again after a while.
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        // Answers are kept no longer than the next refresh: a change is seen then.
        opts.positive_max_ttl = Some(REFRESH_MAX);
        opts.negative_max_ttl = Some(REFRESH_MIN);
        let resolver = builder.build();
        let servers = resolver
            .config()
            .name_servers()
            .iter()
            .map(|s| s.socket_addr.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(",");
        Ok(Self { resolver, servers })
    }

    /// Follows the A records of `name`, each an instance on `port`, until the receiver is
    /// dropped. A name with no address (NXDOMAIN, or no A record: a service scaled to
    /// nothing) lists no instance; a server that does not answer is an error, and the
    /// instances found before are kept meanwhile.
    pub fn watch(&self, name: &str, port: u16) -> Instances {
        let (tx, rx) = mpsc::channel(16);
        let (resolver, name, servers) = (
            self.resolver.clone(),
            name.to_string(),
            self.servers.clone(),
        );
        tokio::spawn(async move {
            let mut backoff = Backoff::new(REFRESH_MIN, REFRESH_MAX);
            let mut last: Option<Vec<SocketAddrV4>> = None;
            loop {
                let (found, next) = match resolver.ipv4_lookup(name.as_str()).await {
                    Ok(lookup) => {
                        backoff.reset();
                        let mut found: Vec<SocketAddrV4> = lookup
                            .iter()
                            .map(|a| SocketAddrV4::new(a.0, port))
                            .collect();
                        found.sort_unstable();
                        found.dedup();
                        let ttl = lookup
                            .valid_until()
                            .saturating_duration_since(std::time::Instant::now());
                        (Ok(found), ttl.clamp(REFRESH_MIN, REFRESH_MAX))
                    }
                    Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                        backoff.reset();
                        (Ok(Vec::new()), REFRESH_MIN)
                    }
                    Err(e) => {
                        let error = SourceError::Dns {
                            name: name.clone(),
                            servers: servers.clone(),
                            why: e.to_string(),
                        };
                        (Err(error), backoff.next_delay())
                    }
                };
                let changed = match &found {
                    Ok(f) => last.as_ref() != Some(f),
                    Err(_) => true,
                };
                if changed {
                    if let Ok(f) = &found {
                        last = Some(f.clone());
                    }
                    if tx.send(found).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(next) => {}
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }
}
