//! Which service a packet is for: its key's `vip_filter` slot tells at once whether any
//! is, and names the service itself when its key is the slot's only one; otherwise the
//! `services` hash map does.
use lb_common::service::{FilterSlot, ServiceInfo, ServiceKey};

use crate::maps;

/// Whether any service's key falls on `key`'s filter slot (none: not a service's packet).
#[inline(always)]
pub fn maybe_service(key: &ServiceKey) -> bool {
    maps::vip_filter
        .get(key.filter_slot())
        .is_some_and(|s| s.count > 0)
}

/// The service of `key`, copied out: from its filter slot when that holds it alone and
/// whole, else from `services`.
#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<ServiceInfo> {
    if let Some(s) = maps::vip_filter.get_ptr(key.filter_slot()) {
        // SAFETY: array values live as long as the map. The daemon may be rewriting the
        // slot: each field is read once, and the check decides whether they belong together.
        let (check, slot_key, info) = unsafe {
            (
                core::ptr::read_volatile(&(*s).check),
                core::ptr::read_volatile(&(*s).key),
                core::ptr::read_volatile(&(*s).info),
            )
        };
        if check != 0 && slot_key == *key && FilterSlot::check_of(key, &info) == check {
            return Some(info);
        }
    }
    // SAFETY: a hash map value, copied out at once.
    unsafe { maps::services.get(key) }.copied()
}
