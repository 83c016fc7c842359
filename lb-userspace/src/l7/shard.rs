//! Counters split per worker thread, each part on a cache line of its own: a worker only
//! writes its part, so counting costs no cache-line transfer between cores; readers sum.
use std::sync::atomic::{AtomicU64, Ordering};

use super::worker;

/// Keeps what it holds on cache lines of its own (128 bytes: adjacent-line prefetch).
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct Padded<T>(pub T);

pub(crate) struct Sharded {
    parts: Box<[Padded<AtomicU64>]>,
}

impl Sharded {
    pub fn new(workers: usize) -> Self {
        Self {
            parts: (0..workers.max(1)).map(|_| Padded::default()).collect(),
        }
    }

    fn mine(&self) -> &AtomicU64 {
        &self.parts[worker::index() % self.parts.len()].0
    }

    pub fn add(&self, n: u64) {
        self.mine().fetch_add(n, Ordering::Relaxed);
    }

    /// Wrapping: a part may go below zero when another worker counted the increment.
    pub fn sub(&self, n: u64) {
        self.mine().fetch_sub(n, Ordering::Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |sum, p| sum.wrapping_add(p.0.load(Ordering::Relaxed)))
    }
}
