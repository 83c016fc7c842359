//! A reference Maglev table, written from the paper (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016, section 3.4, "Pseudocode 1:
//! Populate Maglev hashing lookup table"), to check the tables lb builds against something
//! that is not lb's own code.
//!
//! What the paper leaves to the implementer is lb's documented choice, restated here: each
//! backend's key is its IPv4 address and port (6 bytes, port big-endian); `offset` and
//! `skip` come from two seeded 64-bit hashes of it (FNV-1a finished by splitmix64); and
//! backends take their turns sorted by (address, port), so that the table depends only on
//! the set.
use std::net::SocketAddrV4;

const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031;
const SKIP_SEED: u64 = 0x736b_6970_5f76_3031;

/// FNV-1a (64-bit) over `bytes` from a seeded basis, then splitmix64's finaliser.
fn seeded_hash(bytes: &[u8], seed: u64) -> u64 {
    const FNV_BASIS: u64 = 14_695_981_039_346_656_037;
    const FNV_PRIME: u64 = 1_099_511_628_211;
    let h = bytes.iter().fold(FNV_BASIS ^ seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    let z = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The lookup table of `m` entries (a prime) over `backends`: each entry the index, in
/// `backends` as given, of the backend that owns it.
pub fn table(backends: &[SocketAddrV4], m: u64) -> Vec<usize> {
    if backends.is_empty() {
        return Vec::new();
    }
    let mut turns: Vec<usize> = (0..backends.len()).collect();
    turns.sort_by_key(|&i| (backends[i].ip().octets(), backends[i].port()));
    // permutation[i][j] = (offset + j * skip) mod M, one row per backend.
    let rows: Vec<(u64, u64)> = turns
        .iter()
        .map(|&i| {
            let mut key = backends[i].ip().octets().to_vec();
            key.extend_from_slice(&backends[i].port().to_be_bytes());
            let offset = seeded_hash(&key, OFFSET_SEED) % m;
            let skip = seeded_hash(&key, SKIP_SEED) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let permutation = |row: usize, j: u64| (rows[row].0 + j * rows[row].1) % m;
    let mut next = vec![0u64; rows.len()];
    let mut entry: Vec<Option<usize>> = vec![None; m as usize];
    let mut n = 0;
    loop {
        for (row, &backend) in turns.iter().enumerate() {
            let mut c = permutation(row, next[row]);
            while entry[c as usize].is_some() {
                next[row] += 1;
                c = permutation(row, next[row]);
            }
            entry[c as usize] = Some(backend);
            next[row] += 1;
            n += 1;
            if n == m {
                return entry.into_iter().map(|e| e.unwrap()).collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_gets_its_share_and_the_order_given_does_not_matter() {
        let backends: Vec<SocketAddrV4> = (1..=5)
            .map(|i| SocketAddrV4::new([10, 0, 0, i].into(), 8080))
            .collect();
        let t = table(&backends, 251);
        assert_eq!(t.len(), 251);
        for b in 0..5 {
            let share = t.iter().filter(|&&e| e == b).count();
            assert!((50..=51).contains(&share), "backend {b}: {share} entries");
        }
        let mut reversed = backends.clone();
        reversed.reverse();
        let r = table(&reversed, 251);
        let named = |t: &[usize], bs: &[SocketAddrV4]| t.iter().map(|&i| bs[i]).collect::<Vec<_>>();
        assert_eq!(named(&t, &backends), named(&r, &reversed));
    }
}
