//! Keeping something in step with one keyspace of the store: listed, then watched; listed
//! again (after a backoff) when the watch ends with an error.
use std::{sync::Arc, time::Duration};

use super::{Entry, Event, Store};
use crate::retry::Backoff;

/// What follows a keyspace: it gets the whole listing, then each change.
pub trait Follower: Send + Sync {
    /// Everything the keyspace holds now, replacing what came before.
    fn replace_all(&self, entries: &[Entry]);
    /// `entry` written (new or replaced).
    fn put(&self, entry: &Entry);
    /// The entry `name` deleted.
    fn remove(&self, name: &str);
}

/// Follows `store` into `follower` for ever; `what` names it in the warnings.
pub async fn follow(store: Arc<dyn Store>, what: &'static str, follower: &dyn Follower) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let snapshot = match store.list().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "listing the {what} in the store");
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        follower.replace_all(&snapshot.entries);
        let mut events = store.watch(&snapshot);
        while let Some(event) = events.recv().await {
            match event {
                Ok(Event::Put(entry)) => follower.put(&entry),
                Ok(Event::Deleted { name, .. }) => follower.remove(&name),
                Err(e) => {
                    tracing::warn!(error = %e, "watching the {what} in the store");
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}
