//! One node orders at a time: a lease in the store (`lock`), taken by compare-and-set. A
//! lease runs out by itself, so a node that dies while ordering holds nobody up for longer
//! than its term.
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::store::{Expect, Store, StoreError};

const NAME: &str = "lock";

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    /// Who holds it (host name and process), for whoever looks at the store.
    holder: String,
    /// Until when, in seconds since the epoch.
    until: u64,
}

/// The lock, held until released or its term runs out.
pub struct Held {
    store: Arc<dyn Store>,
    revision: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Takes the lock for `term` unless another holder's lease is still running (`None`).
pub async fn try_take(
    store: &Arc<dyn Store>,
    holder: &str,
    term: Duration,
) -> Result<Option<Held>, StoreError> {
    let listing = store.list().await?;
    let current = listing.entries.iter().find(|e| e.name == NAME);
    let expect = match current {
        None => Expect::Absent,
        Some(entry) => {
            // A lease lb cannot read is taken over, as an expired one.
            let lease: Option<Lease> = serde_json::from_slice(&entry.value).ok();
            match lease {
                Some(l) if l.holder != holder && l.until > now() => return Ok(None),
                _ => Expect::Revision(entry.revision),
            }
        }
    };
    let lease = Lease {
        holder: holder.to_string(),
        until: now() + term.as_secs(),
    };
    let value = serde_json::to_vec(&lease).expect("a lease serialises");
    match store.put(NAME, &value, expect).await {
        Ok(revision) => Ok(Some(Held {
            store: store.clone(),
            revision,
        })),
        // Another node took it first.
        Err(StoreError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Held {
    /// Lets go of the lock, unless its term ran out and another node took it meanwhile.
    pub async fn release(self) {
        match self
            .store
            .delete(NAME, Expect::Revision(self.revision))
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "releasing the ACME lock (it runs out by itself)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;

    fn store(dir: &std::path::Path) -> Arc<dyn Store> {
        Arc::new(FileStore::open(dir, "acme", Duration::from_millis(50)).unwrap())
    }

    #[tokio::test]
    async fn one_holder_at_a_time_until_it_releases_or_its_term_runs_out() {
        let dir = std::env::temp_dir().join(format!("lb-acme-lock-{}", std::process::id()));
        let store = store(&dir);
        let a = try_take(&store, "node-a", Duration::from_secs(600))
            .await
            .unwrap()
            .expect("a free lock is taken");
        assert!(
            try_take(&store, "node-b", Duration::from_secs(600))
                .await
                .unwrap()
                .is_none(),
            "held by node-a"
        );
        a.release().await;
        let b = try_take(&store, "node-b", Duration::ZERO)
            .await
            .unwrap()
            .expect("released");
        // node-b's term (none) has run out: node-a takes over, and node-b's late release
        // leaves node-a's lease alone.
        std::thread::sleep(Duration::from_millis(1100));
        let a = try_take(&store, "node-a", Duration::from_secs(600))
            .await
            .unwrap()
            .expect("an expired lease is taken over");
        b.release().await;
        assert!(
            try_take(&store, "node-b", Duration::from_secs(600))
                .await
                .unwrap()
                .is_none(),
            "still node-a's"
        );
        a.release().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
