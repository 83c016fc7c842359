//! New flows: a backend from the service's Maglev table, a SNAT port towards it, and the
//! entries that track the flow. Also re-balances a tracked flow whose backend went away,
//! and opens the backend side of a client that answered a SYN cookie.
use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{
    config::{Config, NextHop},
    flow::{CONN_HANDSHAKE, FlowKey, NatReverse, SynProbe, state},
    hash::{port_hash, slot_hash},
    service::{Backend, ServiceInfo},
    stats::DropReason,
};

use crate::{
    cookie,
    flows::{self, Insert},
    forward, maps, nat, next,
    parse::Packet,
    ports::{self, First, Want},
    select, stats,
    track::{self, Assignment},
};

/// What a new flow is: the client flow, its keyed hash, its service, its SYN. Written in
/// the per-CPU scratch space (see [`flow_slot`]) for [`new_flow`], [`cookie_flow`] and
/// [`scan_flow`] to read: none of their callers' stacks has room for it.
#[derive(Clone, Copy)]
pub struct Flow {
    pub key: FlowKey,
    pub hash: u64,
    /// What picks its backend: `hash`, or the hash without the client's port for a
    /// service balanced by client address.
    pub pick: u64,
    pub svc: ServiceInfo,
    /// TCP: the SYN's sequence number and timestamp (`SynProbe::NONE` for UDP, and for a
    /// tracked flow re-balanced mid-stream).
    pub syn: SynProbe,
    /// The flow was tracked before (its backend went away): track it again at once.
    pub rebalanced: bool,
}

/// The new flow the next sub-program works on.
#[inline(always)]
pub fn flow_slot() -> Option<&'static mut Flow> {
    maps::scratch_space().map(|s| &mut s.flow)
}

/// How a new flow went.
enum Outcome {
    Sent(u32),
    Tracked,
    /// Its first-choice port was held: [`scan_flow`] looks further.
    Scan,
}

/// The backend chosen for a flow, and the way to it.
pub struct Target {
    id: u32,
    backend: Backend,
    hop: NextHop,
}

/// The flow's backend (by its `pick` hash) and the way to it, in the scratch space (the
/// stack has no room).
#[inline(always)]
fn target(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: &ServiceInfo,
    pick: u64,
    now: u64,
    cfg: &Config,
) -> Result<&'static Target, DropReason> {
    let (id, backend) = select::pick(svc, slot_hash(pick)).ok_or(DropReason::NoBackend)?;
    let hop = forward::backend_hop(ctx, pkt, pkt.ip_len, id, backend.addr, now, cfg)?;
    if hop.src_addr == [0; 4] {
        return Err(DropReason::NoSnatAddress);
    }
    let t = &mut maps::scratch_space().ok_or(DropReason::MapUpdate)?.target;
    t.id = id;
    t.backend = backend;
    maps::copy_value(&mut t.hop, hop);
    Ok(t)
}

/// Balances the new flow in the scratch space (or re-balances one) and sends its packet:
/// the verdict (drops counted here), [`next::TRACKED`] or [`next::SCAN`]. (A sub-program
/// answering a plain number: pointers and `Result`s handed back through memory lose their
/// type or get split on the way.)
#[inline(never)]
pub fn new_flow(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> u32 {
    let Some(f) = flow_slot() else {
        return next::drop(DropReason::MapUpdate);
    };
    if crate::direct::is_direct(&f.svc) {
        return next::DIRECT_FLOW;
    }
    match try_new_flow(ctx, pkt, f, cfg) {
        Ok(Outcome::Sent(v)) => v,
        Ok(Outcome::Tracked) => next::TRACKED,
        Ok(Outcome::Scan) => next::SCAN,
        Err(reason) => next::drop(reason),
    }
}

#[inline(always)]
fn try_new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    f: &Flow,
    cfg: &Config,
) -> Result<Outcome, DropReason> {
    if pkt.ttl_expires() {
        return Err(DropReason::TtlExceeded);
    }
    let now = track::now();
    let t = target(ctx, pkt, &f.svc, f.pick, now, cfg)?;
    // Built in the per-CPU scratch map: the stack has no room for it.
    let scratch = maps::scratch_space().ok_or(DropReason::MapUpdate)?;
    let to = Assignment {
        service_id: f.svc.id,
        backend_id: t.id,
        backend_generation: t.backend.generation,
    };
    let isn = f.syn.seq;
    track::write_reverse(
        &mut scratch.rev,
        &f.key,
        &to,
        state::PENDING,
        isn,
        now,
        &t.hop,
    );
    let rev: &NatReverse = &scratch.rev;
    let want = Want {
        backend: &t.backend,
        proto: pkt.proto,
        hash: port_hash(f.hash),
        syn: f.syn,
        now,
        rev,
    };
    let tcp_syn = f.syn.is_syn();
    let flags = if tcp_syn { CONN_HANDSHAKE } else { 0 };
    // The port, and whether the flow is tracked at once: past its first choice, or
    // re-balanced, so that its next packets (and SYN retries) find the port.
    let (addr, port, track) =
        match ports::first(&want, &t.hop, cfg).map_err(|()| DropReason::SnatExhausted)? {
            // The first packet of a flow: one insert; tracked on its next packet.
            First::Claimed(addr, port) => (addr, port, f.rebalanced),
            First::Own(e, addr, port) => match own(e, f, &want, cfg) {
                // The same flow again: a retried SYN, or a UDP flow's second packet (tracked
                // from now on).
                Own::Again => (addr, port, !tcp_syn),
                Own::Live => match flows::get(&f.key, cfg) {
                    Some(_) => return Ok(Outcome::Tracked),
                    None => (addr, port, false),
                },
                // A new connection on this 5-tuple: it takes the port over.
                Own::Reopen => {
                    let key = FlowKey::new(t.backend.addr, t.backend.port, addr, port, pkt.proto);
                    let _ = maps::nat_reverse.insert(&key, rev, BPF_ANY as u64);
                    (addr, port, f.rebalanced)
                }
                Own::Elsewhere => {
                    track::write_conn(&mut scratch.conn, &to, ([0; 4], 0), flags, isn, now);
                    ports::prepare_scan(&want, &t.hop, SCAN_NEW, 0);
                    return Ok(Outcome::Scan);
                }
            },
            First::Taken => {
                if tcp_syn {
                    // A retry of a flow that took a port past its first choice, or a SYN on a
                    // live connection.
                    if let Some(c) = flows::get(&f.key, cfg)
                        // SAFETY: `flows::get` returned a non-null `conntrack` slot; array
                        // values live as long as the map. Other CPUs may change it
                        // meanwhile (see `flows`).
                        && unsafe { &*c }.takes_syn(isn, pkt.proto, now, cfg)
                    {
                        return Ok(Outcome::Tracked);
                    }
                }
                track::write_conn(&mut scratch.conn, &to, ([0; 4], 0), flags, isn, now);
                ports::prepare_scan(&want, &t.hop, SCAN_NEW, 0);
                return Ok(Outcome::Scan);
            }
        };
    if track {
        track_now(&f.key, &to, (addr, port), flags, isn, now, cfg)?;
    }
    nat::rewrite(pkt, addr, port, t.backend.addr, t.backend.port);
    stats::count(to.service_id, to.backend_id, pkt.ip_len as u64);
    Ok(Outcome::Sent(forward::send(ctx, pkt, &t.hop)))
}

/// What this client flow's own entry at its first-choice port means.
enum Own {
    Again,
    Live,
    Reopen,
    /// An old connection's entry the backend still holds in TIME_WAIT and would not give
    /// this SYN: the new connection goes elsewhere.
    Elsewhere,
}

#[inline(always)]
fn own(e: &mut NatReverse, f: &Flow, want: &Want, cfg: &Config) -> Own {
    let syn = f.syn;
    if !syn.is_syn() {
        // UDP (or a re-balanced flow): the same flow, unless it was over.
        return match e.free_for(SynProbe::NONE, want.now, want.proto, cfg) {
            Some(true) | None => Own::Reopen,
            Some(false) => Own::Again,
        };
    }
    if e.isn == syn.seq && (e.state == state::PENDING || e.state == state::EMBRYONIC) {
        e.last_seen = want.now;
        return Own::Again;
    }
    match e.state {
        state::TIME_WAIT => {
            if e.free_for(syn, want.now, want.proto, cfg) == Some(true) {
                Own::Reopen
            } else {
                Own::Elsewhere
            }
        }
        state::CLOSED | state::PENDING => Own::Reopen,
        _ if e
            .free_for(SynProbe::NONE, want.now, want.proto, cfg)
            .is_none() =>
        {
            Own::Reopen
        }
        _ => Own::Live,
    }
}

/// Tracks a flow at once (its conntrack entry written, whatever was there).
#[inline(always)]
fn track_now(
    flow: &FlowKey,
    to: &Assignment,
    snat: ([u8; 4], u16),
    flags: u16,
    isn: u32,
    now: u64,
    cfg: &Config,
) -> Result<(), DropReason> {
    let scratch = maps::scratch_space().ok_or(DropReason::MapUpdate)?;
    let conn = &mut scratch.conn;
    track::write_conn(conn, to, snat, flags, isn, now);
    flows::insert(flow, conn, Insert::Replace, cfg).map_err(|_| DropReason::FlowTableFull)
}

/// What [`scan_flow`] finishes: a new flow's first packet, or the SYN lb sends a backend
/// for a cookie's answer.
pub const SCAN_NEW: u32 = 0;
pub const SCAN_COOKIE: u32 = 1;

/// Finishes a flow whose first-choice port was held, once `ports::scan` found it another:
/// the flow tracked at once, and its packet sent. Everything it needs is in the scratch
/// space (the search's answer, the flow's `Conn` and [`Flow`]).
#[inline(never)]
pub fn scan_flow(ctx: &XdpContext, pkt: &Packet) -> u32 {
    next::verdict(try_scan_flow(ctx, pkt))
}

#[inline(always)]
fn try_scan_flow(ctx: &XdpContext, pkt: &Packet) -> Result<u32, DropReason> {
    let scratch = maps::scratch_space().ok_or(DropReason::MapUpdate)?;
    let a = &scratch.scan;
    if a.port == 0 {
        return Err(DropReason::SnatExhausted);
    }
    let conn = &mut scratch.conn;
    conn.snat_addr = a.addr;
    conn.snat_port = a.port as u16;
    let cfg = maps::config.get(0).ok_or(DropReason::MapUpdate)?;
    flows::insert(&scratch.flow.key, conn, Insert::Replace, cfg)
        .map_err(|_| DropReason::FlowTableFull)?;
    if a.kind == SCAN_COOKIE {
        cookie::syn_to_backend(ctx, conn, &a.backend, a.ttl as u8)?;
        stats::count(conn.service_id, conn.backend_id, 60);
        return forward::send_rewritten(ctx, &a.hop);
    }
    nat::rewrite(pkt, a.addr, a.port as u16, a.backend.addr, a.backend.port);
    stats::count(conn.service_id, conn.backend_id, pkt.ip_len as u64);
    Ok(forward::send(ctx, pkt, &a.hop))
}

/// Opens the backend side for a client whose ACK carried a good cookie (its flow in the
/// scratch space's [`Flow`], the cookie's answer beside it): a backend and a port as for
/// any new flow, both entries written, and the ACK turned into the SYN the backend gets.
/// A verdict, or [`next::SCAN`].
#[inline(never)]
pub fn cookie_flow(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> u32 {
    next::verdict(try_cookie_flow(ctx, pkt, cfg))
}

#[inline(always)]
fn try_cookie_flow(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> Result<u32, DropReason> {
    if pkt.ttl_expires() {
        return Err(DropReason::TtlExceeded);
    }
    // SAFETY: `parse` checked the IP header against data_end, and the verifier refuses a
    // packet pointer kept across a resize.
    let ttl = unsafe { (*pkt.ip).ttl } - 1;
    let now = track::now();
    let scratch = maps::scratch_space().ok_or(DropReason::MapUpdate)?;
    let f = &scratch.flow;
    let answer = &scratch.answer;
    let t = target(ctx, pkt, &f.svc, f.pick, now, cfg)?;
    let to = Assignment {
        service_id: f.svc.id,
        backend_id: t.id,
        backend_generation: t.backend.generation,
    };
    track::write_reverse(
        &mut scratch.rev,
        &f.key,
        &to,
        state::SYNPROXY,
        answer.isn,
        now,
        &t.hop,
    );
    cookie::mark_reverse(&mut scratch.rev, answer);
    let conn = &mut scratch.conn;
    track::write_conn(conn, &to, ([0; 4], 0), 0, answer.isn, now);
    cookie::mark_conn(conn, answer);
    let rev: &NatReverse = &scratch.rev;
    let want = Want {
        backend: &t.backend,
        proto: pkt.proto,
        hash: port_hash(f.hash),
        syn: f.syn,
        now,
        rev,
    };
    let first = ports::first(&want, &t.hop, cfg).map_err(|()| DropReason::SnatExhausted)?;
    let claimed = match first {
        First::Claimed(addr, port) => Some((addr, port)),
        // An earlier connection of this 5-tuple held the port: taken over only if the
        // backend would take lb's SYN on it (its TIME_WAIT judges the client's ISN and
        // timestamp, which that SYN carries).
        First::Own(e, addr, port) => match own(e, f, &want, cfg) {
            Own::Reopen => {
                let key = FlowKey::new(t.backend.addr, t.backend.port, addr, port, pkt.proto);
                maps::nat_reverse
                    .insert(&key, rev, BPF_ANY as u64)
                    .map_err(|_| DropReason::FlowTableFull)?;
                Some((addr, port))
            }
            _ => None,
        },
        First::Taken => None,
    };
    let Some((addr, port)) = claimed else {
        ports::prepare_scan(&want, &t.hop, SCAN_COOKIE, ttl as u32);
        return Ok(next::SCAN);
    };
    let conn = &mut scratch.conn;
    conn.snat_addr = addr;
    conn.snat_port = port;
    flows::insert(&f.key, conn, Insert::Replace, cfg).map_err(|_| DropReason::FlowTableFull)?;
    cookie::syn_to_backend(ctx, conn, &t.backend, ttl)?;
    stats::count(to.service_id, to.backend_id, 60);
    forward::send_rewritten(ctx, &t.hop)
}
