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
    flow::{Conn, FlowKey, NatReverse},
    service::{Backend, ServiceInfo, ServiceKey},
    stats::{Counters, DropReason},
};

/// (VIP, port, protocol) -> service id and where its Maglev table lies.
#[btf_map]
pub static services: HashMap<ServiceKey, ServiceInfo, 65536> = HashMap::new();

/// Backend id -> address, port, active flag and generation. Id 0 is unused.
#[btf_map]
pub static backends: Array<Backend, 65536> = Array::new();

/// All services' Maglev tables, one after another: slot -> backend id.
#[btf_map]
pub static maglev: Array<u32, 4194304> = Array::new();

/// Client flow (client -> VIP) -> chosen backend, SNAT address and port, next hop.
#[btf_map]
pub static conntrack: LruHashMap<FlowKey, Conn, 524288> = LruHashMap::new();

/// Backend flow (backend -> SNAT address and port) -> client and VIP to restore, next hop.
#[btf_map]
pub static nat_reverse: LruHashMap<FlowKey, NatReverse, 524288> = LruHashMap::new();

/// Index 0: balancer-wide settings (SNAT port range).
#[btf_map]
pub static config: Array<Config, 1> = Array::new();

/// Egress ifindex -> IPv4 address used as SNAT source there.
#[btf_map]
pub static iface_addrs: HashMap<u32, IfaceAddr, 1024> = HashMap::new();

/// (destination, ingress ifindex) -> egress ifindex and MACs, for `FIB_CACHE_TTL_NS`.
#[btf_map]
pub static fib_cache: LruHashMap<FibKey, NextHop, 65536> = LruHashMap::new();

/// Service id -> packets and bytes, both directions, per CPU.
#[btf_map]
pub static service_stats: PerCpuArray<Counters, 65536> = PerCpuArray::new();

/// Backend id -> packets and bytes, both directions, per CPU.
#[btf_map]
pub static backend_stats: PerCpuArray<Counters, 65536> = PerCpuArray::new();

/// Drop reason -> packets dropped, per CPU.
#[btf_map]
pub static drops: PerCpuArray<u64, { DropReason::COUNT as usize }> = PerCpuArray::new();
