//! `conntrack`, the client flows lb tracks: lookups, inserts and removals on its
//! open-addressed slots (the layout and why: `lb_common::flowtab`).
//!
//! Several CPUs use the table at once, without locks. An insert claims a free slot by a
//! compare-and-swap of its state word, writes it, then marks it live; a lookup only takes
//! a live slot whose key is the flow's. Like a kernel hash map's preallocated elements, a
//! removed slot may be reused at once: a CPU still holding it sees another flow's values,
//! and a flow whose key it compared before the change is no longer there.
use lb_common::{
    config::Config,
    flow::{Conn, FlowKey},
    flowtab::{
        FLOW_PROBES, FlowSlot, STATE_WORD, home_slot, slot, slot_words, state_of, with_state,
    },
    hash::SipKey,
};

use crate::maps;

/// Answers of the global functions: no slot.
const NONE: i64 = -1;

/// Where flow slot words `w0`, `w1` (state live) are in a table of `slots` slots whose
/// hash key is `k0`, `k1`: the home slot in the high half, the live slot holding the flow
/// in the low half (`u32::MAX` for none). A global function, verified once; the hash is
/// computed here, so that its registers spill into this frame, not the caller's.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_flow_find(w0: u64, w1: u64, k0: u64, k1: u64, slots: u32) -> u64 {
    let (a, b) = (w0.to_le_bytes(), w1.to_le_bytes());
    let flow = FlowKey::new(
        [a[0], a[1], a[2], a[3]],
        u16::from_le_bytes([b[0], b[1]]),
        [a[4], a[5], a[6], a[7]],
        u16::from_le_bytes([b[2], b[3]]),
        b[4],
    );
    let home = home_slot(SipKey { k0, k1 }, &flow, slots);
    let mask = slots.wrapping_sub(1);
    let found = |idx: u32| ((home as u64) << 32) | idx as u64;
    let mut i = 0;
    while i < FLOW_PROBES {
        let idx = home.wrapping_add(i) & mask;
        let Some(s) = maps::conntrack.get_ptr(idx) else {
            break;
        };
        let p = s.cast::<u64>();
        // SAFETY: non-null from the lookup: a 64-byte slot, 8-byte aligned, read as its
        // first two words (volatile: other CPUs change them).
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(p),
                core::ptr::read_volatile(p.add(1)),
            )
        };
        if x == w0 && y == w1 {
            return found(idx);
        }
        if state_of(y) == slot::EMPTY {
            break;
        }
        i += 1;
    }
    found(NOT_FOUND)
}

/// `lb_flow_find`'s low half when the flow is not there.
const NOT_FOUND: u32 = u32::MAX;

/// Where `flow` is: its home slot, and its live slot if any.
#[inline(always)]
fn locate(flow: &FlowKey, cfg: &Config) -> Option<(u32, Option<u32>)> {
    if cfg.flow_slots == 0 {
        return None;
    }
    let (w0, w1) = slot_words(flow, slot::LIVE);
    let r = lb_flow_find(w0, w1, cfg.table_key.k0, cfg.table_key.k1, cfg.flow_slots);
    let idx = r as u32;
    Some(((r >> 32) as u32, (idx != NOT_FOUND).then_some(idx)))
}

/// Claims the first free slot (empty or dead) from `home` for the flow whose second slot
/// word is `w1`: that word (its ports and protocol) is written, busy. The index, or -1
/// when the probe found none.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_flow_claim(w1: u64, home: u32, mask: u32) -> i64 {
    let busy = with_state(w1, slot::BUSY);
    let mut i = 0;
    while i < FLOW_PROBES {
        let idx = home.wrapping_add(i) & mask;
        let Some(s) = maps::conntrack.get_ptr_mut(idx) else {
            return NONE;
        };
        let word = state_word(s);
        // SAFETY: `word` is the state word of a slot the lookup returned non-null.
        let seen = unsafe { core::ptr::read_volatile(word) };
        let st = state_of(seen);
        if (st == slot::EMPTY || st == slot::DEAD) && cmpxchg(word, seen, busy) {
            return idx as i64;
        }
        i += 1;
    }
    NONE
}

/// The word of slot `s` that holds its state.
#[inline(always)]
fn state_word(s: *mut FlowSlot) -> *mut u64 {
    // SAFETY: `STATE_WORD` (8) is inside the 64-byte slot, and every caller passes a
    // `conntrack` slot.
    unsafe { s.cast::<u8>().add(STATE_WORD).cast::<u64>() }
}

/// Stores `new` at `p` if it holds `expected`, atomically (the instruction is the kernel's
/// BPF_CMPXCHG; Rust's BPF target offers no compare-and-swap).
#[inline(always)]
fn cmpxchg(p: *mut u64, expected: u64, new: u64) -> bool {
    let old: u64;
    // SAFETY: callers pass the state word of a `conntrack` slot: valid and 8-byte aligned;
    // BPF_CMPXCHG is atomic against other CPUs.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") expected => old,
            options(nostack),
        );
    };
    old == expected
}

#[inline(always)]
fn find(flow: &FlowKey, cfg: &Config) -> Option<*mut FlowSlot> {
    let (_, idx) = locate(flow, cfg)?;
    maps::conntrack.get_ptr_mut(idx?)
}

/// The tracked flow `flow`, to read and update in place.
#[inline(always)]
pub fn get(flow: &FlowKey, cfg: &Config) -> Option<*mut Conn> {
    // SAFETY: `find` returned the slot non-null; this only takes a field's address.
    find(flow, cfg).map(|s| unsafe { core::ptr::addr_of_mut!((*s).conn) })
}

/// Whether an insert may replace a flow's entry.
pub enum Insert {
    /// Only when the flow has none.
    New,
    /// Its entry, if any, is replaced.
    Replace,
}

/// Why an insert failed.
pub enum Refused {
    /// The flow is tracked, and the insert was `Insert::New`.
    Tracked,
    /// No slot is free within `FLOW_PROBES` of the flow's home (or the table is not set
    /// up): the table is too full.
    Full,
}

/// Tracks `flow` with `conn`.
#[inline(always)]
pub fn insert(flow: &FlowKey, conn: &Conn, how: Insert, cfg: &Config) -> Result<(), Refused> {
    let (home, old) = locate(flow, cfg).ok_or(Refused::Full)?;
    if old.is_some() && matches!(how, Insert::New) {
        return Err(Refused::Tracked);
    }
    let (_, w1) = slot_words(flow, slot::LIVE);
    let idx = lb_flow_claim(w1, home, cfg.flow_slots.wrapping_sub(1));
    if idx < 0 {
        return Err(Refused::Full);
    }
    // SAFETY: non-null from the lookup. This CPU claimed the slot (busy): no other CPU
    // writes it, and lookups skip it until it is live.
    let s = unsafe {
        &mut *maps::conntrack
            .get_ptr_mut(idx as u32)
            .ok_or(Refused::Full)?
    };
    s.src_addr = flow.src_addr;
    s.dst_addr = flow.dst_addr;
    maps::copy_value(&mut s.conn, conn);
    // Live: the key and value are written before the state says so.
    set_state(s, slot::BUSY, slot::LIVE);
    // The new entry is whole before the old one goes: a lookup finds one or the other.
    if let Some(old) = old
        && let Some(o) = maps::conntrack.get_ptr_mut(old)
    {
        // SAFETY: non-null from the lookup; array values live as long as the map, and
        // `set_state` only changes the state word, atomically.
        set_state(unsafe { &mut *o }, slot::LIVE, slot::DEAD);
    }
    Ok(())
}

/// Stops tracking `flow`.
#[inline(always)]
pub fn remove(flow: &FlowKey, cfg: &Config) {
    if let Some(s) = find(flow, cfg) {
        // SAFETY: as above: a slot `find` returned non-null; only its state word changes.
        set_state(unsafe { &mut *s }, slot::LIVE, slot::DEAD);
    }
}

/// Moves slot `s` from state `from` to `to`, if it is still in `from`.
#[inline(always)]
pub fn set_state(s: &mut FlowSlot, from: u8, to: u8) -> bool {
    let word = state_word(s);
    // SAFETY: `word` points into `s`, a whole slot (see `state_word`).
    let seen = unsafe { core::ptr::read_volatile(word) };
    state_of(seen) == from && cmpxchg(word, seen, with_state(seen, to))
}
