//! An etcd registry: each instance of service S is a key `<prefix>/registry/S/<instance>`
//! whose value is `ip:port`, normally written under a lease so that an instance that stops
//! renewing it disappears by itself. Read with one range request, then followed by an etcd
//! watch from the revision read.
use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;

use super::instances::{Instances, SourceError, WatchBroke, parse_instance};
use crate::{
    retry::Backoff,
    store::{StoreError, access::Access, etcd::connect_checked},
};

type Sender = mpsc::Sender<Result<Vec<SocketAddrV4>, SourceError>>;

pub struct EtcdRegistry {
    client: Client,
    /// `<prefix>/registry/`
    keys: String,
    endpoints: String,
}

impl EtcdRegistry {
    /// A client for the registry at `endpoints` (`http://` or `https://`), reached as
    /// `access` says. A TLS failure or refused credentials are errors at once.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        access: &Access,
    ) -> Result<Self, StoreError> {
        let joined = endpoints.join(",");
        let keys = format!("{prefix}/registry/");
        let what = format!("etcd registry at {joined}");
        let client = connect_checked(endpoints, access, &keys, &what).await?;
        Ok(Self {
            client,
            keys,
            endpoints: joined,
        })
    }

    /// Follows the instances of `service` until the receiver is dropped.
    pub fn watch(&self, service: &str) -> Instances {
        let (tx, rx) = mpsc::channel(16);
        let (client, keys, endpoints) = (
            self.client.clone(),
            format!("{}{service}/", self.keys),
            self.endpoints.clone(),
        );
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
            let mut last: Option<Vec<SocketAddrV4>> = None;
            loop {
                let result = follow(&client, &keys, &tx, &mut last).await;
                if tx.is_closed() {
                    return;
                }
                let error = SourceError::Etcd {
                    endpoints: endpoints.clone(),
                    keys: keys.clone(),
                    why: result.err().unwrap_or(WatchBroke::Ended),
                };
                if tx.send(Err(error)).await.is_err() {
                    return;
                }
                backoff.wait().await;
            }
        });
        rx
    }
}

/// Reads the instances under `keys`, then follows them; returns when the watch breaks.
async fn follow(
    client: &Client,
    keys: &str,
    tx: &Sender,
    last: &mut Option<Vec<SocketAddrV4>>,
) -> Result<(), WatchBroke> {
    let resp = client
        .kv_client()
        .get(keys, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    let mut instances: BTreeMap<String, SocketAddrV4> = BTreeMap::new();
    for kv in resp.kvs() {
        record(
            &mut instances,
            kv.key_str().unwrap_or_default(),
            Some(kv.value()),
        );
    }
    if !send(tx, &instances, last).await {
        return Ok(());
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client.watch_client().watch(keys, Some(options)).await?;
    loop {
        let message = tokio::select! {
            m = stream.message() => m?,
            () = tx.closed() => return Ok(()),
        };
        let Some(resp) = message else {
            return Err(WatchBroke::StreamClosed);
        };
        if resp.canceled() {
            return Err(WatchBroke::Cancelled(resp.cancel_reason().to_string()));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = kv.key_str().unwrap_or_default();
            match ev.event_type() {
                EventType::Put => record(&mut instances, key, Some(kv.value())),
                EventType::Delete => record(&mut instances, key, None),
            }
        }
        if !send(tx, &instances, last).await {
            return Ok(());
        }
    }
}

/// Notes one instance key (`None`: deleted); a value that is not `ip:port` is skipped.
fn record(instances: &mut BTreeMap<String, SocketAddrV4>, key: &str, value: Option<&[u8]>) {
    let Some(value) = value else {
        instances.remove(key);
        return;
    };
    match std::str::from_utf8(value).ok().and_then(parse_instance) {
        Some(addr) => {
            instances.insert(key.to_string(), addr);
        }
        None => {
            instances.remove(key);
            tracing::warn!(key, "skipping a registry entry that is not ip:port");
        }
    }
}

/// Sends the instance list if it changed; false when the receiver is gone.
async fn send(
    tx: &Sender,
    instances: &BTreeMap<String, SocketAddrV4>,
    last: &mut Option<Vec<SocketAddrV4>>,
) -> bool {
    let mut now: Vec<SocketAddrV4> = instances.values().copied().collect();
    now.sort();
    now.dedup();
    if last.as_ref() == Some(&now) {
        return true;
    }
    *last = Some(now.clone());
    tx.send(Ok(now)).await.is_ok()
}
