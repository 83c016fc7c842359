//! Backends draining after a write left them out: active, in no table slot, so that their
//! tracked flows keep them and no new flow finds them. Each ends when the sweep counts no
//! live flow of its own, or when its service's drain timeout passes.
use std::{
    net::SocketAddrV4,
    time::{Instant, SystemTime},
};

use super::{Dataplane, DataplaneError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draining {
    pub addr: SocketAddrV4,
    pub id: u32,
    /// When the write that removed it was applied here.
    pub began: SystemTime,
    /// Its flows are cut then, if any are left.
    pub until: Instant,
    /// The sweep count when it began: only a later sweep's count of its flows tells.
    pub(super) since_sweep: u32,
}

impl Draining {
    pub fn new(addr: SocketAddrV4, id: u32, until: Instant, since_sweep: u32) -> Self {
        Self {
            addr,
            id,
            began: SystemTime::now(),
            until,
            since_sweep,
        }
    }
}

impl Dataplane {
    /// Sweeps run so far (the epoch of the last one's counts).
    pub(super) fn sweeps(&self) -> u32 {
        self.flood.get(&0, 0).map_or(0, |f| f.sweeps)
    }

    /// Retires the draining backends whose flows are over (as the last sweep counted them)
    /// or whose time is up. Returns the services any left, to let go of their next hops.
    pub fn end_drains(&mut self, now: Instant) -> Result<Vec<String>, DataplaneError> {
        let sweeps = self.sweeps();
        let names: Vec<String> = self
            .installed
            .iter()
            .filter(|(_, i)| !i.draining.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        let mut ended_in = Vec::new();
        for name in names {
            let draining = self.installed[&name].draining.clone();
            let (over, left): (Vec<Draining>, Vec<Draining>) =
                draining.into_iter().partition(|d| {
                    let counted = sweeps.wrapping_sub(d.since_sweep) as i32 > 0;
                    now >= d.until || (counted && self.port_use(d.id).in_use == 0)
                });
            if over.is_empty() {
                continue;
            }
            for d in &over {
                let flows_left = self.port_use(d.id).in_use;
                self.retire_backend(d.id)?;
                tracing::info!(service = %name, backend = %d.addr, flows_left, "backend drained");
            }
            if let Some(inst) = self.installed.get_mut(&name) {
                inst.draining = left;
            }
            ended_in.push(name);
        }
        Ok(ended_in)
    }
}
