//! The desired state (services by name) and the one place that changes it: validate,
//! check against the other services, apply to the data plane, then record.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::stats::{Counters, DropReason};
use serde::Serialize;

use crate::{
    dataplane::{Dataplane, DataplaneError},
    model::{Protocol, Service, ServiceSpec, ValidationError, validate_name},
    net::Neighbors,
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("no service named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

#[derive(Debug, Serialize)]
pub struct CounterView {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counters> for CounterView {
    fn from(c: Counters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub address: String,
    #[serde(flatten)]
    pub counters: CounterView,
}

/// `GET /v1/services/{name}`: the service as stored plus its counters.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub service: Service,
    pub counters: CounterView,
    pub backend_counters: Vec<BackendView>,
}

pub struct Controller {
    services: BTreeMap<String, Service>,
    /// (VIP, protocol) -> the service that has it.
    vips: HashMap<(SocketAddrV4, Protocol), String>,
    /// Backend address -> how many services use it (for next-hop upkeep).
    backend_users: HashMap<Ipv4Addr, usize>,
    dataplane: Dataplane,
    neighbors: Neighbors,
    /// While set, next hops of new backends are collected rather than resolved one
    /// service at a time (see `defer_neighbors`).
    deferred: Option<HashSet<Ipv4Addr>>,
}

fn ips(svc: &Service) -> HashSet<Ipv4Addr> {
    svc.backends.iter().map(|b| *b.ip()).collect()
}

impl Controller {
    pub fn new(dataplane: Dataplane) -> Self {
        Self {
            services: BTreeMap::new(),
            vips: HashMap::new(),
            backend_users: HashMap::new(),
            dataplane,
            neighbors: Neighbors::default(),
            deferred: None,
        }
    }

    /// Leaves the data plane attached and forwarding (maps, links and backends' next
    /// hops) when this is dropped, for the next daemon to take over.
    pub fn keep_on_exit(&mut self) {
        self.dataplane.keep_on_exit();
        self.neighbors.keep_on_exit();
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Validates `spec` as the new version of service `name`, against the other services.
    pub fn check(&self, name: &str, spec: ServiceSpec) -> Result<Service, ControlError> {
        let svc = spec.validate_after(name, self.services.get(name))?;
        if let Some(other) = self
            .vips
            .get(&(svc.vip, svc.protocol))
            .filter(|o| **o != svc.name)
        {
            return Err(ValidationError::new(
                "vip",
                format!(
                    "{} {:?} is already served by service {other:?}",
                    svc.vip, svc.protocol
                ),
            )
            .into());
        }
        Ok(svc)
    }

    /// From now until `resolve_deferred_neighbors`, new backends' next hops are collected
    /// and then resolved in one go: restoring thousands of services at start.
    pub fn defer_neighbors(&mut self) {
        self.deferred.get_or_insert_with(HashSet::new);
    }

    pub fn resolve_deferred_neighbors(&mut self) {
        if let Some(ips) = self.deferred.take() {
            self.neighbors.add(ips);
        }
    }

    /// Makes the data plane serve `svc` (already checked).
    pub fn apply(&mut self, svc: Service) -> Result<Service, ControlError> {
        let old = self.services.get(&svc.name).map(ips).unwrap_or_default();
        let new_ips = ips(&svc);
        let first_users: Vec<Ipv4Addr> = new_ips
            .iter()
            .filter(|ip| !old.contains(ip) && !self.backend_users.contains_key(ip))
            .copied()
            .collect();
        // Next hops first, so the first packet to a new backend finds its MAC address.
        match &mut self.deferred {
            Some(queue) => queue.extend(first_users.iter().copied()),
            None => self.neighbors.add(first_users.iter().copied()),
        }
        if let Err(e) = self.dataplane.upsert(&svc) {
            match &mut self.deferred {
                Some(queue) => queue.retain(|ip| !first_users.contains(ip)),
                None => self.neighbors.remove(first_users),
            }
            return Err(e.into());
        }
        for ip in new_ips.difference(&old) {
            *self.backend_users.entry(*ip).or_default() += 1;
        }
        self.release_backends(old.difference(&new_ips).copied().collect());
        if let Some(previous) = self.services.insert(svc.name.clone(), svc.clone()) {
            self.vips.remove(&(previous.vip, previous.protocol));
        }
        self.vips.insert((svc.vip, svc.protocol), svc.name.clone());
        Ok(svc)
    }

    /// Drops one use of each of `gone`; next hops no service needs any more are let go.
    fn release_backends(&mut self, gone: Vec<Ipv4Addr>) {
        let mut unused = Vec::new();
        for ip in gone {
            if let Some(n) = self.backend_users.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.backend_users.remove(&ip);
                    unused.push(ip);
                }
            }
        }
        if let Some(queue) = &mut self.deferred {
            queue.retain(|ip| !unused.contains(ip));
        }
        self.neighbors.remove(unused);
    }

    /// What a service occupies in the maps.
    pub fn installed(&self, name: &str) -> Option<&crate::dataplane::Installed> {
        self.dataplane.installed(name)
    }

    /// Kernel memory taken by the maps, in bytes.
    pub fn memory(&self) -> u64 {
        self.dataplane.map_memory().iter().map(|(_, b)| b).sum()
    }

    pub fn get_service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn delete(&mut self, name: &str) -> Result<(), ControlError> {
        validate_name(name)?;
        let Some(svc) = self.services.get(name).cloned() else {
            return Err(ControlError::NotFound(name.to_string()));
        };
        self.dataplane.remove(name)?;
        self.services.remove(name);
        self.vips.remove(&(svc.vip, svc.protocol));
        self.release_backends(ips(&svc).into_iter().collect());
        Ok(())
    }

    pub fn list(&self) -> Vec<Service> {
        self.services.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Result<ServiceView, ControlError> {
        let service = self
            .services
            .get(name)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?
            .clone();
        let (counters, backends) = self.dataplane.counters(name).unwrap_or_default();
        Ok(ServiceView {
            service,
            counters: counters.into(),
            backend_counters: backends
                .into_iter()
                .map(|(addr, c)| BackendView {
                    address: addr.to_string(),
                    counters: c.into(),
                })
                .collect(),
        })
    }

    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        self.dataplane.drops()
    }
}
