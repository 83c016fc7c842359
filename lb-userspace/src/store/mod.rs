//! Where the configuration lives: one document per service under `<prefix>/services/`
//! (and one per TLS certificate under `<prefix>/certs/`, ACME's under `<prefix>/acme/`),
//! in a store that outlives the
//! balancer. Writes are compare-and-set; a watch delivers the
//! changes after a listing, in order, so that any number of lb nodes converge on one store.
//!
//! Implementations: [`file::FileStore`] (embedded, the default), [`etcd::EtcdStore`] and
//! [`consul::ConsulStore`].
pub mod access;
pub mod claims;
pub mod consul;
pub mod document;
pub mod etcd;
pub mod file;
pub mod follow;

use async_trait::async_trait;
use tokio::sync::mpsc;

use self::claims::{Claim, Claims};

/// One stored document and the store revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub value: Vec<u8>,
    pub revision: u64,
}

/// Everything under the prefix, as of `revision`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub entries: Vec<Entry>,
    pub revision: u64,
}

/// A change, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Entry),
    Deleted { name: String, revision: u64 },
}

impl Event {
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put(e) => e.revision,
            Event::Deleted { revision, .. } => *revision,
        }
    }
}

/// The entries a [`Store`] holds: each is a directory of the group's prefix, with its own
/// listing and watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyspace {
    /// `<prefix>/services/<name>`: service documents.
    Services,
    /// `<prefix>/certs/<name>`: TLS certificates and their keys.
    Certs,
    /// `<prefix>/acme/<name>`: the ACME account, the lock of the node ordering, and the
    /// HTTP-01 challenges being answered.
    Acme,
}

impl Keyspace {
    pub fn dir(self) -> &'static str {
        match self {
            Keyspace::Services => "services",
            Keyspace::Certs => "certs",
            Keyspace::Acme => "acme",
        }
    }
}

/// What a write expects to find, for compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there.
    Any,
    /// Nothing: create only.
    Absent,
    /// The entry as written at this revision.
    Revision(u64),
}

impl Expect {
    /// Whether an entry at revision `current` (none: absent) is what this expects.
    pub fn holds(self, current: Option<u64>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current == Some(r),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{name}: changed by someone else (expected {expected:?}, found revision {found:?})")]
    Conflict {
        name: String,
        expected: Expect,
        found: Option<u64>,
    },
    /// Another service holds what the write claims.
    #[error("{} is already served by service {holder:?} (claimed in the store)", claim.what())]
    Claimed { claim: Claim, holder: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// A write whose claims (its VIP, each host and path it routes, and those it lets go
    /// of) do not fit in one transaction of the store.
    #[error(
        "service {name} makes {count} claims (its VIP, or each host and path it routes, and \
         those a change lets go of), and the store takes at most {max} in one transaction: \
         split it into services with fewer paths"
    )]
    TooManyClaims {
        name: String,
        count: usize,
        max: usize,
        field: &'static str,
    },
    /// The store's server could not be reached or answered with an error.
    #[error("{0}")]
    Unavailable(String),
    /// The store and lb do not trust each other: a TLS certificate refused on either side,
    /// or credentials refused. Retrying cannot mend it.
    #[error("{0}")]
    Refused(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Every entry, and the revision the listing is as of.
    async fn list(&self) -> Result<Snapshot, StoreError>;
    /// Writes `value` under `name` if `expect` holds; the new revision.
    async fn put(&self, name: &str, value: &[u8], expect: Expect) -> Result<u64, StoreError>;
    /// Deletes `name` if `expect` holds; whether it was there.
    async fn delete(&self, name: &str, expect: Expect) -> Result<bool, StoreError>;
    /// As `put`, and in the same compare-and-set: `name` takes `claims.hold` (each must be
    /// free, or already its own, or held by a service whose document is gone) and lets go
    /// of the claims in `claims.previous` it holds and no longer needs. A claim held by
    /// another service is a [`StoreError::Claimed`] naming it, and changes nothing.
    async fn put_claiming(
        &self,
        name: &str,
        value: &[u8],
        expect: Expect,
        claims: &Claims,
    ) -> Result<u64, StoreError>;
    /// As `delete`, and in the same compare-and-set: lets go of those of `claims` that
    /// `name` holds.
    async fn delete_claiming(
        &self,
        name: &str,
        expect: Expect,
        claims: &[Claim],
    ) -> Result<bool, StoreError>;
    /// Every change after `from`, as listed, in revision order, until the receiver is
    /// dropped. The file and etcd stores deliver every single change; Consul, which keeps no
    /// history, delivers the latest state of each key that changed. An error ends the
    /// stream; the caller lists again.
    fn watch(&self, from: &Snapshot) -> mpsc::Receiver<Result<Event, StoreError>>;
    /// The group's secret (`<prefix>/secret`, outside the services): the one stored, or
    /// `proposal` stored as it if there is none. Create-only, so that nodes starting at
    /// once agree on one.
    async fn secret(&self, proposal: &[u8]) -> Result<Vec<u8>, StoreError>;
}

/// The `host:port` list of a `SCHEME://host:port[,host:port...]` URL (empty items
/// dropped), or `None` when the URL has another scheme.
pub fn server_list(url: &str, scheme: &str) -> Option<Vec<String>> {
    let list = url.strip_prefix(scheme)?;
    Some(
        list.split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// The agents of a `consul://` or `consuls://` URL (empty items dropped), and whether it
/// asks for HTTPS; `None` for another scheme.
pub fn consul_servers(url: &str) -> Option<(Vec<String>, bool)> {
    server_list(url, "consuls://")
        .map(|list| (list, true))
        .or_else(|| server_list(url, "consul://").map(|list| (list, false)))
}

/// The endpoints of an `etcd://` (`http://host:port`) or `etcds://` (`https://host:port`)
/// URL, as the etcd client takes them; `None` for another scheme.
pub fn etcd_endpoints(url: &str) -> Option<Vec<String>> {
    let (list, scheme) = match server_list(url, "etcds://") {
        Some(list) => (list, "https"),
        None => (server_list(url, "etcd://")?, "http"),
    };
    Some(list.iter().map(|e| format!("{scheme}://{e}")).collect())
}

/// A Consul client for `addrs`, over HTTPS (checked as `access` says) if `https`.
/// At start, a TLS failure with every agent is a [`StoreError::Refused`].
pub async fn consul_client(
    addrs: Vec<String>,
    https: bool,
    token: Option<String>,
    access: &access::Access,
) -> Result<std::sync::Arc<crate::consul_http::ConsulClient>, StoreError> {
    let client = crate::consul_http::ConsulClient::with_tls(addrs, token, https.then_some(access))
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    if let Some(why) = client.tls_refusal().await {
        return Err(StoreError::Refused(why));
    }
    Ok(std::sync::Arc::new(client))
}

/// Opens the store a `--store` URL names, for the group `prefix`; `token` is an ACL token
/// (Consul only); `access` says how to reach etcd and Consul servers over TLS, and as which
/// etcd user.
pub async fn open(
    url: &str,
    prefix: &str,
    token: Option<String>,
    access: &access::Access,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    open_keyspace(url, prefix, token, access, Keyspace::Services).await
}

/// As [`open`], for the entries of `keyspace`. The file store keeps each keyspace but the
/// services' in a store of its own, `<dir>/<prefix>/<keyspace>/`.
pub async fn open_keyspace(
    url: &str,
    prefix: &str,
    token: Option<String>,
    access: &access::Access,
    keyspace: Keyspace,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if let Some((addrs, https)) = consul_servers(url) {
        if addrs.is_empty() {
            return Err(StoreError::Invalid(format!(
                "--store {url}: no address (consul://host:8500[,host:8500...], or consuls:// for HTTPS)"
            )));
        }
        let client = consul_client(addrs, https, token, access).await?;
        let store = consul::ConsulStore::with_client(client, prefix)?.in_keyspace(keyspace);
        return Ok(std::sync::Arc::new(store));
    }
    if token.is_some() {
        return Err(StoreError::Invalid(format!(
            "--store {url}: an ACL token (--store-token-file) is for consul:// and consuls:// stores only"
        )));
    }
    if let Some(endpoints) = etcd_endpoints(url) {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(format!(
                "--store {url}: no endpoint (etcd://host:2379[,host:2379...], or etcds:// for TLS)"
            )));
        }
        let store = etcd::EtcdStore::connect_with(&endpoints, prefix, access).await?;
        return Ok(std::sync::Arc::new(store.in_keyspace(keyspace)));
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(StoreError::Invalid(format!(
                "--store {url}: a file store needs an absolute path (file:///var/lib/lb)"
            )));
        }
        let poll = std::time::Duration::from_millis(100);
        let root = std::path::Path::new(path);
        let store = match keyspace {
            Keyspace::Services => file::FileStore::open(root, prefix, poll)?,
            other => {
                check_name(prefix)?;
                file::FileStore::open(&root.join(prefix), other.dir(), poll)?
            }
        };
        return Ok(std::sync::Arc::new(store));
    }
    Err(StoreError::Invalid(format!(
        "--store {url}: expected file:///DIR, etcd://HOST:PORT[,HOST:PORT...] or consul://HOST:PORT[,HOST:PORT...] (etcds:// and consuls:// for TLS)"
    )))
}

/// Store names: the same rule as service names, so a name is always a safe file name and
/// key segment.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    crate::model::validate_name(name).map_err(|e| StoreError::Invalid(e.to_string()))
}
