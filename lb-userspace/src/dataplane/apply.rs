//! Applying a service to the maps. Make before break: new backends and table slots are
//! written before the service entry points at them, and old ones are retired only after
//! it no longer does; on removal the service entry goes first. The entry lives in two
//! places, `services` and (when its key has its VIP filter slot alone) that slot: the slot
//! is written after `services` on the way in, and cleared before it on the way out, so
//! that a slot never names an entry `services` lacks, even after a crash.
use std::net::SocketAddrV4;

use lb_common::{
    config::NextHop,
    maglev,
    ports::BackendState,
    service::{BACKEND_ACTIVE, Backend, FilterSlot, ServiceInfo, ServiceKey},
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
    /// Backends whose health check failed: out of the table, inactive in `backends`.
    pub down: Vec<SocketAddrV4>,
    /// The table as written: backend id per slot.
    pub table: Vec<u32>,
}

/// The Maglev table of `backends` with those in `down` taken out: the table of them all,
/// except that the slots of a down backend go to whom the table of the healthy ones gives
/// them. So a backend that falls moves only its own slots, one that rises takes back just
/// those, and the result depends only on the two sets: nodes that agree on health build the
/// same table. Slots with no healthy backend hold 0 (no backend: packets are dropped).
pub fn table_for(backends: &[(SocketAddrV4, u32)], down: &[SocketAddrV4], size: u32) -> Vec<u32> {
    let build = |set: &[(SocketAddrV4, u32)]| -> Vec<u32> {
        if set.is_empty() {
            return vec![0; size as usize];
        }
        let addrs: Vec<SocketAddrV4> = set.iter().map(|&(a, _)| a).collect();
        maglev::build_table(&addrs, size)
            .into_iter()
            .map(|i| set[i as usize].1)
            .collect()
    };
    let full = build(backends);
    if down.is_empty() {
        return full;
    }
    let healthy: Vec<(SocketAddrV4, u32)> = backends
        .iter()
        .filter(|(a, _)| !down.contains(a))
        .copied()
        .collect();
    let down_ids: Vec<u32> = backends
        .iter()
        .filter(|(a, _)| down.contains(a))
        .map(|&(_, id)| id)
        .collect();
    let sub = build(&healthy);
    full.into_iter()
        .zip(sub)
        .map(|(f, s)| if down_ids.contains(&f) { s } else { f })
        .collect()
}

/// The key of a layer-4 service (an HTTP one has no VIP: the unspecified address).
pub fn service_key(svc: &Service) -> ServiceKey {
    let vip = svc
        .l4_vip()
        .unwrap_or(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));
    ServiceKey::new(vip.ip().octets(), vip.port(), svc.protocol.number())
}

impl Dataplane {
    /// Counts `key` in (`by` = 1) or out (`by` = -1) of the VIP filter.
    pub(super) fn filter_add(&mut self, key: &ServiceKey, by: i32) -> Result<(), DataplaneError> {
        let slot = key.filter_slot();
        let keys = self.filter_keys.entry(slot).or_default();
        if by > 0 {
            keys.push(*key);
        } else if let Some(i) = keys.iter().position(|k| k == key) {
            keys.swap_remove(i);
        }
        if keys.is_empty() {
            self.filter_keys.remove(&slot);
        }
        self.publish_filter_slot(slot)
    }

    /// Writes `vip_filter` slot `slot` as the maps stand: its count, and, when one key
    /// falls on it, that key's `services` entry (so call it again whenever that changes,
    /// before anything the old entry pointed at is reused).
    pub(super) fn publish_filter_slot(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let keys = self.filter_keys.get(&slot).map_or(&[][..], Vec::as_slice);
        let sole = match keys {
            [key] => self.services.get(key, 0).ok().map(|info| (*key, info)),
            _ => None,
        };
        let value = FilterSlot::new(keys.len() as u32, sole);
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

    /// Creates or replaces `svc` in the maps. Returns the backends that start down: after
    /// a restart, those the adopted table had taken out (their health check had failed).
    pub fn upsert(&mut self, svc: &Service) -> Result<Vec<SocketAddrV4>, DataplaneError> {
        let key = service_key(svc);
        if let Some(o) = self.installed.get(&svc.name).cloned() {
            if let Some(stale) = self.claim_adopted(&key) {
                // The key it moves to was another service's before the restart.
                self.remove_unclaimed(stale)?;
            }
            self.upsert_over(svc, key, Some(o))?;
            return Ok(Vec::new());
        }
        // A service first applied after a restart takes over the entry an earlier daemon
        // left for its key, so that its tracked flows keep their ids.
        match self.claim_adopted(&key) {
            Some(mut adopted) => {
                let missing: Vec<SocketAddrV4> = svc
                    .backends
                    .iter()
                    .filter(|b| !adopted.backends.iter().any(|(a, _)| a == *b))
                    .copied()
                    .collect();
                // Only when the table was written with some backends left out: then the
                // missing ones were down. (A service whose backends all changed while no
                // daemon ran is new, not down.)
                let was_down = !missing.is_empty() && missing.len() < svc.backends.len();
                if was_down {
                    adopted.down = missing.clone();
                }
                let result = self.upsert_over(svc, key, Some(adopted.clone()));
                if result.is_err() {
                    adopted.down.clear();
                    self.adopted.insert(key, adopted);
                }
                result.map(|()| if was_down { missing } else { Vec::new() })
            }
            None => self.upsert_over(svc, key, None).map(|()| Vec::new()),
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
        let down: Vec<SocketAddrV4> = old
            .as_ref()
            .map(|o| {
                o.down
                    .iter()
                    .filter(|a| svc.backends.contains(a))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
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
                // It must not inherit the next hop, port counts or learnt options of the
                // backend it was before.
                self.backend_hops.set(bid, NextHop::default(), 0)?;
                self.backend_state.set(bid, BackendState::default(), 0)?;
            }
            self.backends.set(
                bid,
                Backend {
                    addr: addr.ip().octets(),
                    port: addr.port(),
                    _pad: 0,
                    flags: if down.contains(&addr) {
                        0
                    } else {
                        BACKEND_ACTIVE
                    },
                    generation: self.generations[bid as usize],
                },
                0,
            )?;
            backends.push((addr, bid));
        }

        // The table: only the slots that change when it stays in place. Backends that
        // stay keep their health; new ones start up.
        let table = table_for(&backends, &down, svc.table_size);
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
        self.publish_filter_slot(key.filter_slot())?;

        // Retire what the old version had and the new one does not.
        if let Some(o) = &old {
            if o.key != key {
                // The filter first: its slot may hold the entry itself.
                self.filter_add(&o.key, -1)?;
                self.services.remove(&o.key)?;
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
                down,
                table,
            },
        );
        Ok(())
    }

    /// Takes backend `addr` of service `name` out of its table (`up` false: tracked flows
    /// to it are balanced again on their next packet) or puts it back. Whether anything
    /// changed.
    pub fn set_backend_health(
        &mut self,
        name: &str,
        addr: SocketAddrV4,
        up: bool,
    ) -> Result<bool, DataplaneError> {
        let Some(inst) = self.installed.get(name).cloned() else {
            return Ok(false);
        };
        let Some(&(_, bid)) = inst.backends.iter().find(|(a, _)| *a == addr) else {
            return Ok(false);
        };
        if inst.down.contains(&addr) != up {
            return Ok(false);
        }
        let mut down = inst.down.clone();
        if up {
            down.retain(|a| *a != addr);
        } else {
            down.push(addr);
        }
        let backend = Backend {
            addr: addr.ip().octets(),
            port: addr.port(),
            _pad: 0,
            flags: if up { BACKEND_ACTIVE } else { 0 },
            generation: self.generations[bid as usize],
        };
        // Rising: usable before the table points at it. Falling: out of the table before
        // it turns inactive, so that re-balanced flows cannot pick it again.
        if up {
            self.backends.set(bid, backend, 0)?;
        }
        let table = table_for(&inst.backends, &down, inst.table_size);
        for (slot, (&new, &was)) in table.iter().zip(&inst.table).enumerate() {
            if new != was {
                self.maglev.set(inst.table_offset + slot as u32, new);
            }
        }
        if !up {
            self.backends.set(bid, backend, 0)?;
        }
        let entry = self.installed.get_mut(name).expect("installed above");
        entry.down = down;
        entry.table = table;
        Ok(true)
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
        // The filter first: its slot may hold the entry itself.
        self.filter_add(&inst.key, -1)?;
        self.services.remove(&inst.key)?;
        self.installed.remove(name);
        for &(_, bid) in &inst.backends {
            self.retire_backend(bid)?;
        }
        self.slots.release(inst.table_offset, inst.table_size);
        self.service_ids.release(inst.id);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallen_backend_moves_only_its_own_slots_and_takes_them_back() {
        let backends: Vec<(SocketAddrV4, u32)> = (1..=5u32)
            .map(|i| (SocketAddrV4::new([10, 0, 0, i as u8].into(), 80), i))
            .collect();
        let size = 509;
        let full = table_for(&backends, &[], size);
        let fallen = backends[2].0;
        let without = table_for(&backends, &[fallen], size);
        assert!(!without.contains(&3), "the fallen backend has no slot");
        for (slot, (&before, &after)) in full.iter().zip(&without).enumerate() {
            if before != 3 {
                assert_eq!(before, after, "slot {slot} of a healthy backend moved");
            }
        }
        // Its slots are spread over the others, not all given to one.
        let heirs: std::collections::HashSet<u32> = full
            .iter()
            .zip(&without)
            .filter(|(b, _)| **b == 3)
            .map(|(_, a)| *a)
            .collect();
        assert!(heirs.len() >= 3, "{heirs:?}");
        // Nobody healthy: no backend in any slot.
        let all: Vec<SocketAddrV4> = backends.iter().map(|b| b.0).collect();
        assert!(table_for(&backends, &all, size).iter().all(|&id| id == 0));
        assert!(table_for(&[], &[], size).iter().all(|&id| id == 0));
    }
}
