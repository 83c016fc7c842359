//! Incremental Internet checksum updates (RFC 1624, equation 3: HC' = ~(~HC + ~m + m')).
//!
//! Every 16-bit value is taken exactly as it lies in the packet, read in native byte order;
//! one's-complement sums do not depend on byte order as long as all words are read the same
//! way, so no byte swapping is needed on either side.

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The change (unfolded one's-complement sum of ~old + new) of a 16-bit word.
#[inline(always)]
pub const fn diff_u16(old: u16, new: u16) -> u32 {
    !old as u32 + new as u32
}

/// The change of a 4-byte field (an address), as two 16-bit words.
#[inline(always)]
pub const fn diff_addr(old: [u8; 4], new: [u8; 4]) -> u32 {
    diff_u16(
        u16::from_ne_bytes([old[0], old[1]]),
        u16::from_ne_bytes([new[0], new[1]]),
    ) + diff_u16(
        u16::from_ne_bytes([old[2], old[3]]),
        u16::from_ne_bytes([new[2], new[3]]),
    )
}

/// Applies the sum of up to a few hundred `diff_*` values to checksum `check`; summing
/// first lets several fields (and both the IP and L4 checksums) share the work.
#[inline(always)]
pub const fn apply(check: u16, diff: u32) -> u16 {
    !fold(!check as u32 + diff)
}

/// Updates checksum `check` for a 16-bit word that changed from `old` to `new`.
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    apply(check, diff_u16(old, new))
}

/// Updates checksum `check` for a 4-byte field (an address) that changed from `old` to `new`.
#[inline(always)]
pub const fn replace_addr(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    apply(check, diff_addr(old, new))
}

/// The wire form of a host-order port, as a native-order word read from the packet.
#[inline(always)]
pub const fn port_word(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum of `data` (even length), returned as a native-order word.
    fn full(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for w in data.chunks(2) {
            sum += u16::from_ne_bytes([w[0], w[1]]) as u32;
        }
        !fold(sum)
    }

    fn with_checksum(mut data: Vec<u8>, at: usize) -> Vec<u8> {
        data[at] = 0;
        data[at + 1] = 0;
        let c = full(&data).to_ne_bytes();
        data[at] = c[0];
        data[at + 1] = c[1];
        data
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..10_000 {
            let mut data: Vec<u8> = (0..20).map(|_| next() as u8).collect();
            data = with_checksum(data, 10);
            let check = u16::from_ne_bytes([data[10], data[11]]);
            let old_addr = [data[12], data[13], data[14], data[15]];
            let new_addr = (next()).to_ne_bytes();
            let old_port = u16::from_ne_bytes([data[16], data[17]]);
            let new_port = next() as u16;
            data[12..16].copy_from_slice(&new_addr);
            data[16..18].copy_from_slice(&new_port.to_ne_bytes());
            let updated = replace_u16(replace_addr(check, old_addr, new_addr), old_port, new_port);
            assert_eq!(
                updated,
                apply(
                    check,
                    diff_addr(old_addr, new_addr) + diff_u16(old_port, new_port)
                )
            );
            let mut reference = data.clone();
            reference = with_checksum(reference, 10);
            let expected = u16::from_ne_bytes([reference[10], reference[11]]);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                updated == expected
                    || (updated ^ expected) == 0xffff && (updated == 0 || expected == 0),
                "updated {updated:#x} expected {expected:#x}"
            );
            // And the packet with the updated checksum verifies.
            data[10..12].copy_from_slice(&updated.to_ne_bytes());
            let mut sum = 0u32;
            for w in data.chunks(2) {
                sum += u16::from_ne_bytes([w[0], w[1]]) as u32;
            }
            assert_eq!(fold(sum), 0xffff);
        }
    }

    #[test]
    fn port_word_is_wire_order() {
        assert_eq!(port_word(0x1f90).to_ne_bytes(), [0x1f, 0x90]);
    }
}
