//! Connection tracking and NAT state: what a flow holds, and when it lets go of its SNAT
//! port.
//!
//! Every balanced flow holds one SNAT port towards its backend, recorded by its
//! `nat_reverse` entry (keyed by the backend's side of the flow). That entry carries the
//! flow's TCP state, so the port is released as soon as the backend no longer needs the
//! tuple: at once after a reset or a close the client began, and, when the backend closed
//! first and so holds the tuple in TIME_WAIT, to a new SYN that the backend's TIME_WAIT
//! accepts (RFC 6191, as Linux implements it) or after the TIME_WAIT ends.
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

/// `Conn::flags`: the client has not yet acknowledged the backend's SYN-ACK.
pub const CONN_HANDSHAKE: u16 = 1;
/// A FIN from the client was seen.
pub const CONN_CLIENT_FIN: u16 = 2;
/// A FIN from the backend was seen.
pub const CONN_BACKEND_FIN: u16 = 4;
/// A RST was seen, either way.
pub const CONN_RESET: u16 = 8;
/// Opened by lb for a client that answered a SYN cookie: its sequence numbers and
/// timestamps are translated between what lb told the client and what the backend chose.
pub const CONN_SYNPROXY: u16 = 16;
/// `CONN_SYNPROXY`: the backend answered lb's SYN; the deltas hold.
pub const CONN_BACKEND_OPEN: u16 = 32;
/// A direct-server-return flow (`SERVICE_DSR_IPIP` or `SERVICE_DSR_L2`): it holds no port,
/// lb sees only the client's side, and a FIN or RST from the client only shortens its
/// timeout (`CONN_CLIENT_FIN`).
pub const CONN_DIRECT_IPIP: u16 = 64;
pub const CONN_DIRECT_L2: u16 = 128;
pub const CONN_DIRECT: u16 = CONN_DIRECT_IPIP | CONN_DIRECT_L2;
/// `CONN_DIRECT_IPIP` with a per-flow outer source (`SERVICE_DSR_SPREAD_SOURCE`).
pub const CONN_SPREAD_SOURCE: u16 = 256;
pub const CONN_CLOSING: u16 = CONN_CLIENT_FIN | CONN_BACKEND_FIN | CONN_RESET;
/// Flags whose packets leave the fast path: state to follow, or fields to translate.
pub const CONN_SLOW: u16 = CONN_HANDSHAKE | CONN_CLOSING | CONN_SYNPROXY;

/// Value of `conntrack`: where a client's flow was balanced to and which SNAT address
/// and port it uses towards the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// Counted under this service; a tracked flow needs no service lookup.
    pub service_id: u32,
    pub backend_id: u32,
    /// The backend's generation when the flow was balanced; a mismatch re-balances.
    pub backend_generation: u32,
    pub snat_addr: [u8; 4],
    pub snat_port: u16,
    /// `CONN_*`.
    pub flags: u16,
    /// TCP: the sequence number of the client's SYN. A SYN with another one on this 5-tuple
    /// is a new connection; with the same one, a retry.
    pub isn: u32,
    /// Jiffies at the last packet, refreshed at most once a second. (The way to the backend
    /// is its own, in `backend_hops`: kept out of here, a flow's entry spans a cache line
    /// less, which a flow's first packet after a quiet spell pays for in misses.)
    pub last_seen: u64,
    /// `CONN_SYNPROXY`: added to the client's acknowledgement numbers and SACK edges (the
    /// backend's initial sequence number less the cookie lb sent the client).
    pub seq_delta: u32,
    /// `CONN_SYNPROXY`: added to the timestamps the client echoes (the backend's clock less
    /// lb's).
    pub ts_delta: u32,
    /// `CONN_SYNPROXY`: the client's SYN options, to open (and re-open) the backend side.
    pub syn: SynOptions,
}
assert_layout!(Conn, size = 48, align = 8);

impl Conn {
    /// Whether a SYN with sequence number `seq` belongs to this tracked flow rather than
    /// opening a new connection on its 5-tuple: a retry of the handshake it began, or a
    /// SYN on a live connection (which its backend answers as it sees fit). Never once the
    /// flow has expired: the SYN is new again.
    #[inline(always)]
    pub fn takes_syn(&self, seq: u32, proto: u8, now: u64, cfg: &Config) -> bool {
        let retry = self.isn == seq && self.flags & CONN_HANDSHAKE != 0;
        let open = self.flags & CONN_CLOSING == 0;
        (retry || open) && !self.expired(proto, now, cfg)
    }

    /// Whether the connection is over: reset, or closed both ways. Its client may open a
    /// new one on the same 5-tuple at once.
    #[inline(always)]
    pub fn closed(&self) -> bool {
        self.flags & CONN_RESET != 0
            || self.flags & (CONN_CLIENT_FIN | CONN_BACKEND_FIN)
                == CONN_CLIENT_FIN | CONN_BACKEND_FIN
    }
}

/// The TCP options of a SYN that matter to a connection lb opens on a client's behalf.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynOptions {
    pub mss: u16,
    /// Window scale (valid with `SYN_WSCALE`).
    pub wscale: u8,
    /// `SYN_*`.
    pub flags: u8,
    /// The client's timestamp value (valid with `SYN_TIMESTAMPS`).
    pub tsval: u32,
}
assert_layout!(SynOptions, size = 8, align = 4);

pub const SYN_WSCALE: u8 = 1;
pub const SYN_SACK: u8 = 2;
pub const SYN_TIMESTAMPS: u8 = 4;

/// Idle timeouts, in seconds: how long a flow in each state keeps its SNAT port without
/// a packet.
///
/// A TCP SYN without an answer (a client retries at 1, 3 and 7 s), and a UDP flow without
/// an answer (Linux conntrack's `udp_timeout`).
pub const PENDING_TIMEOUT_S: u32 = 10;
pub const UDP_PENDING_TIMEOUT_S: u32 = 30;
/// A handshake the client does not complete. Linux's listener gives up after its SYN-ACK
/// retries (about a minute) and conntrack allows 60 s in SYN_RECV; HAProxy's usual
/// `timeout connect` is 5 s. Ten seconds fits a client's slowest answers on a sane
/// network, and is all a flood of SYNs can hold a port for when cookies are off.
pub const EMBRYONIC_TIMEOUT_S: u32 = 10;
pub const TCP_IDLE_TIMEOUT_S: u32 = 3600;
pub const UDP_IDLE_TIMEOUT_S: u32 = 120;
/// A close begun (FIN one way) but not finished.
pub const CLOSING_TIMEOUT_S: u32 = 60;
/// After a reset, or after the client's last ACK of a close the client began: the backend
/// keeps no state, but may still retransmit its FIN for a moment if that ACK was lost.
pub const CLOSED_HOLD_S: u32 = 1;
/// `last_seen` is rewritten only when it is older than this, to keep the fast path free
/// of a cache-line write on every packet.
pub const LAST_SEEN_GRANULARITY_S: u32 = 1;

impl Conn {
    /// Whether the flow has been idle longer than its state allows.
    #[inline(always)]
    pub fn expired(&self, proto: u8, now: u64, cfg: &Config) -> bool {
        let timeout = if self.flags & CONN_CLOSING != 0 {
            CLOSING_TIMEOUT_S
        } else if proto != crate::IPPROTO_TCP {
            UDP_IDLE_TIMEOUT_S
        } else if self.flags & CONN_HANDSHAKE != 0 {
            EMBRYONIC_TIMEOUT_S
        } else {
            TCP_IDLE_TIMEOUT_S
        };
        now.saturating_sub(self.last_seen) > cfg.jiffies(timeout)
    }
}

/// `NatReverse::state`: where the flow holding a SNAT port is in its life.
pub mod state {
    /// The first packet went to the backend; no answer yet.
    pub const PENDING: u8 = 0;
    /// TCP: the backend answered the SYN; the client has not acknowledged it yet.
    pub const EMBRYONIC: u8 = 1;
    pub const ESTABLISHED: u8 = 2;
    /// The client sent a FIN first.
    pub const FIN_CLIENT: u8 = 3;
    /// The backend sent a FIN first.
    pub const FIN_BACKEND: u8 = 4;
    /// The client closed first and the backend closed too: the backend waits for the
    /// client's last ACK.
    pub const LAST_ACK: u8 = 5;
    /// The backend closed first and both sides closed: the backend holds the tuple in
    /// TIME_WAIT.
    pub const TIME_WAIT: u8 = 6;
    /// Reset, or closed with nothing left on the backend.
    pub const CLOSED: u8 = 7;
    /// lb sent the backend a SYN for a client that answered a cookie; no SYN-ACK yet.
    pub const SYNPROXY: u8 = 8;
}

/// `NatReverse::flags`: a cookie-opened flow (see `CONN_SYNPROXY`).
pub const REV_SYNPROXY: u8 = 1;
/// The client sent timestamps: `tw_tsval` holds its last one.
pub const REV_TIMESTAMPS: u8 = 2;
/// The backend's SYN-ACK has been turned into the client's window update; a retransmitted
/// one completes the backend's handshake instead.
pub const REV_CLIENT_OPENED: u8 = 4;

/// Value of `nat_reverse`: how to turn a backend's reply back into what the client expects,
/// and the state of the flow that holds this SNAT port.
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
    /// `state::*`.
    pub state: u8,
    /// `REV_*`.
    pub flags: u8,
    /// `REV_SYNPROXY`: the window scale the backend uses, and the one lb promised the client
    /// (windows are rescaled between the two).
    pub backend_wscale: u8,
    pub client_wscale: u8,
    /// TCP: the client's initial sequence number.
    pub isn: u32,
    /// `TIME_WAIT`: the backend's next expected sequence number from the client (its FIN
    /// plus one); a new SYN above it is accepted.
    pub tw_seq: u32,
    /// `TIME_WAIT` with `REV_TIMESTAMPS`: the client's last timestamp; a new SYN with a
    /// newer one is accepted.
    pub tw_tsval: u32,
    /// `REV_SYNPROXY`: subtracted from the backend's sequence numbers and timestamps.
    pub seq_delta: u32,
    pub ts_delta: u32,
    /// Jiffies at the last packet (refreshed at most once a second), or when the state
    /// last changed.
    pub last_seen: u64,
    /// Towards the client.
    pub hop: NextHop,
}
assert_layout!(NatReverse, size = 88, align = 8);

/// Whether `a` comes after `b` in sequence space (RFC 1982 serial arithmetic).
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What a new flow offers to a backend tuple in TIME_WAIT: a TCP SYN's sequence number and,
/// if it has one, its timestamp. (Plain fields, no `Option`: the BPF program copies it, and
/// the verifier refuses the copy of an `Option`'s unset payload.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynProbe {
    pub seq: u32,
    pub tsval: u32,
    /// `PROBE_*`.
    pub flags: u32,
}

/// `SynProbe::flags`: the flow opens with a TCP SYN.
pub const PROBE_SYN: u32 = 1;
/// The SYN has a timestamp.
pub const PROBE_TS: u32 = 2;

impl SynProbe {
    /// No SYN: UDP, or a TCP flow re-balanced mid-stream.
    pub const NONE: Self = Self {
        seq: 0,
        tsval: 0,
        flags: 0,
    };

    #[inline(always)]
    pub const fn syn(seq: u32, tsval: Option<u32>) -> Self {
        match tsval {
            Some(tsval) => Self {
                seq,
                tsval,
                flags: PROBE_SYN | PROBE_TS,
            },
            None => Self {
                seq,
                tsval: 0,
                flags: PROBE_SYN,
            },
        }
    }

    #[inline(always)]
    pub const fn is_syn(&self) -> bool {
        self.flags & PROBE_SYN != 0
    }

    #[inline(always)]
    pub const fn tsval(&self) -> Option<u32> {
        if self.flags & PROBE_TS != 0 {
            Some(self.tsval)
        } else {
            None
        }
    }
}

impl NatReverse {
    /// The idle timeout of the state this entry is in, in seconds; 0 for the states whose
    /// release is decided otherwise (`TIME_WAIT`, `CLOSED`).
    #[inline(always)]
    pub const fn idle_timeout(&self, proto: u8) -> u32 {
        match self.state {
            state::PENDING if proto == crate::IPPROTO_TCP => PENDING_TIMEOUT_S,
            state::PENDING => UDP_PENDING_TIMEOUT_S,
            state::EMBRYONIC | state::SYNPROXY => EMBRYONIC_TIMEOUT_S,
            state::ESTABLISHED if proto == crate::IPPROTO_TCP => TCP_IDLE_TIMEOUT_S,
            state::ESTABLISHED => UDP_IDLE_TIMEOUT_S,
            state::FIN_CLIENT | state::FIN_BACKEND | state::LAST_ACK => CLOSING_TIMEOUT_S,
            _ => 0,
        }
    }

    /// Whether the port this entry holds may be given to a new flow whose SYN is `syn`
    /// (`SynProbe::NONE` for UDP), judged from the entry alone. `None` for a flow that may
    /// be idle past its timeout, which only its conntrack entry can tell.
    #[inline(always)]
    pub fn free_for(&self, syn: SynProbe, now: u64, proto: u8, cfg: &Config) -> Option<bool> {
        let age = now.saturating_sub(self.last_seen);
        match self.state {
            state::CLOSED => Some(age > cfg.jiffies(CLOSED_HOLD_S)),
            state::TIME_WAIT => {
                if age > cfg.jiffies(cfg.time_wait()) {
                    return Some(true);
                }
                if !syn.is_syn() {
                    return Some(false);
                }
                Some(self.time_wait_accepts(syn))
            }
            _ if age > cfg.jiffies(self.idle_timeout(proto)) => None,
            _ => Some(false),
        }
    }

    /// Whether a backend whose tuple is in TIME_WAIT takes `syn` as a new connection: not
    /// with a timestamp older than the last one it saw, and only with a sequence number
    /// beyond the old connection's or a newer timestamp (RFC 6191; Linux's
    /// `tcp_timewait_state_process`).
    #[inline(always)]
    pub const fn time_wait_accepts(&self, syn: SynProbe) -> bool {
        let seq_newer = seq_after(syn.seq, self.tw_seq);
        if self.flags & REV_TIMESTAMPS == 0 {
            return seq_newer;
        }
        match syn.tsval() {
            // PAWS: an older timestamp is an old duplicate.
            Some(ts) if (self.tw_tsval.wrapping_sub(ts) as i32) > 0 => false,
            Some(ts) => seq_newer || (self.tw_tsval.wrapping_sub(ts) as i32) < 0,
            None => seq_newer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tw(tw_seq: u32, tw_tsval: Option<u32>) -> NatReverse {
        NatReverse {
            state: state::TIME_WAIT,
            tw_seq,
            tw_tsval: tw_tsval.unwrap_or(0),
            flags: if tw_tsval.is_some() {
                REV_TIMESTAMPS
            } else {
                0
            },
            ..Default::default()
        }
    }

    fn syn(seq: u32, tsval: Option<u32>) -> SynProbe {
        SynProbe::syn(seq, tsval)
    }

    #[test]
    fn time_wait_takes_a_syn_as_linux_does() {
        // Without timestamps on the old connection: a sequence number beyond it, wrapping.
        let old = tw(1000, None);
        assert!(old.time_wait_accepts(syn(1001, None)));
        assert!(old.time_wait_accepts(syn(1001, Some(5))));
        assert!(!old.time_wait_accepts(syn(1000, None)));
        assert!(!old.time_wait_accepts(syn(999, Some(u32::MAX))));
        assert!(tw(u32::MAX - 10, None).time_wait_accepts(syn(5, None)));
        // With timestamps: an older one is refused whatever the sequence number; a newer
        // one is enough; an equal one needs the sequence number.
        let old = tw(1000, Some(500));
        assert!(!old.time_wait_accepts(syn(5000, Some(499))));
        assert!(old.time_wait_accepts(syn(10, Some(501))));
        assert!(!old.time_wait_accepts(syn(10, Some(500))));
        assert!(old.time_wait_accepts(syn(1001, Some(500))));
        // A SYN without timestamps is judged by its sequence number alone.
        assert!(old.time_wait_accepts(syn(1001, None)));
        assert!(!old.time_wait_accepts(syn(999, None)));
        // Timestamps wrap too.
        assert!(tw(1000, Some(u32::MAX)).time_wait_accepts(syn(10, Some(3))));
    }

    #[test]
    fn a_port_is_free_when_its_holder_no_longer_needs_it() {
        let cfg = Config {
            hz: 100,
            ..Default::default()
        };
        let s = |secs: u64| secs * 100;
        let at = |state, last_seen| NatReverse {
            state,
            last_seen,
            ..Default::default()
        };
        let now = s(10_000);
        let tcp = crate::IPPROTO_TCP;
        let any = syn(1, None);
        // Held while young, then up to the conntrack entry (None) once idle.
        for (st, timeout) in [
            (state::PENDING, PENDING_TIMEOUT_S),
            (state::EMBRYONIC, EMBRYONIC_TIMEOUT_S),
            (state::SYNPROXY, EMBRYONIC_TIMEOUT_S),
            (state::ESTABLISHED, TCP_IDLE_TIMEOUT_S),
            (state::FIN_CLIENT, CLOSING_TIMEOUT_S),
            (state::FIN_BACKEND, CLOSING_TIMEOUT_S),
            (state::LAST_ACK, CLOSING_TIMEOUT_S),
        ] {
            let t = s(timeout as u64);
            assert_eq!(
                at(st, now - t).free_for(any, now, tcp, &cfg),
                Some(false),
                "{st}"
            );
            assert_eq!(
                at(st, now - t - 1).free_for(any, now, tcp, &cfg),
                None,
                "{st}"
            );
        }
        // Closed: after a second's hold.
        assert_eq!(
            at(state::CLOSED, now).free_for(any, now, tcp, &cfg),
            Some(false)
        );
        assert_eq!(
            at(state::CLOSED, now - s(2)).free_for(SynProbe::NONE, now, tcp, &cfg),
            Some(true)
        );
        // TIME_WAIT: to a SYN it accepts at once, to anything after the TIME_WAIT.
        let mut t = tw(1000, None);
        t.last_seen = now - s(1);
        assert_eq!(t.free_for(syn(1001, None), now, tcp, &cfg), Some(true));
        assert_eq!(t.free_for(syn(999, None), now, tcp, &cfg), Some(false));
        assert_eq!(t.free_for(SynProbe::NONE, now, tcp, &cfg), Some(false));
        t.last_seen = now - s(61);
        assert_eq!(t.free_for(syn(999, None), now, tcp, &cfg), Some(true));
        // UDP waits 30 s for an answer.
        let udp = crate::IPPROTO_UDP;
        let none = SynProbe::NONE;
        assert_eq!(
            at(state::PENDING, now - s(20)).free_for(none, now, udp, &cfg),
            Some(false)
        );
        assert_eq!(
            at(state::PENDING, now - s(31)).free_for(none, now, udp, &cfg),
            None
        );
    }
}
