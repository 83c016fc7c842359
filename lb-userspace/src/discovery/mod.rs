//! Where a service's backends come from when it names a discovery source instead of a
//! list: an etcd registry, Consul's health API, or a DNS name's addresses. Each source is
//! watched; every change in the instances it lists reaches the maps without an API call.
pub mod consul;
pub mod dns;
pub mod etcd;
mod instances;

pub use instances::{Instances, SourceError, WatchBroke, parse_instance};

use crate::model::{Discovery, DiscoveryKind, ValidationError};

/// A discovery URL that does not name its servers as `SCHEME://HOST:PORT[,HOST:PORT...]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{url}: expected {scheme}HOST:PORT[,HOST:PORT...]")]
    Form { url: String, scheme: &'static str },
    /// The URL lists no server; `server` says what one is called ("endpoint", "address").
    #[error("{url}: no {server}")]
    Empty { url: String, server: &'static str },
}

/// The discovery sources this lb was started with.
#[derive(Default)]
pub struct Sources {
    pub etcd: Option<etcd::EtcdRegistry>,
    pub consul: Option<std::sync::Arc<crate::consul_http::ConsulClient>>,
    /// None only when the host's resolv.conf could not be read and no --dns was given.
    pub dns: Option<dns::DnsResolver>,
}

impl Sources {
    /// Starts following the instances of `d`.
    pub fn watch(&self, d: &Discovery) -> Result<Instances, ValidationError> {
        match d.kind {
            DiscoveryKind::Etcd => match &self.etcd {
                Some(r) => Ok(r.watch(&d.service)),
                None => Err(ValidationError::new(
                    "discovery.kind",
                    "no etcd registry: run lb with an etcd:// or etcds:// --store or --discovery-etcd",
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
                    "no Consul: run lb with a consul:// or consuls:// --store or --discovery-consul",
                )),
            },
            DiscoveryKind::Dns => match (&self.dns, d.port) {
                (Some(r), Some(port)) => Ok(r.watch(&d.service, port)),
                (None, _) => Err(ValidationError::new(
                    "discovery.kind",
                    "no DNS servers: the host's resolv.conf could not be read; run lb with --dns",
                )),
                (_, None) => Err(ValidationError::new(
                    "discovery.port",
                    "is required for dns",
                )),
            },
        }
    }
}

/// The endpoints of an `etcd://host:port[,host:port...]` URL (`etcds://` for TLS), as the
/// etcd client takes them.
pub fn etcd_endpoints(url: &str) -> Result<Vec<String>, UrlError> {
    let scheme = "etcd:// or etcds://";
    let endpoints = crate::store::etcd_endpoints(url).ok_or_else(|| UrlError::Form {
        url: url.into(),
        scheme,
    })?;
    non_empty(url, endpoints, "endpoint")
}

/// The agent addresses of a `consul://host:port[,host:port...]` URL (`consuls://` for
/// HTTPS), and whether it asks for HTTPS.
pub fn consul_addrs(url: &str) -> Result<(Vec<String>, bool), UrlError> {
    let scheme = "consul:// or consuls://";
    let (addrs, https) = crate::store::consul_servers(url).ok_or_else(|| UrlError::Form {
        url: url.into(),
        scheme,
    })?;
    Ok((non_empty(url, addrs, "address")?, https))
}

/// `list`, if it names at least one server (called `server` in errors).
fn non_empty(url: &str, list: Vec<String>, server: &'static str) -> Result<Vec<String>, UrlError> {
    if list.is_empty() {
        return Err(UrlError::Empty {
            url: url.into(),
            server,
        });
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_servers() {
        assert_eq!(
            etcd_endpoints("etcd://a:1,b:2").unwrap(),
            ["http://a:1", "http://b:2"]
        );
        assert_eq!(
            etcd_endpoints("etcds://a:1,b:2").unwrap(),
            ["https://a:1", "https://b:2"]
        );
        assert_eq!(
            consul_addrs("consul://a:1").unwrap(),
            (vec!["a:1".to_string()], false)
        );
        assert_eq!(
            consul_addrs("consuls://a:1").unwrap(),
            (vec!["a:1".to_string()], true)
        );
        assert_eq!(
            etcd_endpoints("http://a:1").unwrap_err().to_string(),
            "http://a:1: expected etcd:// or etcds://HOST:PORT[,HOST:PORT...]"
        );
        assert_eq!(
            consul_addrs("etcd://a:1").unwrap_err().to_string(),
            "etcd://a:1: expected consul:// or consuls://HOST:PORT[,HOST:PORT...]"
        );
        assert_eq!(
            etcd_endpoints("etcd://").unwrap_err().to_string(),
            "etcd://: no endpoint"
        );
        assert_eq!(
            consul_addrs("consul://,").unwrap_err().to_string(),
            "consul://,: no address"
        );
    }
}
