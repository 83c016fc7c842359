//! Connection tracking and SNAT port allocation.
//!
//! A new flow costs one map insert: its `nat_reverse` entry, keyed by the backend's side
//! of the flow, which restores the client's view on replies and holds the SNAT port. The
//! `conntrack` entry (client flow -> backend, SNAT port) follows on the flow's second
//! packet in either direction: the backend's first answer or the client's next packet.
//! Both maps are LRU; a SNAT port held by a flow that is gone, closed or idle past its
//! timeout is taken over by a new flow.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_jiffies64,
};
use lb_common::{
    config::{Config, NextHop},
    flow::{
        CONN_CLOSING, Conn, FlowKey, LAST_SEEN_GRANULARITY_S, NatReverse, PENDING_TIMEOUT_S,
        REV_PENDING,
    },
    hash::reduce,
    service::Backend,
    stats::DropReason,
};

use crate::{maps, parse::Packet};

/// How many SNAT ports a new flow tries before it is dropped as exhausted.
const SNAT_TRIES: u32 = 8;

/// Jiffies: the cheapest clock the program can read; all its timeouts are in seconds.
#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_jiffies64() }
}

/// Which service and backend a flow is balanced to.
pub struct Assignment {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend_generation: u32,
}

/// Fills a reverse entry for client `flow` (whose next hop back is not known yet).
#[inline(always)]
pub fn write_reverse(
    rev: &mut NatReverse,
    flow: &FlowKey,
    to: &Assignment,
    flags: u32,
    now: u64,
    hop: &NextHop,
) {
    rev.client_addr = flow.src_addr;
    rev.vip_addr = flow.dst_addr;
    rev.client_port = flow.src_port;
    rev.vip_port = flow.dst_port;
    rev.service_id = to.service_id;
    rev.backend_id = to.backend_id;
    rev.backend_generation = to.backend_generation;
    rev.flags = flags;
    rev._pad = 0;
    rev.last_seen = now;
    // Any hop, expired: the first reply looks up the way back to the client. (Field by
    // field: a struct copy between map values becomes a byte-loop memmove.)
    let hop = *hop;
    rev.hop = hop;
    rev.hop.expires = 0;
}

/// Fills a conntrack entry.
#[inline(always)]
pub fn write_conn(
    conn: &mut Conn,
    to: &Assignment,
    snat: ([u8; 4], u16),
    flags: u16,
    now: u64,
    hop: &NextHop,
) {
    conn.service_id = to.service_id;
    conn._pad = 0;
    conn.backend_id = to.backend_id;
    conn.backend_generation = to.backend_generation;
    conn.snat_addr = snat.0;
    conn.snat_port = snat.1;
    conn.flags = flags;
    conn.last_seen = now;
    let hop = *hop;
    conn.hop = hop;
}

/// Whether a tracked flow's once-a-second bookkeeping is due.
#[inline(always)]
pub fn due(conn: &Conn, now: u64, cfg: &Config) -> bool {
    now.wrapping_sub(conn.last_seen) > cfg.jiffies(LAST_SEEN_GRANULARITY_S)
}

/// Refreshes a tracked flow's idle time and notes a FIN or RST.
#[inline(always)]
pub fn touch(conn: &mut Conn, pkt: &Packet, now: u64, cfg: &Config) {
    if due(conn, now, cfg) {
        conn.last_seen = now;
    }
    if pkt.closes() && conn.flags & CONN_CLOSING == 0 {
        conn.flags |= CONN_CLOSING;
        conn.last_seen = now;
    }
}

/// Keeps a tracked flow's reverse entry in the LRU (a lookup marks it used) and, if the
/// LRU dropped it anyway, puts it back, so that the flow's SNAT port is not given away
/// while the flow lives. Called once a second per flow.
#[inline(always)]
pub fn keep_reverse(conn: &Conn, flow: &FlowKey, backend: &Backend, now: u64) {
    let key = FlowKey::new(
        backend.addr,
        backend.port,
        conn.snat_addr,
        conn.snat_port,
        flow.proto,
    );
    if maps::nat_reverse.get_ptr_mut(&key).is_some() {
        return;
    }
    let Some(scratch) = maps::scratch_space() else {
        return;
    };
    let to = Assignment {
        service_id: conn.service_id,
        backend_id: conn.backend_id,
        backend_generation: conn.backend_generation,
    };
    write_reverse(&mut scratch.rev, flow, &to, 0, now, &conn.hop);
    let rev = &scratch.rev;
    // If another flow took the port meanwhile, it keeps it.
    let _ = maps::nat_reverse.insert(&key, rev, BPF_NOEXIST as u64);
}

#[inline(always)]
fn client_flow(r: &NatReverse, proto: u8) -> FlowKey {
    FlowKey::new(r.client_addr, r.client_port, r.vip_addr, r.vip_port, proto)
}

/// The reply path's bookkeeping: tracks a pending flow on its first answer; otherwise,
/// at most once a second (or on FIN/RST), refreshes the client flow so that flows which
/// mostly receive do not expire.
#[inline(always)]
pub fn on_reply(r: &mut NatReverse, pkt: &Packet, now: u64, cfg: &Config) {
    if r.flags & REV_PENDING != 0 {
        let Some(scratch) = maps::scratch_space() else {
            return;
        };
        let to = Assignment {
            service_id: r.service_id,
            backend_id: r.backend_id,
            backend_generation: r.backend_generation,
        };
        let snat = (pkt.dst_addr(), pkt.dst_port());
        let flags = if pkt.closes() { CONN_CLOSING } else { 0 };
        let conn = &mut scratch.conn;
        write_conn(conn, &to, snat, flags, now, &r.hop);
        // Expired: the client's next packet looks up the way to the backend.
        conn.hop.expires = 0;
        // The first answer wins; a flow tracked meanwhile keeps its entry, unless that entry
        // is older than this flow (an earlier connection on the same 5-tuple).
        let key = client_flow(r, pkt.proto);
        if maps::conntrack
            .insert(&key, &*conn, BPF_NOEXIST as u64)
            .is_err()
        {
            if let Some(old) = maps::conntrack.get_ptr_mut(&key) {
                let old = unsafe { &mut *old };
                let other = old.backend_id != to.backend_id || old.snat_port != snat.1;
                if other && old.last_seen <= r.last_seen {
                    let hop = old.hop;
                    write_conn(old, &to, snat, flags, now, &hop);
                    old.hop.expires = 0;
                }
            }
        }
        r.flags &= !REV_PENDING;
        r.last_seen = now;
        return;
    }
    if now.wrapping_sub(r.last_seen) <= cfg.jiffies(LAST_SEEN_GRANULARITY_S) && !pkt.closes() {
        return;
    }
    r.last_seen = now;
    if let Some(conn) = maps::conntrack.get_ptr_mut(&client_flow(r, pkt.proto)) {
        touch(unsafe { &mut *conn }, pkt, now, cfg);
    }
}

/// Whether the flow that holds a SNAT port through `rev` is still using it.
#[inline(always)]
fn holder_alive(
    rev: &NatReverse,
    snat_addr: [u8; 4],
    port: u16,
    proto: u8,
    now: u64,
    cfg: &Config,
) -> bool {
    if rev.flags & REV_PENDING != 0 {
        return now.wrapping_sub(rev.last_seen) <= cfg.jiffies(PENDING_TIMEOUT_S);
    }
    match unsafe { maps::conntrack.get(&client_flow(rev, proto)) } {
        Some(c) => {
            c.snat_port == port
                && c.snat_addr == snat_addr
                && c.backend_id == rev.backend_id
                && !c.expired(proto, now, cfg)
        }
        None => false,
    }
}

/// A SNAT port for the flow described by `rev`.
pub enum SnatPort {
    /// Newly taken: the flow's first packet.
    New(u16),
    /// Already the flow's own: a packet after the first, before the flow was tracked.
    Own(u16),
}

/// Finds a SNAT port for a flow to `backend` from `snat_addr` and records the reverse
/// translation under it. Ports start at a hash of the flow, so allocation needs no lock,
/// and a flow's later packets find the port its first one took.
#[inline(always)]
pub fn alloc_snat_port(
    cfg: &Config,
    backend: &Backend,
    snat_addr: [u8; 4],
    proto: u8,
    hash: u32,
    rev: &NatReverse,
    now: u64,
) -> Result<SnatPort, DropReason> {
    let min = cfg.snat_port_min as u32;
    let range = (cfg.snat_port_max as u32).wrapping_sub(min) + 1;
    if min == 0 || range == 0 || range > 65535 {
        return Err(DropReason::SnatExhausted);
    }
    let start = (hash >> 7) ^ hash.rotate_left(11);
    for i in 0..SNAT_TRIES {
        let port = (min + reduce(start.wrapping_add(i.wrapping_mul(0x9e37_79b9)), range)) as u16;
        let key = FlowKey::new(backend.addr, backend.port, snat_addr, port, proto);
        if maps::nat_reverse
            .insert(&key, rev, BPF_NOEXIST as u64)
            .is_ok()
        {
            return Ok(SnatPort::New(port));
        }
        let taken = match maps::nat_reverse.get_ptr_mut(&key) {
            Some(existing) => {
                let e = unsafe { &mut *existing };
                if e.client_addr == rev.client_addr
                    && e.client_port == rev.client_port
                    && e.vip_addr == rev.vip_addr
                    && e.vip_port == rev.vip_port
                {
                    // The flow's own entry, maybe from before a re-balance: bring it up to
                    // date, as tracked from now on.
                    e.service_id = rev.service_id;
                    e.backend_id = rev.backend_id;
                    e.backend_generation = rev.backend_generation;
                    e.last_seen = now;
                    e.flags = 0;
                    return Ok(SnatPort::Own(port));
                }
                holder_alive(e, snat_addr, port, proto, now, cfg)
            }
            None => false,
        };
        if !taken && maps::nat_reverse.insert(&key, rev, BPF_ANY as u64).is_ok() {
            return Ok(SnatPort::New(port));
        }
    }
    Err(DropReason::SnatExhausted)
}
