//! Counters and the reasons a packet is dropped, shared so that user space can name them.
use crate::assert_layout;

/// Per-CPU packet and byte counter; summed over CPUs by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
assert_layout!(Counters, size = 16, align = 8);

/// Why the XDP program dropped a packet: the index into the `drops` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header ends before its fixed part or its declared length.
    Truncated = 0,
    /// A header field is impossible (IHL below 5, TCP data offset below 5, total length
    /// shorter than the headers).
    Malformed = 1,
    /// The service exists but has no backend.
    NoBackend = 2,
    /// `bpf_fib_lookup` found no usable route to the backend or client.
    NoRoute = 3,
    /// The next hop's MAC address is not known yet, and the frame could not be handed to
    /// the kernel to resolve it (a driver without XDP metadata).
    NoNeighbor = 4,
    /// The packet is larger than the egress MTU.
    FragNeeded = 5,
    /// Every SNAT port tried for this flow was taken.
    SnatExhausted = 6,
    /// The egress interface has no IPv4 address to use as SNAT source.
    NoSnatAddress = 7,
    /// A map update failed (for example the conntrack map could not take an entry).
    MapUpdate = 8,
    /// The TTL would reach zero.
    TtlExceeded = 9,
    /// A TCP packet other than a SYN for no tracked flow, and not the answer to a SYN
    /// cookie: it gets no state (the backend could not place it), and is dropped.
    UnknownFlow = 10,
    /// A new flow found the connection-tracking maps full of live flows; none is evicted.
    FlowTableFull = 11,
    /// A segment lb answers with itself (a SYN cookie, a handshake on a client's behalf)
    /// did not fit the frame.
    NoRoom = 12,
}

impl DropReason {
    pub const COUNT: u32 = 13;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::Truncated,
        Self::Malformed,
        Self::NoBackend,
        Self::NoRoute,
        Self::NoNeighbor,
        Self::FragNeeded,
        Self::SnatExhausted,
        Self::NoSnatAddress,
        Self::MapUpdate,
        Self::TtlExceeded,
        Self::UnknownFlow,
        Self::FlowTableFull,
        Self::NoRoom,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Malformed => "malformed",
            Self::NoBackend => "no_backend",
            Self::NoRoute => "no_route",
            Self::NoNeighbor => "no_neighbor",
            Self::FragNeeded => "frag_needed",
            Self::SnatExhausted => "snat_exhausted",
            Self::NoSnatAddress => "no_snat_address",
            Self::MapUpdate => "map_update",
            Self::TtlExceeded => "ttl_exceeded",
            Self::UnknownFlow => "unknown_flow",
            Self::FlowTableFull => "flow_table_full",
            Self::NoRoom => "no_room",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DropReason;

    #[test]
    fn drop_reasons_are_dense_and_named_once() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT as usize);
    }
}
