//! Balancer-wide settings the XDP program reads from the one-entry `config` array.
use crate::assert_layout;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// SNAT source ports are taken from `snat_port_min ..= snat_port_max`; replies to
    /// ports in this range are looked up in `nat_reverse`. 0/0 disables forwarding.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The kernel's jiffies per second (CONFIG_HZ): the program keeps time in jiffies,
    /// the cheapest clock it can read. 0 is taken as 250.
    pub hz: u32,
    /// [`LAYOUT_VERSION`] of the daemon that created the maps: a restarted daemon adopts
    /// pinned maps only when it matches its own.
    pub layout: u32,
}
assert_layout!(Config, size = 12, align = 4);

/// The version of the maps' layout (every key and value type here and what its fields
/// mean). Bump it with any such change: a daemon then builds fresh maps instead of adopting
/// pinned ones it would misread.
pub const LAYOUT_VERSION: u32 = 1;

impl Config {
    /// Jiffies in `seconds` (whole seconds only: every timeout lb has is).
    #[inline(always)]
    pub const fn jiffies(&self, seconds: u32) -> u64 {
        let hz = if self.hz == 0 { 250 } else { self.hz };
        seconds as u64 * hz as u64
    }
}

/// Value of `iface_addrs`, keyed by ifindex: the IPv4 address lb uses as SNAT source
/// on that egress interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceAddr {
    pub addr: [u8; 4],
}
assert_layout!(IfaceAddr, size = 4, align = 1);

/// Key of `fib_cache`: a destination as routed for packets arriving on `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FibKey {
    pub dst: [u8; 4],
    pub ingress_ifindex: u32,
}
assert_layout!(FibKey, size = 8, align = 4);

/// A `bpf_fib_lookup` answer: where a packet leaves and with which MACs. Kept in
/// `fib_cache` (per destination) and in every tracked flow (both directions), and reused
/// until `expires_ns`, so that most packets skip the full route and neighbour lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    /// The largest IP total length the lookup accepted for the egress MTU; a larger
    /// packet asks the FIB again.
    pub max_len: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// lb's address on the egress interface (from `iface_addrs`): the SNAT source there.
    pub src_addr: [u8; 4],
    /// Explicit: the verifier rejects copies of uninitialised padding. (Padding is never
    /// an array: the BPF backend zeroes byte arrays with a byte-loop subprogram.)
    pub _pad: u16,
    /// In jiffies; 0 means "look it up".
    pub expires: u64,
}
assert_layout!(NextHop, size = 32, align = 8);

/// How long (seconds) a cached route and next-hop MAC is used before the FIB is asked
/// again: the longest a route or neighbour change goes unnoticed.
pub const FIB_CACHE_TTL_S: u32 = 1;
