//! The desired state (services by name) and the one place that changes it: validate,
//! check against the other services, apply to the data plane, then record.
use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
};

use lb_common::stats::{Counters, DropReason};
use serde::Serialize;

use crate::{
    dataplane::{Dataplane, DataplaneError},
    model::{Service, ServiceSpec, ValidationError, validate_name},
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
    dataplane: Dataplane,
    neighbors: Neighbors,
}

fn backend_ips(services: &BTreeMap<String, Service>) -> HashSet<Ipv4Addr> {
    services
        .values()
        .flat_map(|s| s.backends.iter().map(|b| *b.ip()))
        .collect()
}

impl Controller {
    pub fn new(dataplane: Dataplane) -> Self {
        Self {
            services: BTreeMap::new(),
            dataplane,
            neighbors: Neighbors::default(),
        }
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Validates `spec` as the new version of service `name`, against the other services.
    pub fn check(&self, name: &str, spec: ServiceSpec) -> Result<Service, ControlError> {
        let svc = spec.validate_after(name, self.services.get(name))?;
        if let Some(other) = self
            .services
            .values()
            .find(|o| o.name != svc.name && o.vip == svc.vip && o.protocol == svc.protocol)
        {
            return Err(ValidationError::new(
                "vip",
                format!(
                    "{} {:?} is already served by service {:?}",
                    svc.vip, svc.protocol, other.name
                ),
            )
            .into());
        }
        Ok(svc)
    }

    /// Creates or replaces service `name`; nothing changes when it fails.
    pub fn put(&mut self, name: &str, spec: ServiceSpec) -> Result<Service, ControlError> {
        let svc = self.check(name, spec)?;
        self.apply(svc)
    }

    /// Makes the data plane serve `svc` (already checked).
    pub fn apply(&mut self, svc: Service) -> Result<Service, ControlError> {
        let before = backend_ips(&self.services);
        // Next hops first, so the first packet to a new backend finds its MAC address.
        self.neighbors.add(
            svc.backends
                .iter()
                .map(|b| *b.ip())
                .filter(|ip| !before.contains(ip)),
        );
        if let Err(e) = self.dataplane.upsert(&svc) {
            self.forget_unused_neighbors(&before);
            return Err(e.into());
        }
        self.services.insert(svc.name.clone(), svc.clone());
        self.forget_unused_neighbors(&before);
        Ok(svc)
    }

    /// Stops keeping next hops that no service uses any more.
    fn forget_unused_neighbors(&mut self, before: &HashSet<Ipv4Addr>) {
        let now = backend_ips(&self.services);
        let all: HashSet<Ipv4Addr> = before.union(&now).copied().collect();
        self.neighbors
            .remove(all.into_iter().filter(|ip| !now.contains(ip)));
    }

    pub fn get_service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn delete(&mut self, name: &str) -> Result<(), ControlError> {
        validate_name(name)?;
        if !self.services.contains_key(name) {
            return Err(ControlError::NotFound(name.to_string()));
        }
        let before = backend_ips(&self.services);
        self.dataplane.remove(name)?;
        self.services.remove(name);
        self.forget_unused_neighbors(&before);
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
