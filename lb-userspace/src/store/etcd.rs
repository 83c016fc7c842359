//! The etcd store, through etcd's v3 API. Entries are keys `<prefix>/services/<name>`;
//! revisions are etcd's own (`mod_revision`), compare-and-set is a transaction, and a watch
//! is an etcd watch from a revision. The client balances over every endpoint given, so a
//! member that dies is failed over.
use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    Entry, Event, Expect, Keyspace, Snapshot, Store, StoreError,
    access::Access,
    check_name,
    claims::{self, Claim, Claims, Held},
};
use crate::retry::Backoff;

/// Retries of a request while the cluster cannot be reached (see `EtcdStore::retrying`).
const RETRIES: u32 = 6;

pub struct EtcdStore {
    client: Client,
    /// `<prefix>/services/` (or another [`Keyspace`]'s directory)
    keys: String,
    prefix: String,
    /// `<prefix>/secret`
    secret_key: String,
    /// `<prefix>/claims/`
    claim_keys: String,
    endpoints: String,
}

/// Operations (and compares) etcd takes in one transaction: its `--max-txn-ops` default.
const MAX_TXN_OPS: usize = 128;

/// Reads and compare-and-sets a claiming write makes before giving up while others keep
/// changing what it reads.
const CLAIM_ATTEMPTS: u32 = 20;

/// A client for the cluster at `endpoints` (`http://` or `https://` URLs, balanced over
/// all of them), with lb's timeouts and keep-alive, over TLS to `https://` endpoints and
/// as `access`'s user if it names one: for the store and for the registry. With a user,
/// the client authenticates here, and again whenever etcd lets its token expire.
pub async fn connect_client(
    endpoints: &[String],
    access: &Access,
) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(2));
    if endpoints.iter().any(|e| e.starts_with("https://")) {
        options = options.with_tls(access.etcd_tls());
    }
    if let Some(user) = &access.etcd_user {
        options = options
            .with_user(&user.name, &user.password)
            .with_auto_token_refresh(true);
    }
    Client::connect(endpoints, Some(options)).await
}

/// Connects as [`connect_client`] does and reads `probe` (its count only), so that what
/// retrying cannot mend stops lb at start: a [`StoreError::Refused`] for a TLS failure or
/// credentials etcd refused. A cluster that cannot be reached is a
/// [`StoreError::Unavailable`] only when the client must authenticate first (a user);
/// otherwise the client is returned, and finds the cluster once it answers. `what` names
/// the cluster in errors.
pub async fn connect_checked(
    endpoints: &[String],
    access: &Access,
    probe: &str,
    what: &str,
) -> Result<Client, StoreError> {
    let client = connect_client(endpoints, access)
        .await
        .map_err(|e| match refusal(&e) {
            Some(why) => StoreError::Refused(format!("{what}: {why}")),
            None => StoreError::Unavailable(format!(
                "{what}: {e}{}",
                client_certificate_hint(endpoints, access, &e)
            )),
        })?;
    let answer = client
        .kv_client()
        .get(probe, Some(GetOptions::new().with_count_only()))
        .await;
    if let Err(e) = answer {
        match refusal(&e) {
            Some(why) => return Err(StoreError::Refused(format!("{what}: {why}"))),
            None => tracing::warn!("{what} does not answer yet: {e}"),
        }
    }
    Ok(client)
}

/// A hint for a TLS connection closed without a client certificate to show: a server that
/// wants one sends its alert after the handshake, and HTTP/2 may pass on no more than
/// "connection closed" (or, when our first write meets the closed socket, "broken pipe"),
/// which looks like a failing member.
fn client_certificate_hint(
    endpoints: &[String],
    access: &Access,
    e: &etcd_client::Error,
) -> &'static str {
    let tls = endpoints.iter().any(|e| e.starts_with("https://"));
    let text = e.to_string();
    let closed = ["connection closed", "fatal alert", "broken pipe"]
        .iter()
        .any(|sign| text.contains(sign));
    if tls && access.identity.is_none() && closed {
        " (a server that asks for a client certificate closes the connection like this: \
         give one with --store-cert-file and --store-key-file)"
    } else {
        ""
    }
}

/// Why `e` is one that retrying cannot mend, if it is: the server's certificate or ours
/// refused, a server that speaks no TLS, or etcd refusing the user, its password or its
/// permissions.
pub fn refusal(e: &etcd_client::Error) -> Option<String> {
    use tonic::Code;
    let tls = match e {
        etcd_client::Error::TransportError(t) => super::access::tls_failure(t),
        etcd_client::Error::GRpcStatus(s) => super::access::tls_failure(s),
        _ => None,
    };
    if let Some(tls) = tls {
        return Some(format!("TLS: {tls}"));
    }
    match e {
        // etcd answers a wrong password and a missing user with InvalidArgument, a user
        // given to a cluster without auth with FailedPrecondition.
        etcd_client::Error::GRpcStatus(s)
            if matches!(
                s.code(),
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::FailedPrecondition
            ) =>
        {
            Some(format!("refused: {}", s.message()))
        }
        _ => None,
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`) for the group `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, prefix, &Access::default()).await
    }

    /// Connects to the cluster at `endpoints` (`http://` or `https://`) for the group
    /// `prefix`, as `access` says, and checks that it answers.
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        access: &Access,
    ) -> Result<Self, StoreError> {
        check_name(prefix)?;
        let joined = endpoints.join(",");
        let secret_key = format!("{prefix}/secret");
        let client =
            connect_checked(endpoints, access, &secret_key, &format!("etcd at {joined}")).await?;
        Ok(Self {
            client,
            keys: format!("{prefix}/{}/", Keyspace::Services.dir()),
            prefix: prefix.to_string(),
            secret_key,
            claim_keys: format!("{prefix}/claims/"),
            endpoints: joined,
        })
    }

    /// Runs `f` again while the cluster cannot be reached, up to [`RETRIES`] times, backing
    /// off from 100 ms to 1 s (about 2.5 s in all): requests sent to a member that just died
    /// fail until the client's balancer stops picking it, which has taken over a second.
    /// Each failure is logged at once, naming the endpoints, so that an operator sees the
    /// store failing while lb still retries.
    async fn retrying<T, F, Fut>(&self, mut f: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut tries = 0;
        loop {
            match f().await {
                Err(
                    e @ (etcd_client::Error::TransportError(_) | etcd_client::Error::GRpcStatus(_)),
                ) if tries < RETRIES => {
                    tries += 1;
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        retry_in = ?delay,
                        "a request to the store (etcd at {}) failed, try {tries} of {RETRIES}: {e}",
                        self.endpoints
                    );
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// The same cluster and group, holding `keyspace`'s entries rather than services.
    pub fn in_keyspace(mut self, keyspace: Keyspace) -> Self {
        self.keys = format!("{}/{}/", self.prefix, keyspace.dir());
        self
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.keys)
    }

    fn unavailable(&self, e: etcd_client::Error) -> StoreError {
        StoreError::Unavailable(format!("etcd at {}: {e}", self.endpoints))
    }

    fn entry(&self, kv: &etcd_client::KeyValue) -> Option<Entry> {
        let name = kv.key_str().ok()?.strip_prefix(&self.keys)?.to_string();
        Some(Entry {
            name,
            value: kv.value().to_vec(),
            revision: kv.mod_revision() as u64,
        })
    }

    /// The compare for `expect` on `key`, if any.
    fn compare(key: &str, expect: Expect) -> Option<Compare> {
        match expect {
            Expect::Any => None,
            Expect::Absent => Some(Compare::create_revision(key, CompareOp::Equal, 0)),
            Expect::Revision(r) => Some(Compare::mod_revision(key, CompareOp::Equal, r as i64)),
        }
    }

    /// Runs `op` on `name` if `expect` holds; else a conflict naming what was found.
    async fn guarded(
        &self,
        name: &str,
        op: TxnOp,
        expect: Expect,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        check_name(name)?;
        let key = self.key(name);
        let txn = match Self::compare(&key, expect) {
            Some(c) => Txn::new()
                .when([c])
                .and_then([op])
                .or_else([TxnOp::get(key.as_str(), None)]),
            None => Txn::new().and_then([op]),
        };
        let resp = self
            .retrying(|| {
                let (mut kv, txn) = (self.client.kv_client(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(|e| self.unavailable(e))?;
        if resp.succeeded() {
            return Ok(resp);
        }
        let found = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.mod_revision() as u64)),
            _ => None,
        });
        Err(StoreError::Conflict {
            name: name.to_string(),
            expected: expect,
            found: found.flatten(),
        })
    }
}

/// Claims (see [`claims`]): the key `<prefix>/claims/<kind>/<id>` holds the name of the
/// service that has the claim. A claiming write reads the document and the claim keys, then
/// writes in one transaction that holds only if none of them changed meanwhile; when one
/// did, it reads again.
impl EtcdStore {
    fn claim_key(&self, claim: &Claim) -> String {
        format!("{}{}", self.claim_keys, claim.key())
    }

    async fn run_txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.retrying(|| {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(|e| self.unavailable(e))
    }

    /// The first key-value each `get` of `keys` found, in one read.
    async fn read_keys(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<etcd_client::KeyValue>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let gets: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
        let resp = self.run_txn(Txn::new().and_then(gets)).await?;
        Ok(resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            })
            .collect())
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
        let key = self.key(name);
        let wanted = claims.all();
        let mut keys = vec![key.clone()];
        keys.extend(wanted.iter().map(|c| self.claim_key(c)));
        for _ in 0..CLAIM_ATTEMPTS {
            let read = self.read_keys(&keys).await?;
            let doc = read[0].as_ref();
            let current = doc.map(|kv| kv.mod_revision() as u64);
            if !expect.holds(current) {
                // Written already, by an earlier try of this very request that seemed to
                // fail: what was asked for is done.
                if let (Some(v), Some(kv)) = (value, doc)
                    && kv.value() == v
                    && claims.hold.iter().all(|c| {
                        let i = wanted.iter().position(|w| *w == c).expect("listed") + 1;
                        read[i]
                            .as_ref()
                            .is_some_and(|h| h.value() == name.as_bytes())
                    })
                {
                    return Ok((kv.mod_revision() as u64, true));
                }
                return Err(StoreError::Conflict {
                    name: name.to_string(),
                    expected: expect,
                    found: current,
                });
            }
            let mut found = HashMap::new();
            let mut holders = Vec::new();
            for (claim, kv) in wanted.iter().zip(&read[1..]) {
                let Some(kv) = kv else { continue };
                let holder = String::from_utf8_lossy(kv.value()).into_owned();
                if holder != name && check_name(&holder).is_ok() {
                    holders.push(holder.clone());
                }
                found.insert(
                    claim.key().to_string(),
                    Held {
                        holder,
                        revision: kv.mod_revision() as u64,
                        holder_exists: true,
                    },
                );
            }
            // Claims of services whose document is gone are free.
            let holder_keys: Vec<String> = holders.iter().map(|h| self.key(h)).collect();
            let alive = self.read_keys(&holder_keys).await?;
            for held in found.values_mut() {
                if held.holder != name {
                    held.holder_exists = holders
                        .iter()
                        .zip(&alive)
                        .any(|(h, kv)| *h == held.holder && kv.is_some());
                }
            }
            let plan = claims::plan(name, claims, &found)?;
            let as_read = |k: &str, revision: u64| {
                if revision == 0 {
                    Compare::create_revision(k, CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(k, CompareOp::Equal, revision as i64)
                }
            };
            let mut compares = vec![as_read(&key, current.unwrap_or(0))];
            for (claim, revision) in &plan.unchanged {
                compares.push(as_read(&self.claim_key(claim), *revision));
            }
            for gone in &plan.gone {
                compares.push(Compare::create_revision(
                    self.key(gone),
                    CompareOp::Equal,
                    0,
                ));
            }
            let mut ops = vec![match value {
                Some(v) => TxnOp::put(key.as_str(), v, None),
                None => TxnOp::delete(key.as_str(), None),
            }];
            for claim in &plan.take {
                ops.push(TxnOp::put(self.claim_key(claim), name, None));
            }
            for (claim, _) in &plan.release {
                ops.push(TxnOp::delete(self.claim_key(claim), None));
            }
            let resp = self
                .run_txn(Txn::new().when(compares).and_then(ops))
                .await?;
            if resp.succeeded() {
                let revision = resp.header().map_or(0, |h| h.revision() as u64);
                return Ok((revision, current.is_some()));
            }
        }
        Err(StoreError::Unavailable(format!(
            "etcd at {}: {name} and its claims kept changing while being written",
            self.endpoints
        )))
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn list(&self) -> Result<Snapshot, StoreError> {
        let resp = self
            .retrying(|| {
                let (mut kv, keys) = (self.client.kv_client(), self.keys.clone());
                async move { kv.get(keys, Some(GetOptions::new().with_prefix())).await }
            })
            .await
            .map_err(|e| self.unavailable(e))?;
        let revision = resp.header().map_or(0, |h| h.revision() as u64);
        let mut entries: Vec<Entry> = resp.kvs().iter().filter_map(|kv| self.entry(kv)).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Snapshot { entries, revision })
    }

    async fn put(&self, name: &str, value: &[u8], expect: Expect) -> Result<u64, StoreError> {
        let resp = self
            .guarded(name, TxnOp::put(self.key(name), value, None), expect)
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision() as u64))
    }

    async fn secret(&self, proposal: &[u8]) -> Result<Vec<u8>, StoreError> {
        let key = self.secret_key.as_str();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, proposal, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .retrying(|| {
                let (mut kv, txn) = (self.client.kv_client(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(|e| self.unavailable(e))?;
        if resp.succeeded() {
            return Ok(proposal.to_vec());
        }
        resp.op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .ok_or_else(|| StoreError::Unavailable(format!("etcd: {key} vanished")))
    }

    async fn delete(&self, name: &str, expect: Expect) -> Result<bool, StoreError> {
        let resp = self
            .guarded(name, TxnOp::delete(self.key(name), None), expect)
            .await?;
        Ok(resp
            .op_responses()
            .into_iter()
            .any(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0)))
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
        let after = from.revision;
        let (client, keys, endpoints) = (
            self.client.clone(),
            self.keys.clone(),
            self.endpoints.clone(),
        );
        tokio::spawn(async move {
            let fail = |e: String| StoreError::Unavailable(format!("etcd at {endpoints}: {e}"));
            // Resumed from the next revision whenever the stream breaks (a member went
            // away: the client reconnects to another one); given up only after a while
            // without any member, or when etcd has compacted the revisions needed.
            let mut next = after as i64 + 1;
            let mut failures = 0u32;
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
            loop {
                let options = WatchOptions::new().with_prefix().with_start_revision(next);
                let mut stream = match client
                    .watch_client()
                    .watch(keys.as_str(), Some(options))
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        failures += 1;
                        if failures > 20 {
                            let _ = tx.send(Err(fail(e.to_string()))).await;
                            return;
                        }
                        tokio::select! {
                            () = backoff.wait() => {}
                            () = tx.closed() => return,
                        }
                        continue;
                    }
                };
                let broken = loop {
                    let message = tokio::select! {
                        m = stream.message() => m,
                        () = tx.closed() => return,
                    };
                    let resp = match message {
                        Ok(Some(resp)) => resp,
                        Ok(None) => break "the watch stream ended".to_string(),
                        Err(e) => break e.to_string(),
                    };
                    failures = 0;
                    backoff.reset();
                    if resp.canceled() {
                        let why = format!(
                            "the watch was cancelled ({}; compacted at {})",
                            resp.cancel_reason(),
                            resp.compact_revision()
                        );
                        let _ = tx.send(Err(fail(why))).await;
                        return;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        next = next.max(kv.mod_revision() + 1);
                        let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&keys))
                        else {
                            continue;
                        };
                        let event = match ev.event_type() {
                            EventType::Put => Event::Put(Entry {
                                name: name.to_string(),
                                value: kv.value().to_vec(),
                                revision: kv.mod_revision() as u64,
                            }),
                            EventType::Delete => Event::Deleted {
                                name: name.to_string(),
                                revision: kv.mod_revision() as u64,
                            },
                        };
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                };
                // A stream that breaks at once, again and again, must not spin.
                failures += 1;
                if failures > 20 {
                    let _ = tx.send(Err(fail(broken))).await;
                    return;
                }
                tokio::select! {
                    () = backoff.wait() => {}
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }
}
