//! Per-CPU counters: per service, per backend, drops by reason, and SYN cookies.
use aya_ebpf::btf_maps::PerCpuArray;
use lb_common::{
    flood::CookieStat,
    stats::{Counters, DropReason},
};

use crate::maps;

#[inline(always)]
fn add<const N: usize>(map: &PerCpuArray<Counters, N>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: non-null from the lookup; array values live as long as the map.
        // Per-CPU slot: no other writer, no atomics needed.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count(service_id: u32, backend_id: u32, bytes: u64) {
    add(&maps::service_stats, service_id, bytes);
    add(&maps::backend_stats, backend_id, bytes);
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(c) = maps::drops.get_ptr_mut(reason as u32) {
        // SAFETY: non-null from the lookup; this CPU's own counter, which no other CPU
        // writes.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_cookie(what: CookieStat) {
    if let Some(c) = maps::cookie_stats.get_ptr_mut(what as u32) {
        // SAFETY: non-null from the lookup; this CPU's own counter, which no other CPU
        // writes.
        unsafe { *c += 1 };
    }
}
