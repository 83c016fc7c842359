//! Every map the XDP program reads or writes. All are BTF maps, so `bpftool map dump`
//! prints their fields by name; the daemon pins them under its bpffs directory and may
//! resize them at load time (the sizes here are the defaults).
#![allow(non_upper_case_globals)]

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    config::{Config, FibKey, IfaceAddr, NextHop},
    flow::{Conn, FlowKey, NatReverse, SYN_SEEN_SLOTS, SynSeen},
    service::{Backend, ServiceInfo, ServiceKey},
    stats::{Counters, DropReason},
};

/// (VIP, port, protocol) -> service id and where its Maglev table lies.
#[btf_map]
pub static services: HashMap<ServiceKey, ServiceInfo, 65536> = HashMap::new();

/// Counting filter over service keys (`ServiceKey::filter_slot`): 0 means no service
/// has a key on this slot, so the packet is passed without a hash lookup.
#[btf_map]
pub static vip_filter: Array<u32, { lb_common::service::VIP_FILTER_SLOTS as usize }> = Array::new();

/// Backend id -> address, port, active flag and generation. Id 0 is unused.
#[btf_map]
pub static backends: Array<Backend, 65536> = Array::new();

/// All services' Maglev tables, one after another: slot -> backend id. Memory-mappable
/// (`BPF_F_MMAPABLE`), so the daemon writes tables with plain stores, not a syscall a slot.
#[btf_map]
pub static maglev: Array<u32, 4194304, { aya_ebpf::bindings::BPF_F_MMAPABLE as usize }> =
    Array::new();

/// Client flow (client -> VIP) -> chosen backend, SNAT address and port, next hop.
#[btf_map]
pub static conntrack: LruHashMap<FlowKey, Conn, 524288> = LruHashMap::new();

/// Flow hash (low 16 bits) -> the last SYN that hashed there. A SYN skips the conntrack
/// lookup; this tells a tracked flow's later packets that their 5-tuple was reused.
#[btf_map]
pub static syn_seen: Array<SynSeen, { SYN_SEEN_SLOTS as usize }> = Array::new();

/// Backend flow (backend -> SNAT address and port) -> client and VIP to restore, next hop.
#[btf_map]
pub static nat_reverse: LruHashMap<FlowKey, NatReverse, 524288> = LruHashMap::new();

/// Index 0: balancer-wide settings (SNAT port range).
#[btf_map]
pub static config: Array<Config, 1> = Array::new();

/// Egress ifindex -> IPv4 address used as SNAT source there.
#[btf_map]
pub static iface_addrs: HashMap<u32, IfaceAddr, 4096> = HashMap::new();

/// Backend id -> the next hop towards it, refreshed from the FIB once it expires.
#[btf_map]
pub static backend_hops: Array<NextHop, 65536> = Array::new();

/// (destination, ingress ifindex) -> next hop, for a client's replies; kept for
/// `FIB_CACHE_TTL_S`.
#[btf_map]
pub static fib_cache: LruHashMap<FibKey, NextHop, 65536> = LruHashMap::new();

/// Service id -> packets and bytes, both directions, per CPU.
#[btf_map]
pub static service_stats: PerCpuArray<Counters, 65536> = PerCpuArray::new();

/// Backend id -> packets and bytes, both directions, per CPU.
#[btf_map]
pub static backend_stats: PerCpuArray<Counters, 65536> = PerCpuArray::new();

/// Per-CPU room for the large values a packet builds (BPF gives a program 512 bytes of
/// stack): the reverse and conntrack entries of a new flow, the FIB lookup's parameters.
/// Not pinned: it holds nothing between packets.
#[btf_map]
pub static scratch: PerCpuArray<Scratch, 1> = PerCpuArray::new();

#[repr(C)]
pub struct Scratch {
    pub rev: NatReverse,
    pub conn: Conn,
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
}

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch_space() -> Option<&'static mut Scratch> {
    scratch.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Drop reason -> packets dropped, per CPU.
#[btf_map]
pub static drops: PerCpuArray<u64, { DropReason::COUNT as usize }> = PerCpuArray::new();
