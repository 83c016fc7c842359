//! SNAT port allocation.
//!
//! A flow's first choice is the port its keyed hash names (`h0`), so that its retried SYNs
//! and later packets find the port again without a conntrack entry. When that port is
//! held, the flow takes the first free port after it that the (backend, SNAT address)
//! bitmap shows, a word of 64 ports at a time, and is tracked in conntrack at once; if the
//! ports it tries there all refuse it, it looks once more on the hop's second SNAT address,
//! or half the range away. A port is claimed by inserting its `nat_reverse` entry (the only
//! truth; the bitmap is a hint), or by taking over the entry of a holder that no longer
//! needs it.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    config::{Config, NextHop},
    flow::{FlowKey, NatReverse, SynProbe, state},
    hash::reduce,
    ports::{PORT_TABLE_SUMMARY_WORDS, PORT_TABLE_WORDS, PortTable, PortTableKey, first_free},
    service::Backend,
};

use crate::{maps, track};

/// Summary words a flow's search may look through for a word with a free port: all of
/// them (one bit per 64 ports), and the first once more after wrapping.
const SCAN_SUMMARY: u32 = PORT_TABLE_SUMMARY_WORDS as u32 + 1;
/// Ports a flow tries to claim past its first choice, in each round of the search.
const SCAN_CLAIMS: u32 = 6;
/// Rounds of the search: from the first choice, then on the second SNAT address, or with
/// one address from half the range away. A port in a backend's TIME_WAIT refuses a SYN
/// whose timestamp is older than the last one it saw, and Linux clients (6.x) draw a
/// timestamp offset per connection: about half the ports held in TIME_WAIT refuse a given
/// SYN, so a flow needs tries enough: with 7, about one new flow in a million found none
/// under sustained churn, and its retries failed on the same ports.
const SCAN_ROUNDS: u32 = 2;

/// The SNAT port range as the program uses it.
#[derive(Clone, Copy)]
pub struct Range {
    pub min: u32,
    pub len: u32,
}

impl Range {
    #[inline(always)]
    pub fn of(cfg: &Config) -> Option<Self> {
        let min = cfg.snat_port_min as u32;
        let len = (cfg.snat_port_max as u32).wrapping_sub(min).wrapping_add(1);
        (min != 0 && len != 0 && len <= 65535).then_some(Self { min, len })
    }
}

/// What a new flow asks for: a port towards `backend` for the flow described by `rev`.
pub struct Want<'a> {
    pub backend: &'a Backend,
    pub proto: u8,
    /// The port part of the flow hash.
    pub hash: u32,
    /// A TCP SYN's sequence number and timestamp, which a backend's TIME_WAIT judges.
    pub syn: SynProbe,
    pub now: u64,
    pub rev: &'a NatReverse,
}

/// The answer to a first choice.
pub enum First {
    /// Taken for this flow (its entry is in `nat_reverse`).
    Claimed([u8; 4], u16),
    /// The port holds this client flow's own entry already.
    Own(&'static mut NatReverse, [u8; 4], u16),
    /// Another flow holds it.
    Taken,
}

#[inline(always)]
fn table_key(backend_addr: [u8; 4], backend_port: u16, addr: [u8; 4]) -> PortTableKey {
    PortTableKey {
        backend_addr,
        backend_port,
        _pad: 0,
        snat_addr: addr,
    }
}

/// The bitmap of (backend, `addr`), made empty if there is none yet (None when the map is
/// full: allocation then probes without it).
#[inline(always)]
fn table(backend: &Backend, addr: [u8; 4]) -> Option<&'static mut PortTable> {
    let key = table_key(backend.addr, backend.port, addr);
    if let Some(t) = maps::port_tables.get_ptr_mut(&key) {
        // SAFETY: non-null from the lookup. Only the daemon removes from `port_tables`, and
        // a removed element's memory stays valid through the run (it may be reused for
        // another key). Other CPUs may flip its bits meanwhile: the bitmap is a hint.
        return Some(unsafe { &mut *t });
    }
    let scratch = maps::scratch_space()?;
    let _ = maps::port_tables.insert(&key, &scratch.empty_table, BPF_NOEXIST as u64);
    maps::port_tables
        .get_ptr_mut(&key)
        // SAFETY: as above.
        .map(|t| unsafe { &mut *t })
}

#[inline(always)]
fn word(t: &mut PortTable, idx: u32) -> &mut u64 {
    // Masked where the verifier sees it: the compiler drops a mask it can prove redundant.
    let mut w = (idx / 64) as usize;
    // SAFETY: inline asm that only moves a register to itself: no memory touched.
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) w, options(pure, nomem, nostack)) };
    &mut t.used[w & (PORT_TABLE_WORDS - 1)]
}

/// The summary word holding the bit of word `w`.
#[inline(always)]
fn summary(t: &mut PortTable, w: u32) -> &mut u64 {
    let mut i = (w / 64) as usize;
    // SAFETY: inline asm that only moves a register to itself: no memory touched.
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) i, options(pure, nomem, nostack)) };
    &mut t.full[i & (PORT_TABLE_SUMMARY_WORDS - 1)]
}

#[inline(always)]
fn mark(t: &mut PortTable, idx: u32) {
    let wp = word(t, idx);
    *wp |= 1 << (idx & 63);
    if *wp == u64::MAX {
        mark_full(t, idx / 64);
    }
}

/// Word `w` has no free port.
#[inline(always)]
fn mark_full(t: &mut PortTable, w: u32) {
    *summary(t, w) |= 1 << (w & 63);
}

/// Clears the bit of `port` from `addr` towards the backend at `backend_addr`:`backend_port`:
/// its holder let go.
#[inline(always)]
pub fn release(backend_addr: [u8; 4], backend_port: u16, addr: [u8; 4], port: u16, cfg: &Config) {
    let Some(range) = Range::of(cfg) else { return };
    let idx = (port as u32).wrapping_sub(range.min);
    if idx >= range.len {
        return;
    }
    let key = table_key(backend_addr, backend_port, addr);
    if let Some(t) = maps::port_tables.get_ptr_mut(&key) {
        // SAFETY: as in `table`: a `port_tables` element, valid for the run; a hint only.
        let t = unsafe { &mut *t };
        *word(t, idx) &= !(1 << (idx & 63));
        *summary(t, idx / 64) &= !(1 << ((idx / 64) & 63));
    }
}

/// The SNAT address a flow with port hash `hash` uses on the hop's interface.
#[inline(always)]
pub fn address(hop: &NextHop, hash: u32, nth: u32) -> [u8; 4] {
    let count = hop.snat_count as u32;
    if count <= 1 {
        return hop.src_addr;
    }
    let i = ((hash >> 16).wrapping_add(nth)) % count;
    if i == 0 {
        return hop.src_addr;
    }
    // SAFETY: the program never inserts into or removes from `iface_addrs`, and its
    // elements are preallocated: the value stays valid for the run.
    match unsafe { maps::iface_addrs.get(&hop.ifindex) } {
        Some(a) => a.addrs[(i as usize) & (lb_common::config::MAX_SNAT_ADDRS - 1)],
        None => hop.src_addr,
    }
}

/// Deletes the conntrack entry of the flow that held port `key` through `old`, if it still
/// points there: that flow is over.
#[inline(always)]
fn forget_holder(old: &NatReverse, key: &FlowKey, cfg: &Config) {
    let client = track::client_flow(old, key.proto);
    // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live as long
    // as the map. Other CPUs may change it meanwhile (see `flows`).
    if let Some(c) = crate::flows::get(&client, cfg).map(|c| unsafe { &*c })
        && c.snat_port == key.dst_port
        && c.snat_addr == key.dst_addr
        && c.backend_id == old.backend_id
    {
        crate::flows::remove(&client, cfg);
    }
}

/// Whether the flow holding a port through `e`, idle past its state's timeout by its own
/// entry, is still alive by its conntrack entry (a flow whose replies are rare).
#[inline(always)]
fn alive_by_conntrack(e: &mut NatReverse, key: &FlowKey, now: u64, cfg: &Config) -> bool {
    let client = track::client_flow(e, key.proto);
    // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live as long
    // as the map. Other CPUs may change it meanwhile (see `flows`).
    match crate::flows::get(&client, cfg).map(|c| unsafe { &*c }) {
        Some(c)
            if c.snat_port == key.dst_port
                && c.snat_addr == key.dst_addr
                && c.backend_id == e.backend_id
                && !c.expired(key.proto, now, cfg) =>
        {
            // Seen recently from the client's side: judge it by that until then.
            if c.last_seen > e.last_seen {
                e.last_seen = c.last_seen;
            }
            true
        }
        _ => false,
    }
}

enum Try {
    Claimed,
    Own(&'static mut NatReverse),
    /// Held: by a live flow (`true`, its bit belongs set) or by one the backend still
    /// remembers in TIME_WAIT, which another SYN may be given (`false`).
    Taken(bool),
}

/// Claims the port of `key` for the flow whose reverse entry is `rev` (its SYN `syn`), or
/// tells why not.
#[inline(always)]
fn try_claim(key: &FlowKey, rev: &NatReverse, syn: SynProbe, now: u64, cfg: &Config) -> Try {
    if maps::nat_reverse
        .insert(key, rev, BPF_NOEXIST as u64)
        .is_ok()
    {
        return Try::Claimed;
    }
    let Some(e) = maps::nat_reverse.get_ptr_mut(key) else {
        // Removed meanwhile.
        return overwrite(key, rev);
    };
    // SAFETY: non-null from the lookup. `nat_reverse`'s elements are preallocated: valid
    // for the run even when another CPU (or `overwrite` below) replaces the entry.
    let e = unsafe { &mut *e };
    if e.client_addr == rev.client_addr
        && e.client_port == rev.client_port
        && e.vip_addr == rev.vip_addr
        && e.vip_port == rev.vip_port
    {
        return Try::Own(e);
    }
    let free = match e.free_for(syn, now, key.proto, cfg) {
        Some(free) => free,
        None => !alive_by_conntrack(e, key, now, cfg),
    };
    if !free {
        return Try::Taken(!released(e.state));
    }
    forget_holder(e, key, cfg);
    overwrite(key, rev)
}

/// Puts `rev` on `key` in place of whatever is there.
#[inline(always)]
fn overwrite(key: &FlowKey, rev: &NatReverse) -> Try {
    match maps::nat_reverse.insert(key, rev, BPF_ANY as u64) {
        Ok(()) => Try::Claimed,
        Err(_) => Try::Taken(true),
    }
}

#[inline(always)]
fn port_key(want: &Want, addr: [u8; 4], port: u16) -> FlowKey {
    FlowKey::new(want.backend.addr, want.backend.port, addr, port, want.proto)
}

/// The flow's first choice of port on `hop`'s first SNAT address for it.
#[inline(always)]
pub fn first(want: &Want, hop: &NextHop, cfg: &Config) -> Result<First, ()> {
    let range = Range::of(cfg).ok_or(())?;
    let addr = address(hop, want.hash, 0);
    let idx = reduce(want.hash, range.len);
    let port = (range.min + idx) as u16;
    let key = port_key(want, addr, port);
    let t = table(want.backend, addr);
    Ok(match try_claim(&key, want.rev, want.syn, want.now, cfg) {
        Try::Claimed => {
            if let Some(t) = t {
                mark(t, idx);
            }
            First::Claimed(addr, port)
        }
        Try::Own(e) => First::Own(e, addr, port),
        Try::Taken(live) => {
            if let (Some(t), true) = (t, live) {
                mark(t, idx);
            }
            First::Taken
        }
    })
}

/// What the search carries from one step to the next. It lives in the per-CPU scratch
/// map: the verifier knows nothing of a map value's contents, so each loop step looks the
/// same to it. On the stack, every step's exact counters made new states to verify.
#[repr(C)]
pub struct SearchState {
    pub backend_addr: [u8; 4],
    pub backend_port: u16,
    pub proto: u16,
    pub hash: u32,
    pub addr: [u8; 4],
    pub syn: SynProbe,
    pub now: u64,
    pub min: u32,
    pub len: u32,
    pub words: u32,
    /// The word looked at, its bits as known, and the bit to look from.
    pub w: u32,
    pub current: u64,
    pub from: u32,
    /// 0 while the search looks through the summary for a word with a free port: the
    /// summary word looked at, and the bit to look from.
    pub in_word: u32,
    pub sw: u32,
    pub sfrom: u32,
    pub summary_left: u32,
    pub claims_left: u32,
    /// Set when a port was claimed.
    pub found: u32,
    pub port: u32,
}

/// What [`lb_claim`] gets: plain data only.
#[repr(C)]
pub struct ClaimArgs {
    pub key: FlowKey,
    pub syn: SynProbe,
    pub now: u64,
}

/// What [`lb_claim`] answers.
const CLAIMED: i32 = 0;
const TAKEN_LIVE: i32 = 1;
const TAKEN: i32 = 2;

/// Claims the port of `key` for the flow whose reverse entry is in this CPU's scratch
/// space; the flow's own old entry there (an earlier connection on its 5-tuple) is taken
/// over. A global function, verified once: inlined into the search's loop step, the
/// verifier walked every branch of it on every step.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_claim(args: *mut ClaimArgs) -> i32 {
    if args.is_null() {
        return TAKEN_LIVE;
    }
    // SAFETY: non-null (checked above); the only caller (`claim`) passes a `ClaimArgs` on
    // its stack, and the verifier checks a global function's pointer arguments.
    let a = unsafe { &*args };
    let (Some(cfg), Some(scratch)) = (maps::config.get(0), maps::scratch_space()) else {
        return TAKEN_LIVE;
    };
    let key = a.key;
    let rev = &scratch.rev;
    let outcome = match try_claim(&key, rev, a.syn, a.now, cfg) {
        Try::Own(_) => overwrite(&key, rev),
        other => other,
    };
    match outcome {
        Try::Claimed => CLAIMED,
        Try::Taken(true) => TAKEN_LIVE,
        _ => TAKEN,
    }
}

/// Reads a field of the search state afresh from the map: the compiler would otherwise
/// keep it in a register across rounds, and the verifier would then see each round's exact
/// counters and verify every round anew.
macro_rules! get {
    ($st:expr, $f:ident) => {
        // SAFETY: `$st` is always this CPU's scratch `SearchState` (see `lb_scan`):
        // non-null from the lookup, valid for the run, used by no other CPU.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$st).$f)) }
    };
}
macro_rules! set {
    ($st:expr, $f:ident, $v:expr) => {
        // SAFETY: as in `get!`.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*$st).$f), $v) }
    };
}

/// Claims `port` for the search's flow (see [`lb_claim`]).
#[inline(always)]
fn claim(st: *const SearchState, port: u16) -> i32 {
    let mut a = ClaimArgs {
        key: FlowKey::new(
            get!(st, backend_addr),
            get!(st, backend_port),
            get!(st, addr),
            port,
            get!(st, proto) as u8,
        ),
        syn: get!(st, syn),
        now: get!(st, now),
    };
    lb_claim(&mut a)
}

/// One step: the next free bit of the current word is tried; or, once that word is full,
/// the summary is read, a word at a time, for a word that is not. True ends the search.
#[inline(always)]
fn search_step(st: *mut SearchState, t: &mut PortTable) -> bool {
    let (claims_left, words) = (get!(st, claims_left), get!(st, words));
    if claims_left == 0 || words == 0 {
        return true;
    }
    let len = get!(st, len);
    if get!(st, in_word) == 0 {
        let summary_left = get!(st, summary_left);
        if summary_left == 0 {
            return true;
        }
        let sw = get!(st, sw);
        let summary_words = words.div_ceil(64);
        let valid = if (sw + 1) * 64 <= words {
            64
        } else {
            words.wrapping_sub(sw * 64)
        };
        match first_free(*summary(t, sw * 64), get!(st, sfrom), valid) {
            Some(b) => {
                let w = sw * 64 + b;
                set!(st, w, w);
                set!(st, current, *word(t, w * 64));
                set!(st, from, 0);
                set!(st, in_word, 1);
            }
            None => {
                set!(st, summary_left, summary_left - 1);
                set!(st, sw, if sw + 1 >= summary_words { 0 } else { sw + 1 });
                set!(st, sfrom, 0);
            }
        }
        return false;
    }
    let (w, current) = (get!(st, w), get!(st, current));
    let valid = if (w + 1) * 64 <= len {
        64
    } else {
        len.wrapping_sub(w * 64)
    };
    let Some(b) = first_free(current, get!(st, from), valid) else {
        // Full: noted in the summary, which is read next from the word after this one.
        note_crowded();
        mark_full(t, w);
        let next = if w + 1 >= words { 0 } else { w + 1 };
        set!(st, sw, next / 64);
        set!(st, sfrom, next & 63);
        set!(st, in_word, 0);
        return false;
    };
    set!(st, claims_left, claims_left - 1);
    set!(st, current, current | 1 << b);
    let idx = w * 64 + b;
    let port = (get!(st, min) + idx) as u16;
    match claim(st, port) {
        CLAIMED => {
            mark(t, idx);
            set!(st, found, 1);
            set!(st, port, port as u32);
            true
        }
        TAKEN_LIVE => {
            mark(t, idx);
            false
        }
        _ => false,
    }
}

/// One step without a bitmap: the `i`th port derived from the hash. True ends the search.
#[inline(always)]
fn probe_step(st: *mut SearchState, i: u32) -> bool {
    let len = get!(st, len);
    if len == 0 {
        return true;
    }
    let idx = reduce(
        get!(st, hash).wrapping_add((i + 1).wrapping_mul(0x9e37_79b9)),
        len,
    );
    let port = (get!(st, min) + idx) as u16;
    if claim(st, port) == CLAIMED {
        set!(st, found, 1);
        set!(st, port, port as u32);
        return true;
    }
    false
}

/// What [`lb_scan`] gets and gives: plain data only (to a global function a pointer
/// argument is memory of its type's size; pointers stored inside would be mere numbers).
#[repr(C)]
pub struct ScanArgs {
    pub backend: Backend,
    pub syn: SynProbe,
    pub hash: u32,
    pub proto: u32,
    pub now: u64,
    pub hop: NextHop,
    /// Out: the port claimed (0: none), from this address.
    pub port: u32,
    pub addr: [u8; 4],
    /// What `balance::scan_flow` then does (`SCAN_NEW` or `SCAN_COOKIE`), and the TTL of
    /// the SYN it sends for a cookie.
    pub kind: u32,
    pub ttl: u32,
    /// 1 when the hop has a second SNAT address, which the search's second round takes.
    pub second_address: u32,
}

/// Leaves in the scratch space what [`lb_scan`] needs to find `want` a port past its first
/// choice, and what `balance::scan_flow` does then (`kind`, `ttl`).
#[inline(always)]
pub fn prepare_scan(want: &Want, hop: &NextHop, kind: u32, ttl: u32) {
    let Some(scratch) = maps::scratch_space() else {
        return;
    };
    let a = &mut scratch.scan;
    a.backend = *want.backend;
    a.syn = want.syn;
    a.hash = want.hash;
    a.proto = want.proto as u32;
    a.now = want.now;
    a.hop = *hop;
    a.port = 0;
    a.addr = [0; 4];
    a.kind = kind;
    a.ttl = ttl;
}

/// Runs [`lb_scan`] on what [`prepare_scan`] left: `next::CONTINUE` when it found a port
/// (`balance::scan_flow` then finishes the flow), else a drop.
#[inline(always)]
pub fn scan() -> u32 {
    let Some(scratch) = maps::scratch_space() else {
        return crate::next::drop(lb_common::stats::DropReason::MapUpdate);
    };
    if lb_scan(&mut scratch.scan) == FOUND {
        return crate::next::CONTINUE;
    }
    crate::next::drop(lb_common::stats::DropReason::SnatExhausted)
}

/// A free port past the flow's first choice, in [`SCAN_ROUNDS`] rounds (on the hop's first
/// SNAT address, then on its second or half the range away): from the address's bitmap,
/// or by hashing when there is none. Sets `Flood::occupancy_high` when the search had to
/// go past a full word, or found nothing: the range is nearly full.
///
/// A global function, verified once on its own: inlined into the packet path, the search
/// made the program too complex to verify. Its loops are plain bounded ones (a `bpf_loop`
/// callback would be one more frame on the deepest call chain); the state they carry is
/// in the scratch map, unknown to the verifier, so each round looks the same to it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_scan(args: *mut ScanArgs) -> i32 {
    if args.is_null() {
        return -1;
    }
    // SAFETY: non-null (checked above); the only caller (`scan`) passes this CPU's scratch
    // `ScanArgs`, and the verifier checks a global function's pointer arguments.
    let a = unsafe { &mut *args };
    let Some(cfg) = maps::config.get(0) else {
        return -1;
    };
    let Some(scratch) = maps::scratch_space() else {
        return -1;
    };
    let Some(range) = Range::of(cfg) else {
        return -1;
    };
    a.port = 0;
    // Read back through memory, so that the verifier does not follow each answer on a path
    // of its own.
    // SAFETY: `a` is this CPU's scratch `ScanArgs` (see above).
    unsafe {
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!(a.second_address),
            u32::from(a.hop.snat_count > 1),
        );
    }
    for step in 0..SCAN_ROUNDS {
        // The second round: the second SNAT address if there is one, else the first once
        // more, from half the hash space away, which `reduce` maps half the range away.
        // SAFETY: as above.
        let second = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(a.second_address)) } & 1;
        let (nth, round) = (step & second, step & (second ^ 1));
        let hash = a.hash.wrapping_add(round << 31);
        let start = reduce(hash, range.len);
        let addr = address(&a.hop, a.hash, nth);
        let table = table(&a.backend, addr);
        let st = &mut scratch.search;
        *st = SearchState {
            backend_addr: a.backend.addr,
            backend_port: a.backend.port,
            proto: a.proto as u16,
            hash,
            addr,
            syn: a.syn,
            now: a.now,
            min: range.min,
            len: range.len,
            words: range.len.div_ceil(64),
            w: start / 64,
            current: 0,
            from: start & 63,
            in_word: 1,
            sw: 0,
            sfrom: 0,
            summary_left: SCAN_SUMMARY,
            claims_left: SCAN_CLAIMS,
            found: 0,
            port: 0,
        };
        let stp: *mut SearchState = st;
        match table {
            Some(t) => {
                let mut current = *word(t, start);
                // The first choice was tried already.
                if step == 0 {
                    current |= 1 << (start & 63);
                }
                set!(stp, current, current);
                for _ in 0..SCAN_SUMMARY + 2 * SCAN_CLAIMS + 2 {
                    if search_step(stp, t) {
                        break;
                    }
                }
            }
            None => {
                for i in 0..SCAN_CLAIMS {
                    if probe_step(stp, i) {
                        break;
                    }
                }
            }
        }
        if get!(stp, found) != 0 {
            a.port = get!(stp, port);
            a.addr = addr;
            return FOUND;
        }
    }
    note_crowded();
    0
}

/// What [`lb_scan`] answers when it found a port.
const FOUND: i32 = 1;

#[inline(always)]
fn note_crowded() {
    if let Some(f) = maps::flood.get_ptr_mut(0) {
        // SAFETY: non-null from the lookup; array values live as long as the map. Other
        // CPUs may set the flag at once: all store the same 1.
        unsafe {
            if (*f).occupancy_high == 0 {
                (*f).occupancy_high = 1;
            }
        }
    }
}

/// Whether `st` is a state whose port the bitmap shows free (the sweep keeps it so).
#[inline(always)]
pub const fn released(st: u8) -> bool {
    st == state::TIME_WAIT || st == state::CLOSED
}
