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
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    controller::{ControlError, Controller},
    discovery::{Instances, Sources},
    model::{
        Check, CheckSpec, Discovery, DiscoverySpec, HttpRoute, HttpSpec, Service, ServiceSpec,
        ValidationError,
    },
    owner::{ControllerHandle, Stopped},
    retry::Backoff,
    store::{Entry, Event, Expect, Store, StoreError},
};

/// The stored form of a service: its whole spec, with a schema version.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredService {
    pub schema: u32,
    /// None for an HTTP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    pub protocol: String,
    /// Empty when `discovery` names where they come from.
    pub backends: Vec<String>,
    #[serde(default)]
    pub table_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRoute>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

pub const SCHEMA: u32 = 1;

impl StoredService {
    pub fn of(svc: &Service) -> Self {
        let discovered = svc.discovery.is_some();
        Self {
            schema: SCHEMA,
            vip: svc.vip.map(|v| v.to_string()),
            protocol: format!("{:?}", svc.protocol).to_lowercase(),
            backends: if discovered {
                Vec::new()
            } else {
                svc.backends.iter().map(ToString::to_string).collect()
            },
            table_size: if discovered { 0 } else { svc.table_size },
            discovery: svc.discovery.clone(),
            http: svc.http.clone(),
            check: Some(svc.check.clone()),
        }
    }

    /// Parses and validates a stored entry.
    pub fn parse(entry: &Entry) -> Result<ServiceSpec, String> {
        let doc: StoredService = serde_json::from_slice(&entry.value)
            .map_err(|e| format!("not a service document: {e}"))?;
        if doc.schema != SCHEMA {
            return Err(format!("schema {} (this lb reads {SCHEMA})", doc.schema));
        }
        let discovered = doc.discovery.is_some();
        Ok(ServiceSpec {
            vip: doc.vip,
            protocol: Some(doc.protocol),
            backends: (!discovered).then_some(doc.backends),
            table_size: (!discovered && doc.http.is_none()).then_some(doc.table_size),
            discovery: doc.discovery.as_ref().map(DiscoverySpec::from),
            discovered: None,
            http: doc.http.as_ref().map(HttpSpec::from),
            check: doc.check.as_ref().map(CheckSpec::from),
        })
    }
}

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
    /// One API write at a time on this node, from check to apply.
    writes: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    sources: Sources,
    /// The discovery watch each discovered service is followed by.
    followers: Mutex<HashMap<String, (Discovery, tokio::task::JoinHandle<()>)>>,
    me: Weak<Self>,
}

/// How long a new discovery source gets to list its instances before the service is
/// applied without any (they are added when the source answers).
const FIRST_ANSWER: Duration = Duration::from_secs(3);

impl Reconciler {
    pub fn new(store: Arc<dyn Store>, controller: ControllerHandle, sources: Sources) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            store,
            controller,
            revisions: Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            sources,
            followers: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    pub fn controller(&self) -> &ControllerHandle {
        &self.controller
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn revision_of(&self, name: &str) -> Option<u64> {
        self.revisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
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

    /// For a spec that names a discovery source: fills in the instances it lists now, and
    /// returns the watch to follow it by (none when the service already follows it).
    async fn discover(
        &self,
        name: &str,
        spec: &mut ServiceSpec,
    ) -> Result<Option<(Discovery, Instances)>, ValidationError> {
        let Some(wanted) = spec
            .discovery
            .as_ref()
            .map(DiscoverySpec::validate)
            .transpose()?
        else {
            return Ok(None);
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
            spec.discovered = Some(current.ok().flatten().unwrap_or_default());
            return Ok(None);
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
        spec.discovered = Some(found);
        Ok(Some((wanted, watch)))
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
                if current.discovery.as_ref() != Some(&source) || current.backends == found {
                    return None;
                }
                let spec = ServiceSpec {
                    discovered: Some(found),
                    ..ServiceSpec::from(&current)
                };
                Some(c.check(&owned, spec).and_then(|svc| c.apply(svc)))
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

    /// `PUT`: store, then maps. Nothing changes when it fails.
    pub async fn put(&self, name: &str, mut spec: ServiceSpec) -> Result<Service, ReconcileError> {
        let _one = self.writes.lock().await;
        crate::model::validate_name(name).map_err(ControlError::from)?;
        let watch = self.discover(name, &mut spec).await?;
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
        let doc = serde_json::to_vec(&StoredService::of(&svc)).expect("serialisable");
        let revision = self.store.put(name, &doc, expect).await?;
        let applied = self.controller.call(move |c| c.apply(svc)).await?;
        match applied {
            Ok(svc) => {
                self.set_revision(name, Some(revision));
                self.follow(&svc, watch);
                Ok(svc)
            }
            Err(e) => {
                // The maps refused (a full map): put the store back as it was.
                let undo = match &previous {
                    Some(p) => self
                        .store
                        .put(
                            name,
                            &serde_json::to_vec(&StoredService::of(p)).expect("serialisable"),
                            Expect::Revision(revision),
                        )
                        .await
                        .map(Some),
                    None => self
                        .store
                        .delete(name, Expect::Revision(revision))
                        .await
                        .map(|_| None),
                };
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
        self.store.delete(name, Expect::Revision(revision)).await?;
        let owned = name.to_string();
        self.controller.call(move |c| c.delete(&owned)).await??;
        self.set_revision(name, None);
        self.unfollow(name);
        Ok(())
    }

    /// Applies one stored entry, unless this node already has it at that revision or later.
    async fn apply_entry(&self, entry: &Entry) {
        if self
            .revision_of(&entry.name)
            .is_some_and(|r| r >= entry.revision)
        {
            return;
        }
        let mut spec = match StoredService::parse(entry) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::error!(key = %entry.name, revision = entry.revision, "skipping a stored service: {e}");
                return;
            }
        };
        let watch = match self.discover(&entry.name, &mut spec).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(key = %entry.name, revision = entry.revision, "skipping a stored service: {e}");
                return;
            }
        };
        let name = entry.name.clone();
        let result = self
            .controller
            .call(move |c| c.check(&name, spec).and_then(|svc| c.apply(svc)))
            .await
            .map_err(ReconcileError::from)
            .and_then(|applied| applied.map_err(ReconcileError::from));
        match result {
            Ok(svc) => {
                self.set_revision(&entry.name, Some(entry.revision));
                self.follow(&svc, watch);
            }
            Err(e) => {
                tracing::error!(key = %entry.name, revision = entry.revision, "skipping a stored service: {e}");
            }
        }
    }

    async fn apply_event(&self, event: &Event) {
        match event {
            Event::Put(entry) => self.apply_entry(entry).await,
            Event::Deleted { name, revision } => {
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
            let snapshot = match self.store.list().await {
                Ok(s) => s,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot list the store");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            backoff.reset();
            // A stopped controller is reported by whoever calls it next.
            let _ = self.controller.call(Controller::defer_neighbors).await;
            for entry in &snapshot.entries {
                self.apply_entry(entry).await;
            }
            let _ = self
                .controller
                .call(Controller::resolve_deferred_neighbors)
                .await;
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
            let mut watch = self.store.watch(&snapshot);
            while let Some(event) = watch.recv().await {
                match event {
                    Ok(event) => self.apply_event(&event).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "the store's watch ended; listing again");
                        break;
                    }
                }
            }
        }
    }
}

impl From<ValidationError> for ReconcileError {
    fn from(e: ValidationError) -> Self {
        ReconcileError::Control(e.into())
    }
}
