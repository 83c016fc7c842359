//! The Consul store, through Consul's KV HTTP API. Entries are keys
//! `<prefix>/services/<name>`; revisions are Consul's `ModifyIndex`, and a listing is as of
//! its `X-Consul-Index`. Compare-and-set is `?cas=`.
//!
//! Consul keeps no history, so a watch is a loop of blocking queries on the prefix, each
//! answer compared with the one before: it delivers the latest state of every key that
//! changed, in revision order, not every intermediate write (two writes to one key between
//! two answers arrive as one event, the second).
use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use base64::Engine;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{Entry, Event, Expect, Snapshot, Store, StoreError, check_name};
use crate::{
    consul_http::{
        ConsulClient, ConsulError, REQUEST_TIMEOUT, Reply, blocking_timeout, next_index, wait_param,
    },
    retry::Backoff,
};

/// How long a watch's blocking query waits for a change before asking again.
const WATCH_WAIT: Duration = Duration::from_secs(30);
/// The least time between the starts of two queries of one watch, so that answers that
/// come back at once (a busy prefix, or an agent that does not block) cannot spin.
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Failed queries in a row after which a watch gives up and reports the error.
const WATCH_MAX_FAILURES: u32 = 20;
/// The wait after a failed query of a watch: doubling from the least to the most.
const WATCH_MIN_BACKOFF: Duration = Duration::from_millis(100);
const WATCH_MAX_BACKOFF: Duration = Duration::from_secs(1);

pub struct ConsulStore {
    client: Arc<ConsulClient>,
    /// `<prefix>/services/`
    keys: String,
    /// `<prefix>/secret`
    secret_key: String,
    wait: Duration,
}

/// One key as Consul lists it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvPair {
    key: String,
    /// Base64; null for an empty value.
    value: Option<String>,
    modify_index: u64,
}

fn unavailable(e: ConsulError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl ConsulStore {
    /// A store on the agents at `addrs` (`host:port`) for the group `prefix`. Nothing is
    /// sent until the first request.
    pub fn new(
        addrs: Vec<String>,
        prefix: &str,
        token: Option<String>,
    ) -> Result<Self, StoreError> {
        let client =
            ConsulClient::new(addrs, token).map_err(|e| StoreError::Invalid(e.to_string()))?;
        Self::with_client(Arc::new(client), prefix)
    }

    /// A store through `client` (over HTTP or HTTPS) for the group `prefix`.
    pub fn with_client(client: Arc<ConsulClient>, prefix: &str) -> Result<Self, StoreError> {
        check_name(prefix)?;
        Ok(Self {
            client,
            keys: format!("{prefix}/services/"),
            secret_key: format!("{prefix}/secret"),
            wait: WATCH_WAIT,
        })
    }

    /// How long each blocking query of a watch waits (30 s unless changed).
    pub fn with_watch_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The HTTP client, for other users of the same agents (service discovery).
    pub fn client(&self) -> Arc<ConsulClient> {
        self.client.clone()
    }

    fn path(&self, name: &str) -> String {
        format!("/v1/kv/{}{name}", self.keys)
    }

    /// The current `ModifyIndex` and value of `name`, if it exists.
    async fn get(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let reply = self
            .client
            .request(Method::GET, &self.path(name), None, REQUEST_TIMEOUT)
            .await
            .map_err(unavailable)?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let pairs = parse_pairs(&reply)?;
        let Some(pair) = pairs.into_iter().next() else {
            return Ok(None);
        };
        let value = decode(&reply, &pair)?;
        Ok(Some((pair.modify_index, value)))
    }

    /// A conflict on `name`, naming what is there now.
    async fn conflict(&self, name: &str, expect: Expect) -> StoreError {
        match self.get(name).await {
            Ok(found) => StoreError::Conflict {
                name: name.to_string(),
                expected: expect,
                found: found.map(|(index, _)| index),
            },
            Err(e) => e,
        }
    }

    /// Sends a write and reads Consul's `true` or `false`.
    async fn write(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let reply = self
            .client
            .request(method, path, body, REQUEST_TIMEOUT)
            .await
            .map_err(unavailable)?;
        if reply.status != StatusCode::OK {
            let why = reply.unexpected();
            return Err(if reply.status.is_client_error() {
                StoreError::Invalid(why)
            } else {
                StoreError::Unavailable(why)
            });
        }
        match reply.body_text().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(StoreError::Unavailable(format!(
                "{} (expected true or false)",
                reply.unexpected()
            ))),
        }
    }
}

fn parse_pairs(reply: &Reply) -> Result<Vec<KvPair>, StoreError> {
    if reply.status != StatusCode::OK {
        return Err(StoreError::Unavailable(reply.unexpected()));
    }
    serde_json::from_slice(&reply.body).map_err(|e| {
        StoreError::Unavailable(format!("consul at {}: not a KV listing: {e}", reply.addr))
    })
}

fn decode(reply: &Reply, pair: &KvPair) -> Result<Vec<u8>, StoreError> {
    match &pair.value {
        None => Ok(Vec::new()),
        Some(v) => base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "consul at {}: {}: value is not base64: {e}",
                    reply.addr, pair.key
                ))
            }),
    }
}

/// Lists `keys` (`<prefix>/services/`); with `block`, as a blocking query from that index.
/// The entries by name, and the listing's index.
async fn list_keys(
    client: &ConsulClient,
    keys: &str,
    block: Option<(u64, Duration)>,
) -> Result<Snapshot, ConsulListError> {
    let mut path = format!("/v1/kv/{keys}?recurse");
    let mut timeout = REQUEST_TIMEOUT;
    if let Some((index, wait)) = block {
        path.push_str(&format!("&index={index}&wait={}", wait_param(wait)));
        timeout = blocking_timeout(wait);
    }
    let reply = client
        .request(Method::GET, &path, None, timeout)
        .await
        .map_err(ConsulListError::Consul)?;
    // 404: nothing under the prefix, but the index still counts (deletions raise it).
    let pairs = if reply.status == StatusCode::NOT_FOUND {
        Vec::new()
    } else {
        parse_pairs(&reply).map_err(ConsulListError::Store)?
    };
    let mut entries = Vec::new();
    for pair in &pairs {
        let Some(name) = pair.key.strip_prefix(keys) else {
            continue;
        };
        if check_name(name).is_err() {
            continue; // a folder key or a nested key: not one lb writes
        }
        entries.push(Entry {
            name: name.to_string(),
            value: decode(&reply, pair).map_err(ConsulListError::Store)?,
            revision: pair.modify_index,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Snapshot {
        entries,
        revision: reply.index.unwrap_or(0),
    })
}

enum ConsulListError {
    Consul(ConsulError),
    Store(StoreError),
}

impl From<ConsulListError> for StoreError {
    fn from(e: ConsulListError) -> Self {
        match e {
            ConsulListError::Consul(e) => unavailable(e),
            ConsulListError::Store(e) => e,
        }
    }
}

/// The events that take a watcher knowing `known` (name → revision) to `now`, a listing as
/// of `index`: a put for every key that is new or whose revision grew, a deletion (at
/// `index`, the first listing that missed it) for every key gone. Sorted by revision, a
/// deletion after the puts of the same revision. `known` is updated.
fn diff(known: &mut HashMap<String, u64>, now: &[Entry], index: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for e in now {
        if known.get(&e.name).is_none_or(|&r| r < e.revision) {
            events.push(Event::Put(e.clone()));
        }
    }
    let mut gone: Vec<&String> = known
        .keys()
        .filter(|n| !now.iter().any(|e| &e.name == *n))
        .collect();
    gone.sort();
    for name in gone {
        events.push(Event::Deleted {
            name: name.clone(),
            revision: index,
        });
    }
    events.sort_by_key(|e| (e.revision(), matches!(e, Event::Deleted { .. })));
    for e in &events {
        match e {
            Event::Put(entry) => known.insert(entry.name.clone(), entry.revision),
            Event::Deleted { name, .. } => known.remove(name),
        };
    }
    events
}

#[async_trait]
impl Store for ConsulStore {
    async fn list(&self) -> Result<Snapshot, StoreError> {
        Ok(list_keys(&self.client, &self.keys, None).await?)
    }

    async fn put(&self, name: &str, value: &[u8], expect: Expect) -> Result<u64, StoreError> {
        check_name(name)?;
        let path = match expect {
            Expect::Any => self.path(name),
            Expect::Absent => format!("{}?cas=0", self.path(name)),
            // No entry is ever at index 0, and `cas=0` would mean "create".
            Expect::Revision(0) => return Err(self.conflict(name, expect).await),
            Expect::Revision(r) => format!("{}?cas={r}", self.path(name)),
        };
        if !self.write(Method::PUT, &path, Some(value)).await? {
            return Err(self.conflict(name, expect).await);
        }
        // Consul's PUT answers only true, not the index it wrote at: read it back.
        Ok(match self.get(name).await? {
            Some((index, now)) if now == value => index,
            // Someone else wrote after us already: report a revision just older than
            // theirs (and newer than ours), so a compare-and-set against it fails as it
            // must and the watch's event for their write still counts as newer.
            Some((index, _)) => index.saturating_sub(1).max(1),
            // Already deleted again: the oldest revision there is, so that every later
            // change, the deletion included, counts as newer.
            None => 1,
        })
    }

    async fn secret(&self, proposal: &[u8]) -> Result<Vec<u8>, StoreError> {
        let path = format!("/v1/kv/{}", self.secret_key);
        if self
            .write(Method::PUT, &format!("{path}?cas=0"), Some(proposal))
            .await?
        {
            return Ok(proposal.to_vec());
        }
        let reply = self
            .client
            .request(Method::GET, &path, None, REQUEST_TIMEOUT)
            .await
            .map_err(unavailable)?;
        let pairs = parse_pairs(&reply)?;
        let pair = pairs.into_iter().next().ok_or_else(|| {
            StoreError::Unavailable(format!("consul: {} vanished", self.secret_key))
        })?;
        decode(&reply, &pair)
    }

    async fn delete(&self, name: &str, expect: Expect) -> Result<bool, StoreError> {
        check_name(name)?;
        // Consul answers `true` to a compare-and-set delete of a key that is not there, so
        // the key is read first and deleted at the index read: "was it there" is then
        // exact, unless another writer deletes it between the read and our delete (both
        // deleters are told it was there).
        for _ in 0..100 {
            let current = self.get(name).await?.map(|(index, _)| index);
            let index = match (expect, current) {
                (Expect::Any | Expect::Absent, None) => return Ok(false),
                (Expect::Any, Some(index)) => index,
                (Expect::Revision(r), Some(index)) if index == r => index,
                (Expect::Absent | Expect::Revision(_), found) => {
                    return Err(StoreError::Conflict {
                        name: name.to_string(),
                        expected: expect,
                        found,
                    });
                }
            };
            let path = format!("{}?cas={index}", self.path(name));
            if self.write(Method::DELETE, &path, None).await? {
                return Ok(true);
            }
            // Changed between the read and the delete: read again (a conflict, unless any
            // revision will do).
        }
        Err(StoreError::Unavailable(format!(
            "consul at {}: {name} kept changing while being deleted",
            self.client.addrs()
        )))
    }

    fn watch(&self, from: &Snapshot) -> mpsc::Receiver<Result<Event, StoreError>> {
        let (tx, rx) = mpsc::channel(256);
        let (client, keys, wait) = (self.client.clone(), self.keys.clone(), self.wait);
        let mut known: HashMap<String, u64> = from
            .entries
            .iter()
            .map(|e| (e.name.clone(), e.revision))
            .collect();
        let mut index = from.revision;
        tokio::spawn(async move {
            let mut failures = 0u32;
            let mut backoff = Backoff::new(WATCH_MIN_BACKOFF, WATCH_MAX_BACKOFF);
            let mut last_start = None::<tokio::time::Instant>;
            loop {
                // Rate limit: answers that come back at once must not make a tight loop.
                if let Some(t) = last_start {
                    tokio::time::sleep_until(t + WATCH_MIN_INTERVAL).await;
                }
                last_start = Some(tokio::time::Instant::now());
                // Index 0 (the start, or after the index went backwards) asks without
                // blocking, to learn where things stand.
                let block = (index > 0).then_some((index, wait));
                let answer = tokio::select! {
                    a = list_keys(&client, &keys, block) => a,
                    () = tx.closed() => return,
                };
                let snapshot = match answer {
                    Ok(s) => s,
                    Err(e) => {
                        let refused =
                            matches!(e, ConsulListError::Consul(ConsulError::Refused { .. }));
                        failures += 1;
                        if refused || failures >= WATCH_MAX_FAILURES {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                        tokio::select! {
                            () = backoff.wait() => {}
                            () = tx.closed() => return,
                        }
                        continue;
                    }
                };
                failures = 0;
                backoff.reset();
                for event in diff(&mut known, &snapshot.entries, snapshot.revision) {
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                index = next_index(index, snapshot.revision);
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, revision: u64) -> Entry {
        Entry {
            name: name.into(),
            value: name.as_bytes().to_vec(),
            revision,
        }
    }

    #[test]
    fn diff_gives_the_latest_state_in_revision_order() {
        let mut known: HashMap<String, u64> = [("a".to_string(), 3), ("b".to_string(), 4)]
            .into_iter()
            .collect();
        // a rewritten twice (only the last write is seen), b deleted, c created before a.
        let events = diff(&mut known, &[entry("a", 9), entry("c", 7)], 10);
        assert_eq!(
            events,
            [
                Event::Put(entry("c", 7)),
                Event::Put(entry("a", 9)),
                Event::Deleted {
                    name: "b".into(),
                    revision: 10
                },
            ]
        );
        assert_eq!(known.len(), 2);
        // Nothing changed: nothing sent.
        assert!(diff(&mut known, &[entry("a", 9), entry("c", 7)], 10).is_empty());
        // A deletion sorts after a put of the same revision.
        let events = diff(&mut known, &[entry("c", 11)], 11);
        assert_eq!(
            events,
            [
                Event::Put(entry("c", 11)),
                Event::Deleted {
                    name: "a".into(),
                    revision: 11
                },
            ]
        );
    }
}
