//! SYN cookies: the initial sequence number lb answers a SYN with in cookie mode, which
//! proves, when the client acknowledges it, that the client owns its address; and the
//! options the client's SYN offered, carried through the handshake without state.
//!
//! The cookie is a SipHash-2-4 MAC under the group's secret over the client's 4-tuple, its
//! initial sequence number and a 64-second time counter, with the time counter's low bits
//! and the client's MSS (as an index into [`MSS_TABLE`]) in clear. Any node of the group
//! can check a cookie another node made. Window scale and SACK, which Linux keeps in the
//! timestamp it sends, travel the same way: in the low bits of lb's timestamp value, which
//! the client echoes.
use crate::hash::{SipKey, siphash_words};

/// MSS values a cookie can carry; a client's MSS is rounded down to one of them.
pub const MSS_TABLE: [u16; 8] = [536, 1220, 1330, 1400, 1440, 1452, 1460, 8940];

/// Seconds a cookie's time counter ticks at; a cookie is good for one to two ticks.
pub const COOKIE_TICK_S: u32 = 64;

const MAC_SHIFT: u32 = 5;
const TIME_SHIFT: u32 = 3;

/// The index of the largest table MSS not above `mss`.
#[inline(always)]
pub const fn mss_index(mss: u16) -> u32 {
    let mut i = MSS_TABLE.len() - 1;
    while i > 0 && MSS_TABLE[i] > mss {
        i -= 1;
    }
    i as u32
}

/// The client's side of the handshake a cookie is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieFlow {
    pub client_addr: [u8; 4],
    pub vip_addr: [u8; 4],
    pub client_port: u16,
    pub vip_port: u16,
    /// The client's initial sequence number.
    pub isn: u32,
}

#[inline(always)]
fn mac(key: SipKey, f: &CookieFlow, tick: u32, mss_idx: u32) -> u32 {
    let w0 =
        ((u32::from_be_bytes(f.client_addr) as u64) << 32) | u32::from_be_bytes(f.vip_addr) as u64;
    let w1 = ((f.client_port as u64) << 48) | ((f.vip_port as u64) << 32) | f.isn as u64;
    let w2 = ((tick as u64) << 8) | mss_idx as u64;
    siphash_words::<2, 4, 3>(key, [w0, w1, w2]) as u32
}

/// The cookie for `f` at time counter `tick` (see [`cookie_tick`]) with the client's MSS.
#[inline(always)]
pub fn make(key: SipKey, f: &CookieFlow, tick: u32, client_mss: u16) -> u32 {
    let idx = mss_index(client_mss);
    (mac(key, f, tick, idx) << MAC_SHIFT) | ((tick & 3) << TIME_SHIFT) | idx
}

/// The client's MSS if `cookie` (its ACK's acknowledgement number less one) is one lb made
/// for `f` in this tick or the last.
#[inline(always)]
pub fn check(key: SipKey, f: &CookieFlow, tick: u32, cookie: u32) -> Option<u16> {
    let idx = cookie & 7;
    let lo = (cookie >> TIME_SHIFT) & 3;
    let age = tick.wrapping_sub(lo) & 3;
    if age > 1 {
        return None;
    }
    let made = tick.wrapping_sub(age);
    if (mac(key, f, made, idx) << MAC_SHIFT) != (cookie & !((1 << MAC_SHIFT) - 1)) {
        return None;
    }
    Some(MSS_TABLE[idx as usize])
}

/// The cookie time counter at `now` jiffies.
#[inline(always)]
pub const fn cookie_tick(now: u64, hz: u32) -> u32 {
    let hz = if hz == 0 { 250 } else { hz };
    (now / (COOKIE_TICK_S as u64 * hz as u64)) as u32
}

/// Marks lb's timestamp as carrying options.
const TS_OPTIONS: u32 = 1;
const TS_SACK: u32 = 2;
const TS_WSCALE_SHIFT: u32 = 2;
/// Window scale value meaning "none offered".
const TS_NO_WSCALE: u32 = 15;

/// lb's timestamp value for a cookie SYN-ACK: its clock with the low 6 bits holding the
/// client's window scale (`None`: not offered) and SACK permission.
#[inline(always)]
pub const fn ts_encode(clock: u32, wscale: Option<u8>, sack: bool) -> u32 {
    let ws = match wscale {
        Some(w) if w <= 14 => w as u32,
        Some(_) => 14,
        None => TS_NO_WSCALE,
    };
    (clock & !0x3f) | (ws << TS_WSCALE_SHIFT) | if sack { TS_SACK } else { 0 } | TS_OPTIONS
}

/// The window scale and SACK permission in a timestamp [`ts_encode`] made (the client's
/// echo of it); `None` if it carries none.
#[inline(always)]
pub const fn ts_decode(echo: u32) -> Option<(Option<u8>, bool)> {
    if echo & TS_OPTIONS == 0 {
        return None;
    }
    let ws = (echo >> TS_WSCALE_SHIFT) & 0xf;
    let wscale = if ws == TS_NO_WSCALE {
        None
    } else if ws > 14 {
        return None;
    } else {
        Some(ws as u8)
    };
    Some((wscale, echo & TS_SACK != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SipKey = SipKey { k0: 11, k1: 22 };

    fn flow() -> CookieFlow {
        CookieFlow {
            client_addr: [10, 0, 0, 1],
            vip_addr: [10, 0, 9, 100],
            client_port: 40000,
            vip_port: 80,
            isn: 0xdead_beef,
        }
    }

    #[test]
    fn a_cookie_checks_for_its_flow_in_its_tick_and_the_next() {
        let c = make(KEY, &flow(), 1000, 1460);
        assert_eq!(check(KEY, &flow(), 1000, c), Some(1460));
        assert_eq!(check(KEY, &flow(), 1001, c), Some(1460));
        assert_eq!(check(KEY, &flow(), 1002, c), None, "expired");
        assert_eq!(check(KEY, &flow(), 999, c), None, "from the future");
        let other = [
            CookieFlow { isn: 1, ..flow() },
            CookieFlow {
                client_port: 40001,
                ..flow()
            },
            CookieFlow {
                client_addr: [10, 0, 0, 2],
                ..flow()
            },
            CookieFlow {
                vip_port: 81,
                ..flow()
            },
        ];
        for f in other {
            assert_eq!(check(KEY, &f, 1000, c), None, "{f:?}");
        }
        assert_eq!(
            check(SipKey { k0: 1, k1: 2 }, &flow(), 1000, c),
            None,
            "another key"
        );
        // Every bit matters: a forged neighbour does not check.
        for bit in 0..32 {
            assert_eq!(check(KEY, &flow(), 1000, c ^ (1 << bit)), None, "bit {bit}");
        }
    }

    #[test]
    fn the_mss_is_rounded_down_to_the_table() {
        assert_eq!(mss_index(1460), 6);
        assert_eq!(mss_index(1459), 5);
        assert_eq!(mss_index(100), 0);
        assert_eq!(mss_index(9000), 7);
        let c = make(KEY, &flow(), 7, 1448);
        assert_eq!(check(KEY, &flow(), 7, c), Some(1440));
    }

    #[test]
    fn timestamps_carry_window_scale_and_sack() {
        for ws in [None, Some(0), Some(7), Some(14)] {
            for sack in [false, true] {
                let ts = ts_encode(0x1234_5678, ws, sack);
                assert_eq!(ts & !0x3f, 0x1234_5640);
                assert_eq!(ts_decode(ts), Some((ws, sack)));
            }
        }
        assert_eq!(
            ts_decode(ts_encode(0, Some(20), false)),
            Some((Some(14), false))
        );
        assert_eq!(ts_decode(0x1234_5640), None);
        assert_eq!(cookie_tick(64 * 250 * 3 + 5, 250), 3);
    }
}
