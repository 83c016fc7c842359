//! When lb answers SYNs with cookies: above a rate of new SYNs (measured per CPU over short
//! windows and summed), or while a backend's SNAT ports are crowded; and back off when both
//! calm down.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_map_lookup_percpu_elem};
use lb_common::{
    config::{COOKIES_ALWAYS, COOKIES_NEVER, Config},
    flood::{COOKIE_MODE_MIN_S, Flood, SYN_WINDOW_MS, SynWindow},
};

use crate::maps;

/// The most CPUs whose SYN counts are summed.
const MAX_CPUS: u32 = 256;

/// Whether lb answers new SYNs with cookies now.
#[inline(always)]
pub fn cookies(cfg: &Config) -> bool {
    if cfg.flags & COOKIES_NEVER != 0 {
        return false;
    }
    if cfg.flags & COOKIES_ALWAYS != 0 {
        return true;
    }
    maps::flood.get(0).is_some_and(|f| f.cookies != 0)
}

#[inline(always)]
fn window(cfg: &Config) -> u64 {
    let w = cfg.jiffies(1) * SYN_WINDOW_MS as u64 / 1000;
    if w == 0 { 1 } else { w }
}

/// Counts a new SYN on this CPU; at the end of the CPU's window, reconsiders cookie mode.
#[inline(always)]
pub fn count_syn(now: u64, cfg: &Config) {
    let Some(w) = maps::syn_window.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: non-null from the lookup; this CPU's own window, which no other CPU writes
    // (`add_cpu` reads it through the helper while `w` is held).
    let w = unsafe { &mut *w };
    w.count += 1;
    if now.wrapping_sub(w.start) < window(cfg) {
        return;
    }
    // The sum reads this CPU's window as it ends; only then does a new one begin.
    reconsider(now, cfg);
    w.start = now;
    w.count = 0;
}

/// What the sum over CPUs carries from one CPU to the next.
#[repr(C)]
struct RateSum {
    now: u64,
    win: u64,
    second: u64,
    total: u64,
}

extern "C" fn add_cpu(cpu: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the `RateSum` that `syn_rate` gave it, alive on its
    // stack for the loop.
    let s = unsafe { &mut *(ctx as *mut RateSum) };
    let key = 0u32;
    let map = core::ptr::from_ref(&maps::syn_window).cast_mut().cast();
    // SAFETY: a BPF helper call with arguments of the types it documents: the map, a key on
    // the stack and a CPU number.
    let p = unsafe {
        bpf_map_lookup_percpu_elem(map, core::ptr::from_ref(&key).cast_mut().cast(), cpu)
    } as *const SynWindow;
    if p.is_null() {
        return 0;
    }
    // SAFETY: non-null: that CPU's `SynWindow`, which lives as long as the map. That CPU
    // may write it meanwhile: a torn copy only skews the rate.
    let w = unsafe { *p };
    let age = s.now.wrapping_sub(w.start);
    if age < 2 * s.win {
        // The current window's SYNs over its age so far (at least one window's worth).
        let span = if age < s.win { s.win } else { age };
        if let Some(rate) = (w.count * s.second).checked_div(span) {
            s.total += rate;
        }
    }
    0
}

/// New SYNs a second over every CPU: each CPU's count in its current window, scaled to a
/// second. A CPU whose window is older than two windows saw none lately.
#[inline(always)]
pub fn syn_rate(now: u64, cfg: &Config) -> u64 {
    let cpus = if cfg.nr_cpus == 0 || cfg.nr_cpus > MAX_CPUS {
        1
    } else {
        cfg.nr_cpus
    };
    let mut s = RateSum {
        now,
        win: window(cfg),
        second: cfg.jiffies(1),
        total: 0,
    };
    // SAFETY: a BPF helper call with arguments of the types it documents: `add_cpu` as the
    // callback, and `s`, which outlives the loop, as its context.
    unsafe {
        bpf_loop(
            cpus,
            add_cpu as *mut c_void,
            core::ptr::from_mut(&mut s).cast(),
            0,
        )
    };
    s.total
}

/// Turns cookie mode on or off from the SYN rate and the crowding flag.
#[inline(always)]
pub fn reconsider(now: u64, cfg: &Config) {
    let Some(f) = maps::flood.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: non-null from the lookup; array values live as long as the map. Other CPUs
    // and the sweep may write it at once: plain figures, no atomics.
    let f = unsafe { &mut *f };
    let rate = syn_rate(now, cfg);
    f.syn_rate = rate;
    decide(f, rate, now, cfg);
}

#[inline(always)]
pub fn decide(f: &mut Flood, rate: u64, now: u64, cfg: &Config) {
    let threshold = cfg.cookie_syn_rate as u64;
    let by_rate = threshold > 0 && rate >= threshold;
    let by_ports = cfg.cookie_occupancy > 0 && f.occupancy_high != 0;
    if f.cookies == 0 {
        if by_rate || by_ports {
            f.cookies = 1;
            f.since = now;
            f.entered += 1;
        }
        return;
    }
    let calm = (threshold == 0 || rate < threshold / 2) && !by_ports;
    if calm && now.wrapping_sub(f.since) >= cfg.jiffies(COOKIE_MODE_MIN_S) {
        f.cookies = 0;
        f.since = now;
        f.left += 1;
    }
}
