//! What the XDP program leaves in a frame's XDP metadata when it hands the frame to the
//! kernel to be sent (its next hop has no neighbour entry yet), for lb's tc program on the
//! same interface to read.

/// The metadata in front of a handed-up frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelHopMeta {
    /// [`KernelHopMeta::MAGIC`]: metadata lb wrote, not some other program's.
    pub magic: u32,
    /// The interface the frame leaves by.
    pub ifindex: u32,
}
crate::assert_layout!(KernelHopMeta, size = 8, align = 4);

impl KernelHopMeta {
    pub const MAGIC: u32 = 0x6c62_6e68; // "lbnh"
    pub const LEN: usize = core::mem::size_of::<Self>();

    pub const fn new(ifindex: u32) -> Self {
        Self {
            magic: Self::MAGIC,
            ifindex,
        }
    }

    /// Splits `bytes` (metadata then frame, as `BPF_PROG_TEST_RUN` returns them) into lb's
    /// metadata and the frame, if it starts with lb's metadata.
    pub fn split(bytes: &[u8]) -> Option<(Self, &[u8])> {
        let (head, frame) = bytes.split_at_checked(Self::LEN)?;
        let word = |i: usize| u32::from_ne_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let meta = Self {
            magic: word(0),
            ifindex: word(4),
        };
        (meta.magic == Self::MAGIC).then_some((meta, frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_finds_lbs_metadata_and_nothing_else() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&KernelHopMeta::MAGIC.to_ne_bytes());
        bytes.extend_from_slice(&7u32.to_ne_bytes());
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            KernelHopMeta::split(&bytes),
            Some((KernelHopMeta::new(7), &[1u8, 2, 3][..]))
        );
        bytes[0] ^= 1;
        assert_eq!(KernelHopMeta::split(&bytes), None);
        assert_eq!(KernelHopMeta::split(&bytes[..5]), None);
    }
}
