//! Every map the XDP program reads or writes. All are BTF maps, so `bpftool map dump`
//! prints their fields by name; the daemon pins them under its bpffs directory and may
//! resize them at load time (the sizes here are the defaults).
#![allow(non_upper_case_globals)]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    config::{Config, FibKey, IfaceAddrs, NextHop},
    flood::{CookieStat, Flood, SynWindow},
    flow::{Conn, FlowKey, NatReverse},
    flowtab::FlowSlot,
    ports::{BackendState, PortTable, PortTableKey},
    service::{Backend, FilterSlot, ServiceInfo, ServiceKey},
    stats::{Counters, DropReason},
};

/// (VIP, port, protocol) -> service id and where its Maglev table lies.
#[btf_map]
pub static services: HashMap<ServiceKey, ServiceInfo, 65536> = HashMap::new();

/// Counting filter over service keys (`ServiceKey::filter_slot`): 0 means no service
/// has a key on this slot, so the packet is passed without a hash lookup; a slot of one
/// key holds that service's entry too (`FilterSlot`, read by `vips`).
#[btf_map]
pub static vip_filter: Array<FilterSlot, { lb_common::service::VIP_FILTER_SLOTS as usize }> =
    Array::new();

/// Backend id -> address, port, active flag and generation. Id 0 is unused.
#[btf_map]
pub static backends: Array<Backend, 65536> = Array::new();

/// Backend id -> SNAT ports its flows hold (from the sweep) and its SYN-ACK's options.
#[btf_map]
pub static backend_state: Array<BackendState, 65536> = Array::new();

/// All services' Maglev tables, one after another: slot -> backend id. Memory-mappable,
/// so the daemon writes tables with plain stores, not a syscall a slot.
#[btf_map]
pub static maglev: Array<u32, 4194304, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Client flow (client -> VIP) -> chosen backend, SNAT address and port: lb's own
/// open-addressed table of one-line slots (`flows`, `lb_common::flowtab`). Entries leave
/// when their flow is over (the sweep, or a port taken over), never to make room, so a
/// flood cannot push out a live flow. Memory-mappable: its slots start on a page, so each
/// is one cache line.
#[btf_map]
pub static conntrack: Array<FlowSlot, 1048576, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Backend flow (backend -> SNAT address and port) -> client and VIP to restore, next hop,
/// and the state of the flow holding the port. A plain hash, like `conntrack`.
#[btf_map]
pub static nat_reverse: HashMap<FlowKey, NatReverse, 524288> = HashMap::new();

/// (backend, SNAT address) -> bitmap of the ports held: where a new flow finds a free port.
/// Made by the program on a pair's first flow (memory only for pairs in use).
#[btf_map]
pub static port_tables: HashMap<PortTableKey, PortTable, 65536, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Index 0: balancer-wide settings (SNAT port range, secrets, cookie thresholds).
#[btf_map]
pub static config: Array<Config, 1> = Array::new();

/// Egress ifindex -> the addresses used as SNAT sources there.
#[btf_map]
pub static iface_addrs: HashMap<u32, IfaceAddrs, 4096> = HashMap::new();

/// Backend id -> the next hop towards it, refreshed from the FIB once it expires.
#[btf_map]
pub static backend_hops: Array<NextHop, 65536> = Array::new();

/// (destination, ingress ifindex) -> next hop, for a client's replies; kept for
/// `FIB_CACHE_TTL_S`. A cache: LRU eviction only costs a lookup.
#[btf_map]
pub static fib_cache: LruHashMap<FibKey, NextHop, 65536> = LruHashMap::new();

/// Index 0: whether lb answers SYNs with cookies, and the figures that decide it.
#[btf_map]
pub static flood: Array<Flood, 1> = Array::new();

/// New SYNs this CPU saw in its current measuring window.
#[btf_map]
pub static syn_window: PerCpuArray<SynWindow, 1> = PerCpuArray::new();

/// `CookieStat` -> count, per CPU.
#[btf_map]
pub static cookie_stats: PerCpuArray<u64, { CookieStat::COUNT as usize }> = PerCpuArray::new();

/// Service id -> packets and bytes, both directions, per CPU.
#[btf_map]
pub static service_stats: PerCpuArray<Counters, 65536> = PerCpuArray::new();

/// Backend id -> packets and bytes, both directions, per CPU.
#[btf_map]
pub static backend_stats: PerCpuArray<Counters, 65536> = PerCpuArray::new();

/// Per-CPU room for the large values a packet builds (BPF gives a program 512 bytes of
/// stack): the reverse and conntrack entries of a new flow, the FIB lookup's parameters,
/// and an empty port table to create one from. Not pinned: it holds nothing between
/// packets.
#[btf_map]
pub static scratch: PerCpuArray<Scratch, 1> = PerCpuArray::new();

#[repr(C)]
pub struct Scratch {
    pub rev: NatReverse,
    pub conn: Conn,
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
    pub scan: crate::ports::ScanArgs,
    pub search: crate::ports::SearchState,
    pub flow: crate::balance::Flow,
    pub target: crate::balance::Target,
    pub answer: crate::cookie::Answer,
    /// The backend a cookie SYN-ACK speaks for.
    pub cookie_backend: u32,
    pub direct: crate::direct::Chosen,
    /// The MTU a "fragmentation needed" answer advertises (see `icmp::too_big`).
    pub too_big_mtu: u16,
    /// Never written: all zeroes.
    pub empty_table: PortTable,
}

/// Copies one map value into another a 64-bit word at a time: a struct copy goes through
/// the stack (or becomes a byte-loop subprogram), and the stack is short. For values whose
/// size is a whole number of words (every shared type is 8-byte aligned).
#[inline(always)]
pub fn copy_value<T>(dst: &mut T, src: &T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8)) };
    let words = core::mem::size_of::<T>() / 8;
    let (d, s) = (
        core::ptr::from_mut(dst).cast::<u64>(),
        core::ptr::from_ref(src).cast::<u64>(),
    );
    let mut i = 0;
    while i < words {
        // SAFETY: both point at whole values of `T`, `words` words long.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch_space() -> Option<&'static mut Scratch> {
    // SAFETY: non-null from the lookup; this CPU's value outlives the program run and no
    // other CPU touches it. (Callers hold several of these `&mut` at once, which Rust's
    // aliasing rules forbid.)
    scratch.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Drop reason -> packets dropped, per CPU.
#[btf_map]
pub static drops: PerCpuArray<u64, { DropReason::COUNT as usize }> = PerCpuArray::new();
