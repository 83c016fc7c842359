//! Applying a service to the maps. Make before break: new backends and table slots are
//! written before the service entry points at them, and old ones are retired only after
//! it no longer does; on removal the service entry goes first. The entry lives in two
//! places, `services` and (when its key has its VIP filter slot alone) that slot: the slot
//! is written after `services` on the way in, and cleared before it on the way out, so
//! that a slot never names an entry `services` lacks, even after a crash.
use std::{collections::HashSet, net::SocketAddrV4};

use lb_common::{
    config::NextHop,
    maglev,
    ports::BackendState,
    service::{BACKEND_ACTIVE, Backend, FilterSlot, SERVICE_HASH_SRC_IP, ServiceInfo, ServiceKey},
    stats::Counters,
};

use super::{Dataplane, DataplaneError, drain::Draining};
use crate::{
    drain::OnDown,
    model::{FlowHash, Service},
};

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
    /// The table of all the backends, down or not (what `table` is made from on a health
    /// change); empty for a table adopted from an earlier daemon.
    pub full_table: Vec<u32>,
    /// The table weights that are not 1 (0 for a draining backend).
    pub weights: Weights,
    /// Backends a write left out that keep their tracked flows for now: active, in no
    /// table slot, their ids still theirs.
    pub draining: Vec<Draining>,
    /// Whether a backend its check takes down keeps its tracked flows.
    pub on_down: OnDown,
}

impl Installed {
    /// The id of backend `addr`, listed or draining.
    pub fn id_of(&self, addr: &SocketAddrV4) -> Option<u32> {
        self.backends
            .iter()
            .find(|(a, _)| a == addr)
            .map(|&(_, id)| id)
            .or_else(|| self.draining.iter().find(|d| d.addr == *addr).map(|d| d.id))
    }

    /// Every backend id it holds, listed or draining.
    pub fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.backends
            .iter()
            .map(|&(_, id)| id)
            .chain(self.draining.iter().map(|d| d.id))
    }
}

/// Backends' table weights where they are not 1.
pub type Weights = std::collections::BTreeMap<SocketAddrV4, u32>;

/// The table weights of `svc`'s backends, where not 1.
pub fn weights_of(svc: &Service) -> Weights {
    svc.backend_options
        .iter()
        .map(|(&a, o)| (a, o.table_weight()))
        .filter(|&(_, w)| w != 1)
        .collect()
}

/// The weighted Maglev table of `backends`: backend id per slot (0 in every slot when
/// none has a weight).
pub fn full_table(backends: &[(SocketAddrV4, u32)], weights: &Weights, size: u32) -> Vec<u32> {
    let weighted: Vec<(SocketAddrV4, u32)> = backends
        .iter()
        .map(|&(a, _)| (a, weights.get(&a).copied().unwrap_or(1)))
        .collect();
    let table = maglev::build_weighted(&weighted, size);
    if table.is_empty() {
        return vec![0; size as usize];
    }
    table.into_iter().map(|i| backends[i as usize].1).collect()
}

/// `full` (the table of all `backends`) with those in `down` taken out: the slots of a down
/// backend go to whom the table of the healthy ones gives them. So a backend that falls
/// moves only its own slots, one that rises takes back just those, and the result depends
/// only on the two sets: nodes that agree on health build the same table. Slots with no
/// healthy backend hold 0 (no backend: packets are dropped). One table build and one pass
/// over the slots.
pub fn table_for(
    full: &[u32],
    backends: &[(SocketAddrV4, u32)],
    weights: &Weights,
    down: &HashSet<SocketAddrV4>,
    size: u32,
) -> Vec<u32> {
    if !backends.iter().any(|(a, _)| down.contains(a)) {
        return full.to_vec();
    }
    let (fallen, healthy): (Vec<_>, Vec<_>) = backends
        .iter()
        .copied()
        .partition(|(a, _)| down.contains(a));
    let fallen: HashSet<u32> = fallen.into_iter().map(|(_, id)| id).collect();
    let sub = full_table(&healthy, weights, size);
    full.iter()
        .zip(sub)
        .map(|(&f, s)| if fallen.contains(&f) { s } else { f })
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

    /// Creates or replaces `svc` in the maps, with the backends in `down` out of its table
    /// and inactive. Returns the backends that start down besides: after a restart, those
    /// the adopted table had taken out (their health check had failed).
    pub fn upsert(
        &mut self,
        svc: &Service,
        down: &HashSet<SocketAddrV4>,
    ) -> Result<Vec<SocketAddrV4>, DataplaneError> {
        let key = service_key(svc);
        if let Some(o) = self.installed.get(&svc.name).cloned() {
            if let Some(stale) = self.claim_adopted(&key) {
                // The key it moves to was another service's before the restart.
                self.remove_unclaimed(stale)?;
            }
            self.upsert_over(svc, key, Some(o), down)?;
            return Ok(Vec::new());
        }
        // A service first applied after a restart takes over the entry an earlier daemon
        // left for its key, so that its tracked flows keep their ids.
        let Some(adopted) = self.claim_adopted(&key) else {
            return self.upsert_over(svc, key, None, down).map(|()| Vec::new());
        };
        // A backend with no weight has no slot in any table: its absence says nothing.
        let missing: Vec<SocketAddrV4> = svc
            .backends
            .iter()
            .filter(|b| svc.options(b).table_weight() > 0)
            .filter(|b| !adopted.backends.iter().any(|(a, _)| a == *b))
            .copied()
            .collect();
        // Only when the table was written with some backends left out: then the missing
        // ones were down. (A service whose backends all changed while no daemon ran is new,
        // not down.)
        let was_down = !missing.is_empty() && missing.len() < svc.backends.len();
        let mut starts_down = down.clone();
        if was_down {
            starts_down.extend(missing.iter().copied());
        }
        match self.upsert_over(svc, key, Some(adopted.clone()), &starts_down) {
            Ok(()) => Ok(if was_down { missing } else { Vec::new() }),
            Err(e) => {
                self.adopted.insert(key, adopted);
                Err(e)
            }
        }
    }

    /// Writes `svc` over `old`, what its key or name had in the maps: room is checked and
    /// taken first (so that a full map fails the call without changing anything), then
    /// the backends and table are written, the service entry switched over, and what only
    /// `old` used retired.
    fn upsert_over(
        &mut self,
        svc: &Service,
        key: ServiceKey,
        old: Option<Installed>,
        down: &HashSet<SocketAddrV4>,
    ) -> Result<(), DataplaneError> {
        let old = old.as_ref();
        self.check_room(svc, key, old)?;
        let (id, reused_id) = match old {
            Some(o) => (o.id, false),
            None => self.service_ids.alloc_noting_reuse().ok_or_else(|| {
                DataplaneError::Full("no room for another service (raise --max-services)".into())
            })?,
        };
        let Some(region) = self.table_region(svc.table_size, old) else {
            if old.is_none() {
                self.service_ids.release(id);
            }
            return Err(DataplaneError::Full(format!(
                "no room for a {}-slot Maglev table (raise --maglev-slots)",
                svc.table_size
            )));
        };
        // Entries under a fresh id are zero already: a cold start of thousands of
        // services skips these writes.
        if reused_id {
            self.zero_counters(Some(id), None)?;
        }
        let backends = self.write_backends(svc, old, down)?;
        let weights = weights_of(svc);
        let full = full_table(&backends, &weights, svc.table_size);
        let table = table_for(&full, &backends, &weights, down, svc.table_size);
        let in_place = old
            .filter(|o| o.table_offset == region)
            .map(|o| &o.table[..]);
        self.write_table(region, &table, in_place);
        self.switch_entry(
            key,
            old.map(|o| o.key),
            ServiceInfo {
                id,
                table_offset: region,
                table_size: svc.table_size,
                flags: svc.forwarding.flags(svc.encap_source)
                    | match svc.hash {
                        FlowHash::FiveTuple => 0,
                        FlowHash::SrcIp => SERVICE_HASH_SRC_IP,
                    },
            },
        )?;
        let draining = match old {
            Some(o) => self.leave_unused(svc, o, region)?,
            None => Vec::new(),
        };
        // Kept backends that are down turn inactive once the table no longer names them,
        // unless they keep their flows.
        if svc.drain.on_down == OnDown::Shutdown {
            self.write_health(&backends, down, false)?;
        }
        self.installed.insert(
            svc.name.clone(),
            Installed {
                key,
                id,
                table_offset: region,
                table_size: svc.table_size,
                backends,
                table,
                full_table: full,
                weights,
                draining,
                on_down: svc.drain.on_down,
            },
        );
        Ok(())
    }

    /// Whether `svc` fits: a new key (a new service, or a moved VIP, whose old key goes
    /// only after the new one is in) needs room in `services`, new backends their ids.
    fn check_room(
        &self,
        svc: &Service,
        key: ServiceKey,
        old: Option<&Installed>,
    ) -> Result<(), DataplaneError> {
        let new_key = old.is_none_or(|o| o.key != key);
        let used = self.installed.len() + self.adopted.len();
        if new_key && used as u32 >= self.max_services {
            return Err(DataplaneError::Full(
                "no room for another service key (raise --max-services)".into(),
            ));
        }
        let needed = svc
            .backends
            .iter()
            .filter(|b| old.is_none_or(|o| o.id_of(b).is_none()))
            .count();
        if needed as u32 > self.backend_ids.available() {
            return Err(DataplaneError::Full(format!(
                "no room for {needed} more backends (raise --max-backends)"
            )));
        }
        Ok(())
    }

    /// Where a table of `size` slots goes: `old`'s region when it is that size, else a
    /// new one (None when there is no room).
    fn table_region(&mut self, size: u32, old: Option<&Installed>) -> Option<u32> {
        match old {
            Some(o) if o.table_size == size => Some(o.table_offset),
            _ => self.slots.alloc(size),
        }
    }

    /// Backend ids for `svc`'s backends: kept for those `old` had (draining ones too), new
    /// ones (written, and active unless in `down`) for the others. Kept backends that are
    /// up are made active here, before the table can name them.
    fn write_backends(
        &mut self,
        svc: &Service,
        old: Option<&Installed>,
        down: &HashSet<SocketAddrV4>,
    ) -> Result<Vec<(SocketAddrV4, u32)>, DataplaneError> {
        let mut backends = Vec::with_capacity(svc.backends.len());
        let mut kept = Vec::new();
        for &addr in &svc.backends {
            if let Some(bid) = old.and_then(|o| o.id_of(&addr)) {
                backends.push((addr, bid));
                kept.push((addr, bid));
                continue;
            }
            let (bid, reused) = self
                .backend_ids
                .alloc_noting_reuse()
                .expect("counted by check_room");
            self.generations[bid as usize] = self.generations[bid as usize].wrapping_add(1);
            if reused {
                self.zero_counters(None, Some(bid))?;
                // It must not inherit the next hop, port counts or learnt options of the
                // backend it was before.
                self.backend_hops.set(bid, NextHop::default(), 0)?;
                self.backend_state.set(bid, BackendState::default(), 0)?;
            }
            self.write_backend(addr, bid, !down.contains(&addr))?;
            backends.push((addr, bid));
        }
        self.write_health(&kept, down, true)?;
        Ok(backends)
    }

    fn write_backend(
        &mut self,
        addr: SocketAddrV4,
        bid: u32,
        up: bool,
    ) -> Result<(), DataplaneError> {
        let backend = Backend {
            addr: addr.ip().octets(),
            port: addr.port(),
            _pad: 0,
            flags: if up { BACKEND_ACTIVE } else { 0 },
            generation: self.generations[bid as usize],
        };
        self.backends.set(bid, backend, 0)?;
        Ok(())
    }

    /// Writes the active flag of those of `backends` that are up (`up` true) or down as
    /// `down` says, where the map differs. Whether it wrote any.
    fn write_health(
        &mut self,
        backends: &[(SocketAddrV4, u32)],
        down: &HashSet<SocketAddrV4>,
        up: bool,
    ) -> Result<bool, DataplaneError> {
        let mut wrote = false;
        for &(addr, bid) in backends {
            if down.contains(&addr) == up {
                continue;
            }
            let active = self.backends.get(&bid, 0)?.is_active();
            if active != up {
                self.write_backend(addr, bid, up)?;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// Writes `table` at `offset`; only the slots that differ from `in_place` when it is
    /// the table there now.
    fn write_table(&mut self, offset: u32, table: &[u32], in_place: Option<&[u32]>) {
        for (slot, &bid) in table.iter().enumerate() {
            if in_place.is_none_or(|t| t[slot] != bid) {
                self.maglev.set(offset + slot as u32, bid);
            }
        }
    }

    /// Points `key` at `info`, moving it from `old_key` (the filter lets its packets
    /// through first; the old key goes after the new one is in).
    fn switch_entry(
        &mut self,
        key: ServiceKey,
        old_key: Option<ServiceKey>,
        info: ServiceInfo,
    ) -> Result<(), DataplaneError> {
        let moved = old_key != Some(key);
        if moved {
            self.filter_add(&key, 1)?;
        }
        self.services.insert(key, info, 0)?;
        self.publish_filter_slot(key.filter_slot())?;
        if let Some(old_key) = old_key.filter(|_| moved) {
            // The filter first: its slot may hold the entry itself.
            self.filter_add(&old_key, -1)?;
            self.services.remove(&old_key)?;
        }
        Ok(())
    }

    /// Lets go of what `old` had and `svc`, now at table `region`, does not. Backends
    /// left out drain (they keep their tracked flows, up to `svc`'s drain timeout) unless
    /// the write cut them or they are inactive already; those draining before go on
    /// unless listed again. Returns the backends draining now.
    fn leave_unused(
        &mut self,
        svc: &Service,
        old: &Installed,
        region: u32,
    ) -> Result<Vec<Draining>, DataplaneError> {
        let cut = svc.cut_removed || svc.drain.timeout_s == 0;
        let until =
            std::time::Instant::now() + std::time::Duration::from_secs(svc.drain.timeout_s.into());
        let sweep = self.sweeps();
        let mut draining = Vec::new();
        for &(addr, bid) in &old.backends {
            if svc.backends.contains(&addr) {
                continue;
            }
            if cut || !self.backends.get(&bid, 0)?.is_active() {
                self.retire_backend(bid)?;
            } else {
                draining.push(Draining::new(addr, bid, until, sweep));
            }
        }
        for d in &old.draining {
            if svc.backends.contains(&d.addr) {
                continue;
            }
            if cut {
                self.retire_backend(d.id)?;
            } else {
                draining.push(Draining {
                    until: d.until.min(until),
                    ..*d
                });
            }
        }
        if old.table_offset != region {
            self.slots.release(old.table_offset, old.table_size);
        }
        Ok(draining)
    }

    /// Makes the table and active flags of service `name` match `down`, its backends that
    /// are down: those that fall leave the table (their tracked flows keep them, or under
    /// `on_down: shutdown` are balanced again on their next packet), those that rise take
    /// back their own slots. Whether anything
    /// changed.
    pub fn set_health(
        &mut self,
        name: &str,
        down: &HashSet<SocketAddrV4>,
    ) -> Result<bool, DataplaneError> {
        let Some(inst) = self.installed.get(name).cloned() else {
            return Ok(false);
        };
        // Rising: usable before the table points at it. Falling: out of the table before
        // it turns inactive (under `on_down: shutdown`; under `drain` it stays active, for
        // its tracked flows), so that re-balanced flows cannot pick it again.
        let rose = self.write_health(&inst.backends, down, true)?;
        let table = table_for(
            &inst.full_table,
            &inst.backends,
            &inst.weights,
            down,
            inst.table_size,
        );
        let moved = table != inst.table;
        self.write_table(inst.table_offset, &table, Some(&inst.table));
        let fell = match inst.on_down {
            OnDown::Shutdown => self.write_health(&inst.backends, down, false)?,
            OnDown::Drain => false,
        };
        self.installed.get_mut(name).expect("installed above").table = table;
        Ok(rose || moved || fell)
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
        for bid in inst.backend_ids() {
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
        let none = Weights::new();
        let full = full_table(&backends, &none, size);
        let fallen = backends[2].0;
        let without = table_for(&full, &backends, &none, &HashSet::from([fallen]), size);
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
        let all: HashSet<SocketAddrV4> = backends.iter().map(|b| b.0).collect();
        assert!(
            table_for(&full, &backends, &none, &all, size)
                .iter()
                .all(|&id| id == 0)
        );
        assert!(full_table(&[], &none, size).iter().all(|&id| id == 0));
    }
}
