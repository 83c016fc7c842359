//! Services (keyed by VIP, port and protocol), their backends and Maglev slots.
use crate::assert_layout;

/// Key of the `services` map: the address, port and protocol a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_layout!(ServiceKey, size = 8, align = 2);

impl ServiceKey {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }

    /// This key's slot in `vip_filter`.
    #[inline(always)]
    pub fn filter_slot(&self) -> u32 {
        crate::hash::filter_hash(self.addr, self.port, self.proto) & (VIP_FILTER_SLOTS - 1)
    }
}

/// Slots in `vip_filter`, a counting filter over service keys: a packet whose key falls on
/// an empty slot is no service's, which one array read tells, before any hash lookup.
pub const VIP_FILTER_SLOTS: u32 = 1 << 16;

/// Value of `vip_filter`: how many service keys fall on the slot, and when exactly one
/// does, that service's key and entry, so that its SYNs need no hash lookup in `services`
/// (10–30 ns of a new flow on this project's machine). The daemon rewrites a slot while the
/// program may read it, so `check` covers the rest: a reader that finds it does not match
/// what it read (a torn read, or a slot of several keys, whose check is 0) asks `services`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterSlot {
    pub count: u32,
    /// [`FilterSlot::check_of`] the key and entry, or 0: no entry here.
    pub check: u32,
    pub key: ServiceKey,
    pub info: ServiceInfo,
}
assert_layout!(FilterSlot, size = 32, align = 4);

impl FilterSlot {
    /// A slot of `count` keys; when that is one and its entry is known, the entry too.
    pub fn new(count: u32, sole: Option<(ServiceKey, ServiceInfo)>) -> Self {
        match sole {
            Some((key, info)) if count == 1 => Self {
                count,
                check: Self::check_of(&key, &info),
                key,
                info,
            },
            _ => Self {
                count,
                ..Self::default()
            },
        }
    }

    /// The check word of a key and its entry: never 0, and different for any mix of two
    /// versions but by a chance of about one in four billion.
    #[inline(always)]
    pub fn check_of(key: &ServiceKey, info: &ServiceInfo) -> u32 {
        let k = u32::from_le_bytes(key.addr)
            ^ (((key.port as u32) << 16) | ((key.proto as u32) << 8)).rotate_left(7);
        let mut h = crate::hash::fmix32(k ^ 0x243f_6a88);
        for w in [info.id, info.table_offset, info.table_size, info.flags] {
            h = crate::hash::fmix32(h ^ w);
        }
        if h == 0 { 1 } else { h }
    }
}

/// Value of the `services` map. The service's Maglev table is the run
/// `maglev[table_offset .. table_offset + table_size]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Index into the per-service counters.
    pub id: u32,
    pub table_offset: u32,
    /// A prime; 0 means the service has no backend (its packets are dropped and counted).
    pub table_size: u32,
    pub flags: u32,
}
assert_layout!(ServiceInfo, size = 16, align = 4);

/// `ServiceInfo::flags`: new flows are balanced by the client's address alone (its port
/// left out of the hash), so one client's connections all reach the same backend while
/// the table stands (Katran's `HASH_NO_SRC_PORT`).
pub const SERVICE_HASH_SRC_IP: u32 = 1;
/// `ServiceInfo::flags`: direct server return through an IPIP tunnel. The client's packet
/// goes to the backend whole, inside an outer IPv4 header addressed to it; the backend
/// answers the client itself. No SNAT port, no reverse entry.
pub const SERVICE_DSR_IPIP: u32 = 2;
/// Direct server return on the balancer's own segment: only the destination MAC changes.
pub const SERVICE_DSR_L2: u32 = 4;
/// With `SERVICE_DSR_IPIP`: the outer source is made per flow from the client's address
/// and port (in 172.16.0.0/16, as Katran does), so that a backend's NIC spreads the
/// tunnel's packets over its queues; without it, it is the balancer's own address.
pub const SERVICE_DSR_SPREAD_SOURCE: u32 = 8;

/// `Backend::flags`: the backend may receive new flows and keeps its tracked ones.
pub const BACKEND_ACTIVE: u32 = 1;

/// Value of the `backends` array, indexed by backend id. Id 0 is never used ("no backend").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
    pub flags: u32,
    /// Bumped every time the id is given to another backend, so that a tracked flow
    /// never follows a reused id to a backend it was not balanced to.
    pub generation: u32,
}
assert_layout!(Backend, size = 16, align = 4);

impl Backend {
    pub const fn is_active(&self) -> bool {
        self.flags & BACKEND_ACTIVE != 0
    }
}
