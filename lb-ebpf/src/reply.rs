//! A backend's packet to a SNAT port lb holds: restore the VIP as source and the client as
//! destination, and follow the flow's state from the backend's side.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    config::Config,
    flow::{CONN_HANDSHAKE, NatReverse, REV_CLIENT_OPENED, REV_SYNPROXY, state},
    stats::DropReason,
};

use crate::{cookie, forward, maps, nat, parse::Packet, stats, tcpopt, track};

/// `reply`'s `seen`: [`synproxy_handshake`] had its turn.
pub const SEEN_HANDSHAKE: u32 = 1;
/// `reply`'s `seen`: [`refresh_hop`] had its turn.
pub const SEEN_ROUTE: u32 = 2;

/// A sub-program of its own: the top of the program stays small (see `next`). The way back
/// to the client, once stale, is left to [`refresh_hop`] (`next::ROUTE`), and a
/// cookie-opened flow's handshake with its backend to [`synproxy_handshake`]
/// (`next::SYNPROXY`); `seen` says which had their turn.
#[inline(never)]
pub fn reply(ctx: &XdpContext, pkt: &Packet, rev: *mut NatReverse, seen: u32, cfg: &Config) -> u32 {
    crate::next::verdict(try_reply(ctx, pkt, rev, seen, cfg))
}

#[inline(always)]
fn try_reply(
    ctx: &XdpContext,
    pkt: &Packet,
    rev: *mut NatReverse,
    seen: u32,
    cfg: &Config,
) -> Result<u32, DropReason> {
    if pkt.ttl_expires() {
        return Err(DropReason::TtlExceeded);
    }
    // SAFETY: `rev` is `lb_xdp`'s non-null `nat_reverse` lookup. Its elements are
    // preallocated: valid for the run even if another CPU removes the entry.
    let r = unsafe { &mut *rev };
    let now = track::now();
    if !forward::fresh(&r.hop, pkt.ip_len, now) && seen & SEEN_ROUTE == 0 {
        return Ok(crate::next::ROUTE);
    }
    if seen & SEEN_HANDSHAKE == 0
        && pkt.is_tcp()
        && r.flags & REV_SYNPROXY != 0
        && r.state != state::ESTABLISHED
    {
        return Ok(crate::next::SYNPROXY);
    }
    let mut conn_flags = 0u16;
    if pkt.is_tcp() {
        if pkt.accepts() && r.state == state::PENDING {
            // The backend takes the connection: tracked from now on.
            r.state = state::EMBRYONIC;
            r.last_seen = now;
            learn_once(ctx, pkt, r.backend_id);
            track::track_on_answer(r, pkt, CONN_HANDSHAKE, now, cfg);
        } else if pkt.closes() {
            conn_flags = track::backend_segment(pkt, r, now, cfg);
        }
    } else if r.state == state::PENDING {
        // A UDP flow's first answer.
        r.state = state::ESTABLISHED;
        r.last_seen = now;
        track::track_on_answer(r, pkt, 0, now, cfg);
    }
    // At most once a second (or on FIN/RST), the client flow learns that it lives, so
    // that flows which mostly receive do not expire. Not from the backend's SYN-ACK sent
    // again: a handshake the client does not complete ends 10 s after the first one, and
    // the host's reset to the next clears the backend's half-open connection.
    let retried_answer = pkt.is_tcp() && pkt.accepts() && r.state == state::EMBRYONIC;
    if conn_flags != 0 || (track::due(r.last_seen, now, cfg) && !retried_answer) {
        r.last_seen = now;
        if let Some(c) = crate::flows::get(&track::client_flow(r, pkt.proto), cfg) {
            // SAFETY: `flows::get` returned a non-null `conntrack` slot; array values live
            // as long as the map. Other CPUs may change it meanwhile (see `flows`).
            let c = unsafe { &mut *c };
            if c.snat_port == pkt.dst_port() && c.snat_addr == pkt.dst_addr() {
                c.flags |= conn_flags;
                c.last_seen = now;
            }
        }
    }
    if r.flags & REV_SYNPROXY != 0 {
        return Ok(send_translated(ctx, pkt, r));
    }
    Ok(send(ctx, pkt, r))
}

/// Looks up the way back to the client again: a step of its own, as its stack and that of
/// `reply`'s calls into `flows` together would not fit.
#[inline(never)]
pub fn refresh_hop(ctx: &XdpContext, pkt: &Packet, rev: *mut NatReverse, cfg: &Config) -> u32 {
    // SAFETY: as in `try_reply`: `lb_xdp`'s non-null `nat_reverse` lookup.
    let r = unsafe { &mut *rev };
    match forward::lookup(ctx, pkt, r.vip_addr, r.client_addr, track::now(), cfg) {
        Ok(hop) => {
            r.hop = hop;
            crate::next::CONTINUE
        }
        Err(reason) => crate::next::drop(reason),
    }
}

#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, r: &NatReverse) -> u32 {
    nat::rewrite(pkt, r.vip_addr, r.vip_port, r.client_addr, r.client_port);
    stats::count(r.service_id, r.backend_id, pkt.ip_len as u64);
    forward::send(ctx, pkt, &r.hop)
}

/// A backend's segment of a cookie-opened flow, moved into the client's sequence space
/// and sent. (Out of line: only these flows pay for reading the options.)
#[inline(never)]
fn send_translated(ctx: &XdpContext, pkt: &Packet, r: &NatReverse) -> u32 {
    let opts = tcpopt::read(ctx, pkt);
    tcpopt::translate(ctx, &opts, &cookie::backend_translation(r));
    send(ctx, pkt, r)
}

/// The backend's side of a handshake lb made for a cookie's answer; `CONTINUE` when the
/// packet is to be translated and forwarded as usual.
#[inline(never)]
pub fn synproxy_handshake(
    ctx: &XdpContext,
    pkt: &Packet,
    rev: *mut NatReverse,
    cfg: &Config,
) -> u32 {
    // SAFETY: as in `try_reply`: `lb_xdp`'s non-null `nat_reverse` lookup.
    let r = unsafe { &mut *rev };
    match try_synproxy_handshake(ctx, pkt, r, cfg) {
        Ok(Some(v)) => v,
        Ok(None) => crate::next::CONTINUE,
        Err(reason) => {
            stats::count_drop(reason);
            aya_ebpf::bindings::xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_synproxy_handshake(
    ctx: &XdpContext,
    pkt: &Packet,
    r: &mut NatReverse,
    cfg: &Config,
) -> Result<Option<u32>, DropReason> {
    if r.state == state::SYNPROXY {
        if pkt.accepts() {
            stats::count(r.service_id, r.backend_id, 60);
            return cookie::backend_accepts(ctx, pkt, r, cfg).map(Some);
        }
        if pkt.rst() {
            // The backend refuses: so does lb, in the client's sequence space.
            let opts = tcpopt::read(ctx, pkt);
            // The cookie waits in `seq_delta` until the backend's SYN-ACK.
            let seq_add = r.seq_delta.wrapping_add(1).wrapping_sub(pkt.seq());
            tcpopt::translate(
                ctx,
                &opts,
                &tcpopt::Translation {
                    seq_add,
                    ..Default::default()
                },
            );
            track::backend_segment(pkt, r, track::now(), cfg);
            nat::rewrite(pkt, r.vip_addr, r.vip_port, r.client_addr, r.client_port);
            stats::count(r.service_id, r.backend_id, pkt.ip_len as u64);
            return Ok(Some(forward::send(ctx, pkt, &r.hop)));
        }
        // Nothing else is expected before the SYN-ACK.
        return Err(DropReason::UnknownFlow);
    }
    if pkt.accepts() && r.flags & REV_CLIENT_OPENED != 0 && r.state == state::EMBRYONIC {
        // Sent again: lb's ACK was lost.
        stats::count(r.service_id, r.backend_id, 60);
        return cookie::complete_backend(ctx, pkt, r).map(Some);
    }
    Ok(None)
}

/// Learns the backend's SYN-ACK options the first time (cookie mode offers them).
#[inline(always)]
fn learn_once(ctx: &XdpContext, pkt: &Packet, id: u32) {
    if maps::backend_state.get(id).is_some_and(|b| b.mss == 0) {
        cookie::learn(id, &tcpopt::read(ctx, pkt));
    }
}
