//! The daemon's long-running parts each run under a name. One that stops while the daemon
//! runs (it returned, failed or panicked) is logged, and `/ready` names it and answers 503
//! from then on: an orchestrator takes the node out rather than trust a half-working one.
use std::{
    collections::BTreeMap,
    fmt::Display,
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::FutureExt;
use tokio::task::JoinHandle;

#[derive(Clone, Default)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Name -> why it stopped.
    dead: Mutex<BTreeMap<String, String>>,
    /// Set at shutdown: from then on parts stop because they are told to.
    stopping: AtomicBool,
}

impl Supervisor {
    /// Runs `task` on the current tokio runtime as part `name`, which is expected to run
    /// until the daemon stops (or until it is aborted through the handle returned).
    pub fn spawn(
        &self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let (name, me) = (name.into(), self.clone());
        tokio::spawn(async move {
            let why = match std::panic::AssertUnwindSafe(task).catch_unwind().await {
                Ok(()) => "it stopped".to_string(),
                Err(panic) => format!("it panicked: {}", panic_message(panic)),
            };
            me.report(name, why);
        })
    }

    /// Part `name` stopped, for `why`: logged, and kept for `/ready`, unless the daemon is
    /// shutting down.
    pub fn report(&self, name: impl Into<String>, why: impl Display) {
        if self.inner.stopping.load(Ordering::Acquire) {
            return;
        }
        let (name, why) = (name.into(), why.to_string());
        tracing::error!(part = %name, "a part of lb stopped: {why}");
        self.inner
            .dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, why);
    }

    /// From now on parts stop because the daemon does.
    pub fn shutting_down(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    /// The parts that stopped, and why: "name: why", in name order.
    pub fn dead(&self) -> Vec<String> {
        self.inner
            .dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, why)| format!("{name}: {why}"))
            .collect()
    }
}

/// The message a panic carried (panics with a format string carry a String).
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_string(), |s| (*s).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn settle(s: &Supervisor, parts: usize) {
        for _ in 0..200 {
            if s.dead().len() >= parts {
                return;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_part_that_stops_or_panics_is_named_and_one_aborted_is_not() {
        let s = Supervisor::default();
        s.spawn("returns", async {});
        s.spawn("panics", async { panic!("boom {}", 42) });
        let forever = s.spawn("aborted", std::future::pending());
        forever.abort();
        settle(&s, 2).await;
        assert_eq!(
            s.dead(),
            vec![
                "panics: it panicked: boom 42".to_string(),
                "returns: it stopped".to_string()
            ]
        );
    }

    #[tokio::test]
    async fn nothing_is_reported_once_shutting_down() {
        let s = Supervisor::default();
        s.shutting_down();
        s.spawn("returns", async {});
        s.report("worker", "it stopped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(s.dead().is_empty(), "{:?}", s.dead());
    }
}
