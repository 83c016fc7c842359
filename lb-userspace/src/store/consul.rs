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

use super::{
    Entry, Event, Expect, Keyspace, Snapshot, Store, StoreError, check_name,
    claims::{self, Claim, Claims, Held},
};
use crate::{
    consul_http::{
        ConsulClient, ConsulError, REQUEST_TIMEOUT, Reply, WriteError, blocking_timeout,
        next_index, wait_param,
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
/// How many times a write is sent in all when each attempt got no answer and a read then
/// found it had not taken effect.
const WRITE_ATTEMPTS: usize = 3;

pub struct ConsulStore {
    client: Arc<ConsulClient>,
    /// `<prefix>/services/` (or another [`Keyspace`]'s directory)
    keys: String,
    prefix: String,
    /// `<prefix>/secret`
    secret_key: String,
    /// `<prefix>/claims/`
    claim_keys: String,
    wait: Duration,
    /// How long an ordinary request may take.
    timeout: Duration,
}

/// What a read after a write that got no answer found.
enum Settled {
    /// The key holds what was written, at this index: the write took effect (or another
    /// writer wrote the very same value, which comes to the same).
    Applied(u64),
    /// The key is as it was expected before the write: the write did not take effect, and
    /// may be sent again.
    NotApplied,
    /// Someone else changed the key: found at this index, or gone.
    Changed(Option<u64>),
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
            keys: format!("{prefix}/{}/", Keyspace::Services.dir()),
            prefix: prefix.to_string(),
            secret_key: format!("{prefix}/secret"),
            claim_keys: format!("{prefix}/claims/"),
            wait: WATCH_WAIT,
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// The same agents and group, holding `keyspace`'s entries rather than services.
    pub fn in_keyspace(mut self, keyspace: Keyspace) -> Self {
        self.keys = format!("{}/{}/", self.prefix, keyspace.dir());
        self
    }

    /// How long each ordinary request (not a watch's blocking query) may take before the
    /// next address is tried (5 s unless changed).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
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
            .request(Method::GET, &self.path(name), None, self.timeout)
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

    /// Sends a write once (see [`ConsulClient::write`]): Consul's `true` or `false`, or
    /// `None` when it got no answer to trust, described in `unknown`.
    async fn write(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        unknown: &mut String,
    ) -> Result<Option<bool>, StoreError> {
        match self.client.write(method, path, body, self.timeout).await {
            Ok(reply) => write_answer(&reply).map(Some),
            Err(WriteError::Unknown(why)) => {
                tracing::warn!(
                    path,
                    "consul: a write got no answer ({why}); reading to learn whether it took effect"
                );
                *unknown = why;
                Ok(None)
            }
            Err(WriteError::NotSent(why)) => Err(StoreError::Unavailable(why)),
            Err(WriteError::Refused(e)) => Err(unavailable(e)),
        }
    }

    /// Whether a put of `value` under `name` against `expect` took effect, from what the
    /// key holds now.
    async fn settle_put(
        &self,
        name: &str,
        value: &[u8],
        expect: Expect,
    ) -> Result<Settled, StoreError> {
        let now = self.get(name).await?;
        Ok(match (expect, now) {
            (_, Some((index, v))) if v == value => Settled::Applied(index),
            (Expect::Any, _) | (Expect::Absent, None) => Settled::NotApplied,
            (Expect::Revision(r), Some((index, _))) if index == r => Settled::NotApplied,
            (_, now) => Settled::Changed(now.map(|(index, _)| index)),
        })
    }

    /// The index `value`, just written under `name`, is at.
    async fn index_of_write(&self, name: &str, value: &[u8]) -> Result<u64, StoreError> {
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
}

/// Consul's `true` or `false` to a write.
fn write_answer(reply: &Reply) -> Result<bool, StoreError> {
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

/// The error for a write sent `WRITE_ATTEMPTS` times without an answer, none of which
/// took effect.
fn gave_up(name: &str, last: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{name}: no answer to {WRITE_ATTEMPTS} attempts at writing it, and none took effect ({last})"
    ))
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
    mut timeout: Duration,
) -> Result<Snapshot, ConsulListError> {
    let mut path = format!("/v1/kv/{keys}?recurse");
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

/// Operations Consul takes in one `/v1/txn` transaction.
const MAX_TXN_OPS: usize = 128;

/// Reads and transactions a claiming write makes before giving up while others keep
/// changing what it reads.
const CLAIM_ATTEMPTS: u32 = 20;

/// One operation of a `/v1/txn` transaction on the KV store.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct KvOp {
    verb: &'static str,
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    index: u64,
}

/// One entry of a `/v1/txn` body: `{"KV": {...}}`.
#[derive(serde::Serialize)]
struct TxnOp<'a> {
    #[serde(rename = "KV")]
    kv: &'a KvOp,
}

/// A `/v1/txn` answer: the entries written (200), or why it was rolled back (409).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnAnswer {
    results: Option<Vec<TxnResult>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnResult {
    #[serde(rename = "KV")]
    kv: Option<TxnKv>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnKv {
    key: String,
    modify_index: u64,
}

/// Claims (see [`claims`]): the key `<prefix>/claims/<kind>/<id>` holds the name of the
/// service that has the claim. A claiming write reads the document and the claim keys, then
/// sends one transaction (`/v1/txn`) that holds only if none of them changed meanwhile
/// (`cas`, `check-index`, `check-not-exists`, `delete-cas`, each at the index read); when
/// one did, it reads again.
impl ConsulStore {
    fn claim_key(&self, claim: &Claim) -> String {
        format!("{}{}", self.claim_keys, claim.key())
    }

    /// The `ModifyIndex` and value of any `key` (claim ids hold `%`: sent encoded).
    async fn get_key(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let path = format!(
            "/v1/kv/{}",
            percent_encoding::utf8_percent_encode(key, KEY_ESCAPE)
        );
        let reply = self
            .client
            .request(Method::GET, &path, None, REQUEST_TIMEOUT)
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

    /// Sends `ops` as one transaction: the `ModifyIndex` each written key got, or none
    /// when Consul rolled it back (409: something was not as read).
    async fn transaction(&self, ops: &[KvOp]) -> Result<Option<HashMap<String, u64>>, StoreError> {
        let ops: Vec<TxnOp> = ops.iter().map(|kv| TxnOp { kv }).collect();
        let body = serde_json::to_vec(&ops).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let reply = self
            .client
            .request(Method::PUT, "/v1/txn", Some(&body), REQUEST_TIMEOUT)
            .await
            .map_err(unavailable)?;
        if reply.status == StatusCode::CONFLICT {
            return Ok(None);
        }
        if reply.status != StatusCode::OK {
            let why = reply.unexpected();
            return Err(if reply.status.is_client_error() {
                StoreError::Invalid(why)
            } else {
                StoreError::Unavailable(why)
            });
        }
        let answer: TxnAnswer = serde_json::from_slice(&reply.body).map_err(|e| {
            StoreError::Unavailable(format!(
                "consul at {}: not a transaction answer: {e}",
                reply.addr
            ))
        })?;
        Ok(Some(
            answer
                .results
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r.kv.map(|kv| (kv.key, kv.modify_index)))
                .collect(),
        ))
    }

    /// Writes `value` (none: deletes) under `name` if `expect` holds, moving its claims.
    /// The new revision, and whether the entry was there.
    async fn write_claiming(
        &self,
        name: &str,
        value: Option<&[u8]>,
        expect: Expect,
        claims: &Claims,
    ) -> Result<(u64, bool), StoreError> {
        check_name(name)?;
        claims.check_fit(name, MAX_TXN_OPS)?;
        let key = format!("{}{name}", self.keys);
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        for _ in 0..CLAIM_ATTEMPTS {
            let doc = self.get(name).await?;
            let current = doc.as_ref().map(|(index, _)| *index);
            let mut found = HashMap::new();
            for claim in claims.all() {
                let Some((index, holder)) = self.get_key(&self.claim_key(claim)).await? else {
                    continue;
                };
                let holder = String::from_utf8_lossy(&holder).into_owned();
                let holder_exists = holder == name
                    || (check_name(&holder).is_ok() && self.get(&holder).await?.is_some());
                found.insert(
                    claim.key().to_string(),
                    Held {
                        holder,
                        revision: index,
                        holder_exists,
                    },
                );
            }
            if !expect.holds(current) {
                // Written already, by an earlier try of this very request that seemed to
                // fail (a timeout, then the same transaction sent to the next address):
                // what was asked for is done.
                if let (Some(v), Some((index, now))) = (value, &doc)
                    && now == v
                    && claims
                        .hold
                        .iter()
                        .all(|c| found.get(c.key()).is_some_and(|h| h.holder == name))
                {
                    return Ok((*index, true));
                }
                return Err(StoreError::Conflict {
                    name: name.to_string(),
                    expected: expect,
                    found: current,
                });
            }
            let plan = claims::plan(name, claims, &found)?;
            let mut ops = vec![match (value, current) {
                (Some(v), index) => KvOp {
                    verb: "cas",
                    key: key.clone(),
                    value: Some(b64(v)),
                    index: index.unwrap_or(0),
                },
                (None, Some(index)) => KvOp {
                    verb: "delete-cas",
                    key: key.clone(),
                    value: None,
                    index,
                },
                (None, None) => KvOp {
                    verb: "check-not-exists",
                    key: key.clone(),
                    value: None,
                    index: 0,
                },
            }];
            for (claim, index) in &plan.unchanged {
                let claim_key = self.claim_key(claim);
                let op = if plan.take.contains(claim) {
                    // cas at 0 creates only.
                    KvOp {
                        verb: "cas",
                        key: claim_key,
                        value: Some(b64(name.as_bytes())),
                        index: *index,
                    }
                } else if plan.release.iter().any(|(c, _)| c == claim) {
                    KvOp {
                        verb: "delete-cas",
                        key: claim_key,
                        value: None,
                        index: *index,
                    }
                } else if *index == 0 {
                    KvOp {
                        verb: "check-not-exists",
                        key: claim_key,
                        value: None,
                        index: 0,
                    }
                } else {
                    KvOp {
                        verb: "check-index",
                        key: claim_key,
                        value: None,
                        index: *index,
                    }
                };
                ops.push(op);
            }
            for gone in &plan.gone {
                ops.push(KvOp {
                    verb: "check-not-exists",
                    key: format!("{}{gone}", self.keys),
                    value: None,
                    index: 0,
                });
            }
            if ops.len() > MAX_TXN_OPS {
                // The checks that claims' holders are gone made it too long.
                return Err(StoreError::TooManyClaims {
                    name: name.to_string(),
                    count: ops.len() - 1,
                    max: MAX_TXN_OPS - 1,
                    field: "http.paths",
                });
            }
            if let Some(written) = self.transaction(&ops).await? {
                let revision = match value {
                    Some(_) => written.get(&key).copied().ok_or_else(|| {
                        StoreError::Unavailable(format!(
                            "consul at {}: the transaction's answer lacks {key}",
                            self.client.addrs()
                        ))
                    })?,
                    None => 0,
                };
                return Ok((revision, current.is_some()));
            }
        }
        Err(StoreError::Unavailable(format!(
            "consul at {}: {name} and its claims kept changing while being written",
            self.client.addrs()
        )))
    }
}

/// What a key must have escaped in a URL path: `%` (claim ids hold percent-encoded paths)
/// and what would end the path.
const KEY_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b'%')
    .add(b'?')
    .add(b'#')
    .add(b' ');

#[async_trait]
impl Store for ConsulStore {
    async fn list(&self) -> Result<Snapshot, StoreError> {
        Ok(list_keys(&self.client, &self.keys, None, self.timeout).await?)
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
        // A compare-and-set sent again after it took effect fails: so a write that got no
        // answer is read back, and sent again only if it did not take effect.
        let mut unknown = String::new();
        for _ in 0..WRITE_ATTEMPTS {
            let settled = match self.write(Method::PUT, &path, Some(value), &mut unknown).await? {
                Some(true) => return self.index_of_write(name, value).await,
                Some(false) if unknown.is_empty() => {
                    return Err(self.conflict(name, expect).await);
                }
                // Refused after an attempt without an answer: that one may have taken
                // effect, and be why this one was refused.
                Some(false) => match self.settle_put(name, value, expect).await? {
                    Settled::Applied(index) => return Ok(index),
                    Settled::NotApplied | Settled::Changed(_) => {
                        return Err(self.conflict(name, expect).await);
                    }
                },
                None => self.settle_put(name, value, expect).await.map_err(|e| {
                    StoreError::Unavailable(format!(
                        "{unknown}; and reading {name} to learn whether the write took effect failed: {e}"
                    ))
                })?,
            };
            match settled {
                Settled::Applied(index) => return Ok(index),
                Settled::NotApplied => {}
                Settled::Changed(found) => {
                    return Err(StoreError::Conflict {
                        name: name.to_string(),
                        expected: expect,
                        found,
                    });
                }
            }
        }
        Err(gave_up(name, &unknown))
    }

    async fn secret(&self, proposal: &[u8]) -> Result<Vec<u8>, StoreError> {
        let path = format!("/v1/kv/{}", self.secret_key);
        let mut unknown = String::new();
        for _ in 0..WRITE_ATTEMPTS {
            let created = self
                .write(
                    Method::PUT,
                    &format!("{path}?cas=0"),
                    Some(proposal),
                    &mut unknown,
                )
                .await?;
            if created == Some(true) {
                return Ok(proposal.to_vec());
            }
            // Refused (another node's is there), or no answer (ours may be there): read it.
            let reply = self
                .client
                .request(Method::GET, &path, None, self.timeout)
                .await
                .map_err(unavailable)?;
            if reply.status == StatusCode::NOT_FOUND {
                continue; // not created after all (or deleted again): propose again
            }
            let pairs = parse_pairs(&reply)?;
            if let Some(pair) = pairs.into_iter().next() {
                return decode(&reply, &pair);
            }
        }
        Err(gave_up(&self.secret_key, &unknown))
    }

    async fn delete(&self, name: &str, expect: Expect) -> Result<bool, StoreError> {
        check_name(name)?;
        // Consul answers `true` to a compare-and-set delete of a key that is not there, so
        // the key is read first and deleted at the index read: "was it there" is then
        // exact, unless another writer deletes it between the read and our delete (both
        // deleters are told it was there).
        let mut unknown = String::new();
        let mut unanswered = 0;
        for _ in 0..100 {
            let current = self.get(name).await?.map(|(index, _)| index);
            let index = match (expect, current) {
                // Gone after a delete that got no answer: that one took effect (or another
                // deleter's did), and the key was there at the index it was sent with.
                (_, None) if unanswered > 0 => return Ok(true),
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
            match self
                .write(Method::DELETE, &path, None, &mut unknown)
                .await?
            {
                Some(true) => return Ok(true),
                // Changed between the read and the delete: read again (a conflict, unless
                // any revision will do).
                Some(false) => {}
                // No answer: read again to learn whether it took effect.
                None => {
                    unanswered += 1;
                    if unanswered == WRITE_ATTEMPTS {
                        return match self.get(name).await? {
                            None => Ok(true),
                            Some(_) => Err(gave_up(name, &unknown)),
                        };
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "consul at {}: {name} kept changing while being deleted",
            self.client.addrs()
        )))
    }

    async fn put_claiming(
        &self,
        name: &str,
        value: &[u8],
        expect: Expect,
        claims: &Claims,
    ) -> Result<u64, StoreError> {
        Ok(self
            .write_claiming(name, Some(value), expect, claims)
            .await?
            .0)
    }

    async fn delete_claiming(
        &self,
        name: &str,
        expect: Expect,
        claims: &[Claim],
    ) -> Result<bool, StoreError> {
        let claims = Claims::released(claims);
        Ok(self.write_claiming(name, None, expect, &claims).await?.1)
    }

    fn watch(&self, from: &Snapshot) -> mpsc::Receiver<Result<Event, StoreError>> {
        let (tx, rx) = mpsc::channel(256);
        let (client, keys, wait, timeout) = (
            self.client.clone(),
            self.keys.clone(),
            self.wait,
            self.timeout,
        );
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
                    a = list_keys(&client, &keys, block, timeout) => a,
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
