//! What a sub-program answers besides an XDP verdict: the step the top of the program takes
//! next. Sub-programs answer plain numbers (see `balance::new_flow`), and the steps that
//! follow are called from the top, one after another rather than one inside another, so
//! that the deepest chain of frames stays inside the verifier's 512 bytes of stack.
use aya_ebpf::bindings::xdp_action;
use lb_common::stats::DropReason;

use crate::stats;

/// Carry on as usual: the sub-program only looked, or changed the packet in place.
pub const CONTINUE: u32 = u32::MAX;
/// A tracked flow of this 5-tuple takes the packet: a retried SYN, or a SYN on a live
/// connection (which its backend answers as it sees fit).
pub const TRACKED: u32 = u32::MAX - 1;
/// The new flow's first-choice port was held: `balance::scan_flow` looks further.
pub const SCAN: u32 = u32::MAX - 2;
/// The tracked flow's backend went away, or the flow expired: balance it again.
pub const REBALANCE: u32 = u32::MAX - 3;
/// The ACK answered one of lb's cookies (the answer is in the scratch space):
/// `balance::cookie_flow` opens the backend side.
pub const OPEN_COOKIE: u32 = u32::MAX - 4;

/// A backend's packet for a flow lb opened behind a cookie, whose handshake with the
/// backend is under way: `reply::synproxy_handshake` takes it first.
pub const SYNPROXY: u32 = u32::MAX - 5;
/// A client's packet for a flow whose handshake or close is under way, or that lb opened
/// behind a cookie: `slow` (in `main`) takes it first.
pub const SLOW: u32 = u32::MAX - 6;

/// A new flow, left in the scratch space: `balance::new_flow` balances it.
pub const NEW_FLOW: u32 = u32::MAX - 7;

/// A backend's packet whose way back to the client is stale: `reply::refresh_hop` looks it
/// up.
pub const ROUTE: u32 = u32::MAX - 9;

/// A plain ACK of a tracked flow that is over: `cookie_ack` (in `main`) checks whether it
/// answers a cookie lb sent a new connection on the same 5-tuple.
pub const COOKIE_ACK: u32 = u32::MAX - 10;

/// A SYN in cookie mode: `cookie_syn` (in `main`) answers it.
pub const COOKIE_SYN: u32 = u32::MAX - 8;

/// A new flow of a direct-server-return service, left in the scratch space:
/// `direct::new_flow` balances it.
pub const DIRECT_FLOW: u32 = u32::MAX - 11;

/// A direct flow's backend was chosen (in the scratch space): `direct::send` sends it.
pub const DIRECT_SEND: u32 = u32::MAX - 13;

/// The packet is larger than its route's MTU (the MTU to advertise is in the scratch
/// space): `icmp::too_big` answers the sender, from the top of the program.
pub const TOO_BIG: u32 = u32::MAX - 12;

/// Counts a drop and answers its verdict; a packet too large for its route instead gets
/// [`TOO_BIG`] (the answer counts it if it cannot be sent).
#[inline(always)]
pub fn drop(reason: DropReason) -> u32 {
    if matches!(reason, DropReason::FragNeeded) {
        return TOO_BIG;
    }
    stats::count_drop(reason);
    xdp_action::XDP_DROP
}

/// The verdict of a result: a drop is counted here.
#[inline(always)]
pub fn verdict(r: Result<u32, DropReason>) -> u32 {
    match r {
        Ok(v) => v,
        Err(reason) => drop(reason),
    }
}
