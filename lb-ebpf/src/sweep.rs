//! The sweep: a program the daemon runs once a second (through `BPF_PROG_TEST_RUN`) that
//! walks the flow maps in the kernel. It removes the entries of flows that are over (idle
//! past their state's timeout, closed, out of TIME_WAIT), clears their ports' bits, counts
//! the ports each backend's flows hold, and reconsiders cookie mode from those counts and
//! the SYN rate. The program never needs it to forward correctly; without it (no daemon)
//! ports are still taken over from finished flows as new flows meet them.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_for_each_map_elem, bpf_loop},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    config::Config,
    flow::{CONN_DIRECT, FlowKey, NatReverse, state},
    flowtab,
    ports::BackendState,
};

use crate::{flood, flows, maps, ports, track};

/// What the sweep carries from entry to entry.
#[repr(C)]
struct Sweep {
    now: u64,
    cfg: Config,
    epoch: u32,
    /// The highest per-mille occupancy of a backend's ports seen so far.
    max_permille: u32,
    removed: u32,
    range: u32,
}

/// Backend `id`'s counts, zeroed on this sweep's first visit.
#[inline(always)]
fn counts(id: u32, s: &Sweep) -> Option<&'static mut BackendState> {
    let b = maps::backend_state.get_ptr_mut(id)?;
    // SAFETY: non-null from the lookup; array values live as long as the map. The packet
    // path may write other fields of it (the MSS) meanwhile.
    let b = unsafe { &mut *b };
    if b.sweep != s.epoch {
        b.sweep = s.epoch;
        b.ports_in_use = 0;
        b.ports_time_wait = 0;
    }
    Some(b)
}

/// Counts the port held through `r` for its backend.
#[inline(always)]
fn count(r: &NatReverse, s: &mut Sweep) {
    let Some(b) = counts(r.backend_id, s) else {
        return;
    };
    if r.state == state::TIME_WAIT {
        b.ports_time_wait += 1;
        return;
    }
    if ports::released(r.state) {
        return;
    }
    b.ports_in_use += 1;
    let addrs = match maps::backend_hops.get(r.backend_id) {
        Some(h) if h.snat_count > 1 => h.snat_count as u64,
        _ => 1,
    };
    let capacity = s.range as u64 * addrs;
    if let Some(permille) = (b.ports_in_use as u64 * 1000).checked_div(capacity) {
        let permille = permille as u32;
        if permille > s.max_permille {
            s.max_permille = permille;
        }
    }
}

extern "C" fn sweep_reverse(
    _map: *mut c_void,
    key: *mut FlowKey,
    value: *mut NatReverse,
    ctx: *mut Sweep,
) -> i64 {
    // SAFETY: `bpf_for_each_map_elem` passes the current element's key and value, valid
    // through the callback, and the `Sweep` that `lb_sweep` gave it.
    let (k, r, s) = unsafe { (&*key, &mut *value, &mut *ctx) };
    let over = match r.free_for(lb_common::flow::SynProbe::NONE, s.now, k.proto, &s.cfg) {
        Some(free) => free,
        None => !holder_alive(r, k, s),
    };
    if !over {
        count(r, s);
        return 0;
    }
    let client = track::client_flow(r, k.proto);
    // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live as long
    // as the map. Other CPUs may change it meanwhile (see `flows`).
    if let Some(c) = flows::get(&client, &s.cfg).map(|c| unsafe { &*c })
        && c.snat_port == k.dst_port
        && c.snat_addr == k.dst_addr
        && c.backend_id == r.backend_id
    {
        flows::remove(&client, &s.cfg);
    }
    if !ports::released(r.state) {
        ports::release(k.src_addr, k.src_port, k.dst_addr, k.dst_port, &s.cfg);
    }
    let _ = maps::nat_reverse.remove(k);
    s.removed += 1;
    0
}

/// Whether the flow holding port `k`, idle by its own entry, lives by its conntrack entry.
#[inline(always)]
fn holder_alive(r: &NatReverse, k: &FlowKey, s: &Sweep) -> bool {
    let client = track::client_flow(r, k.proto);
    // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live as long
    // as the map. Other CPUs may change it meanwhile (see `flows`).
    match flows::get(&client, &s.cfg).map(|c| unsafe { &*c }) {
        Some(c) => {
            c.snat_port == k.dst_port
                && c.snat_addr == k.dst_addr
                && c.backend_id == r.backend_id
                && !c.expired(k.proto, s.now, &s.cfg)
        }
        None => false,
    }
}

/// Slots [`sweep_slots`] takes a call (a callback a slot cost about 40 ns a slot, most
/// of them empty).
const SLOTS_PER_CALL: u32 = 16;

/// The `index`-th group of `SLOTS_PER_CALL` slots of `conntrack`, counted from the end:
/// the table is walked from its last slot down (see [`sweep_slot`]).
extern "C" fn sweep_slots(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the `Sweep` that `lb_sweep` gave it, alive on its
    // stack.
    let s = unsafe { &mut *ctx.cast::<Sweep>() };
    let mask = s.cfg.flow_slots.wrapping_sub(1);
    let top = mask.wrapping_sub((index as u32).wrapping_mul(SLOTS_PER_CALL));
    let mut j = 0;
    while j < SLOTS_PER_CALL {
        sweep_slot(top.wrapping_sub(j) & mask, mask, s);
        j += 1;
    }
    0
}

/// One slot of `conntrack`: an expired flow's slot goes dead; a dead slot just before an
/// empty one is no run's middle any more, so it becomes empty too (walking down, a whole
/// run of dead slots ending in an empty one clears in one sweep). An insert that claimed
/// the next slot meanwhile keeps its run: the slot is put back.
#[inline(always)]
fn sweep_slot(i: u32, mask: u32, s: &mut Sweep) {
    let Some(slot) = maps::conntrack.get_ptr_mut(i) else {
        return;
    };
    // SAFETY: non-null from the lookup; array values live as long as the map. Other CPUs
    // may change the slot meanwhile (see `flows`).
    let slot = unsafe { &mut *slot };
    // SAFETY: a pointer made from a reference: valid and aligned.
    let mut st = unsafe { core::ptr::read_volatile(&slot.state) };
    if st == flowtab::slot::EMPTY {
        return;
    }
    if st == flowtab::slot::LIVE {
        if !slot.conn.expired(slot.proto, s.now, &s.cfg) {
            // A direct flow holds no port: it is counted here, among its backend's.
            if slot.conn.flags & CONN_DIRECT != 0
                && let Some(b) = counts(slot.conn.backend_id, s)
            {
                b.ports_in_use += 1;
            }
        } else if flows::set_state(slot, flowtab::slot::LIVE, flowtab::slot::DEAD) {
            s.removed += 1;
            st = flowtab::slot::DEAD;
        }
    }
    if st != flowtab::slot::DEAD {
        return;
    }
    let next_empty = |i: u32| match maps::conntrack.get(i.wrapping_add(1) & mask) {
        // SAFETY: a pointer made from a reference: valid and aligned.
        Some(n) => (unsafe { core::ptr::read_volatile(&n.state) }) == flowtab::slot::EMPTY,
        None => false,
    };
    if next_empty(i)
        && flows::set_state(slot, flowtab::slot::DEAD, flowtab::slot::EMPTY)
        && !next_empty(i)
    {
        flows::set_state(slot, flowtab::slot::EMPTY, flowtab::slot::DEAD);
    }
}

#[xdp]
pub fn lb_sweep(_ctx: XdpContext) -> u32 {
    let Some(cfg) = maps::config.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(f) = maps::flood.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: non-null from the lookup; array values live as long as the map. The packet
    // path may write it at once (see `flood`): plain figures, no atomics.
    let f = unsafe { &mut *f };
    let now = track::now();
    let mut s = Sweep {
        now,
        cfg: *cfg,
        epoch: f.sweeps.wrapping_add(1),
        max_permille: 0,
        removed: 0,
        range: ports::Range::of(cfg).map_or(0, |r| r.len),
    };
    let ctx = core::ptr::from_mut(&mut s).cast::<c_void>();
    // SAFETY: BPF helper calls with arguments of the types they document: callbacks of
    // their signatures, the map, and `s`, which outlives both walks.
    unsafe {
        bpf_loop(
            cfg.flow_slots.div_ceil(SLOTS_PER_CALL),
            sweep_slots as *mut c_void,
            ctx,
            0,
        );
        bpf_for_each_map_elem(
            core::ptr::from_ref(&maps::nat_reverse).cast_mut().cast(),
            sweep_reverse as *mut c_void,
            ctx,
            0,
        );
    }
    f.sweeps = s.epoch;
    f.occupancy = s.max_permille;
    f.occupancy_high = (cfg.cookie_occupancy > 0 && s.max_permille >= cfg.cookie_occupancy) as u32;
    let rate = flood::syn_rate(now, cfg);
    f.syn_rate = rate;
    flood::decide(f, rate, now, cfg);
    xdp_action::XDP_PASS
}
