//! A timeout that requests wait on without a timer entry or a clock read each: every
//! worker thread keeps a coarse clock, set a few times per timeout, and wakes whoever
//! waits at each setting to compare it with the clock when they began. For timeouts
//! counted in seconds (a backend's response head), where firing up to half a timeout
//! late is no matter, and a timer armed and dropped per request is a cost that shows.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{shard::Padded, worker};

/// Clock settings per timeout.
const TICKS: u32 = 4;

pub(crate) struct CoarseTimeout {
    timeout: Duration,
    /// Milliseconds since `epoch`, as last set on each worker thread.
    parts: Box<[Padded<Part>]>,
    epoch: Instant,
}

#[derive(Default)]
struct Part {
    now_ms: AtomicU64,
    ticked: Notify,
}

impl CoarseTimeout {
    pub fn new(timeout: Duration, workers: usize) -> Self {
        Self {
            timeout,
            parts: (0..workers.max(1)).map(|_| Padded::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn tick(&self) -> Duration {
        (self.timeout / TICKS).max(Duration::from_millis(10))
    }

    fn mine(&self) -> &Part {
        &self.parts[worker::index() % self.parts.len()].0
    }

    /// Resolves once `timeout` has passed since the call, at most two ticks (half a
    /// timeout) later. The clock read at the call may be a tick old: a wait counts from
    /// it and lasts a tick more.
    pub async fn expired(&self) {
        let part = self.mine();
        let start = part.now_ms.load(Ordering::Relaxed);
        let wait = (self.timeout + self.tick()).as_millis() as u64;
        loop {
            let ticked = part.ticked.notified();
            tokio::pin!(ticked);
            // Listening before looking: a tick between the two is not missed.
            ticked.as_mut().enable();
            if part.now_ms.load(Ordering::Relaxed).saturating_sub(start) >= wait {
                return;
            }
            ticked.await;
        }
    }

    /// Sets the clock of worker `index` a few times per timeout, for as long as it is
    /// polled: each worker runs it for its own part (several servers' workers of the same
    /// index may; the clock is the same).
    pub async fn run(&self, index: usize) {
        let part = &self.parts[index % self.parts.len()].0;
        let tick = self.tick();
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = ticks.tick().await;
            let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
            part.now_ms.fetch_max(ms, Ordering::Relaxed);
            part.ticked.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_after_the_timeout_and_within_half_of_it_more() {
        let t = Arc::new(CoarseTimeout::new(Duration::from_millis(400), 1));
        let clock = tokio::spawn({
            let t = t.clone();
            async move { t.run(0).await }
        });
        // Begun at odd moments between two settings of the clock.
        for offset in [0, 30, 99, 100, 170] {
            tokio::time::sleep(Duration::from_millis(offset)).await;
            let began = Instant::now();
            t.expired().await;
            let waited = began.elapsed();
            assert!(
                waited >= Duration::from_millis(400) && waited <= Duration::from_millis(600),
                "offset {offset} ms: fired after {waited:?}"
            );
        }
        clock.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_clock_of_the_same_worker_does_not_make_it_fire_early() {
        let t = Arc::new(CoarseTimeout::new(Duration::from_millis(400), 1));
        let clocks: Vec<_> = (0..2)
            .map(|i| {
                let t = t.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(37 * i)).await;
                    t.run(0).await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(55)).await;
        let began = Instant::now();
        t.expired().await;
        assert!(
            began.elapsed() >= Duration::from_millis(400),
            "{:?}",
            began.elapsed()
        );
        clocks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}
