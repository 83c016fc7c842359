//! Giving way before sleeping: a worker with nothing left to do lets the other runnable
//! tasks of its CPU go first, once, before it blocks in epoll.
//!
//! Why: on a host where the proxy shares its CPUs with its clients and backends, a worker
//! that sleeps is woken again a few microseconds later by the very task that then runs
//! (a client sending its next request, a backend answering), and the wake-up preempts that
//! task. Measured with `perf sched` under `lb-bench-l7`, the client was preempted three
//! times as often behind lb as behind HAProxy, and a client waiting for the CPU holds up
//! the very requests it is timing.
//! A worker that yields instead stays runnable: the others finish their turn, and the
//! worker then finds their events waiting, without a sleep, a wake-up or a preemption.
//! `sched_yield` costs one syscall and does nothing when no other task is runnable.
//!
//! It only pays in that ping-pong. When the last sleep was a real one (the worker stayed
//! idle), the next one skips the yield, so an idle or lightly loaded worker sleeps at once.
use std::{
    cell::Cell,
    time::{Duration, Instant},
};

/// A sleep shorter than this means the worker was woken at once by a task on its CPU,
/// which is when yielding first avoids the round trip.
const SHORT_SLEEP: Duration = Duration::from_micros(30);

/// The decision, per worker thread: whether to yield before the next sleep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GiveWay {
    parked_at: Option<Instant>,
    yield_next: bool,
}

impl Default for GiveWay {
    fn default() -> Self {
        Self {
            parked_at: None,
            yield_next: true,
        }
    }
}

impl GiveWay {
    /// Called as the worker is about to sleep; tells whether to yield first.
    pub fn before_sleep(&mut self, now: Instant) -> bool {
        self.parked_at = Some(now);
        self.yield_next
    }

    /// Called as the worker wakes.
    pub fn after_sleep(&mut self, now: Instant) {
        if let Some(at) = self.parked_at.take() {
            self.yield_next = now.saturating_duration_since(at) < SHORT_SLEEP;
        }
    }
}

thread_local! {
    static STATE: Cell<GiveWay> = Cell::new(GiveWay::default());
}

/// The worker runtime's `on_thread_park` hook.
pub(crate) fn before_park() {
    let mut state = STATE.get();
    if state.before_sleep(Instant::now()) {
        // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
        unsafe { libc::sched_yield() };
    }
    STATE.set(state);
}

/// The worker runtime's `on_thread_unpark` hook.
pub(crate) fn after_unpark() {
    let mut state = STATE.get();
    state.after_sleep(Instant::now());
    STATE.set(state);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_while_sleeps_are_short_and_not_after_a_real_sleep() {
        let t0 = Instant::now();
        let mut g = GiveWay::default();
        assert!(g.before_sleep(t0), "the first sleep yields");
        g.after_sleep(t0 + Duration::from_micros(5));
        assert!(
            g.before_sleep(t0 + Duration::from_micros(10)),
            "woken at once: yield again"
        );
        g.after_sleep(t0 + Duration::from_millis(50));
        assert!(
            !g.before_sleep(t0 + Duration::from_millis(51)),
            "was idle: sleep at once"
        );
        g.after_sleep(t0 + Duration::from_millis(51) + Duration::from_micros(3));
        assert!(
            g.before_sleep(t0 + Duration::from_millis(52)),
            "busy again: yield"
        );
    }

    #[test]
    fn a_wake_without_a_recorded_sleep_changes_nothing() {
        let t0 = Instant::now();
        let mut g = GiveWay::default();
        g.after_sleep(t0);
        assert!(g.before_sleep(t0));
        g.after_sleep(t0 + Duration::from_secs(1));
        g.after_sleep(t0 + Duration::from_secs(2));
        assert!(!g.before_sleep(t0 + Duration::from_secs(3)));
    }
}
