//! SYN cookies and the backend handshake lb makes for a client that answers one (as the
//! kernel's SYNPROXY does, in XDP).
//!
//! 1. In cookie mode a SYN gets lb's own SYN-ACK: its sequence number is the cookie, its
//!    window zero (the client waits for the backend before it sends), its timestamp carries
//!    the client's window scale and SACK permission. No state is kept.
//! 2. The client's ACK proves its address: lb checks the cookie, takes a backend and a SNAT
//!    port like any new flow, and turns the ACK into the SYN the backend gets.
//! 3. The backend's SYN-ACK becomes the window update that lets the client send; the
//!    client's first segment completes the backend's handshake. Should the backend send
//!    its SYN-ACK again (a protocol where the server speaks first, so the client is
//!    silent), lb acknowledges it to the backend itself: such a connection waits for the
//!    backend's first retransmission, a second on Linux.
//! 4. For the flow's life, sequence numbers, timestamps and windows are translated between
//!    what lb told the client and what the backend chose (`tcpopt::translate`).
//!
//! Each step rewrites the packet it received into the one it sends: XDP cannot send two.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    config::Config,
    cookie::{CookieFlow, check, cookie_tick, make, ts_decode, ts_encode},
    flood::CookieStat,
    flow::{
        CONN_BACKEND_OPEN, CONN_HANDSHAKE, CONN_SYNPROXY, Conn, FlowKey, NatReverse,
        REV_CLIENT_OPENED, REV_SYNPROXY, REV_TIMESTAMPS, SYN_SACK, SYN_TIMESTAMPS, SYN_WSCALE,
        SynOptions, state,
    },
    service::Backend,
    stats::DropReason,
};

use crate::{
    emit::{self, Segment},
    forward, maps,
    parse::{Packet, TCP_ACK, TCP_SYN},
    stats, tcpopt,
};

/// The window scale lb promises every client. Fixed, so that the client's ACK finds the
/// scale its SYN-ACK promised without keeping state; the backend's windows are rescaled to
/// it (`backend_translation`).
const PROMISED_WSCALE: u8 = 7;
const DEFAULT_MSS: u16 = 1460;

/// The MSS lb offers a client on behalf of backend `id`: what its SYN-ACKs carried, or
/// Linux's usual one.
#[inline(always)]
fn backend_mss(id: u32) -> u16 {
    match maps::backend_state.get(id) {
        Some(b) if b.mss != 0 => b.mss,
        _ => DEFAULT_MSS,
    }
}

/// lb's timestamp clock: milliseconds, from jiffies.
#[inline(always)]
fn clock(now: u64, cfg: &Config) -> u32 {
    (now * 1000 / cfg.jiffies(1)) as u32
}

#[inline(always)]
fn cookie_flow(flow: &FlowKey, isn: u32) -> CookieFlow {
    CookieFlow {
        client_addr: flow.src_addr,
        vip_addr: flow.dst_addr,
        client_port: flow.src_port,
        vip_port: flow.dst_port,
        isn,
    }
}

/// Answers a SYN with lb's cookie SYN-ACK, back out of the interface it came in on.
#[inline(always)]
pub fn answer_syn(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    backend_id: u32,
    now: u64,
    cfg: &Config,
) -> Result<u32, DropReason> {
    let syn = tcpopt::read(ctx, pkt);
    let isn = pkt.seq();
    let client_mss = if syn.mss == 0 { 536 } else { syn.mss };
    let cookie = make(
        cfg.cookie_key,
        &cookie_flow(flow, isn),
        cookie_tick(now, cfg.hz),
        client_mss,
    );
    let mss = backend_mss(backend_id);
    // Window scale and SACK ride in the timestamp: without one, neither is offered.
    let ts = syn.has_ts().then(|| {
        (
            ts_encode(clock(now, cfg), syn.wscale(), syn.flags & SYN_SACK != 0),
            syn.tsval,
        )
    });
    let sack = ts.is_some() && syn.flags & SYN_SACK != 0;
    let ws = (ts.is_some() && syn.wscale().is_some()).then_some(PROMISED_WSCALE);
    let seg = Segment {
        src: flow.dst_addr,
        dst: flow.src_addr,
        sport: flow.dst_port,
        dport: flow.src_port,
        seq: cookie,
        ack: isn.wrapping_add(1),
        flags: TCP_SYN | TCP_ACK,
        // Zero: the client sends nothing before the backend is ready for it.
        window: 0,
        ttl: 64,
        options: tcpopt::build(Some(mss), sack, ts, ws),
    };
    emit::write(ctx, &seg)?;
    stats::count_cookie(CookieStat::Sent);
    emit::send_back(ctx)
}

/// What a client's ACK to a cookie carries.
pub struct Answer {
    pub isn: u32,
    pub cookie: u32,
    pub syn: SynOptions,
    /// lb's timestamp the client echoed.
    pub ts_echo: u32,
}

/// Checks the cookie in a plain ACK of no tracked flow, or of one that is over; the
/// client's SYN options if it is good. Counted when good, and when bad if `count_invalid`
/// (the ACK of a flow that is over is most likely that flow's own).
#[inline(always)]
pub fn check_ack(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    now: u64,
    count_invalid: bool,
    cfg: &Config,
) -> Option<Answer> {
    let cookie = pkt.ack_seq().wrapping_sub(1);
    let tick = cookie_tick(now, cfg.hz);
    let seq = pkt.seq();
    // The ACK follows the SYN (seq = ISN + 1); a window probe repeats the ISN.
    let mut found = None;
    for isn in [seq.wrapping_sub(1), seq] {
        if let Some(mss) = check(cfg.cookie_key, &cookie_flow(flow, isn), tick, cookie) {
            found = Some((isn, mss));
            break;
        }
    }
    let Some((isn, mss)) = found else {
        if count_invalid {
            stats::count_cookie(CookieStat::Invalid);
        }
        return None;
    };
    stats::count_cookie(CookieStat::Valid);
    let opts = tcpopt::read(ctx, pkt);
    let mut syn = SynOptions {
        mss,
        ..Default::default()
    };
    let mut ts_echo = 0;
    if opts.has_ts() {
        syn.flags |= SYN_TIMESTAMPS;
        syn.tsval = opts.tsval;
        ts_echo = opts.tsecr;
        if let Some((ws, sack)) = ts_decode(opts.tsecr) {
            if let Some(w) = ws {
                syn.flags |= SYN_WSCALE;
                syn.wscale = w;
            }
            if sack {
                syn.flags |= SYN_SACK;
            }
        }
    }
    Some(Answer {
        isn,
        cookie,
        syn,
        ts_echo,
    })
}

/// Marks the entries of a flow lb opens for a cookie's answer: what to translate once the
/// backend answers (the cookie and lb's timestamp wait in the deltas until then).
#[inline(always)]
pub fn mark_reverse(rev: &mut NatReverse, a: &Answer) {
    rev.state = state::SYNPROXY;
    rev.flags = REV_SYNPROXY;
    if a.syn.flags & SYN_TIMESTAMPS != 0 {
        rev.flags |= REV_TIMESTAMPS;
        rev.tw_tsval = a.syn.tsval;
    }
    rev.seq_delta = a.cookie;
    rev.ts_delta = a.ts_echo;
    rev.client_wscale = if a.syn.flags & SYN_WSCALE != 0 {
        PROMISED_WSCALE
    } else {
        0
    };
}

#[inline(always)]
pub fn mark_conn(conn: &mut Conn, a: &Answer) {
    conn.flags = CONN_SYNPROXY | CONN_HANDSHAKE;
    conn.syn = a.syn;
}

/// Writes the SYN lb sends the backend for client flow `conn` over `snat` (the client's
/// ACK, or a later segment of its while the backend has not answered, becomes it).
#[inline(always)]
pub fn syn_to_backend(
    ctx: &XdpContext,
    conn: &Conn,
    backend: &Backend,
    ttl: u8,
) -> Result<(), DropReason> {
    let s = &conn.syn;
    let ts = (s.flags & SYN_TIMESTAMPS != 0).then_some((s.tsval, 0));
    let ws = (s.flags & SYN_WSCALE != 0).then_some(s.wscale);
    let seg = Segment {
        src: conn.snat_addr,
        dst: backend.addr,
        sport: conn.snat_port,
        dport: backend.port,
        seq: conn.isn,
        ack: 0,
        flags: TCP_SYN,
        window: 65535,
        ttl,
        options: tcpopt::build(Some(s.mss), s.flags & SYN_SACK != 0, ts, ws),
    };
    emit::write(ctx, &seg)
}

/// The backend's SYN-ACK to lb's SYN: learns its sequence number and clock, and becomes
/// the window update that lets the client send (lb's SYN-ACK offered a zero window). The
/// client's first segment, translated, then completes the backend's handshake.
#[inline(always)]
pub fn backend_accepts(
    ctx: &XdpContext,
    pkt: &Packet,
    r: &mut NatReverse,
    cfg: &Config,
) -> Result<u32, DropReason> {
    let opts = tcpopt::read(ctx, pkt);
    let cookie = r.seq_delta;
    let lb_ts = r.ts_delta;
    let backend_isn = pkt.seq();
    r.seq_delta = backend_isn.wrapping_sub(cookie);
    r.ts_delta = if opts.has_ts() {
        opts.tsval.wrapping_sub(lb_ts)
    } else {
        0
    };
    r.backend_wscale = opts.wscale().unwrap_or(0);
    r.state = state::EMBRYONIC;
    r.flags |= REV_CLIENT_OPENED;
    learn(r.backend_id, &opts);
    // The client's entry translates from now on.
    let client = crate::track::client_flow(r, pkt.proto);
    if let Some(c) = crate::flows::get(&client, cfg) {
        // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live as
        // long as the map. Other CPUs may change it meanwhile (see `flows`).
        let c = unsafe { &mut *c };
        c.seq_delta = r.seq_delta;
        c.ts_delta = r.ts_delta;
        c.flags |= CONN_BACKEND_OPEN;
    }
    // A SYN-ACK's window is not scaled; the client reads lb's with the scale lb promised.
    let window = ((pkt.window() as u32) >> (r.client_wscale & 15)).max(1) as u16;
    let ts = (opts.has_ts() && r.flags & REV_TIMESTAMPS != 0).then_some((lb_ts, opts.tsecr));
    let seg = Segment {
        src: r.vip_addr,
        dst: r.client_addr,
        sport: r.vip_port,
        dport: r.client_port,
        seq: cookie.wrapping_add(1),
        ack: r.isn.wrapping_add(1),
        flags: TCP_ACK,
        window,
        ttl: 64,
        options: tcpopt::build(None, false, ts, None),
    };
    emit::write(ctx, &seg)?;
    forward::send_rewritten(ctx, &r.hop)
}

/// The backend sent its SYN-ACK again: the client has sent nothing since its window
/// opened (a protocol in which the server speaks first). lb completes the backend's
/// handshake itself, as the kernel's SYNPROXY does, with an ACK sent back out the way the
/// SYN-ACK came.
#[inline(always)]
pub fn complete_backend(ctx: &XdpContext, pkt: &Packet, r: &NatReverse) -> Result<u32, DropReason> {
    let opts = tcpopt::read(ctx, pkt);
    // The window in the scale the client's SYN gave the backend: about 64 KiB, what a
    // client's first window is, until its own comes with its next segment.
    let client_wscale = match maps::config
        .get(0)
        .and_then(|cfg| crate::flows::get(&crate::track::client_flow(r, pkt.proto), cfg))
        // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live as
        // long as the map. Other CPUs may change it meanwhile (see `flows`).
        .map(|c| unsafe { &*c })
    {
        Some(c) if c.syn.flags & SYN_WSCALE != 0 => c.syn.wscale,
        _ => 0,
    };
    let ts = (opts.has_ts() && r.flags & REV_TIMESTAMPS != 0).then_some((r.tw_tsval, opts.tsval));
    let seg = Segment {
        src: pkt.dst_addr(),
        dst: pkt.src_addr(),
        sport: pkt.dst_port(),
        dport: pkt.src_port(),
        seq: r.isn.wrapping_add(1),
        ack: pkt.seq().wrapping_add(1),
        flags: TCP_ACK,
        window: ((65535u32 >> (client_wscale & 15)).max(1)) as u16,
        ttl: 64,
        options: tcpopt::build(None, false, ts, None),
    };
    emit::write(ctx, &seg)?;
    emit::send_back(ctx)
}

/// Remembers the MSS a backend's SYN-ACK carried, to offer it on its behalf.
#[inline(always)]
pub fn learn(id: u32, opts: &tcpopt::Options) {
    if let Some(b) = maps::backend_state.get_ptr_mut(id) {
        // SAFETY: non-null from the lookup; array values live as long as the map. Other
        // CPUs and the sweep may write it meanwhile: plain fields, no atomics.
        let b = unsafe { &mut *b };
        if opts.mss != 0 && b.mss != opts.mss {
            b.mss = opts.mss;
        }
    }
}

/// The translation of a client's segment of a cookie-opened flow.
#[inline(always)]
pub fn client_translation(c: &Conn) -> tcpopt::Translation {
    tcpopt::Translation {
        ack_add: c.seq_delta,
        tsecr_add: c.ts_delta,
        ..Default::default()
    }
}

/// The translation of a backend's segment of a cookie-opened flow.
#[inline(always)]
pub fn backend_translation(r: &NatReverse) -> tcpopt::Translation {
    tcpopt::Translation {
        seq_add: r.seq_delta.wrapping_neg(),
        tsval_add: r.ts_delta.wrapping_neg(),
        ws_from: r.backend_wscale,
        ws_to: r.client_wscale,
        ..Default::default()
    }
}
