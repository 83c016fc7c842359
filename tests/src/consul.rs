//! A Consul test server: no Consul can be installed on the build machine, so the tests talk
//! to this instead. It implements, as Consul's HTTP API documents them, exactly the
//! endpoints lb uses:
//!
//! - `GET /v1/kv/<key>` (404 if absent), `?recurse` (every key with that prefix; 404 if
//!   none), `PUT` with `?cas` (0: create only) and `?flags`, `DELETE` with `?cas` or
//!   `?recurse`; writes answer `true` or `false`.
//! - `PUT /v1/txn` with KV operations only, verbs `set`, `cas`, `get`, `check-index`,
//!   `check-not-exists`, `delete` and `delete-cas`: applied all or none, at one index;
//!   200 with `Results` (the entries set, got or checked; values only for `get`), or 409
//!   with `Errors` (each failed operation's `OpIndex` and `What`); at most 128 operations
//!   (413 beyond).
//! - `GET /v1/health/service/<name>`, `?passing`.
//! - Blocking queries on both (`?index=N&wait=D`): held until the query's index exceeds N
//!   or the wait (default 5m, at most 10m, plus up to wait/16 of jitter) passes.
//! - An optional ACL token (`X-Consul-Token`, `Authorization: Bearer` or `?token=`):
//!   without it 403 "Permission denied", with a wrong one 403 "ACL not found".
//!
//! Indexes follow Consul's: one Raft-like index raised by every write; a key's
//! `ModifyIndex` is the index of its last write (a write of the same value and flags leaves
//! it alone, as Consul does); a recursive listing is as of the highest `ModifyIndex` among
//! its keys or its deletions (tombstones), and of the KV table's index when nothing under
//! the prefix was ever written; a single key, as of its `ModifyIndex` (the table's index
//! when absent). An index below 1 is answered as 1.
//!
//! The server runs on a thread of its own with its own tokio runtime, so sync and async
//! tests can use it alike; it stops when dropped. It may listen as several agents of one
//! datacenter ([`ConsulServer::start_agents`]): several addresses, one KV store.
//!
//! A test may inject a [`Fault`] into the next request of a method at one agent: a 5xx, a
//! stall past the client's timeout, a connection dropped without an answer, each with the
//! request taking effect or not, as a Consul agent that loses its leader or its network
//! would. Requests without a fault follow the protocol above exactly.
use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, Hasher},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use axum::{
    Router,
    body::Bytes,
    extract::{Extension, Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine;
use serde_json::json;

use crate::netns::Netns;

/// Consul's largest value (512 KiB).
const MAX_VALUE: usize = 512 * 1024;
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// The one node instances are registered on.
const NODE: &str = "lbt-node";

#[derive(Clone)]
struct KvEntry {
    create_index: u64,
    modify_index: u64,
    flags: u64,
    value: Vec<u8>,
}

struct Instance {
    service: String,
    address: String,
    port: u16,
    status: String,
}

struct Catalogue {
    /// The last index given out.
    index: u64,
    kv: BTreeMap<String, KvEntry>,
    /// Deleted keys and the index of their deletion.
    tombstones: BTreeMap<String, u64>,
    /// The KV table's index: its last write or deletion.
    kv_index: u64,
    /// Instances by service ID.
    instances: BTreeMap<String, Instance>,
    /// Per service name, the index of the last change to its instances or checks.
    service_index: HashMap<String, u64>,
    /// The last change to any instance.
    catalog_index: u64,
}

impl Default for Catalogue {
    fn default() -> Self {
        Self {
            // A real Consul has used the first Raft indexes for its own start by the time it
            // answers; index 1 stands for that here, so the first write is at 2.
            index: 1,
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            kv_index: 0,
            instances: BTreeMap::new(),
            service_index: HashMap::new(),
            catalog_index: 1,
        }
    }
}

impl Catalogue {
    fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn kv_set(&mut self, key: &str, value: &[u8], flags: u64) {
        if let Some(e) = self.kv.get(key)
            && e.value == value
            && e.flags == flags
        {
            return; // nothing changes, not even the index
        }
        let index = self.next_index();
        let create_index = self.kv.get(key).map_or(index, |e| e.create_index);
        self.kv.insert(
            key.to_string(),
            KvEntry {
                create_index,
                modify_index: index,
                flags,
                value: value.to_vec(),
            },
        );
        self.tombstones.remove(key);
        self.kv_index = index;
    }

    fn kv_delete(&mut self, key: &str) {
        if self.kv.remove(key).is_some() {
            let index = self.next_index();
            self.tombstones.insert(key.to_string(), index);
            self.kv_index = index;
        }
    }

    /// The index a read of `key` (or, with `recurse`, of the prefix) answers with, and the
    /// entries it returns.
    fn kv_read(&self, key: &str, recurse: bool) -> (u64, Vec<serde_json::Value>) {
        let show = |k: &str, e: &KvEntry| {
            json!({
                "LockIndex": 0,
                "Key": k,
                "Flags": e.flags,
                "Value": if e.value.is_empty() {
                    serde_json::Value::Null
                } else {
                    base64::engine::general_purpose::STANDARD.encode(&e.value).into()
                },
                "CreateIndex": e.create_index,
                "ModifyIndex": e.modify_index,
            })
        };
        if !recurse {
            return match self.kv.get(key) {
                Some(e) => (e.modify_index, vec![show(key, e)]),
                None => (self.kv_index.max(1), Vec::new()),
            };
        }
        let under = self
            .kv
            .range(key.to_string()..)
            .take_while(|(k, _)| k.starts_with(key));
        let entries: Vec<_> = under.clone().map(|(k, e)| show(k, e)).collect();
        let mut index = under.map(|(_, e)| e.modify_index).max().unwrap_or(0);
        if key.is_empty() {
            index = self.kv_index;
        } else {
            let deleted = self
                .tombstones
                .range(key.to_string()..)
                .take_while(|(k, _)| k.starts_with(key))
                .map(|(_, i)| *i)
                .max()
                .unwrap_or(0);
            index = index.max(deleted);
        }
        if index == 0 {
            index = self.kv_index;
        }
        (index.max(1), entries)
    }

    fn touch_service(&mut self, service: &str) {
        let index = self.next_index();
        self.service_index.insert(service.to_string(), index);
        self.catalog_index = index;
    }

    /// The index and answer of `/v1/health/service/<name>`.
    fn health(
        &self,
        service: &str,
        passing_only: bool,
        node_address: &str,
    ) -> (u64, serde_json::Value) {
        let mut out = Vec::new();
        for (id, i) in &self.instances {
            if i.service != service || (passing_only && i.status != "passing") {
                continue;
            }
            out.push(json!({
                "Node": {
                    "ID": "",
                    "Node": NODE,
                    "Address": node_address,
                    "Datacenter": "dc1",
                    "TaggedAddresses": {},
                    "Meta": {},
                },
                "Service": {
                    "ID": id,
                    "Service": service,
                    "Tags": [],
                    "Address": i.address,
                    "Meta": {},
                    "Port": i.port,
                },
                "Checks": [
                    {
                        "Node": NODE,
                        "CheckID": "serfHealth",
                        "Name": "Serf Health Status",
                        "Status": "passing",
                        "ServiceID": "",
                        "ServiceName": "",
                    },
                    {
                        "Node": NODE,
                        "CheckID": format!("service:{id}"),
                        "Name": format!("Service '{service}' check"),
                        "Status": i.status,
                        "ServiceID": id,
                        "ServiceName": service,
                    },
                ],
            }));
        }
        let index = self
            .service_index
            .get(service)
            .copied()
            .unwrap_or(self.catalog_index);
        (index.max(1), serde_json::Value::Array(out))
    }
}

/// A failure the server injects into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers 500 as Consul does without a cluster leader; the request does nothing.
    ServerError,
    /// Holds the request for `hold` (to outlast the client's timeout) without answering,
    /// then closes the connection; the request takes effect as `applied` says.
    Stall { hold: Duration, applied: Applied },
    /// Closes the connection without an answer; the request takes effect as `applied`
    /// says (`After` is taken as `Before`).
    Drop { applied: Applied },
}

/// When a request that meets a [`Fault`] takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// At once, before the failure: the client is not told that it succeeded.
    Before,
    /// Once the stall is over, after the client gave up on it.
    After,
    Never,
}

/// Which agent (listening address) a request came in on.
#[derive(Clone, Copy)]
struct Agent(usize);

/// A fault waiting for the next request of `method` at `agent`.
struct Pending {
    agent: usize,
    method: axum::http::Method,
    fault: Fault,
}

struct Shared {
    catalogue: Mutex<Catalogue>,
    /// Faults not yet met, in the order injected.
    faults: Mutex<Vec<Pending>>,
    /// Requests per agent.
    agent_requests: Vec<AtomicU64>,
    /// The last index, sent after every write: blocking queries wait on it.
    changed: tokio::sync::watch::Sender<u64>,
    token: Mutex<Option<String>>,
    requests: AtomicU64,
    node_address: String,
}

impl Shared {
    fn write<T>(&self, f: impl FnOnce(&mut Catalogue) -> T) -> T {
        let mut c = self.catalogue.lock().unwrap();
        let out = f(&mut c);
        let index = c.index;
        drop(c);
        self.changed.send_replace(index);
        out
    }

    /// Runs `read` once, or, for a blocking query (`index` above 0), until the index it
    /// answers exceeds `index` or the wait (plus jitter) has passed.
    async fn blocking<T>(
        &self,
        index: u64,
        wait: Duration,
        read: impl Fn(&Catalogue) -> (u64, T),
    ) -> (u64, T) {
        let mut changes = self.changed.subscribe();
        changes.borrow_and_update();
        let answer = read(&self.catalogue.lock().unwrap());
        if index == 0 || answer.0 > index {
            return answer;
        }
        let deadline = tokio::time::Instant::now() + wait + jitter(wait / 16);
        loop {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return read(&self.catalogue.lock().unwrap());
            }
            changes.borrow_and_update();
            let answer = read(&self.catalogue.lock().unwrap());
            if answer.0 > index {
                return answer;
            }
        }
    }
}

/// A random duration up to `max`.
fn jitter(max: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let nanos = max.as_nanos() as u64;
    if nanos == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(r % nanos)
    }
}

/// A Go duration as Consul's `wait` takes it: "10s", "5m", "1m30s", "250ms".
fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Some(Duration::from_secs_f64(total))
}

/// The `index` and `wait` of a query; Consul's message for a bad value.
fn blocking_params(q: &HashMap<String, String>) -> Result<(u64, Duration), &'static str> {
    let index = match q.get("index") {
        None => 0,
        Some(v) => v.parse().map_err(|_| "Invalid index")?,
    };
    let wait = match q.get("wait") {
        None => DEFAULT_WAIT,
        Some(v) => parse_go_duration(v).ok_or("Invalid wait time")?,
    };
    let wait = if wait.is_zero() {
        DEFAULT_WAIT
    } else {
        wait.min(MAX_WAIT)
    };
    Ok((index, wait))
}

fn text(status: StatusCode, body: &str) -> Response {
    (status, body.to_string()).into_response()
}

/// A JSON answer with the headers Consul puts on every read.
fn answer(status: StatusCode, index: Option<u64>, body: Option<String>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(i) = index {
        headers.insert("X-Consul-Index", HeaderValue::from(i));
        headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
        headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    }
    (status, headers, body.unwrap_or_default()).into_response()
}

fn bool_answer(b: bool) -> Response {
    answer(StatusCode::OK, None, Some(b.to_string()))
}

/// Counts the request, and injects the fault waiting for it, if any.
async fn count_and_inject(
    State(shared): State<Arc<Shared>>,
    Extension(Agent(agent)): Extension<Agent>,
    req: Request,
    next: Next,
) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    shared.agent_requests[agent].fetch_add(1, Ordering::Relaxed);
    let fault = {
        let mut faults = shared.faults.lock().unwrap();
        let at = faults
            .iter()
            .position(|p| p.agent == agent && p.method == *req.method());
        at.map(|i| faults.remove(i).fault)
    };
    let Some(fault) = fault else {
        return next.run(req).await;
    };
    match fault {
        Fault::ServerError => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rpc error making call: No cluster leader",
        ),
        Fault::Drop { applied } => {
            if applied != Applied::Never {
                next.run(req).await;
            }
            dropped()
        }
        Fault::Stall { hold, applied } => {
            match applied {
                Applied::Before => {
                    next.run(req).await;
                    tokio::time::sleep(hold).await;
                }
                // On a task of its own: the client's going away must not cancel it.
                Applied::After => {
                    let late = tokio::spawn(async move {
                        tokio::time::sleep(hold).await;
                        next.run(req).await;
                    });
                    let _ = late.await;
                }
                Applied::Never => tokio::time::sleep(hold).await,
            }
            dropped()
        }
    }
}

/// An answer that never comes: the body fails at once, so the server closes the
/// connection before the client has a whole answer.
fn dropped() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other("connection dropped (injected fault)"))
    });
    axum::body::Body::from_stream(failing).into_response()
}

async fn acl(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let want = shared.token.lock().unwrap().clone();
    if let Some(want) = want {
        let headers = req.headers();
        let from_query = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix("token=").map(str::to_string))
        });
        let given = headers
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_string)
            })
            .or(from_query);
        match given {
            None => {
                return text(
                    StatusCode::FORBIDDEN,
                    "Permission denied: anonymous token lacks permission",
                );
            }
            Some(t) if t != want => return text(StatusCode::FORBIDDEN, "ACL not found"),
            Some(_) => {}
        }
    }
    next.run(req).await
}

async fn kv_get(
    State(shared): State<Arc<Shared>>,
    key: Option<Path<String>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    let recurse = q.contains_key("recurse");
    if key.is_empty() && !recurse {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let (index, wait) = match blocking_params(&q) {
        Ok(p) => p,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    let (index, entries) = shared
        .blocking(index, wait, |c| c.kv_read(&key, recurse))
        .await;
    if entries.is_empty() {
        return answer(StatusCode::NOT_FOUND, Some(index), None);
    }
    answer(
        StatusCode::OK,
        Some(index),
        Some(serde_json::Value::Array(entries).to_string()),
    )
}

async fn kv_put(
    State(shared): State<Arc<Shared>>,
    key: Option<Path<String>>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(Path(key)) = key else {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    };
    let flags = match q.get("flags").map(|f| f.parse::<u64>()) {
        None => 0,
        Some(Ok(f)) => f,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid flags"),
    };
    let cas = match q.get("cas").map(|c| c.parse::<u64>()) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid cas value"),
    };
    if body.len() > MAX_VALUE {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "Request body({} bytes) too large, max size: {MAX_VALUE} bytes.",
                body.len()
            ),
        );
    }
    let done = shared.write(|c| {
        if let Some(cas) = cas {
            let current = c.kv.get(&key).map(|e| e.modify_index);
            let holds = match (cas, current) {
                (0, None) => true,
                (0, Some(_)) | (_, None) => false,
                (cas, Some(m)) => cas == m,
            };
            if !holds {
                return false;
            }
        }
        c.kv_set(&key, &body, flags);
        true
    });
    bool_answer(done)
}

async fn kv_delete(
    State(shared): State<Arc<Shared>>,
    key: Option<Path<String>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    let recurse = q.contains_key("recurse");
    if key.is_empty() && !recurse {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = match q.get("cas").map(|c| c.parse::<u64>()) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid cas value"),
    };
    let done = shared.write(|c| {
        if recurse {
            let keys: Vec<String> =
                c.kv.range(key.clone()..)
                    .take_while(|(k, _)| k.starts_with(&key))
                    .map(|(k, _)| k.clone())
                    .collect();
            for k in keys {
                c.kv_delete(&k);
            }
            return true;
        }
        match (cas, c.kv.get(&key).map(|e| e.modify_index)) {
            // Consul answers true for a key that is not there, with or without cas; a cas of
            // 0 never deletes.
            (_, None) => true,
            (Some(cas), Some(m)) if cas != m => false,
            _ => {
                c.kv_delete(&key);
                true
            }
        }
    });
    bool_answer(done)
}

async fn health_service(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let passing = q
        .get("passing")
        .is_some_and(|v| v.is_empty() || v == "true" || v == "1");
    let (index, wait) = match blocking_params(&q) {
        Ok(p) => p,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    let node = shared.node_address.clone();
    let (index, body) = shared
        .blocking(index, wait, |c| c.health(&service, passing, &node))
        .await;
    answer(StatusCode::OK, Some(index), Some(body.to_string()))
}

/// Consul's most operations in one transaction.
const MAX_TXN_OPS: usize = 128;

/// One operation of a `/v1/txn` body, as Consul's API takes it.
#[derive(serde::Deserialize)]
struct TxnOp {
    #[serde(rename = "KV")]
    kv: Option<TxnKvOp>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnKvOp {
    verb: String,
    key: String,
    /// Base64.
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    index: u64,
}

/// A key as a transaction's result shows it (the value only for `get`).
fn txn_entry(key: &str, e: &KvEntry, with_value: bool) -> serde_json::Value {
    let value = if with_value && !e.value.is_empty() {
        base64::engine::general_purpose::STANDARD
            .encode(&e.value)
            .into()
    } else {
        serde_json::Value::Null
    };
    json!({"KV": {
        "LockIndex": 0,
        "Key": key,
        "Flags": e.flags,
        "Value": value,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    }})
}

impl Catalogue {
    /// Runs KV operations `ops` (values decoded) as one transaction: every write at one
    /// new index, all or none. The results, or each failed operation's index and why.
    fn txn(
        &mut self,
        ops: &[(TxnKvOp, Vec<u8>)],
    ) -> Result<Vec<serde_json::Value>, Vec<(usize, String)>> {
        let (mut kv, mut tombstones) = (self.kv.clone(), self.tombstones.clone());
        let index = self.index + 1;
        let mut wrote = false;
        let mut results = Vec::new();
        let mut errors = Vec::new();
        for (i, (op, value)) in ops.iter().enumerate() {
            let key = op.key.as_str();
            let current = kv.get(key).map(|e| e.modify_index);
            let stale = |what: &str| format!("failed to {what} key {key:?}, index is stale");
            let outcome: Result<(), String> = match op.verb.as_str() {
                "set" | "cas" => {
                    let holds = op.verb == "set"
                        || match current {
                            None => op.index == 0,
                            Some(m) => op.index == m,
                        };
                    if holds {
                        let unchanged = kv
                            .get(key)
                            .is_some_and(|e| e.value == *value && e.flags == op.flags);
                        if !unchanged {
                            let create_index = kv.get(key).map_or(index, |e| e.create_index);
                            kv.insert(
                                key.to_string(),
                                KvEntry {
                                    create_index,
                                    modify_index: index,
                                    flags: op.flags,
                                    value: value.clone(),
                                },
                            );
                            tombstones.remove(key);
                            wrote = true;
                        }
                        results.push(txn_entry(key, &kv[key], false));
                        Ok(())
                    } else {
                        Err(stale("set"))
                    }
                }
                "get" => match kv.get(key) {
                    Some(e) => {
                        results.push(txn_entry(key, e, true));
                        Ok(())
                    }
                    None => Err(format!("key {key:?} doesn't exist")),
                },
                "check-index" => match kv.get(key) {
                    Some(e) if e.modify_index == op.index => {
                        results.push(txn_entry(key, e, false));
                        Ok(())
                    }
                    Some(_) => Err(format!(
                        "failed to check index of key {key:?}, index is stale"
                    )),
                    None => Err(format!(
                        "failed to check index of key {key:?}, key does not exist"
                    )),
                },
                "check-not-exists" => match current {
                    None => Ok(()),
                    Some(_) => Err(format!("key {key:?} exists")),
                },
                // As `DELETE ?cas=`: a key that is not there counts as deleted.
                "delete" | "delete-cas" => match current {
                    Some(m) if op.verb == "delete-cas" && m != op.index => Err(stale("delete")),
                    Some(_) => {
                        kv.remove(key);
                        tombstones.insert(key.to_string(), index);
                        wrote = true;
                        Ok(())
                    }
                    None => Ok(()),
                },
                other => Err(format!("unknown KV verb {other:?}")),
            };
            if let Err(what) = outcome {
                errors.push((i, what));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        self.kv = kv;
        self.tombstones = tombstones;
        if wrote {
            self.index = index;
            self.kv_index = index;
        }
        Ok(results)
    }
}

async fn txn(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let ops: Vec<TxnOp> = match serde_json::from_slice(&body) {
        Ok(ops) => ops,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("Failed to parse body: {e}"),
            );
        }
    };
    if ops.len() > MAX_TXN_OPS {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                ops.len()
            ),
        );
    }
    let mut decoded = Vec::with_capacity(ops.len());
    for op in ops {
        let Some(kv) = op.kv else {
            return text(
                StatusCode::BAD_REQUEST,
                "this test server runs KV operations only",
            );
        };
        let value = match &kv.value {
            None => Vec::new(),
            Some(v) => match base64::engine::general_purpose::STANDARD.decode(v) {
                Ok(v) => v,
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("Failed to parse body: {e}"),
                    );
                }
            },
        };
        if value.len() > MAX_VALUE {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "Value for key {:?} is too large ({} > {MAX_VALUE} bytes)",
                    kv.key,
                    value.len()
                ),
            );
        }
        decoded.push((kv, value));
    }
    match shared.write(|c| c.txn(&decoded)) {
        Ok(results) => answer(
            StatusCode::OK,
            None,
            Some(json!({"Results": results, "Errors": null}).to_string()),
        ),
        Err(errors) => {
            let errors: Vec<serde_json::Value> = errors
                .into_iter()
                .map(|(i, what)| json!({"OpIndex": i, "What": what}))
                .collect();
            answer(
                StatusCode::CONFLICT,
                None,
                Some(json!({"Results": null, "Errors": errors}).to_string()),
            )
        }
    }
}

pub struct ConsulServer {
    addr: SocketAddr,
    /// Every agent's address, the first being `addr`.
    addrs: Vec<SocketAddr>,
    /// Served over HTTPS.
    tls: bool,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConsulServer {
    /// A server on 127.0.0.1 at a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_agents(1)
    }

    /// `n` agents of one datacenter on 127.0.0.1, each at a free port of its own, sharing
    /// one KV store and catalogue.
    pub fn start_agents(n: usize) -> anyhow::Result<Self> {
        let listeners = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").context("binding the Consul test server"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::serve(listeners, "127.0.0.1", None)
    }

    /// A server on 127.0.0.1 at a free port, over HTTPS with `tls`'s certificate.
    pub fn start_tls(tls: Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("binding the Consul test server")?;
        Self::serve(vec![listener], "127.0.0.1", Some(tls))
    }

    /// A server inside `ns`, listening on `ip` (an address of `ns`) at a free port.
    pub fn start_in(ns: &Netns, ip: &str) -> anyhow::Result<Self> {
        Self::start_in_with(ns, ip, None)
    }

    /// As [`ConsulServer::start_in`], over HTTPS with `tls`'s certificate.
    pub fn start_tls_in(
        ns: &Netns,
        ip: &str,
        tls: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<Self> {
        Self::start_in_with(ns, ip, Some(tls))
    }

    fn start_in_with(
        ns: &Netns,
        ip: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<Self> {
        let bind_ip = ip.to_string();
        let listener =
            crate::netns::in_netns(&ns.path(), move || TcpListener::bind((bind_ip.as_str(), 0)))
                .with_context(|| {
                    format!("binding the Consul test server to {ip} in {}", ns.name)
                })?;
        Self::serve(vec![listener], ip, tls)
    }

    /// Serves every agent on its listener, over HTTPS with `tls`'s certificate if given.
    fn serve(
        listeners: Vec<TcpListener>,
        node_address: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<Self> {
        let https = tls.is_some();
        let mut addrs = Vec::new();
        for l in &listeners {
            l.set_nonblocking(true)?;
            addrs.push(l.local_addr()?);
        }
        let addr = addrs[0];
        let shared = Arc::new(Shared {
            catalogue: Mutex::new(Catalogue::default()),
            faults: Mutex::new(Vec::new()),
            agent_requests: addrs.iter().map(|_| AtomicU64::new(0)).collect(),
            changed: tokio::sync::watch::channel(0).0,
            token: Mutex::new(None),
            requests: AtomicU64::new(0),
            node_address: node_address.to_string(),
        });
        let app = |agent: usize| {
            Router::new()
                .route("/v1/txn", axum::routing::put(txn))
                .route("/v1/kv/", get(kv_get).put(kv_put).delete(kv_delete))
                .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
                .route("/v1/health/service/{service}", get(health_service))
                .layer(middleware::from_fn_with_state(shared.clone(), acl))
                .layer(middleware::from_fn_with_state(
                    shared.clone(),
                    count_and_inject,
                ))
                .layer(Extension(Agent(agent)))
                .layer(axum::extract::DefaultBodyLimit::max(2 * MAX_VALUE))
                .with_state(shared.clone())
        };
        let apps: Vec<Router> = (0..listeners.len()).map(app).collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread = std::thread::Builder::new()
            .name(format!("consul-test-{}", addr.port()))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut servers = tokio::task::JoinSet::new();
                    for (listener, app) in listeners.into_iter().zip(apps) {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.into()));
                                return;
                            }
                        };
                        let tls = tls.clone();
                        servers.spawn(async move {
                            let _ = match tls {
                                Some(tls) => {
                                    let listener = crate::pki::TlsListener::new(listener, tls);
                                    axum::serve(listener, app).await
                                }
                                None => axum::serve(listener, app).await,
                            };
                        });
                    }
                    let _ = ready_tx.send(Ok(()));
                    // Dropping the servers (and then the runtime) ends every connection,
                    // blocking queries included.
                    let _ = stopped.await;
                    servers.abort_all();
                });
            })?;
        ready_rx
            .recv()
            .context("the Consul test server's thread died")??;
        Ok(Self {
            addr,
            addrs,
            tls: https,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Requires `token` on every request from now on.
    pub fn with_token(self, token: &str) -> Self {
        *self.shared.token.lock().unwrap() = Some(token.to_string());
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every agent's address (`host:port`), in order.
    pub fn addrs(&self) -> Vec<String> {
        self.addrs.iter().map(ToString::to_string).collect()
    }

    /// The `--store` URL of this server: every agent's address (`consuls://` over HTTPS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "consuls" } else { "consul" };
        format!("{scheme}://{}", self.addrs().join(","))
    }

    /// Injects `fault` into the next `method` request (`GET`, `PUT`, `DELETE`) that agent
    /// `agent` receives. Faults injected for one agent and method are met in order.
    pub fn inject(&self, agent: usize, method: &str, fault: Fault) {
        assert!(agent < self.addrs.len(), "no agent {agent}");
        let method = method.parse().expect("an HTTP method");
        self.shared.faults.lock().unwrap().push(Pending {
            agent,
            method,
            fault,
        });
    }

    /// How many injected faults no request has met yet.
    pub fn faults_pending(&self) -> usize {
        self.shared.faults.lock().unwrap().len()
    }

    /// How many requests agent `agent` has received.
    pub fn requests_at(&self, agent: usize) -> u64 {
        self.shared.agent_requests[agent].load(Ordering::Relaxed)
    }

    /// The `ModifyIndex` of `key`, if it exists.
    pub fn kv_index(&self, key: &str) -> Option<u64> {
        let c = self.shared.catalogue.lock().unwrap();
        c.kv.get(key).map(|e| e.modify_index)
    }

    /// The last index given out.
    pub fn index(&self) -> u64 {
        self.shared.catalogue.lock().unwrap().index
    }

    /// How many HTTP requests the server has answered or is holding.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Registers (or replaces) instance `id` of `service` at `addr:port` (an empty `addr`
    /// leaves Consul to use the node's address) with one service check in `status`
    /// (`passing`, `warning` or `critical`).
    pub fn register(&self, service: &str, id: &str, addr: &str, port: u16, status: &str) {
        check_status(status);
        self.shared.write(|c| {
            let old = c.instances.insert(
                id.to_string(),
                Instance {
                    service: service.to_string(),
                    address: addr.to_string(),
                    port,
                    status: status.to_string(),
                },
            );
            if let Some(old) = old
                && old.service != service
            {
                c.touch_service(&old.service);
            }
            c.touch_service(service);
        });
    }

    /// Sets the status of instance `id`'s check.
    pub fn set_status(&self, id: &str, status: &str) {
        check_status(status);
        self.shared.write(|c| {
            let service = {
                let i = c
                    .instances
                    .get_mut(id)
                    .unwrap_or_else(|| panic!("no instance {id}"));
                if i.status == status {
                    return;
                }
                i.status = status.to_string();
                i.service.clone()
            };
            c.touch_service(&service);
        });
    }

    pub fn deregister(&self, id: &str) {
        self.shared.write(|c| {
            if let Some(i) = c.instances.remove(id) {
                c.touch_service(&i.service);
            }
        });
    }

    /// Writes `value` under `key` directly, as another Consul client would.
    pub fn kv_put_raw(&self, key: &str, value: &[u8]) {
        self.shared.write(|c| c.kv_set(key, value, 0));
    }

    /// The value under `key`, if any.
    pub fn kv_get_raw(&self, key: &str) -> Option<Vec<u8>> {
        let c = self.shared.catalogue.lock().unwrap();
        c.kv.get(key).map(|e| e.value.clone())
    }

    pub fn kv_delete_raw(&self, key: &str) {
        self.shared.write(|c| c.kv_delete(key));
    }

    /// Forgets every deletion, as Consul's servers do after a while (the tombstone TTL): a
    /// listing whose last change was a deletion then answers an older index.
    pub fn reap_tombstones(&self) {
        self.shared.write(|c| c.tombstones.clear());
    }
}

fn check_status(status: &str) {
    assert!(
        matches!(status, "passing" | "warning" | "critical"),
        "a check status is passing, warning or critical, not {status:?}"
    );
}

impl Drop for ConsulServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("s"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    fn op(verb: &str, key: &str, value: &[u8], index: u64) -> (TxnKvOp, Vec<u8>) {
        let kv = TxnKvOp {
            verb: verb.into(),
            key: key.into(),
            value: None,
            flags: 0,
            index,
        };
        (kv, value.to_vec())
    }

    #[test]
    fn a_transaction_applies_all_at_one_index_or_nothing() {
        let mut c = Catalogue::default();
        c.kv_set("a", b"1", 0); // 2
        let results = c
            .txn(&[
                op("cas", "a", b"2", 2),
                op("cas", "b", b"x", 0),
                op("check-not-exists", "c", b"", 0),
            ])
            .unwrap();
        assert_eq!(c.index, 3);
        assert_eq!((c.kv["a"].modify_index, c.kv["b"].modify_index), (3, 3));
        assert_eq!(results.len(), 2, "check-not-exists has no result");
        assert_eq!(results[0]["KV"]["Key"], "a");
        assert_eq!(results[0]["KV"]["ModifyIndex"], 3);
        assert!(results[0]["KV"]["Value"].is_null());
        // One stale operation: nothing applied, and each failure named by its position.
        let errors = c
            .txn(&[
                op("delete-cas", "a", b"", 3),
                op("check-index", "b", b"", 2),
                op("check-not-exists", "b", b"", 0),
            ])
            .unwrap_err();
        assert_eq!(errors.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(c.index, 3);
        assert_eq!(c.kv["a"].value, b"2");
        // delete-cas of a key that is not there counts as done, as DELETE ?cas= does.
        c.txn(&[op("delete-cas", "zz", b"", 9), op("delete", "b", b"", 0)])
            .unwrap();
        assert_eq!((c.index, c.tombstones["b"]), (4, 4));
    }

    #[test]
    fn listing_indexes_follow_consul() {
        let mut c = Catalogue::default();
        assert_eq!(c.kv_read("lb/", true).0, 1, "never below 1");
        c.kv_set("other", b"x", 0); // 2
        assert_eq!(
            c.kv_read("lb/", true).0,
            2,
            "nothing under the prefix: the table's index"
        );
        c.kv_set("lb/a", b"1", 0); // 3
        c.kv_set("other", b"y", 0); // 4
        assert_eq!(c.kv_read("lb/", true).0, 3, "the prefix's own index");
        c.kv_set("lb/a", b"1", 0);
        assert_eq!(c.index, 4, "an unchanged value is no write");
        c.kv_set("lb/b", b"2", 0); // 5
        c.kv_delete("lb/b"); // 6
        assert_eq!(
            c.kv_read("lb/", true).0,
            6,
            "a deletion raises the listing's index"
        );
        assert_eq!(c.kv_read("lb/a", false).0, 3, "a key: its ModifyIndex");
        assert_eq!(
            c.kv_read("lb/b", false).0,
            6,
            "an absent key: the table's index"
        );
        c.tombstones.clear();
        assert_eq!(c.kv_read("lb/", true).0, 3, "reaped: the index goes back");
    }
}
