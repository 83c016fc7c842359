//! Balancer-wide settings the XDP program reads from the one-entry `config` array.
use crate::{assert_layout, hash::SipKey};

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
    /// `COOKIES_*`.
    pub flags: u32,
    /// The group's secret key of the flow hash (Maglev slot and SNAT port).
    pub flow_key: SipKey,
    /// The group's secret key of SYN cookies.
    pub cookie_key: SipKey,
    /// New SYNs a second (over all CPUs) that turn cookie mode on; 0: never by rate.
    pub cookie_syn_rate: u32,
    /// Per mille of a backend's SNAT ports in use that turn cookie mode on; 0: never by
    /// occupancy.
    pub cookie_occupancy: u32,
    /// Seconds a backend holds a tuple it closed first in TIME_WAIT (60 on Linux); 0 is
    /// taken as 60.
    pub time_wait_s: u32,
    /// CPUs the per-CPU counters span (to sum the SYN rate).
    pub nr_cpus: u32,
    /// Slots of `conntrack` (a power of two; 0 before the daemon configured it).
    pub flow_slots: u32,
    pub _reserved: u32,
    /// The secret key of `conntrack`'s slot hash: chosen when the table is made and kept
    /// for its life (a new key would lose every tracked flow), unlike the group's keys.
    pub table_key: SipKey,
}
assert_layout!(Config, size = 88, align = 8);

/// `Config::flags`: answer every SYN with a cookie.
pub const COOKIES_ALWAYS: u32 = 1;
/// Never answer with a cookie.
pub const COOKIES_NEVER: u32 = 2;

/// The version of the maps' layout (every key and value type here and what its fields
/// mean). Bump it with any such change: a daemon then builds fresh maps instead of adopting
/// pinned ones it would misread.
pub const LAYOUT_VERSION: u32 = 5;

impl Config {
    /// Jiffies in `seconds` (whole seconds only: every timeout lb has is).
    #[inline(always)]
    pub const fn jiffies(&self, seconds: u32) -> u64 {
        let hz = if self.hz == 0 { 250 } else { self.hz };
        seconds as u64 * hz as u64
    }

    /// The backend's TIME_WAIT, in seconds.
    #[inline(always)]
    pub const fn time_wait(&self) -> u32 {
        if self.time_wait_s == 0 {
            60
        } else {
            self.time_wait_s
        }
    }
}

/// How many SNAT addresses an interface may have.
pub const MAX_SNAT_ADDRS: usize = 8;

/// Value of `iface_addrs`, keyed by ifindex: the IPv4 addresses lb uses as SNAT sources on
/// that egress interface (`addrs[..count]`), and how lb sends out of it (`IFACE_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceAddrs {
    pub count: u8,
    pub flags: u8,
    pub _reserved: u16,
    pub addrs: [[u8; 4]; MAX_SNAT_ADDRS],
}
assert_layout!(IfaceAddrs, size = 36, align = 2);

/// `IfaceAddrs::flags` and `NextHop::flags`: a frame that leaves where it came in is sent
/// with `XDP_REDIRECT` to that interface, not `XDP_TX`. A veth delivers `XDP_TX` frames
/// only to a peer that runs an XDP program itself (the kernel's `veth_xdp_flush` wakes no
/// other peer, and the frames wait for the next packet), but a redirect to any peer with
/// GRO on.
pub const IFACE_TX_BY_REDIRECT: u8 = 1;

/// `NextHop::flags` only: the FIB knows the route but not the next hop's MAC yet. The frame
/// goes to the kernel to be sent (`kernel_hop` in the XDP program), and the hop is never
/// kept (its `expires` is 0).
pub const HOP_VIA_KERNEL: u8 = 0x80;

/// `NextHop::flags` only: the destination is reached through a gateway, not on the
/// egress interface's own segment (a `dsr-l2` backend must be on it).
pub const HOP_VIA_GATEWAY: u8 = 0x40;

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
    /// lb's first SNAT address on the egress interface (from `iface_addrs`).
    pub src_addr: [u8; 4],
    /// How many SNAT addresses the egress interface has (more than one: the others are
    /// read from `iface_addrs`).
    pub snat_count: u8,
    /// The egress interface's `IFACE_*` flags.
    pub flags: u8,
    /// In jiffies; 0 means "look it up".
    pub expires: u64,
}
assert_layout!(NextHop, size = 32, align = 8);

/// How long (seconds) a cached route and next-hop MAC is used before the FIB is asked
/// again: the longest a route or neighbour change goes unnoticed.
pub const FIB_CACHE_TTL_S: u32 = 1;
