//! Hashes that both sides must compute identically: the flow hash that picks a Maglev
//! slot (in the kernel, and in the host-side simulator) and the backend hashes that build
//! the Maglev permutation. None depends on anything node-local, so every node balances a
//! flow the same way.

/// The murmur3 32-bit finalizer: cheap and mixes every input bit into every output bit.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a client's flow towards a service: client address and port, VIP and port,
/// protocol. Addresses are taken as their network-order bytes.
#[inline(always)]
pub fn flow_hash(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let a = u32::from_be_bytes(src);
    let b = u32::from_be_bytes(dst);
    let c = ((src_port as u32) << 16) | dst_port as u32;
    let mut h = 0x9e37_79b9u32 ^ proto as u32;
    h = fmix32(h ^ a);
    h = fmix32(h.wrapping_add(b));
    fmix32(h ^ c.rotate_left(7))
}

/// Maps a 32-bit hash onto `0..n` without a division (Lemire's multiply-shift), which
/// the BPF JIT turns into one multiplication instead of a slow divide.
#[inline(always)]
pub const fn reduce(hash: u32, n: u32) -> u32 {
    ((hash as u64 * n as u64) >> 32) as u32
}

/// 64-bit FNV-1a with a seed, finished by the splitmix64 mixer; used on the host only to
/// derive a backend's Maglev offset and skip.
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40000, 80, 6);
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 2], [10, 0, 0, 100], 40000, 80, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 101], 40000, 80, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40001, 80, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40000, 81, 6)
        );
        assert_ne!(
            base,
            flow_hash([10, 0, 0, 1], [10, 0, 0, 100], 40000, 80, 17)
        );
    }

    #[test]
    fn reduce_stays_in_range_and_spreads() {
        let n = 1021;
        let mut counts = vec![0u32; n as usize];
        for i in 0..1_021_000u32 {
            let r = reduce(
                flow_hash([10, 0, 0, 1], [10, 0, 0, 2], i as u16, (i >> 16) as u16, 6),
                n,
            );
            assert!(r < n);
            counts[r as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{:?}",
            counts.iter().min()
        );
        assert_eq!(reduce(u32::MAX, 7), 6);
        assert_eq!(reduce(0, 7), 0);
    }

    #[test]
    fn flow_hash_spreads_client_ports_evenly() {
        let buckets = 7u32;
        let mut counts = [0u32; 7];
        for port in 1024..(1024 + 70_000u32) {
            let h = flow_hash([192, 168, 1, 9], [10, 0, 0, 100], port as u16, 443, 6);
            counts[(h % buckets) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
