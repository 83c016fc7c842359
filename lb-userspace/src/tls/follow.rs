//! The certificates in the store, kept in the [`CertTable`]. A stored entry that does not
//! parse is skipped with an error logged (the API never stores one), and one that has
//! expired is served with a warning.
use std::sync::Arc;

use super::{cert::Certificate, table::CertTable};
use crate::store::{
    Entry, Store,
    follow::{Follower, follow as follow_store},
};

/// Follows the store's certificates into `table` for ever.
pub async fn follow(store: Arc<dyn Store>, table: Arc<CertTable>) {
    follow_store(store, "certificates", &*table).await;
}

impl Follower for CertTable {
    fn replace_all(&self, entries: &[Entry]) {
        self.replace_all_certs(entries.iter().filter_map(usable).collect());
    }

    fn put(&self, entry: &Entry) {
        match usable(entry) {
            Some(cert) => self.put_cert(cert),
            None => self.remove_cert(&entry.name),
        }
    }

    fn remove(&self, name: &str) {
        self.remove_cert(name);
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
