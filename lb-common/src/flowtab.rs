//! The layout of `conntrack`, lb's own flow table: an open-addressed array of 64-byte
//! slots, each one cache line holding a client flow's key and its [`Conn`].
//!
//! Why not a kernel hash map: its lookup reads a bucket, then the element it points to,
//! two dependent memory reads. A flow's first packet after a quiet second finds neither in
//! the caches, and on this project's machines each such read costs about 145 ns. Here the
//! key's hash names the slot, so that packet costs one read: the slot's line, key and
//! value together.
//!
//! Linear probing within [`FLOW_PROBES`] slots of the home slot; the table has twice as
//! many slots as the flows it is sized for, so runs stay short (at half full the longest
//! run in a million slots is about 35). A removed flow leaves a [`slot::DEAD`] slot that
//! inserts reuse and the sweep turns back into [`slot::EMPTY`] where no run passes
//! through it. The slot's state shares its second 64-bit word with the ports and the
//! protocol: inserts claim a slot, and removals free it, with a compare-and-swap of that
//! word.
use crate::{
    assert_layout,
    flow::{Conn, FlowKey},
    hash::{SipKey, flow_hash},
};

/// One slot of `conntrack`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// `slot::*`.
    pub state: u8,
    pub _pad: u16,
    pub conn: Conn,
}
assert_layout!(FlowSlot, size = 64, align = 8);

/// `FlowSlot::state`.
pub mod slot {
    /// Never used since the sweep last found no run through it: a lookup stops here.
    pub const EMPTY: u8 = 0;
    /// Claimed by an insert that is still writing it.
    pub const BUSY: u8 = 1;
    pub const LIVE: u8 = 2;
    /// Its flow was removed: free for an insert, but a lookup goes on past it.
    pub const DEAD: u8 = 3;
}

/// Byte offset of the 64-bit word (ports, protocol, state) that inserts claim.
pub const STATE_WORD: usize = 8;
/// Bit of the state byte in that word (little-endian).
pub const STATE_SHIFT: u32 = 40;

/// Slots a lookup or insert tries from the home slot.
pub const FLOW_PROBES: u32 = 64;

/// Slots of a table sized for `flows` flows: twice as many, a power of two.
pub const fn flow_slots(flows: u32) -> u32 {
    let want = if flows == 0 { 2u64 } else { flows as u64 * 2 };
    let p = want.next_power_of_two();
    if p > 1 << 31 { 1 << 31 } else { p as u32 }
}

/// The slot a flow's probe starts at, in a table of `slots` slots (a power of two).
#[inline(always)]
pub fn home_slot(key: SipKey, flow: &FlowKey, slots: u32) -> u32 {
    let h = flow_hash(
        key,
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    // The high half: the Maglev slot uses the low one.
    ((h >> 32) as u32) & slots.wrapping_sub(1)
}

/// The first two 64-bit words of a slot holding `flow` in `state`, as memory holds them
/// (little-endian): a lookup compares a slot with these two loads.
#[inline(always)]
pub const fn slot_words(flow: &FlowKey, state: u8) -> (u64, u64) {
    let a = flow.src_addr;
    let b = flow.dst_addr;
    let sp = flow.src_port.to_le_bytes();
    let dp = flow.dst_port.to_le_bytes();
    (
        u64::from_le_bytes([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]),
        u64::from_le_bytes([sp[0], sp[1], dp[0], dp[1], flow.proto, state, 0, 0]),
    )
}

/// The state byte of a slot's second word.
#[inline(always)]
pub const fn state_of(word1: u64) -> u8 {
    (word1 >> STATE_SHIFT) as u8
}

/// `word1` with its state byte set to `state`.
#[inline(always)]
pub const fn with_state(word1: u64, state: u8) -> u64 {
    (word1 & !(0xff << STATE_SHIFT)) | (state as u64) << STATE_SHIFT
}

impl FlowSlot {
    /// The flow this slot holds (whatever its state).
    pub const fn key(&self) -> FlowKey {
        FlowKey::new(
            self.src_addr,
            self.src_port,
            self.dst_addr,
            self.dst_port,
            self.proto,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_words_are_the_slots_first_sixteen_bytes() {
        let flow = FlowKey::new([10, 0, 0, 1], 40000, [10, 0, 0, 100], 80, 6);
        let s = FlowSlot {
            src_addr: flow.src_addr,
            dst_addr: flow.dst_addr,
            src_port: flow.src_port,
            dst_port: flow.dst_port,
            proto: flow.proto,
            state: slot::LIVE,
            ..FlowSlot::default()
        };
        let p = &s as *const FlowSlot as *const u64;
        let (w0, w1) = unsafe { (p.read(), p.add(1).read()) };
        assert_eq!(slot_words(&flow, slot::LIVE), (w0, w1));
        assert_eq!(state_of(w1), slot::LIVE);
        let word = unsafe { (p as *const u8).add(STATE_WORD).cast::<u64>().read() };
        assert_eq!(word, w1);
        assert_eq!(with_state(w1, slot::DEAD), slot_words(&flow, slot::DEAD).1);
        assert_eq!(s.key(), flow);
    }

    #[test]
    fn tables_have_twice_the_flows_in_a_power_of_two() {
        assert_eq!(flow_slots(524_288), 1 << 20);
        assert_eq!(flow_slots(100_000), 1 << 18);
        assert_eq!(flow_slots(0), 2);
        assert_eq!(flow_slots(u32::MAX), 1 << 31);
    }

    #[test]
    fn home_slots_spread_over_the_table() {
        let key = SipKey { k0: 7, k1: 9 };
        let slots = 1 << 12;
        let mut hits = vec![0u32; slots as usize];
        for i in 0..(slots * 4) {
            let f = FlowKey::new(
                [10, 1, (i >> 8) as u8, i as u8],
                1024 + (i % 50_000) as u16,
                [10, 0, 0, 1],
                80,
                6,
            );
            hits[home_slot(key, &f, slots) as usize] += 1;
        }
        // Four a slot on average; a fair hash leaves few slots far from that.
        assert!(hits.iter().all(|&h| h < 20), "{:?}", hits.iter().max());
        assert!(hits.iter().filter(|&&h| h == 0).count() < slots as usize / 20);
    }
}
