//! Hashes that both sides must compute identically: the flow hash that picks a Maglev
//! slot and a SNAT port (in the kernel, and in the host-side simulator), the SYN cookie MAC,
//! and the backend hashes that build the Maglev permutation. None depends on anything
//! node-local: the flow hash and the cookies are keyed by a secret that every node of a
//! group shares through the store, so every node balances a flow the same way while an
//! outsider can neither predict which slot or port a flow takes nor forge a cookie.

/// The murmur3 32-bit finalizer: cheap and mixes every input bit into every output bit.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// A 128-bit SipHash key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SipKey {
    pub k0: u64,
    pub k1: u64,
}
crate::assert_layout!(SipKey, size = 16, align = 8);

/// SipHash's state after the key, before any message word.
#[inline(always)]
const fn sip_init(key: SipKey) -> [u64; 4] {
    [
        key.k0 ^ 0x736f_6d65_7073_6575,
        key.k1 ^ 0x646f_7261_6e64_6f6d,
        key.k0 ^ 0x6c79_6765_6e65_7261,
        key.k1 ^ 0x7465_6462_7974_6573,
    ]
}

#[inline(always)]
const fn sip_round(mut v: [u64; 4]) -> [u64; 4] {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
    v
}

/// Absorbs one 8-byte message word with `C` compression rounds.
#[inline(always)]
const fn sip_absorb<const C: usize>(mut v: [u64; 4], m: u64) -> [u64; 4] {
    v[3] ^= m;
    let mut i = 0;
    while i < C {
        v = sip_round(v);
        i += 1;
    }
    v[0] ^= m;
    v
}

#[inline(always)]
const fn sip_finish<const D: usize>(mut v: [u64; 4]) -> u64 {
    v[2] ^= 0xff;
    let mut i = 0;
    while i < D {
        v = sip_round(v);
        i += 1;
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// SipHash-C-D of a message made of whole 8-byte words (each the little-endian reading of
/// eight message bytes): the same value as SipHash over those bytes.
#[inline(always)]
pub const fn siphash_words<const C: usize, const D: usize, const N: usize>(
    key: SipKey,
    words: [u64; N],
) -> u64 {
    let mut v = sip_init(key);
    let mut i = 0;
    while i < N {
        v = sip_absorb::<C>(v, words[i]);
        i += 1;
    }
    // The last block holds only the length (a multiple of 8, so no tail bytes).
    v = sip_absorb::<C>(v, ((N as u64 * 8) & 0xff) << 56);
    sip_finish::<D>(v)
}

/// The keyed hash of a client's flow towards a service (client address and port, VIP and
/// port, protocol; addresses as their network-order bytes): SipHash-1-3 under the group's
/// secret. The low 32 bits pick the Maglev slot, the high 32 bits the SNAT port.
#[inline(always)]
pub fn flow_hash(
    key: SipKey,
    src: [u8; 4],
    dst: [u8; 4],
    src_port: u16,
    dst_port: u16,
    proto: u8,
) -> u64 {
    let a = ((u32::from_be_bytes(src) as u64) << 32) | u32::from_be_bytes(dst) as u64;
    let b = ((src_port as u64) << 32) | ((dst_port as u64) << 16) | proto as u64;
    siphash_words::<1, 3, 2>(key, [a, b])
}

/// The Maglev slot part of a [`flow_hash`].
#[inline(always)]
pub const fn slot_hash(h: u64) -> u32 {
    h as u32
}

/// The SNAT port part of a [`flow_hash`].
#[inline(always)]
pub const fn port_hash(h: u64) -> u32 {
    (h >> 32) as u32
}

/// A cheap unkeyed hash of a service key, for the VIP filter (which only saves lookups and
/// decides nothing an outsider could exploit).
#[inline(always)]
pub fn filter_hash(addr: [u8; 4], port: u16, proto: u8) -> u32 {
    let a = u32::from_be_bytes(addr);
    let c = ((port as u32) << 8) | proto as u32;
    fmix32(fmix32(0x9e37_79b9 ^ a).wrapping_add(c))
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

    const KEY: SipKey = SipKey {
        k0: 0x0706_0504_0302_0100,
        k1: 0x0f0e_0d0c_0b0a_0908,
    };

    /// SipHash over bytes, written from the paper's description, to check the word form.
    fn siphash_bytes(c: usize, d: usize, key: SipKey, msg: &[u8]) -> u64 {
        let mut v = sip_init(key);
        let mut chunks = msg.chunks_exact(8);
        let compress = |mut v: [u64; 4], m: u64| {
            v[3] ^= m;
            for _ in 0..c {
                v = sip_round(v);
            }
            v[0] ^= m;
            v
        };
        for chunk in &mut chunks {
            v = compress(v, u64::from_le_bytes(chunk.try_into().unwrap()));
        }
        let mut last = [0u8; 8];
        let tail = chunks.remainder();
        last[..tail.len()].copy_from_slice(tail);
        last[7] = msg.len() as u8;
        v = compress(v, u64::from_le_bytes(last));
        v[2] ^= 0xff;
        for _ in 0..d {
            v = sip_round(v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    #[test]
    fn siphash_2_4_matches_the_papers_test_vectors() {
        // Key 00..0f; messages 00.., of length 0 and 15 (Aumasson and Bernstein, appendix A).
        let msg: Vec<u8> = (0..64).collect();
        assert_eq!(siphash_bytes(2, 4, KEY, &msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash_bytes(2, 4, KEY, &msg[..15]), 0xa129_ca61_49be_45e5);
        // The word form is the same function on whole words.
        for n in [1usize, 2, 3] {
            let words: Vec<u64> = msg[..n * 8]
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let bytes = siphash_bytes(2, 4, KEY, &msg[..n * 8]);
            let w = match n {
                1 => siphash_words::<2, 4, 1>(KEY, [words[0]]),
                2 => siphash_words::<2, 4, 2>(KEY, [words[0], words[1]]),
                _ => siphash_words::<2, 4, 3>(KEY, [words[0], words[1], words[2]]),
            };
            assert_eq!(w, bytes, "{n} words");
            let w13 = match n {
                1 => siphash_words::<1, 3, 1>(KEY, [words[0]]),
                2 => siphash_words::<1, 3, 2>(KEY, [words[0], words[1]]),
                _ => siphash_words::<1, 3, 3>(KEY, [words[0], words[1], words[2]]),
            };
            assert_eq!(
                w13,
                siphash_bytes(1, 3, KEY, &msg[..n * 8]),
                "{n} words, 1-3"
            );
        }
    }

    #[test]
    fn flow_hash_depends_on_every_field_and_on_the_key() {
        let h = |src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, proto: u8| {
            flow_hash(KEY, src, dst, sp, dp, proto)
        };
        let base = h([10, 0, 0, 1], [10, 0, 0, 100], 40000, 80, 6);
        assert_ne!(base, h([10, 0, 0, 2], [10, 0, 0, 100], 40000, 80, 6));
        assert_ne!(base, h([10, 0, 0, 1], [10, 0, 0, 101], 40000, 80, 6));
        assert_ne!(base, h([10, 0, 0, 1], [10, 0, 0, 100], 40001, 80, 6));
        assert_ne!(base, h([10, 0, 0, 1], [10, 0, 0, 100], 40000, 81, 6));
        assert_ne!(base, h([10, 0, 0, 1], [10, 0, 0, 100], 40000, 80, 17));
        let other = SipKey { k0: 1, k1: 2 };
        assert_ne!(
            base,
            flow_hash(other, [10, 0, 0, 1], [10, 0, 0, 100], 40000, 80, 6)
        );
    }

    #[test]
    fn reduce_stays_in_range_and_spreads() {
        let n = 1021;
        let mut counts = vec![0u32; n as usize];
        for i in 0..1_021_000u32 {
            let r = reduce(
                slot_hash(flow_hash(
                    KEY,
                    [10, 0, 0, 1],
                    [10, 0, 0, 2],
                    i as u16,
                    (i >> 16) as u16,
                    6,
                )),
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
            let h = flow_hash(KEY, [192, 168, 1, 9], [10, 0, 0, 100], port as u16, 443, 6);
            counts[(slot_hash(h) % buckets) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
