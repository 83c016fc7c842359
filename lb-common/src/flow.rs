//! Connection tracking and NAT state.
use crate::{
    assert_layout,
    config::{Config, NextHop},
};

/// A flow as seen on the wire: key of `conntrack` (client to VIP) and of `nat_reverse`
/// (backend to the balancer's SNAT address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}
assert_layout!(FlowKey, size = 16, align = 2);

impl FlowKey {
    pub const fn new(
        src_addr: [u8; 4],
        src_port: u16,
        dst_addr: [u8; 4],
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Value of `conntrack`: where a client's flow was balanced to and which SNAT address
/// and port it uses towards the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// Counted under this service; a tracked flow needs no service lookup.
    pub service_id: u32,
    pub _pad: u32,
    pub backend_id: u32,
    /// The backend's generation when the flow was balanced; a mismatch re-balances.
    pub backend_generation: u32,
    pub snat_addr: [u8; 4],
    pub snat_port: u16,
    /// `CONN_CLOSING` once a FIN or RST was seen in either direction.
    pub flags: u16,
    /// Jiffies at the last packet, refreshed at most once a second.
    pub last_seen: u64,
    /// Towards the backend.
    pub hop: NextHop,
}
assert_layout!(Conn, size = 64, align = 8);

pub const CONN_CLOSING: u16 = 1;

/// Idle timeouts, in seconds. A tracked flow idle for longer no longer holds its SNAT port.
pub const TCP_IDLE_TIMEOUT_S: u32 = 3600;
/// After a FIN or RST: long enough for the backend's TIME_WAIT (60 s on Linux).
pub const TCP_CLOSING_TIMEOUT_S: u32 = 60;
pub const UDP_IDLE_TIMEOUT_S: u32 = 120;
/// A new flow's SNAT port is held this long for its first answer (or second packet)
/// before the flow is tracked in `conntrack`: the first SYN retries (1, 3 and 7 s) fit
/// in it, and a SYN flood holds ports for no longer.
pub const PENDING_TIMEOUT_S: u32 = 10;
/// `last_seen` is rewritten only when it is older than this, to keep the fast path free
/// of a cache-line write on every packet.
pub const LAST_SEEN_GRANULARITY_S: u32 = 1;

impl Conn {
    /// Whether the flow has been idle longer than its protocol allows.
    #[inline(always)]
    pub fn expired(&self, proto: u8, now: u64, cfg: &Config) -> bool {
        let timeout = if self.flags & CONN_CLOSING != 0 {
            TCP_CLOSING_TIMEOUT_S
        } else if proto == crate::IPPROTO_TCP {
            TCP_IDLE_TIMEOUT_S
        } else {
            UDP_IDLE_TIMEOUT_S
        };
        now.saturating_sub(self.last_seen) > cfg.jiffies(timeout)
    }
}

/// Value of `syn_seen`, indexed by a flow's hash: the last SYN whose flow hashed there.
/// A tracked flow that sees a SYN for its own hash after its last packet is a new
/// connection on a reused port, and is balanced afresh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynSeen {
    pub hash: u32,
    /// The low 32 bits of jiffies (compared with wrapping arithmetic: good for weeks).
    pub at: u32,
}
assert_layout!(SynSeen, size = 8, align = 4);

impl SynSeen {
    /// Whether this mark is a SYN of the flow with `hash`, later than jiffies `since`.
    #[inline(always)]
    pub fn reopens(&self, hash: u32, since: u64) -> bool {
        self.hash == hash && (self.at.wrapping_sub(since as u32) as i32) > 0
    }
}

pub const SYN_SEEN_SLOTS: u32 = 1 << 14;

/// `NatReverse::flags`: the flow has no `conntrack` entry yet. Creating it is left to the
/// flow's second packet in either direction, so a new flow costs one map insert.
pub const REV_PENDING: u32 = 1;

/// Value of `nat_reverse`: how to turn a backend's reply back into what the client expects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverse {
    pub client_addr: [u8; 4],
    pub vip_addr: [u8; 4],
    pub client_port: u16,
    pub vip_port: u16,
    /// Replies are counted on the same service and backend as the requests.
    pub service_id: u32,
    pub backend_id: u32,
    pub backend_generation: u32,
    /// `REV_PENDING` until the flow is in `conntrack`.
    pub flags: u32,
    pub _pad: u32,
    /// Jiffies when the flow was created or the reply path last refreshed the client
    /// flow's `Conn::last_seen`.
    pub last_seen: u64,
    /// Towards the client.
    pub hop: NextHop,
}
assert_layout!(NatReverse, size = 72, align = 8);
