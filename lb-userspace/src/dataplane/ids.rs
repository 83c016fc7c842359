//! Id allocation with a free list; id 0 is never handed out (it means "none" in maps).

#[derive(Debug)]
pub struct IdAllocator {
    next: u32,
    limit: u32,
    free: Vec<u32>,
    /// Set when adopting an earlier daemon's maps: any id may hold its leftovers.
    all_reused: bool,
}

impl IdAllocator {
    /// Ids `1 .. limit` (so `limit - 1` of them).
    pub fn new(limit: u32) -> Self {
        Self {
            next: 1,
            limit,
            free: Vec::new(),
            all_reused: false,
        }
    }

    /// Ids `1 .. limit` of which `used` are taken already (by the maps an earlier daemon
    /// left). Every id handed out counts as reused: that daemon may have used any of them.
    pub fn adopting(limit: u32, used: &std::collections::HashSet<u32>) -> Self {
        let next = used.iter().max().map_or(1, |m| m + 1);
        Self {
            next,
            limit,
            free: (1..next).rev().filter(|id| !used.contains(id)).collect(),
            all_reused: true,
        }
    }

    #[cfg(test)]
    pub fn alloc(&mut self) -> Option<u32> {
        self.alloc_noting_reuse().map(|(id, _)| id)
    }

    /// An id, and whether it was handed out before (so what maps hold under it is stale;
    /// a never-used id's entries are still as the kernel created them: zero).
    pub fn alloc_noting_reuse(&mut self) -> Option<(u32, bool)> {
        if let Some(id) = self.free.pop() {
            return Some((id, true));
        }
        if self.next >= self.limit {
            return None;
        }
        self.next += 1;
        Some((self.next - 1, self.all_reused))
    }

    pub fn release(&mut self, id: u32) {
        debug_assert!(id != 0 && id < self.next);
        self.free.push(id);
    }

    /// How many more ids can be handed out.
    pub fn available(&self) -> u32 {
        self.limit - self.next + self.free.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_are_reused_and_run_out() {
        let mut ids = IdAllocator::new(4);
        assert_eq!(
            (ids.alloc(), ids.alloc(), ids.alloc()),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(ids.alloc(), None);
        ids.release(2);
        assert_eq!(ids.available(), 1);
        assert_eq!(ids.alloc(), Some(2));
    }

    #[test]
    fn adopted_ids_are_not_handed_out_again() {
        let used = std::collections::HashSet::from([2, 5]);
        let mut ids = IdAllocator::adopting(8, &used);
        let mut got = Vec::new();
        while let Some((id, reused)) = ids.alloc_noting_reuse() {
            assert!(
                reused,
                "an adopted allocator treats every id as used before"
            );
            got.push(id);
        }
        got.sort_unstable();
        assert_eq!(got, [1, 3, 4, 6, 7]);
    }
}
