//! Where a service's backends come from when it names a discovery source instead of a
//! list: an etcd registry or Consul's health API. Each source is watched; every change in
//! the instances it lists reaches the maps without an API call.
pub mod consul;
pub mod etcd;

use std::net::SocketAddrV4;

use tokio::sync::mpsc;

use crate::{
    model::{Discovery, DiscoveryKind, ValidationError},
    store::server_list,
};

/// The instances a source lists now (sorted, no duplicates), sent on every change; an
/// `Err` says why the source cannot be read at the moment (the watch goes on retrying).
pub type Instances = mpsc::Receiver<Result<Vec<SocketAddrV4>, String>>;

/// The discovery sources this lb was started with.
#[derive(Default)]
pub struct Sources {
    pub etcd: Option<etcd::EtcdRegistry>,
    pub consul: Option<std::sync::Arc<crate::consul_http::ConsulClient>>,
}

impl Sources {
    /// Starts following the instances of `d`.
    pub fn watch(&self, d: &Discovery) -> Result<Instances, ValidationError> {
        match d.kind {
            DiscoveryKind::Etcd => match &self.etcd {
                Some(r) => Ok(r.watch(&d.service)),
                None => Err(ValidationError::new(
                    "discovery.kind",
                    "no etcd registry: run lb with an etcd:// --store or --discovery-etcd",
                )),
            },
            DiscoveryKind::Consul => match &self.consul {
                Some(client) => Ok(consul::watch_service(
                    client.clone(),
                    &d.service,
                    consul::HealthOptions {
                        passing_only: !d.include_warning,
                        ..consul::HealthOptions::default()
                    },
                )),
                None => Err(ValidationError::new(
                    "discovery.kind",
                    "no Consul: run lb with a consul:// --store or --discovery-consul",
                )),
            },
        }
    }
}

/// The endpoints of an `etcd://host:port[,host:port...]` URL, as the etcd client takes
/// them.
pub fn etcd_endpoints(url: &str) -> Result<Vec<String>, String> {
    let endpoints = server_list(url, "etcd://")
        .ok_or_else(|| format!("{url}: expected etcd://HOST:PORT[,HOST:PORT...]"))?;
    if endpoints.is_empty() {
        return Err(format!("{url}: no endpoint"));
    }
    Ok(endpoints.iter().map(|e| format!("http://{e}")).collect())
}

/// The agent addresses of a `consul://host:port[,host:port...]` URL.
pub fn consul_addrs(url: &str) -> Result<Vec<String>, String> {
    let addrs = server_list(url, "consul://")
        .ok_or_else(|| format!("{url}: expected consul://HOST:PORT[,HOST:PORT...]"))?;
    if addrs.is_empty() {
        return Err(format!("{url}: no address"));
    }
    Ok(addrs)
}

/// Parses an instance's `ip:port`.
pub fn parse_instance(value: &str) -> Option<SocketAddrV4> {
    let addr: SocketAddrV4 = value.trim().parse().ok()?;
    let ip = addr.ip();
    (addr.port() != 0 && !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast())
        .then_some(addr)
}
