//! The daemon's side of the sweep (`lb-ebpf/src/sweep.rs`): it runs the program once a
//! second, and reads back what the sweep and the flood defence counted.
use aya::programs::{TestRun, TestRunOptions};
use lb_common::flood::CookieStat;
use serde::Serialize;

use super::{Dataplane, DataplaneError, SWEEP_PROGRAM};

/// Whether lb answers SYNs with cookies, why, and what came of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FloodView {
    /// Cookie mode is on.
    pub cookies: bool,
    /// Seconds since cookie mode last turned on or off (None: never did).
    pub since_s: Option<u64>,
    /// Times it turned on, and off.
    pub entered: u64,
    pub left: u64,
    /// New SYNs a second, all CPUs, as last measured.
    pub syn_rate: u64,
    /// Per mille of the fullest backend's SNAT ports in use, as of the last sweep.
    pub port_occupancy_permille: u32,
    /// SYN-ACKs lb answered with a cookie; ACKs whose cookie checked; ACKs of no flow
    /// whose cookie did not.
    pub cookies_sent: u64,
    pub cookies_valid: u64,
    pub cookies_invalid: u64,
}

/// The SNAT ports a backend's flows hold, as of the last sweep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PortUse {
    /// Held by live flows.
    pub in_use: u32,
    /// Held only in the backend's TIME_WAIT (given to new SYNs that it accepts).
    pub time_wait: u32,
    /// Every port the backend can be reached from: the range times the SNAT addresses of
    /// the interface towards it.
    pub capacity: u32,
}

impl Dataplane {
    /// Runs the sweep once: flows that are over leave the maps, their ports go back, each
    /// backend's ports are counted and cookie mode is reconsidered.
    pub fn sweep(&self) -> Result<(), DataplaneError> {
        let prog = self
            .program(SWEEP_PROGRAM)
            .ok_or(DataplaneError::Missing(SWEEP_PROGRAM))?;
        // The program reads no packet; XDP's test run wants one anyway.
        let frame = [0u8; 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.repeat = 1;
        prog.test_run(opts)?;
        Ok(())
    }

    /// Deletes the port bitmaps of backends no service has any more (a bitmap is only a
    /// hint; this bounds the memory of backends that come and go).
    pub fn forget_port_tables(&mut self) -> Result<usize, DataplaneError> {
        let live: std::collections::HashSet<([u8; 4], u16)> = self
            .installed
            .values()
            .flat_map(|i| {
                let draining = i.draining.iter().map(|d| d.addr);
                i.backends.iter().map(|(a, _)| *a).chain(draining)
            })
            .map(|a| (a.ip().octets(), a.port()))
            .collect();
        let stale: Vec<lb_common::ports::PortTableKey> = self
            .port_tables
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&(k.backend_addr, k.backend_port)))
            .collect();
        for k in &stale {
            let _ = self.port_tables.remove(k);
        }
        Ok(stale.len())
    }

    /// The flood defence's state and counters.
    pub fn flood_view(&self) -> FloodView {
        let f = self.flood.get(&0, 0).unwrap_or_default();
        let count = |s: CookieStat| -> u64 {
            self.cookie_stats
                .get(&(s as u32), 0)
                .map_or(0, |v| v.iter().sum())
        };
        let now = super::clock::jiffies_now().unwrap_or(f.since);
        let hz = u64::from(self.hz.max(1));
        FloodView {
            cookies: f.cookies != 0,
            since_s: (f.entered > 0).then(|| now.saturating_sub(f.since) / hz),
            entered: f.entered,
            left: f.left,
            syn_rate: f.syn_rate,
            port_occupancy_permille: f.occupancy,
            cookies_sent: count(CookieStat::Sent),
            cookies_valid: count(CookieStat::Valid),
            cookies_invalid: count(CookieStat::Invalid),
        }
    }

    /// The ports each backend of service `name` holds, draining ones too.
    pub fn port_uses(&self, name: &str) -> Option<Vec<(std::net::SocketAddrV4, PortUse)>> {
        let inst = self.installed.get(name)?;
        let draining = inst.draining.iter().map(|d| (d.addr, d.id));
        Some(
            inst.backends
                .iter()
                .copied()
                .chain(draining)
                .map(|(addr, id)| (addr, self.port_use(id)))
                .collect(),
        )
    }

    /// The ports backend `id`'s flows hold.
    pub fn port_use(&self, id: u32) -> PortUse {
        let sweeps = self.flood.get(&0, 0).map_or(0, |f| f.sweeps);
        let state = self.backend_state.get(&id, 0).unwrap_or_default();
        let (in_use, time_wait) = if state.sweep == sweeps && sweeps != 0 {
            (state.ports_in_use, state.ports_time_wait)
        } else {
            (0, 0)
        };
        let addrs = self
            .backend_hops
            .get(&id, 0)
            .map_or(1, |h| u32::from(h.snat_count.max(1)));
        let range = self
            .settings
            .as_ref()
            .map_or(0, |s| u32::from(s.snat_ports.1 - s.snat_ports.0) + 1);
        PortUse {
            in_use,
            time_wait,
            capacity: range * addrs,
        }
    }
}
