//! Connection tracking and SNAT port allocation.
//!
//! A client flow's `Conn` says which backend and SNAT port it uses. The matching
//! `nat_reverse` entry, keyed by the backend's side of the flow, restores the client's view
//! on replies. Both are LRU maps; a SNAT port held by a flow that is gone, closed or idle
//! past its timeout is taken over by a new flow.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    config::Config,
    flow::{CONN_CLOSING, Conn, FlowKey, LAST_SEEN_GRANULARITY_NS, NatReverse},
    service::Backend,
    stats::DropReason,
};

use crate::{maps, parse::Packet};

/// How many SNAT ports a new flow tries before it is dropped as exhausted.
const SNAT_TRIES: u32 = 8;

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Refreshes a tracked flow's idle time and notes a FIN or RST.
#[inline(always)]
pub fn touch(conn: *mut Conn, pkt: &Packet, now: u64) {
    let conn = unsafe { &mut *conn };
    if now.wrapping_sub(conn.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        conn.last_seen_ns = now;
    }
    if pkt.closes() && conn.flags & CONN_CLOSING == 0 {
        conn.flags |= CONN_CLOSING;
        conn.last_seen_ns = now;
    }
}

/// The reply path's share of [`touch`]: at most once a second (or on FIN/RST) it finds
/// the client flow and refreshes it, so flows that only receive do not expire.
#[inline(always)]
pub fn touch_from_reply(rev: *mut NatReverse, pkt: &Packet, now: u64) {
    let r = unsafe { &mut *rev };
    if now.wrapping_sub(r.last_seen_ns) <= LAST_SEEN_GRANULARITY_NS && !pkt.closes() {
        return;
    }
    r.last_seen_ns = now;
    let key = FlowKey::new(r.client_addr, r.client_port, r.vip_addr, r.vip_port, pkt.proto);
    if let Some(conn) = maps::conntrack.get_ptr_mut(&key) {
        touch(conn, pkt, now);
    }
}

/// Whether the flow that holds a SNAT port through `rev` is still using it.
#[inline(always)]
fn holder_alive(rev: &NatReverse, snat_addr: [u8; 4], port: u16, proto: u8, now: u64) -> bool {
    let key = FlowKey::new(rev.client_addr, rev.client_port, rev.vip_addr, rev.vip_port, proto);
    match unsafe { maps::conntrack.get(&key) } {
        Some(c) => {
            c.snat_port == port
                && c.snat_addr == snat_addr
                && c.backend_id == rev.backend_id
                && !c.expired(proto, now)
        }
        None => false,
    }
}

/// Finds a SNAT port for a flow to `backend` from `snat_addr` and records the reverse
/// translation under it. Ports start at a hash of the flow, so allocation needs no lock.
#[inline(always)]
pub fn alloc_snat_port(
    cfg: &Config,
    backend: &Backend,
    snat_addr: [u8; 4],
    proto: u8,
    hash: u32,
    rev: &NatReverse,
    now: u64,
) -> Result<u16, DropReason> {
    let min = cfg.snat_port_min as u32;
    let range = (cfg.snat_port_max as u32).wrapping_sub(min) + 1;
    if min == 0 || range == 0 || range > 65535 {
        return Err(DropReason::SnatExhausted);
    }
    let start = (hash >> 7) ^ hash.rotate_left(11);
    for i in 0..SNAT_TRIES {
        let port = (min + start.wrapping_add(i.wrapping_mul(40503)) % range) as u16;
        let key = FlowKey::new(backend.addr, backend.port, snat_addr, port, proto);
        if maps::nat_reverse.insert(&key, rev, BPF_NOEXIST as u64).is_ok() {
            return Ok(port);
        }
        let taken = match unsafe { maps::nat_reverse.get(&key) } {
            Some(existing) => holder_alive(existing, snat_addr, port, proto, now),
            None => false,
        };
        if !taken && maps::nat_reverse.insert(&key, rev, BPF_ANY as u64).is_ok() {
            return Ok(port);
        }
    }
    Err(DropReason::SnatExhausted)
}
