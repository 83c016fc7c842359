//! Connection tracking: the entries a flow is known by, and how its TCP state moves.
//!
//! A new flow costs one map insert: its `nat_reverse` entry, keyed by the backend's side
//! of the flow, which holds the SNAT port, restores the client's view on replies and
//! carries the flow's state. The `conntrack` entry (client flow -> backend, SNAT port)
//! follows with the backend's answer, or with the client's second packet; a flow whose
//! port is not the first one its hash names gets it at once, so that its SYN retries find
//! the port again. States move on the segments each side sends; the port goes back to the
//! bitmap when the backend no longer needs the tuple.
use aya_ebpf::{helpers::generated::bpf_jiffies64, programs::XdpContext};
use lb_common::{
    config::{Config, NextHop},
    flow::{
        CONN_BACKEND_FIN, CONN_BACKEND_OPEN, CONN_CLIENT_FIN, CONN_HANDSHAKE, CONN_RESET,
        CONN_SYNPROXY, Conn, FlowKey, LAST_SEEN_GRANULARITY_S, NatReverse, REV_TIMESTAMPS,
        SynOptions, seq_after, state,
    },
    service::Backend,
};

use crate::{
    flows::{self, Insert, Refused},
    maps,
    parse::Packet,
    ports, tcpopt,
};

/// Jiffies: the cheapest clock the program can read; all its timeouts are in seconds.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a BPF helper call without arguments.
    unsafe { bpf_jiffies64() }
}

/// Which service and backend a flow is balanced to.
pub struct Assignment {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend_generation: u32,
}

/// Fills a reverse entry for client `flow` in `state` (its next hop back is not known yet).
#[inline(always)]
pub fn write_reverse(
    rev: &mut NatReverse,
    flow: &FlowKey,
    to: &Assignment,
    st: u8,
    isn: u32,
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
    rev.state = st;
    rev.flags = 0;
    rev.backend_wscale = 0;
    rev.client_wscale = 0;
    rev.isn = isn;
    rev.tw_seq = 0;
    rev.tw_tsval = 0;
    rev.seq_delta = 0;
    rev.ts_delta = 0;
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
    isn: u32,
    now: u64,
) {
    conn.service_id = to.service_id;
    conn.backend_id = to.backend_id;
    conn.backend_generation = to.backend_generation;
    conn.snat_addr = snat.0;
    conn.snat_port = snat.1;
    conn.flags = flags;
    conn.isn = isn;
    conn.last_seen = now;
    conn.seq_delta = 0;
    conn.ts_delta = 0;
    conn.syn = SynOptions::default();
}

/// Whether a once-a-second refresh of `last_seen` is due.
#[inline(always)]
pub fn due(last_seen: u64, now: u64, cfg: &Config) -> bool {
    now.wrapping_sub(last_seen) > cfg.jiffies(LAST_SEEN_GRANULARITY_S)
}

/// Refreshes a tracked flow's idle time.
#[inline(always)]
pub fn touch(conn: &mut Conn, now: u64, cfg: &Config) {
    if due(conn.last_seen, now, cfg) {
        conn.last_seen = now;
    }
}

/// The client flow a reverse entry belongs to.
#[inline(always)]
pub fn client_flow(r: &NatReverse, proto: u8) -> FlowKey {
    FlowKey::new(r.client_addr, r.client_port, r.vip_addr, r.vip_port, proto)
}

/// Whether reverse entry `r` belongs to client flow `flow`.
#[inline(always)]
pub fn belongs_to(r: &NatReverse, flow: &FlowKey) -> bool {
    r.client_addr == flow.src_addr
        && r.client_port == flow.src_port
        && r.vip_addr == flow.dst_addr
        && r.vip_port == flow.dst_port
}

/// The reverse entry of tracked flow `flow`, if the port is still its own, with its key.
#[inline(always)]
pub fn own_reverse(
    conn: &Conn,
    flow: &FlowKey,
    backend: &Backend,
) -> Option<(&'static mut NatReverse, FlowKey)> {
    let key = FlowKey::new(
        backend.addr,
        backend.port,
        conn.snat_addr,
        conn.snat_port,
        flow.proto,
    );
    // SAFETY: non-null from the lookup. `nat_reverse`'s elements are preallocated: valid
    // for the run even if another CPU removes or replaces the entry.
    let r = unsafe { &mut *maps::nat_reverse.get_ptr_mut(&key)? };
    belongs_to(r, flow).then_some((r, key))
}

/// The port the flow of reverse entry key `k` holds goes back to the bitmap.
#[inline(always)]
fn release(k: &FlowKey, cfg: &Config) {
    ports::release(k.src_addr, k.src_port, k.dst_addr, k.dst_port, cfg);
}

/// Ends the flow holding port `k`: the backend keeps nothing (a reset, or the client's
/// last ACK of a close it began), so the port is free after a short hold.
#[inline(always)]
fn close(r: &mut NatReverse, k: &FlowKey, now: u64, cfg: &Config) {
    r.state = state::CLOSED;
    r.last_seen = now;
    release(k, cfg);
}

/// What a client's segment of a tracked TCP flow tells about its state (the slow path:
/// only while the handshake or a close is under way).
#[inline(always)]
pub fn client_segment(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    conn: &mut Conn,
    backend: &Backend,
    now: u64,
    cfg: &Config,
) {
    // A cookie-opened flow's handshake ends with the first client segment after the
    // backend's answer (earlier ones only carry lb's SYN again).
    let handshake = conn.flags & CONN_HANDSHAKE != 0
        && !pkt.opens()
        && !pkt.rst()
        && conn.flags & (CONN_SYNPROXY | CONN_BACKEND_OPEN) != CONN_SYNPROXY;
    let first_fin = pkt.fin() && !pkt.rst() && conn.flags & CONN_CLIENT_FIN == 0;
    let closing_both =
        conn.flags & (CONN_CLIENT_FIN | CONN_BACKEND_FIN) == CONN_CLIENT_FIN | CONN_BACKEND_FIN;
    if handshake {
        conn.flags &= !CONN_HANDSHAKE;
    }
    if first_fin {
        conn.flags |= CONN_CLIENT_FIN;
        conn.last_seen = now;
    }
    if !(handshake || pkt.rst() || first_fin || closing_both) {
        return;
    }
    let own = own_reverse(conn, flow, backend);
    if pkt.rst() {
        match own {
            Some((r, k)) if takes_reset(r, pkt) => close(r, &k, now, cfg),
            // The backend will not take it: nothing ends.
            Some(_) => return,
            None => {}
        }
        conn.flags |= CONN_RESET;
        conn.last_seen = now;
        return;
    }
    let Some((r, k)) = own else {
        return;
    };
    if handshake && r.state == state::EMBRYONIC {
        r.state = state::ESTABLISHED;
    }
    if first_fin {
        let closed_first = match r.state {
            state::EMBRYONIC | state::ESTABLISHED => true,
            state::FIN_BACKEND => false,
            _ => return,
        };
        // What the backend expects after this FIN: kept for its TIME_WAIT, which follows
        // if it closed first, or if its own FIN crosses this one (see `backend_segment`).
        let opts = tcpopt::read(ctx, pkt);
        r.tw_seq = pkt.seq_end();
        if opts.has_ts() {
            r.flags |= REV_TIMESTAMPS;
            r.tw_tsval = opts.tsval;
        }
        r.last_seen = now;
        if closed_first {
            r.state = state::FIN_CLIENT;
        } else {
            // The backend closed first: from the ACK of this FIN on it holds the tuple in
            // TIME_WAIT.
            r.state = state::TIME_WAIT;
            release(&k, cfg);
        }
        return;
    }
    if closing_both && !pkt.fin() {
        match r.state {
            // The client acknowledges the backend's FIN of a close it began: done.
            state::LAST_ACK => close(r, &k, now, cfg),
            // A later ACK in TIME_WAIT refreshes the backend's last timestamp.
            state::TIME_WAIT if r.flags & REV_TIMESTAMPS != 0 => {
                let opts = tcpopt::read(ctx, pkt);
                if opts.has_ts() && (opts.tsval.wrapping_sub(r.tw_tsval) as i32) > 0 {
                    r.tw_tsval = opts.tsval;
                }
            }
            _ => {}
        }
    }
}

/// How far past the client's ISN a reset may be while the handshake is under way: the
/// window a backend's half-open connection takes it in (a SYN-ACK offers at most 64 KiB).
const HANDSHAKE_RESET_WINDOW: u32 = 1 << 16;

/// Whether the backend takes the client's reset `pkt` as the end of the flow holding `r`.
/// While the handshake is under way (the client has sent only its SYN), only a reset in
/// the window of the backend's half-open connection (RFC 793). Another is the client's
/// answer to a stray segment, such as the backend's ACK of the FIN of the connection
/// that held the port before: the backend ignores it, and so does lb. Later, lb does not
/// follow the client's sequence numbers, and takes any reset.
#[inline(always)]
fn takes_reset(r: &NatReverse, pkt: &Packet) -> bool {
    match r.state {
        state::PENDING | state::EMBRYONIC => {
            pkt.seq().wrapping_sub(r.isn.wrapping_add(1)) < HANDSHAKE_RESET_WINDOW
        }
        _ => true,
    }
}

/// The `nat_reverse` key of a backend's segment.
#[inline(always)]
pub fn reverse_key(pkt: &Packet) -> FlowKey {
    FlowKey::new(
        pkt.src_addr(),
        pkt.src_port(),
        pkt.dst_addr(),
        pkt.dst_port(),
        pkt.proto,
    )
}

/// What a backend's segment says about the flow holding port `r` (the reply path), and
/// the `CONN_*` flags the client's entry must learn.
#[inline(always)]
pub fn backend_segment(pkt: &Packet, r: &mut NatReverse, now: u64, cfg: &Config) -> u16 {
    if pkt.rst() {
        close(r, &reverse_key(pkt), now, cfg);
        return CONN_RESET;
    }
    if pkt.fin() {
        match r.state {
            state::EMBRYONIC | state::ESTABLISHED => {
                r.state = state::FIN_BACKEND;
                r.last_seen = now;
            }
            // The client's FIN acknowledged: the backend closes second, and waits for the
            // ACK of this FIN.
            state::FIN_CLIENT if !seq_after(r.tw_seq, pkt.ack_seq()) => {
                r.state = state::LAST_ACK;
                r.last_seen = now;
            }
            // Sent before the client's FIN reached it: a simultaneous close, after which
            // the backend, too, holds the tuple in TIME_WAIT (expecting what follows the
            // client's FIN, recorded with it).
            state::FIN_CLIENT => {
                r.state = state::TIME_WAIT;
                r.last_seen = now;
                release(&reverse_key(pkt), cfg);
            }
            _ => {}
        }
        return CONN_BACKEND_FIN;
    }
    0
}

/// Tracks the client flow of reverse entry `r` on the backend's first answer (the flow's
/// second packet): a conntrack entry towards the backend (its next hop looked up by the
/// client's next packet). An entry a flow left on the same 5-tuple before this one began
/// is replaced, even one on the same port (its flags and ISN are the old connection's);
/// one of this very flow (made with its SYN: same port, same ISN) is kept. Out of line:
/// inlined, its stack adds to the reply step's, and the deepest chain of calls through it
/// would not fit the verifier's 512 bytes.
#[inline(never)]
pub fn track_on_answer(r: &NatReverse, pkt: &Packet, flags: u16, now: u64, cfg: &Config) {
    let Some(scratch) = maps::scratch_space() else {
        return;
    };
    let to = Assignment {
        service_id: r.service_id,
        backend_id: r.backend_id,
        backend_generation: r.backend_generation,
    };
    let snat = (pkt.dst_addr(), pkt.dst_port());
    let conn = &mut scratch.conn;
    write_conn(conn, &to, snat, flags, r.isn, now);
    let key = client_flow(r, pkt.proto);
    let how = match flows::get(&key, cfg) {
        None => Insert::New,
        Some(old) => {
            // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live
            // as long as the map. Other CPUs may change it meanwhile (see `flows`).
            let old = unsafe { &*old };
            let this_flow = old.backend_id == to.backend_id
                && old.snat_port == snat.1
                && old.snat_addr == snat.0
                && old.isn == r.isn;
            if this_flow || old.last_seen > r.last_seen {
                return;
            }
            Insert::Replace
        }
    };
    if let Err(Refused::Full) = flows::insert(&key, conn, how, cfg) {
        // The flow goes on untracked: its client's next segment is an unknown flow's.
        crate::stats::count_drop(lb_common::stats::DropReason::FlowTableFull);
    }
}
