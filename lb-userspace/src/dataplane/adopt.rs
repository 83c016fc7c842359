//! Taking over the maps an earlier daemon left pinned. Tracked flows name services and
//! backends by id, so the ids, table runs and generations found in the maps are kept: a
//! service restored from the store takes over its entry as it stands (rewriting only the
//! slots that differ), and entries no stored service claims are removed afterwards.
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::maps::MapError;
use lb_common::service::{ServiceInfo, ServiceKey};

use super::{Dataplane, DataplaneError, Installed, Limits, ids::IdAllocator};

/// Why an adopted service cannot be trusted.
#[derive(Debug, thiserror::Error)]
enum Untrusted {
    #[error("service id {0} is out of range or taken")]
    ServiceId(u32),
    #[error("table run ends at {0}, past the slot array")]
    PastSlots(u64),
    #[error("backend id {0} is out of range or taken")]
    BackendId(u32),
    #[error("backend {id}: {source}")]
    Backend { id: u32, source: MapError },
    #[error("its table names inactive backend {0}")]
    Inactive(u32),
    #[error("its table run overlaps another")]
    Overlap,
}

impl Dataplane {
    /// Reads the services, tables and backends in adopted maps into `self.adopted`, and
    /// marks their ids and slots as taken.
    pub(super) fn read_adopted(&mut self, limits: &Limits) -> Result<(), DataplaneError> {
        // Every backend id's generation, also of ids free now: a flow tracked to a retired
        // backend must never match the id's next holder.
        for id in 1..=limits.max_backends {
            if let Ok(b) = self.backends.get(&id, 0) {
                self.generations[id as usize] = b.generation;
            }
        }
        let entries: Vec<(ServiceKey, ServiceInfo)> =
            self.services.iter().filter_map(Result::ok).collect();
        let (mut service_ids, mut backend_ids) = (HashSet::new(), HashSet::new());
        let mut bad = Vec::new();
        for (key, info) in entries {
            match self.read_service(key, info, limits, &service_ids, &backend_ids) {
                Ok(inst) => {
                    service_ids.insert(inst.id);
                    backend_ids.extend(inst.backends.iter().map(|&(_, id)| id));
                    self.adopted.insert(key, inst);
                }
                Err(why) => bad.push((key, why)),
            }
        }
        let mut slots: Vec<u32> = Vec::new();
        for (key, why) in bad {
            // Nothing can be trusted about it: its traffic goes to the kernel until a
            // stored service claims the address again.
            tracing::warn!(vip = %service_addr(&key), proto = key.proto, "dropping an adopted service: {why}");
            self.services.remove(&key)?;
            // Its filter slot may name it: written again below.
            slots.push(key.filter_slot());
        }
        self.service_ids = IdAllocator::adopting(limits.max_services + 1, &service_ids);
        self.backend_ids = IdAllocator::adopting(limits.max_backends + 1, &backend_ids);
        let mut keys: HashMap<u32, Vec<ServiceKey>> = HashMap::new();
        for key in self.adopted.keys() {
            keys.entry(key.filter_slot()).or_default().push(*key);
        }
        self.filter_keys = keys;
        slots.extend(self.filter_keys.keys());
        for slot in slots {
            self.publish_filter_slot(slot)?;
        }
        tracing::info!(
            services = self.adopted.len(),
            backends = backend_ids.len(),
            "adopted the pinned maps"
        );
        Ok(())
    }

    /// One adopted service as `Installed`, after checking that it is consistent and does
    /// not collide with the ones read before it.
    fn read_service(
        &mut self,
        key: ServiceKey,
        info: ServiceInfo,
        limits: &Limits,
        service_ids: &HashSet<u32>,
        backend_ids: &HashSet<u32>,
    ) -> Result<Installed, Untrusted> {
        if info.id == 0 || info.id > limits.max_services || service_ids.contains(&info.id) {
            return Err(Untrusted::ServiceId(info.id));
        }
        let end = info.table_offset as u64 + info.table_size as u64;
        if end > limits.maglev_slots as u64 {
            return Err(Untrusted::PastSlots(end));
        }
        let table: Vec<u32> = (0..info.table_size)
            .map(|i| self.maglev.get(info.table_offset + i))
            .collect();
        let mut backends: Vec<(SocketAddrV4, u32)> = Vec::new();
        for &id in &table {
            // 0: a slot no healthy backend had.
            if id == 0 || backends.iter().any(|&(_, b)| b == id) {
                continue;
            }
            if id == 0 || id > limits.max_backends || backend_ids.contains(&id) {
                return Err(Untrusted::BackendId(id));
            }
            let b = self
                .backends
                .get(&id, 0)
                .map_err(|source| Untrusted::Backend { id, source })?;
            if !b.is_active() {
                return Err(Untrusted::Inactive(id));
            }
            backends.push((SocketAddrV4::new(Ipv4Addr::from(b.addr), b.port), id));
        }
        if !self.slots.reserve(info.table_offset, info.table_size) {
            return Err(Untrusted::Overlap);
        }
        Ok(Installed {
            key,
            id: info.id,
            table_offset: info.table_offset,
            table_size: info.table_size,
            backends,
            table,
            full_table: Vec::new(),
            weights: Default::default(),
            // What drained before the restart is not known: it ends when its id is reused.
            draining: Vec::new(),
            on_down: Default::default(),
        })
    }

    /// The adopted entry for `key`, claimed by a service being applied.
    pub(super) fn claim_adopted(&mut self, key: &ServiceKey) -> Option<Installed> {
        self.adopted.remove(key)
    }

    /// Removes `inst` (not in `installed`) from the maps: entry first, then what it held.
    pub(super) fn remove_unclaimed(&mut self, inst: Installed) -> Result<(), DataplaneError> {
        self.filter_add(&inst.key, -1)?;
        self.services.remove(&inst.key)?;
        for &(_, bid) in &inst.backends {
            self.retire_backend(bid)?;
        }
        self.slots.release(inst.table_offset, inst.table_size);
        self.service_ids.release(inst.id);
        Ok(())
    }

    /// Removes the adopted services no stored service claimed (deleted while no daemon
    /// ran); called once every stored service is restored. How many there were.
    pub fn finish_adoption(&mut self) -> Result<usize, DataplaneError> {
        let unclaimed: Vec<Installed> = self.adopted.drain().map(|(_, i)| i).collect();
        let n = unclaimed.len();
        for inst in unclaimed {
            tracing::info!(vip = %service_addr(&inst.key), "removing an adopted service the store no longer has");
            self.remove_unclaimed(inst)?;
        }
        Ok(n)
    }
}

fn service_addr(key: &ServiceKey) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(key.addr), key.port)
}
