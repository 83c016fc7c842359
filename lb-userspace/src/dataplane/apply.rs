//! Applying a service to the maps. Make before break: new backends and table slots are
//! written before the service entry points at them, and old ones are retired only after
//! it no longer does; on removal the service entry goes first.
use std::net::SocketAddrV4;

use lb_common::{
    config::NextHop,
    maglev,
    service::{BACKEND_ACTIVE, Backend, ServiceInfo, ServiceKey},
    stats::Counters,
};

use super::{Dataplane, DataplaneError};
use crate::model::Service;

/// What a service occupies in the maps.
#[derive(Debug, Clone)]
pub struct Installed {
    pub key: ServiceKey,
    pub id: u32,
    pub table_offset: u32,
    pub table_size: u32,
    /// Each backend and its backend id.
    pub backends: Vec<(SocketAddrV4, u32)>,
    /// The table as written: backend id per slot.
    pub table: Vec<u32>,
}

pub fn service_key(svc: &Service) -> ServiceKey {
    ServiceKey::new(svc.vip.ip().octets(), svc.vip.port(), svc.protocol.number())
}

impl Dataplane {
    /// Counts `key` in (`by` = 1) or out (`by` = -1) of the VIP filter.
    pub(super) fn filter_add(&mut self, key: &ServiceKey, by: i32) -> Result<(), DataplaneError> {
        let slot = key.filter_slot();
        let count = self.filter_counts.entry(slot).or_default();
        *count = count.saturating_add_signed(by);
        let value = *count;
        if value == 0 {
            self.filter_counts.remove(&slot);
        }
        self.vip_filter.set(slot, value, 0)?;
        Ok(())
    }

    fn zero_counters(
        &mut self,
        service: Option<u32>,
        backend: Option<u32>,
    ) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let zeros = || {
            aya::maps::PerCpuValues::try_from(vec![Counters::default(); cpus])
                .map_err(DataplaneError::Cpus)
        };
        if let Some(id) = service {
            self.service_stats.set(id, zeros()?, 0)?;
        }
        if let Some(id) = backend {
            self.backend_stats.set(id, zeros()?, 0)?;
        }
        Ok(())
    }

    /// Creates or replaces `svc` in the maps.
    pub fn upsert(&mut self, svc: &Service) -> Result<(), DataplaneError> {
        let key = service_key(svc);
        if let Some(o) = self.installed.get(&svc.name).cloned() {
            if let Some(stale) = self.claim_adopted(&key) {
                // The key it moves to was another service's before the restart.
                self.remove_unclaimed(stale)?;
            }
            return self.upsert_over(svc, key, Some(o));
        }
        // A service first applied after a restart takes over the entry an earlier daemon
        // left for its key, so that its tracked flows keep their ids.
        match self.claim_adopted(&key) {
            Some(adopted) => {
                let result = self.upsert_over(svc, key, Some(adopted.clone()));
                if result.is_err() {
                    self.adopted.insert(key, adopted);
                }
                result
            }
            None => self.upsert_over(svc, key, None),
        }
    }

    /// Writes `svc` over `old`, what its key or name had in the maps.
    fn upsert_over(
        &mut self,
        svc: &Service,
        key: ServiceKey,
        old: Option<Installed>,
    ) -> Result<(), DataplaneError> {
        // Every capacity is checked before the first write, so that a full map fails the
        // call without changing anything. A new key (a new service, or a moved VIP, whose
        // old key goes only after the new one is in) needs room in `services`.
        let new_key = old.as_ref().is_none_or(|o| o.key != key);
        let used = self.installed.len() + self.adopted.len();
        if new_key && used as u32 >= self.max_services {
            return Err(DataplaneError::Full(
                "no room for another service key (raise --max-services)".into(),
            ));
        }

        // Backend ids: kept for backends that stay, new ones for the others.
        let mut backends = Vec::with_capacity(svc.backends.len());
        let needed = svc
            .backends
            .iter()
            .filter(|b| {
                !old.as_ref()
                    .is_some_and(|o| o.backends.iter().any(|(a, _)| a == *b))
            })
            .count();
        if needed as u32 > self.backend_ids.available() {
            return Err(DataplaneError::Full(format!(
                "no room for {needed} more backends (raise --max-backends)"
            )));
        }
        let (id, reused_id) = match &old {
            Some(o) => (o.id, false),
            None => self.service_ids.alloc_noting_reuse().ok_or_else(|| {
                DataplaneError::Full("no room for another service (raise --max-services)".into())
            })?,
        };
        let reuse_region = old.as_ref().is_some_and(|o| o.table_size == svc.table_size);
        let offset = if reuse_region {
            old.as_ref().unwrap().table_offset
        } else {
            match self.slots.alloc(svc.table_size) {
                Some(o) => o,
                None => {
                    if old.is_none() {
                        self.service_ids.release(id);
                    }
                    return Err(DataplaneError::Full(format!(
                        "no room for a {}-slot Maglev table (raise --maglev-slots)",
                        svc.table_size
                    )));
                }
            }
        };
        // Entries under a fresh id are zero already: a cold start of thousands of
        // services skips these writes.
        if reused_id {
            self.zero_counters(Some(id), None)?;
        }
        for &addr in &svc.backends {
            if let Some(&(_, bid)) = old
                .as_ref()
                .and_then(|o| o.backends.iter().find(|(a, _)| *a == addr))
            {
                backends.push((addr, bid));
                continue;
            }
            let (bid, reused) = self
                .backend_ids
                .alloc_noting_reuse()
                .expect("counted above");
            self.generations[bid as usize] = self.generations[bid as usize].wrapping_add(1);
            if reused {
                self.zero_counters(None, Some(bid))?;
                // It must not inherit the next hop of the backend it was before.
                self.backend_hops.set(bid, NextHop::default(), 0)?;
            }
            self.backends.set(
                bid,
                Backend {
                    addr: addr.ip().octets(),
                    port: addr.port(),
                    _pad: 0,
                    flags: BACKEND_ACTIVE,
                    generation: self.generations[bid as usize],
                },
                0,
            )?;
            backends.push((addr, bid));
        }

        // The table: only the slots that change when it stays in place.
        let addrs: Vec<SocketAddrV4> = backends.iter().map(|&(a, _)| a).collect();
        let table: Vec<u32> = maglev::build_table(&addrs, svc.table_size)
            .into_iter()
            .map(|i| backends[i as usize].1)
            .collect();
        for (slot, &bid) in table.iter().enumerate() {
            let unchanged = reuse_region && old.as_ref().unwrap().table[slot] == bid;
            if !unchanged {
                self.maglev.set(offset + slot as u32, bid);
            }
        }

        // Switch the service entry over (the filter lets its packets through first).
        let moved = old.as_ref().is_none_or(|o| o.key != key);
        if moved {
            self.filter_add(&key, 1)?;
        }
        let info = ServiceInfo {
            id,
            table_offset: offset,
            table_size: svc.table_size,
            flags: 0,
        };
        self.services.insert(key, info, 0)?;

        // Retire what the old version had and the new one does not.
        if let Some(o) = &old {
            if o.key != key {
                self.services.remove(&o.key)?;
                self.filter_add(&o.key, -1)?;
            }
            for &(addr, bid) in &o.backends {
                if !svc.backends.contains(&addr) {
                    self.retire_backend(bid)?;
                }
            }
            if !reuse_region {
                self.slots.release(o.table_offset, o.table_size);
            }
        }
        self.installed.insert(
            svc.name.clone(),
            Installed {
                key,
                id,
                table_offset: offset,
                table_size: svc.table_size,
                backends,
                table,
            },
        );
        Ok(())
    }

    pub(super) fn retire_backend(&mut self, bid: u32) -> Result<(), DataplaneError> {
        // Inactive: tracked flows see it and are balanced again on their next packet. The
        // generation stays, for a later daemon that adopts these maps.
        let retired = Backend {
            generation: self.generations[bid as usize],
            ..Backend::default()
        };
        self.backends.set(bid, retired, 0)?;
        self.backend_ids.release(bid);
        Ok(())
    }

    /// Removes a service: its entry first, then its backends and table.
    pub fn remove(&mut self, name: &str) -> Result<bool, DataplaneError> {
        let Some(inst) = self.installed.get(name).cloned() else {
            return Ok(false);
        };
        self.services.remove(&inst.key)?;
        self.installed.remove(name);
        self.filter_add(&inst.key, -1)?;
        for &(_, bid) in &inst.backends {
            self.retire_backend(bid)?;
        }
        self.slots.release(inst.table_offset, inst.table_size);
        self.service_ids.release(inst.id);
        Ok(true)
    }
}
