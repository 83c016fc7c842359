//! Backend selection: the service's Maglev slot for the flow's hash.
use lb_common::{
    hash::reduce,
    service::{Backend, ServiceInfo},
};

use crate::maps;

/// The backend id and backend in the slot `hash` (the flow hash's slot part) falls on, if
/// that backend is usable.
#[inline(always)]
pub fn pick(svc: &ServiceInfo, hash: u32) -> Option<(u32, Backend)> {
    if svc.table_size == 0 {
        return None;
    }
    let slot = svc.table_offset.wrapping_add(reduce(hash, svc.table_size));
    let id = *maps::maglev.get(slot)?;
    let backend = *maps::backends.get(id)?;
    if id == 0 || !backend.is_active() {
        return None;
    }
    Some((id, backend))
}
