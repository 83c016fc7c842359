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
