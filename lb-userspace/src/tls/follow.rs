//! The certificates in the store, kept in the [`CertTable`]: listed, then watched; listed
//! again after an error. A stored entry that does not parse is skipped with an error logged
//! (the API never stores one), and one that has expired is served with a warning.
use std::{sync::Arc, time::Duration};

use super::{cert::Certificate, table::CertTable};
use crate::{
    retry::Backoff,
    store::{Entry, Event, Store},
};

/// Follows the store's certificates into `table` for ever.
pub async fn follow(store: Arc<dyn Store>, table: Arc<CertTable>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let snapshot = match store.list().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "listing the certificates in the store");
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        table.replace_all(snapshot.entries.iter().filter_map(usable).collect());
        let mut events = store.watch(&snapshot);
        while let Some(event) = events.recv().await {
            match event {
                Ok(Event::Put(entry)) => match usable(&entry) {
                    Some(cert) => table.put(cert),
                    None => table.remove(&entry.name),
                },
                Ok(Event::Deleted { name, .. }) => table.remove(&name),
                Err(e) => {
                    tracing::warn!(error = %e, "watching the certificates in the store");
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}

fn usable(entry: &Entry) -> Option<Certificate> {
    match Certificate::from_stored(&entry.name, &entry.value) {
        Ok(cert) => {
            if let Err(e) = cert.check_dates() {
                tracing::warn!(cert = %entry.name, "served anyway: {e}");
            }
            Some(cert)
        }
        Err(e) => {
            tracing::error!(cert = %entry.name, "a stored certificate lb cannot use: {e}");
            None
        }
    }
}
