//! Placement of services' Maglev tables in the one shared `maglev` array: first fit over
//! a list of free runs, merged again on release.
use std::collections::BTreeMap;

#[derive(Debug)]
pub struct SlotAllocator {
    /// Free runs: offset -> length.
    free: BTreeMap<u32, u32>,
}

impl SlotAllocator {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free }
    }

    /// The offset of a free run of `len` slots, now taken.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&offset, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&offset);
        if run > len {
            self.free.insert(offset + len, run - len);
        }
        Some(offset)
    }

    pub fn release(&mut self, offset: u32, len: u32) {
        let (mut start, mut length) = (offset, len);
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            start = prev;
            length += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            length += next_len;
        }
        self.free.insert(start, length);
    }

    #[cfg(test)]
    pub fn free_slots(&self) -> u64 {
        self.free.values().map(|&l| l as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_placed_first_fit_and_merged_back() {
        let mut s = SlotAllocator::new(1000);
        let a = s.alloc(251).unwrap();
        let b = s.alloc(509).unwrap();
        let c = s.alloc(200).unwrap();
        assert_eq!((a, b, c), (0, 251, 760));
        assert_eq!(s.alloc(100), None);
        s.release(b, 509);
        assert_eq!(s.alloc(300), Some(251));
        s.release(a, 251);
        s.release(251, 300);
        s.release(c, 200);
        assert_eq!(s.free_slots(), 1000);
        assert_eq!(s.alloc(1000), Some(0));
    }
}
