//! The store is the source of truth; this is how it reaches the data plane.
//!
//! API writes go to the store first (compare-and-set against the revision this node last
//! applied), then to the maps, so the call returns once packets are balanced the new way.
//! A watch applies every change made anywhere (this node's own come back and are skipped by
//! revision), so several nodes on one store converge without calling each other. At start
//! every stored service is restored before the node reports ready; an entry that does not
//! parse or validate is skipped with an error naming its key. A service whose backends
//! come from discovery is stored without them: each node follows the source itself.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    controller::{ControlError, Controller},
    discovery::{Instances, Sources},
    model::{Discovery, DiscoverySpec, Service, ServiceSpec, ValidationError},
    owner::{ControllerHandle, Stopped},
    retry::Backoff,
    store::{
        Entry, Event, Expect, Store, StoreError,
        claims::{Claims, claims_of},
        document::StoredService,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    controller: ControllerHandle,
    /// The store revision each applied service was written at.
    revisions: Mutex<HashMap<String, u64>>,
    /// Services this node deleted (or whose write it undid), with the revision it had: the
    /// watch may still deliver that write afterwards, and must not bring the service back.
    /// Forgotten when the store's deletion comes through the watch.
    deleted: Mutex<HashMap<String, u64>>,
    /// One API write at a time on this node, from check to apply.
    writes: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    sources: Sources,
    /// The discovery watch each discovered service is followed by.
    followers: Mutex<HashMap<String, (Discovery, tokio::task::JoinHandle<()>)>>,
    /// Reloads asked for (DFP's `reload`): the watch is left and the store listed again.
    reloads_asked: AtomicU64,
    reload: tokio::sync::Notify,
    /// The reloads asked for before the last complete listing began.
    reloads_done: tokio::sync::watch::Sender<u64>,
    me: Weak<Self>,
}

/// What a discovery source lists for a service, and the watch to follow it by.
#[derive(Default)]
struct Discovered {
    found: Option<Vec<SocketAddrV4>>,
    watch: Option<(Discovery, Instances)>,
}

/// A stored service ready to apply: at `revision`, followed by `watch` if discovered.
struct Restored {
    service: Service,
    revision: u64,
    watch: Option<(Discovery, Instances)>,
}

/// Services a restore applies in one command to the controller.
const RESTORE_BATCH: usize = 256;

/// How long a new discovery source gets to list its instances before the service is
/// applied without any (they are added when the source answers).
const FIRST_ANSWER: Duration = Duration::from_secs(3);

/// How long a store watch must have run for its end to count as a new fault rather than
/// the same one again: the wait before listing again starts over from its least.
const WATCH_SETTLED: Duration = Duration::from_secs(10);

impl Reconciler {
    pub fn new(store: Arc<dyn Store>, controller: ControllerHandle, sources: Sources) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            store,
            controller,
            revisions: Mutex::new(HashMap::new()),
            deleted: Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            sources,
            followers: Mutex::new(HashMap::new()),
            reloads_asked: AtomicU64::new(0),
            reload: tokio::sync::Notify::new(),
            reloads_done: tokio::sync::watch::Sender::new(0),
            me: me.clone(),
        })
    }

    pub fn controller(&self) -> &ControllerHandle {
        &self.controller
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Lists the store again and applies what it holds, as at start; returns once a
    /// listing begun after the call is applied. Waits as long as the store cannot be
    /// listed: the caller bounds it.
    pub async fn reload(&self) {
        let ticket = self.reloads_asked.fetch_add(1, Ordering::AcqRel) + 1;
        let mut done = self.reloads_done.subscribe();
        self.reload.notify_one();
        let _ = done.wait_for(|&served| served >= ticket).await;
    }

    fn revision_of(&self, name: &str) -> Option<u64> {
        self.revisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
    }

    /// Whether this node deleted `name` after applying `revision` (or a later one).
    fn deleted_since(&self, name: &str, revision: u64) -> bool {
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .is_some_and(|&r| r >= revision)
    }

    /// This node deleted `name`, which it had at `revision`: the watch may still bring
    /// writes up to it.
    fn set_deleted(&self, name: &str, revision: u64) {
        let mut d = self
            .deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = d.entry(name.to_string()).or_insert(revision);
        *known = (*known).max(revision);
    }

    /// The store's deletion of `name` at `revision` came through the watch: writes before
    /// it will not come again.
    fn forget_deleted(&self, name: &str, revision: u64) {
        let mut d = self
            .deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.get(name).is_some_and(|&r| r < revision) {
            d.remove(name);
        }
    }

    fn set_revision(&self, name: &str, revision: Option<u64>) {
        let mut r = self
            .revisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match revision {
            Some(rev) => r.insert(name.to_string(), rev),
            None => r.remove(name),
        };
    }

    fn followers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Discovery, tokio::task::JoinHandle<()>)>> {
        self.followers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For a service that names discovery source `wanted`: the instances it lists now, and
    /// the watch to follow it by (none when the service already follows it).
    async fn discover(
        &self,
        name: &str,
        wanted: Option<&Discovery>,
    ) -> Result<Discovered, ValidationError> {
        let Some(wanted) = wanted.cloned() else {
            return Ok(Discovered::default());
        };
        let followed = self
            .followers()
            .get(name)
            .is_some_and(|(d, task)| *d == wanted && !task.is_finished());
        if followed {
            let owned = name.to_string();
            let current = self
                .controller
                .call(move |c| c.get_service(&owned).map(|s| s.backends.clone()))
                .await;
            return Ok(Discovered {
                found: Some(current.ok().flatten().unwrap_or_default()),
                watch: None,
            });
        }
        let mut watch = self.sources.watch(&wanted)?;
        let found = match tokio::time::timeout(FIRST_ANSWER, watch.recv()).await {
            Ok(Some(Ok(found))) => found,
            Ok(Some(Err(e))) => {
                tracing::warn!(
                    service = name,
                    "discovery: {e}; no backends until it answers"
                );
                Vec::new()
            }
            _ => {
                tracing::warn!(service = name, source = ?wanted, "discovery did not answer within {FIRST_ANSWER:?}; no backends until it does");
                Vec::new()
            }
        };
        Ok(Discovered {
            found: Some(found),
            watch: Some((wanted, watch)),
        })
    }

    /// After `svc` is applied: follows its discovery source with `watch`, or stops
    /// following one it no longer names.
    fn follow(&self, svc: &Service, watch: Option<(Discovery, Instances)>) {
        if svc.discovery.is_none() {
            self.unfollow(&svc.name);
            return;
        }
        let Some((source, mut instances)) = watch else {
            return;
        };
        let (me, name, followed) = (self.me.clone(), svc.name.clone(), source.clone());
        let task = tokio::spawn(async move {
            while let Some(update) = instances.recv().await {
                let Some(this) = me.upgrade() else { return };
                match update {
                    Ok(found) => this.rediscovered(&name, &followed, found).await,
                    Err(e) => tracing::warn!(service = %name, "discovery: {e}"),
                }
            }
        });
        if let Some((_, old)) = self.followers().insert(svc.name.clone(), (source, task)) {
            old.abort();
        }
    }

    fn unfollow(&self, name: &str) {
        if let Some((_, task)) = self.followers().remove(name) {
            task.abort();
        }
    }

    /// The source of `name` lists `found` now: its backends become those.
    async fn rediscovered(&self, name: &str, source: &Discovery, found: Vec<SocketAddrV4>) {
        let _one = self.writes.lock().await;
        let (owned, source) = (name.to_string(), source.clone());
        let applied = self
            .controller
            .call(move |c| {
                let current = c.get_service(&owned)?.clone();
                if current.discovery.as_ref() != Some(&source) {
                    return None;
                }
                let found = c.admit_instances(&current, crate::model::discovered_backends(found));
                if current.backends == found {
                    return None;
                }
                Some(
                    current
                        .with_discovered(found)
                        .checked()
                        .map_err(ControlError::from)
                        .and_then(|svc| c.apply(svc)),
                )
            })
            .await;
        match applied {
            Ok(None) => {}
            Ok(Some(Ok(svc))) => {
                tracing::info!(service = name, backends = ?svc.backends, "discovery changed the backends");
            }
            Ok(Some(Err(e))) => {
                tracing::error!(service = name, "applying discovered backends: {e}");
            }
            Err(e) => tracing::error!(service = name, "applying discovered backends: {e}"),
        }
    }

    /// Checks several services meant to be written together (DFP's destinations of one
    /// service) as `put` would, against the others and each other, writing nothing;
    /// `replaced` are the services the change rewrites or removes. The first refused
    /// comes back with its place in `group`.
    pub async fn check_group(
        &self,
        group: Vec<(String, ServiceSpec)>,
        replaced: Vec<String>,
    ) -> Result<(), (usize, ReconcileError)> {
        for (i, (name, spec)) in group.iter().enumerate() {
            let valid = crate::model::validate_name(name).map_err(ControlError::from);
            let discovery = spec
                .discovery
                .as_ref()
                .map(DiscoverySpec::validate)
                .transpose();
            valid
                .map_err(ReconcileError::from)
                .and(discovery.map_err(ReconcileError::from))
                .map_err(|e| (i, e))?;
        }
        let last = group.len().saturating_sub(1);
        self.controller
            .call(move |c| c.check_group(group, &replaced).map(drop))
            .await
            .map_err(|e| (last, e.into()))?
            .map_err(|(i, e)| (i, e.into()))
    }

    /// `PUT`: store, then maps. Nothing changes when it fails.
    pub async fn put(&self, name: &str, mut spec: ServiceSpec) -> Result<Service, ReconcileError> {
        let _one = self.writes.lock().await;
        crate::model::validate_name(name).map_err(ControlError::from)?;
        let wanted = spec
            .discovery
            .as_ref()
            .map(DiscoverySpec::validate)
            .transpose()?;
        let Discovered { found, watch } = self.discover(name, wanted.as_ref()).await?;
        spec.discovered = found;
        let owned = name.to_string();
        let (svc, previous) = self
            .controller
            .call(move |c| {
                let svc = c.check(&owned, spec)?;
                Ok::<_, ControlError>((svc, c.get_service(&owned).cloned()))
            })
            .await??;
        let expect = self
            .revision_of(name)
            .map_or(Expect::Absent, Expect::Revision);
        let doc = StoredService::of(&svc).to_bytes();
        // The VIP or routes, claimed for the whole group in the same write: another node may
        // be giving them to another service right now.
        let claims = Claims {
            hold: claims_of(&svc),
            previous: previous.as_ref().map(claims_of).unwrap_or_default(),
        };
        let revision = self.store.put_claiming(name, &doc, expect, &claims).await?;
        let (applied, next_hops) = self
            .controller
            .call(move |c| (c.apply(svc), c.next_hops_done()))
            .await?;
        match applied {
            Ok(svc) => {
                // Answered once the new backends' next hops are in, as the maps are.
                next_hops.wait().await;
                self.set_revision(name, Some(revision));
                self.follow(&svc, watch);
                Ok(svc)
            }
            Err(e) => {
                // The maps refused (a full map): put the store back as it was.
                let undo = match &previous {
                    Some(p) => self
                        .store
                        .put_claiming(
                            name,
                            &StoredService::of(p).to_bytes(),
                            Expect::Revision(revision),
                            &Claims {
                                hold: claims.previous.clone(),
                                previous: claims.hold.clone(),
                            },
                        )
                        .await
                        .map(Some),
                    None => self
                        .store
                        .delete_claiming(name, Expect::Revision(revision), &claims.hold)
                        .await
                        .map(|_| None),
                };
                if previous.is_none() {
                    self.set_deleted(name, revision);
                }
                match undo {
                    Ok(rev) => self.set_revision(name, rev.or(self.revision_of(name))),
                    Err(u) => {
                        tracing::error!(service = name, error = %u, "could not undo a store write the maps refused");
                    }
                }
                Err(e.into())
            }
        }
    }

    /// `DELETE`: store, then maps.
    pub async fn delete(&self, name: &str) -> Result<(), ReconcileError> {
        let _one = self.writes.lock().await;
        crate::model::validate_name(name).map_err(ControlError::from)?;
        let Some(revision) = self.revision_of(name) else {
            return Err(ControlError::NotFound(name.to_string()).into());
        };
        let owned = name.to_string();
        let claims = self
            .controller
            .call(move |c| c.get_service(&owned).map(claims_of))
            .await?
            .unwrap_or_default();
        self.store
            .delete_claiming(name, Expect::Revision(revision), &claims)
            .await?;
        let owned = name.to_string();
        self.controller.call(move |c| c.delete(&owned)).await??;
        self.set_deleted(name, revision);
        self.set_revision(name, None);
        self.unfollow(name);
        Ok(())
    }

    /// Applies one stored entry, unless this node already has it at that revision or later.
    async fn apply_entry(&self, entry: &Entry) {
        if let Some(ready) = self.prepare(entry).await {
            self.commit(vec![ready]).await;
        }
    }

    /// A stored entry read into the service it describes (with its discovered backends),
    /// unless this node has it at that revision or later; one that cannot be used is
    /// skipped with an error naming its key.
    async fn prepare(&self, entry: &Entry) -> Option<Restored> {
        if self
            .revision_of(&entry.name)
            .is_some_and(|r| r >= entry.revision)
            || self.deleted_since(&entry.name, entry.revision)
        {
            return None;
        }
        let skip = |e: &dyn std::fmt::Display| {
            tracing::error!(key = %entry.name, revision = entry.revision, "skipping a stored service: {e}");
        };
        let doc = match StoredService::parse(&entry.value) {
            Ok(doc) => doc,
            Err(e) => {
                skip(&e);
                return None;
            }
        };
        let Discovered { found, watch } =
            match self.discover(&entry.name, doc.discovery.as_ref()).await {
                Ok(d) => d,
                Err(e) => {
                    skip(&e);
                    return None;
                }
            };
        match doc.into_service(&entry.name, found) {
            Ok(service) => Some(Restored {
                service,
                revision: entry.revision,
                watch,
            }),
            Err(e) => {
                skip(&e);
                None
            }
        }
    }

    /// Applies `batch` in one command to the controller (a restore of thousands of
    /// services pays one round trip per batch, not per service).
    async fn commit(&self, batch: Vec<Restored>) {
        if batch.is_empty() {
            return;
        }
        let mut watches = Vec::with_capacity(batch.len());
        let mut services = Vec::with_capacity(batch.len());
        for r in batch {
            watches.push((r.revision, r.watch));
            services.push(r.service);
        }
        let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
        let applied = self
            .controller
            .call(move |c| {
                services
                    .into_iter()
                    .map(|svc| {
                        let svc = c.admit(svc)?;
                        c.apply(svc)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        let results: Vec<Result<Service, ReconcileError>> = match applied {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(ReconcileError::from))
                .collect(),
            Err(stopped) => names.iter().map(|_| Err(stopped.into())).collect(),
        };
        for ((name, (revision, watch)), result) in names.iter().zip(watches).zip(results) {
            match result {
                Ok(svc) => {
                    self.set_revision(name, Some(revision));
                    self.follow(&svc, watch);
                }
                Err(e) => {
                    tracing::error!(key = %name, revision, "skipping a stored service: {e}");
                }
            }
        }
    }

    /// Applies a change from the store's watch; one at a time with this node's own writes,
    /// which set the revision they wrote before the watch looks at it.
    async fn apply_event(&self, event: &Event) {
        let _one = self.writes.lock().await;
        match event {
            Event::Put(entry) => self.apply_entry(entry).await,
            Event::Deleted { name, revision } => {
                self.forget_deleted(name, *revision);
                if self.revision_of(name).is_some_and(|r| r < *revision) {
                    let owned = name.clone();
                    let deleted = self.controller.call(move |c| c.delete(&owned)).await;
                    if let Err(e) = deleted
                        .map_err(ReconcileError::from)
                        .and_then(|d| d.map_err(ReconcileError::from))
                    {
                        tracing::error!(key = %name, "removing a service deleted from the store: {e}");
                    }
                    self.set_revision(name, None);
                    self.unfollow(name);
                }
            }
        }
    }

    /// Lists the store (retrying with backoff while it cannot be reached), restores every
    /// service, reports ready, then follows the store's changes for as long as it runs.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let reloads = self.reloads_asked.load(Ordering::Acquire);
            let snapshot = match self.store.list().await {
                Ok(s) => s,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot list the store");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            // A stopped controller is reported by whoever calls it next.
            let _ = self.controller.call(Controller::defer_neighbors).await;
            let mut batch = Vec::new();
            for entry in &snapshot.entries {
                batch.extend(self.prepare(entry).await);
                if batch.len() == RESTORE_BATCH {
                    self.commit(std::mem::take(&mut batch)).await;
                }
            }
            self.commit(batch).await;
            let next_hops = self
                .controller
                .call(|c| {
                    c.resolve_deferred_neighbors();
                    c.next_hops_done()
                })
                .await;
            if let Ok(next_hops) = next_hops {
                next_hops.wait().await;
            }
            // Services this node has that the store no longer has (deleted while the
            // watch was down).
            let gone: Vec<String> = {
                let r = self
                    .revisions
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                r.keys()
                    .filter(|n| !snapshot.entries.iter().any(|e| &e.name == *n))
                    .cloned()
                    .collect()
            };
            for name in gone {
                self.apply_event(&Event::Deleted {
                    name,
                    revision: u64::MAX,
                })
                .await;
            }
            // What an earlier daemon left in the maps and the store no longer has.
            let finished = self
                .controller
                .call(|c| c.dataplane().finish_adoption())
                .await;
            if let Ok(Err(e)) = finished {
                tracing::error!(error = %e, "removing adopted services the store does not have");
            }
            if !self.ready.swap(true, Ordering::AcqRel) {
                tracing::info!(
                    services = snapshot.entries.len(),
                    revision = snapshot.revision,
                    "restored from the store; ready"
                );
            }
            self.reloads_done.send_replace(reloads);
            let watched = tokio::time::Instant::now();
            let mut watch = self.store.watch(&snapshot);
            let mut why = "the watch stopped".to_string();
            loop {
                let event = tokio::select! {
                    event = watch.recv() => event,
                    () = self.reload.notified() => {
                        why = String::new();
                        break;
                    }
                };
                match event {
                    Some(Ok(event)) => self.apply_event(&event).await,
                    Some(Err(e)) => {
                        why = e.to_string();
                        break;
                    }
                    None => break,
                }
            }
            if why.is_empty() {
                tracing::info!("reload asked: listing the store again");
                continue;
            }
            // Listed again after a wait that grows while watches keep failing soon after
            // they start (a log that does not parse, a store that accepts the watch and
            // drops it), so that a lasting fault costs no spinning.
            if watched.elapsed() >= WATCH_SETTLED {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %why, retry_in = ?delay, "the store's watch ended; listing again");
            tokio::time::sleep(delay).await;
        }
    }
}

impl From<ValidationError> for ReconcileError {
    fn from(e: ValidationError) -> Self {
        ReconcileError::Control(e.into())
    }
}
