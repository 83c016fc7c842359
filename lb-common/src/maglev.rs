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

/// The largest weight a backend may have (HAProxy's bound).
pub const MAX_WEIGHT: u32 = 256;

/// Builds a table of `size` slots (a prime larger than the backend count) over `backends`.
/// Each slot holds an index into `backends` as given; the result does not depend on the
/// order of `backends`, only on the set.
pub fn build_table(backends: &[SocketAddrV4], size: u32) -> Vec<u32> {
    let weighted: Vec<(SocketAddrV4, u32)> = backends.iter().map(|&b| (b, 1)).collect();
    build_weighted(&weighted, size)
}

/// Each backend's number of slots in a table of `size`: its weight's share, rounded by
/// largest remainder (ties to canonical order), so every count is within one slot of the
/// exact share and they add up to `size`. All zero when every weight is.
fn quotas(weights: &[u32], size: u32) -> Vec<u64> {
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let exact = |w: u32| size as u64 * w as u64;
    let mut quota: Vec<u64> = weights.iter().map(|&w| exact(w) / total).collect();
    let short = size as u64 - quota.iter().sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    // Stable: equal remainders keep canonical order.
    by_remainder.sort_by_key(|&r| std::cmp::Reverse(exact(weights[r]) % total));
    for &r in by_remainder.iter().take(short as usize) {
        quota[r] += 1;
    }
    quota
}

/// [`build_table`] with a weight per backend: each gets a share of the slots proportional
/// to its weight, within one slot; weight 0 gets none. Backends take turns in proportion
/// to their weights (a turn each when the weights are equal, which is plain Maglev), each
/// taking the next free slot of its own permutation, until it holds its quota. Empty when
/// no backend has a weight.
pub fn build_weighted(backends: &[(SocketAddrV4, u32)], size: u32) -> Vec<u32> {
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
    order.sort_by_key(|&i| (backends[i].0.ip().octets(), backends[i].0.port()));
    let weights: Vec<u32> = order.iter().map(|&i| backends[i].1).collect();
    let quota = quotas(&weights, size);
    if quota.iter().all(|&q| q == 0) {
        return Vec::new();
    }
    let max_weight = weights.iter().copied().max().unwrap_or(1) as u64;
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let b = backends[i].0;
            let mut key = [0u8; 6];
            key[..4].copy_from_slice(&b.ip().octets());
            key[4..].copy_from_slice(&b.port().to_be_bytes());
            let offset = hash64(&key, 0x6d61_676c_6576_3031) % m;
            let skip = hash64(&key, 0x736b_6970_5f76_3031) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut credit = vec![0u64; n];
    let mut held = vec![0u64; n];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (rank, &(offset, skip)) in perms.iter().enumerate() {
            credit[rank] += weights[rank] as u64;
            while credit[rank] >= max_weight && held[rank] < quota[rank] {
                credit[rank] -= max_weight;
                let mut slot = (offset + next[rank] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[rank] += 1;
                    slot = (offset + next[rank] * skip) % m;
                }
                table[slot as usize] = order[rank] as u32;
                next[rank] += 1;
                held[rank] += 1;
                filled += 1;
                if filled == size as usize {
                    break 'fill;
                }
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
    fn weighted_shares_are_within_one_slot_of_the_weights() {
        let cases: [&[u32]; 6] = [
            &[1, 2],
            &[1, 1, 2, 4],
            &[3, 0, 5],
            &[256, 1, 1, 1, 7],
            &[10, 20, 30, 40, 50, 60, 70],
            &[0, 0, 1],
        ];
        for weights in cases {
            let b = backends(weights.len());
            let weighted: Vec<_> = b.iter().copied().zip(weights.iter().copied()).collect();
            for size in [251, 1021, 65537] {
                let table = build_weighted(&weighted, size);
                assert!(!table.contains(&u32::MAX));
                let total: u32 = weights.iter().sum();
                for (i, c) in shares(&table, b.len()).into_iter().enumerate() {
                    let exact = size as f64 * weights[i] as f64 / total as f64;
                    assert!(
                        (c as f64 - exact).abs() < 1.0,
                        "{weights:?} size {size}: backend {i} has {c} slots, exact share {exact:.2}"
                    );
                }
            }
        }
    }

    #[test]
    fn equal_weights_are_plain_maglev() {
        let b = backends(9);
        let plain = build_table(&b, 1021);
        let weighted: Vec<_> = b.iter().map(|&a| (a, 5)).collect();
        assert_eq!(build_weighted(&weighted, 1021), plain);
    }

    #[test]
    fn no_weight_at_all_is_an_empty_table() {
        let b = backends(3);
        let weighted: Vec<_> = b.iter().map(|&a| (a, 0)).collect();
        assert!(build_weighted(&weighted, 251).is_empty());
    }

    #[test]
    fn a_weight_change_moves_only_a_few_other_slots() {
        // One backend of ten going from weight 1 to 2 takes about 1/11 of the table; the
        // others should mostly lose slots to it, not to each other.
        let b = backends(10);
        let before: Vec<_> = b.iter().map(|&a| (a, 2)).collect();
        let mut after = before.clone();
        after[3].1 = 4;
        let (t1, t2) = (build_weighted(&before, 1021), build_weighted(&after, 1021));
        let among_others = t1
            .iter()
            .zip(&t2)
            .filter(|&(&x, &y)| x != y && y != 3)
            .count();
        assert!(
            among_others <= 1021 / 10,
            "{among_others} slots moved among the others"
        );
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
