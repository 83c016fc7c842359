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

    /// Takes the run `offset .. offset + len` (an adopted table) if it is free.
    pub fn reserve(&mut self, offset: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some((&start, &run)) = self.free.range(..=offset).next_back() else {
            return false;
        };
        let (end, want_end) = (start as u64 + run as u64, offset as u64 + len as u64);
        if want_end > end {
            return false;
        }
        self.free.remove(&start);
        if offset > start {
            self.free.insert(start, offset - start);
        }
        if end > want_end {
            self.free.insert(want_end as u32, (end - want_end) as u32);
        }
        true
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

    #[test]
    fn adopted_runs_are_reserved_once() {
        let mut s = SlotAllocator::new(1000);
        assert!(s.reserve(100, 251));
        assert!(!s.reserve(300, 10), "overlaps the first");
        assert!(s.reserve(0, 100));
        assert!(!s.reserve(990, 20), "past the end");
        assert_eq!(s.free_slots(), 1000 - 351);
        assert_eq!(s.alloc(649), Some(351));
    }
}
