//! Maglev lookup tables (Eisenbud et al., NSDI 2016), built on the host and copied into the
//! `maglev` array by the daemon.
//!
//! A table depends only on the set of backend addresses and the table size: backends are
//! put in canonical order first, so every node builds the same table for the same set, and
//! a flow reaches the same backend through any node.
use std::net::SocketAddrV4;

use crate::hash::hash64;

/// The sizes a table may have. A table grows only at these steps, because changing the
/// size re-deals every slot while keeping it lets Maglev move only about 1/N of them.
pub const TABLE_SIZES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65537];
/// Slots wanted per backend before a larger size is chosen.
pub const SLOTS_PER_BACKEND: u32 = 100;
pub const MAX_TABLE_SIZE: u32 = 65537;

/// The default table size for `backends` backends: the smallest step with at least
/// [`SLOTS_PER_BACKEND`] slots per backend, at most [`MAX_TABLE_SIZE`].
pub fn default_table_size(backends: usize) -> u32 {
    let wanted = (backends as u64).saturating_mul(SLOTS_PER_BACKEND as u64);
    TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| m as u64 >= wanted)
        .unwrap_or(MAX_TABLE_SIZE)
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Builds a table of `size` slots (a prime larger than the backend count) over `backends`.
/// Each slot holds an index into `backends` as given; the result does not depend on the
/// order of `backends`, only on the set.
pub fn build_table(backends: &[SocketAddrV4], size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    assert!(
        is_prime(size) && size as usize >= n,
        "table size {size} for {n} backends"
    );
    let m = size as u64;
    // Canonical order: sorted by address and port.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (backends[i].ip().octets(), backends[i].port()));
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let b = backends[i];
            let mut key = [0u8; 6];
            key[..4].copy_from_slice(&b.ip().octets());
            key[4..].copy_from_slice(&b.port().to_be_bytes());
            let offset = hash64(&key, 0x6d61_676c_6576_3031) % m;
            let skip = hash64(&key, 0x736b_6970_5f76_3031) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (rank, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = (offset + next[rank] * skip) % m;
            while table[slot as usize] != u32::MAX {
                next[rank] += 1;
                slot = (offset + next[rank] * skip) % m;
            }
            table[slot as usize] = order[rank] as u32;
            next[rank] += 1;
            filled += 1;
            if filled == size as usize {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: usize) -> Vec<SocketAddrV4> {
        (0..n)
            .map(|i| {
                SocketAddrV4::new(
                    Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1),
                    8080,
                )
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0usize; n];
        for &b in table {
            counts[b as usize] += 1;
        }
        counts
    }

    #[test]
    fn table_sizes_are_primes_and_grow_with_backends() {
        for m in TABLE_SIZES {
            assert!(is_prime(m), "{m}");
        }
        assert_eq!(default_table_size(1), 251);
        assert_eq!(default_table_size(3), 509);
        assert_eq!(default_table_size(10), 1021);
        assert_eq!(default_table_size(1000), 65537);
        assert_eq!(default_table_size(100_000), 65537);
    }

    #[test]
    fn every_backend_gets_its_share_within_a_few_percent() {
        for n in [1usize, 2, 3, 5, 10, 33, 100, 250, 655, 1000] {
            let b = backends(n);
            let size = default_table_size(n);
            let table = build_table(&b, size);
            assert_eq!(table.len(), size as usize);
            let ideal = size as f64 / n as f64;
            for (i, c) in shares(&table, n).into_iter().enumerate() {
                let dev = (c as f64 - ideal).abs() / ideal;
                // Maglev fills round robin, so shares differ by at most one slot.
                assert!(
                    c as f64 >= ideal.floor() && c as f64 <= ideal.ceil(),
                    "n={n} backend {i}: {c} slots, ideal {ideal:.1}"
                );
                assert!(
                    dev <= 0.03 || n * 100 > size as usize,
                    "n={n} backend {i}: {dev:.3}"
                );
            }
        }
    }

    /// Slots that change owner among the backends that stay, when `removed` goes.
    fn moved_others(b: &[SocketAddrV4], removed: usize, size: u32) -> usize {
        let before = build_table(b, size);
        let mut rest = b.to_vec();
        rest.remove(removed);
        let after = build_table(&rest, size);
        before
            .iter()
            .zip(&after)
            .filter(|&(&old, &new)| {
                old as usize != removed && b[old as usize] != rest[new as usize]
            })
            .count()
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth_of_other_slots() {
        // With the default sizes (at least 100 slots per backend) up to 100 backends.
        for n in [2usize, 3, 5, 10, 20, 50, 100] {
            let b = backends(n);
            let size = default_table_size(n);
            let per_backend = size as f64 / n as f64;
            for removed in [0, n / 2, n - 1] {
                let moved = moved_others(&b, removed, size);
                assert!(
                    moved as f64 <= per_backend * 1.5,
                    "n={n}: removing backend {removed} moved {moved} other slots (1/N is {per_backend:.0})"
                );
            }
        }
    }

    #[test]
    fn large_pools_at_the_size_cap_move_under_one_percent_of_other_slots() {
        // Near the 65537-slot cap a pool has under 330 slots per backend, where Maglev's
        // greedy fill cascades more: the bound here is 1% of the table, not 1/N.
        for n in [200usize, 400, 655, 1000] {
            let b = backends(n);
            let moved = moved_others(&b, n / 2, MAX_TABLE_SIZE);
            assert!(
                moved as f64 <= MAX_TABLE_SIZE as f64 * 0.01,
                "n={n}: moved {moved} other slots"
            );
        }
    }

    #[test]
    fn table_depends_only_on_the_set() {
        let b = backends(7);
        let mut shuffled = b.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        let t1: Vec<_> = build_table(&b, 1021)
            .into_iter()
            .map(|i| b[i as usize])
            .collect();
        let t2: Vec<_> = build_table(&shuffled, 1021)
            .into_iter()
            .map(|i| shuffled[i as usize])
            .collect();
        assert_eq!(t1, t2);
    }
}
