//! What a discovery source sends: the instances it lists, or why it cannot be read at the
//! moment.
use std::net::SocketAddrV4;

use reqwest::StatusCode;
use tokio::sync::mpsc;

use crate::consul_http::ConsulError;

/// The instances a source lists now (sorted, no duplicates), sent on every change; an
/// `Err` says why the source cannot be read at the moment (the watch goes on retrying).
pub type Instances = mpsc::Receiver<Result<Vec<SocketAddrV4>, SourceError>>;

/// Why a discovery source cannot be read at the moment.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No Consul agent answered, or one refused the token.
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// A Consul agent answered other than 200 OK; the body shortened.
    #[error("consul at {addr}: {status}: {body}")]
    ConsulStatus {
        addr: String,
        status: StatusCode,
        body: String,
    },
    #[error("consul at {addr}: not a health listing: {source}")]
    ConsulListing {
        addr: String,
        source: serde_json::Error,
    },
    /// No DNS server answered for `name` (or one failed); asked again after a while.
    #[error("dns name {name} (servers {servers}): {why}")]
    Dns {
        name: String,
        servers: String,
        why: String,
    },
    /// Following the etcd registry's keys under `keys` stopped; the watch starts over.
    #[error("etcd registry at {endpoints}, {keys}: {why}")]
    Etcd {
        endpoints: String,
        keys: String,
        why: WatchBroke,
    },
}

/// Why following an etcd registry's keys stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchBroke {
    #[error("{0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the watch stream closed")]
    StreamClosed,
    #[error("the watch was cancelled: {0}")]
    Cancelled(String),
    #[error("the watch ended")]
    Ended,
}

/// Parses an instance's `ip:port`.
pub fn parse_instance(value: &str) -> Option<SocketAddrV4> {
    let addr: SocketAddrV4 = value.trim().parse().ok()?;
    let ip = addr.ip();
    (addr.port() != 0 && !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast())
        .then_some(addr)
}
