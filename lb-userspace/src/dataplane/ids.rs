//! Id allocation with a free list; id 0 is never handed out (it means "none" in maps).

#[derive(Debug)]
pub struct IdAllocator {
    next: u32,
    limit: u32,
    free: Vec<u32>,
}

impl IdAllocator {
    /// Ids `1 .. limit` (so `limit - 1` of them).
    pub fn new(limit: u32) -> Self {
        Self {
            next: 1,
            limit,
            free: Vec::new(),
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
        Some((self.next - 1, false))
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
}
