//! Retrying with backoff: the delays between attempts at something that fails for a while
//! (a store or registry out of reach), growing from a minimum to a maximum.
use std::{fmt::Display, future::Future, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays that double from `min` up to `max`, then stay at `max`: they never run out.
/// Each is jittered by backon (up to as much again, at random, so that nodes that failed
/// together do not retry together), and never longer than `max`.
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: <ExponentialBuilder as BackoffBuilder>::Backoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts over from the minimum (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// Sleeps the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

/// Calls `attempt` until it succeeds, waiting a [`Backoff`] from `min` to `max` after each
/// failure, which is logged as a warning: "`what`: the error".
pub async fn until_ok<T, E, F>(
    what: &str,
    min: Duration,
    max: Duration,
    mut attempt: impl FnMut() -> F,
) -> T
where
    E: Display,
    F: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(min, max);
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "{what}: {e}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    /// The jitter adds up to as much again: the delay for exponential step `step`.
    fn assert_step(delay: Duration, step: Duration) {
        assert!(
            delay >= step && delay < step * 2 && delay <= MAX,
            "{delay:?} for step {step:?}"
        );
    }

    #[test]
    fn delays_double_then_stay_at_max() {
        let mut backoff = Backoff::new(MIN, MAX);
        for step in [100, 200, 400, 800] {
            assert_step(backoff.next_delay(), Duration::from_millis(step));
        }
        for _ in 0..100 {
            assert_eq!(backoff.next_delay(), MAX);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(MIN, MAX);
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_step(backoff.next_delay(), MIN);
        assert_step(backoff.next_delay(), MIN * 2);
    }

    #[tokio::test]
    async fn until_ok_retries_until_success() {
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let min = Duration::from_millis(1);
        let value = until_ok("trying", min, MAX, || {
            calls += 1;
            let result = if calls < 4 { Err("not yet") } else { Ok(calls) };
            async move { result }
        })
        .await;
        assert_eq!(value, 4);
        // Three waits: at least 1 + 2 + 4 ms.
        assert!(started.elapsed() >= min * 7);
    }
}
