//! The SNAT port space: which ports of a (backend, SNAT address) pair are taken.
//!
//! `nat_reverse` is the truth (an entry per port in use); a [`PortTable`] is a bitmap over
//! the same ports that lets a new flow find a free one with a word read instead of probing
//! the map, however full the range is. The bitmap is a hint: a bit set for a port whose
//! holder is gone only costs a probe, a bit clear for a taken port is found taken by the
//! insert that claims it, and both are corrected as they are met.
use crate::assert_layout;

/// Key of `port_tables`: a backend's address and port (as in `nat_reverse` keys: two
/// services with the same backend share its ports) and a SNAT address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortTableKey {
    pub backend_addr: [u8; 4],
    pub backend_port: u16,
    pub _pad: u16,
    pub snat_addr: [u8; 4],
}
assert_layout!(PortTableKey, size = 12, align = 2);

/// 64-bit words in a table: one bit for every port of the largest range.
pub const PORT_TABLE_WORDS: usize = 1024;

/// Words of a table's summary: one bit for every word of `used`.
pub const PORT_TABLE_SUMMARY_WORDS: usize = PORT_TABLE_WORDS / 64;

/// Value of `port_tables`: bit `i` of `used` set means port `snat_port_min + i` is held;
/// bit `w` of `full` set means word `w` of `used` was last seen full, so that a search
/// finds a word with a free port in a few steps however full the range is. (Taking the
/// first free port near a flow's hash fills words whole; at 95 % occupancy most words are
/// full and the free ports gather in a few.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortTable {
    pub used: [u64; PORT_TABLE_WORDS],
    pub full: [u64; PORT_TABLE_SUMMARY_WORDS],
}
assert_layout!(PortTable, size = 8320, align = 8);

impl Default for PortTable {
    fn default() -> Self {
        Self {
            used: [0; PORT_TABLE_WORDS],
            full: [0; PORT_TABLE_SUMMARY_WORDS],
        }
    }
}

/// The index of the lowest set bit of `x` (64 when none), without `cttz` (which the BPF
/// backend has no instruction for).
#[inline(always)]
pub const fn lowest_bit(x: u64) -> u32 {
    if x == 0 {
        return 64;
    }
    let mut x = x & x.wrapping_neg();
    let mut n = 0;
    if x & 0xffff_ffff == 0 {
        n += 32;
        x >>= 32;
    }
    if x & 0xffff == 0 {
        n += 16;
        x >>= 16;
    }
    if x & 0xff == 0 {
        n += 8;
        x >>= 8;
    }
    if x & 0xf == 0 {
        n += 4;
        x >>= 4;
    }
    if x & 0x3 == 0 {
        n += 2;
        x >>= 2;
    }
    if x & 0x1 == 0 {
        n += 1;
    }
    n
}

/// The first clear bit of `word` at or after bit `from`, wrapping round the word; `None`
/// when every bit is set. Bits at `valid` and above do not exist (the range's last word).
#[inline(always)]
pub const fn first_free(word: u64, from: u32, valid: u32) -> Option<u32> {
    let exists = if valid >= 64 {
        u64::MAX
    } else {
        (1u64 << valid) - 1
    };
    let free = !word & exists;
    if free == 0 {
        return None;
    }
    let from = from & 63;
    let i = lowest_bit(free.rotate_right(from));
    Some((i + from) & 63)
}

/// Per-backend figures: the SNAT ports its flows hold (counted by the daemon's periodic
/// sweep), and the TCP options its SYN-ACKs carry (learnt by the program, offered to clients
/// on its behalf in cookie mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// Ports held by live flows, over every SNAT address, as of the last sweep; for a
    /// direct-server-return backend, whose flows hold none, its live flows.
    pub ports_in_use: u32,
    /// Ports whose last flow the backend closed first, in its TIME_WAIT.
    pub ports_time_wait: u32,
    /// The sweep that counted them (counts of an earlier sweep are stale).
    pub sweep: u32,
    /// The backend's MSS, 0 until a SYN-ACK was seen (offered on its behalf in SYN
    /// cookies' SYN-ACKs).
    pub mss: u16,
    pub _reserved: u16,
}
assert_layout!(BackendState, size = 16, align = 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_bit_is_trailing_zeros() {
        for i in 0..64 {
            assert_eq!(lowest_bit(1 << i), i);
            assert_eq!(lowest_bit(u64::MAX << i), i);
        }
        assert_eq!(lowest_bit(0), 64);
        for x in [
            0x8000_0000_0000_0001u64,
            0x10,
            0xf0f0_0000,
            0x1234_5678_9abc_def0,
        ] {
            assert_eq!(lowest_bit(x), x.trailing_zeros());
        }
    }

    #[test]
    fn first_free_wraps_and_respects_the_range_end() {
        assert_eq!(first_free(0, 5, 64), Some(5));
        assert_eq!(first_free(0b111, 0, 64), Some(3));
        assert_eq!(first_free(u64::MAX ^ 1, 10, 64), Some(0), "wraps");
        assert_eq!(first_free(u64::MAX, 0, 64), None);
        // Only 10 bits exist: bits 10..64 count as taken.
        assert_eq!(first_free(0b11_1111_1111, 0, 10), None);
        assert_eq!(first_free(0b11_1111_1011, 7, 10), Some(2));
        assert_eq!(first_free(0, 63, 10), Some(0));
    }
}
