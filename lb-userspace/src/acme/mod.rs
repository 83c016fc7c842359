//! ACME: certificates ordered from a CA (Let's Encrypt, or any RFC 8555 directory) for the
//! domains that ask for one (`--acme-domain`, or a service's `"tls": {"acme": true}` for
//! its `http.domain`), renewed well before they expire, and stored as any certificate
//! (`acme.<domain>` under `<prefix>/certs/`), so that every node serves them and a
//! replacement node needs nothing but the store.
//!
//! Every node runs the manager; one orders at a time, holding a lease in the store. The
//! CA's HTTP-01 request may reach any node: the challenges go through the store too.
//!
//! - `challenges`: the answers to the CA's HTTP-01 requests, as every node serves them
//! - `lock`: the lease of the node ordering
//! - `order`: the account, and one order from the new order to the certificate
pub mod challenges;
pub mod lock;
mod order;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

pub use challenges::Challenges;

use crate::{
    api_certs::Certs,
    store::Store,
    tls::{CertTable, Certificate},
};

/// Let's Encrypt's production directory, what `--acme-directory letsencrypt` names.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How a node orders certificates.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// The account's contact, if any.
    pub email: Option<String>,
    /// The roots the directory's own HTTPS is checked against, instead of the system's
    /// (a private CA, or pebble in tests).
    pub ca_file: Option<PathBuf>,
    /// Domains that want a certificate whatever the services say.
    pub domains: Vec<String>,
    /// Renew once this close to expiry, or a third of the lifetime before it if that is
    /// sooner (short-lived certificates).
    pub renew_before: Duration,
}

/// The name a domain's ordered certificate is stored under.
pub fn cert_name(domain: &str) -> String {
    format!("acme.{domain}")
}

/// How long a node holds the lock at most; an order takes seconds.
const LOCK_TERM: Duration = Duration::from_secs(600);
/// How soon to look again when another node holds the lock.
const LOCKED_RETRY: Duration = Duration::from_secs(30);
/// Retries after a failed order, doubling: CAs limit failed validations (Let's Encrypt:
/// five an hour per name).
const FAILED_FIRST_RETRY: Duration = Duration::from_secs(60);
const FAILED_MAX_RETRY: Duration = Duration::from_secs(3600);
/// How often the certificates are looked at with nothing else happening.
const IDLE_CHECK: Duration = Duration::from_secs(3600);

/// Orders and renews the certificates wanted.
pub struct Manager {
    pub config: AcmeConfig,
    /// The ACME keyspace: account, lock, challenges.
    pub store: Arc<dyn Store>,
    pub certs: Certs,
    pub table: Arc<CertTable>,
    pub challenges: Arc<Challenges>,
    /// The services' domains that ask for a certificate.
    pub wanted: watch::Receiver<BTreeSet<String>>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// When a certificate valid from `not_before` to `not_after` is renewed (seconds since
/// the epoch).
fn renew_at(not_before: i64, not_after: i64, renew_before: Duration) -> i64 {
    let lifetime = not_after - not_before;
    let before = i64::try_from(renew_before.as_secs())
        .unwrap_or(i64::MAX)
        .min(lifetime / 3);
    not_after - before
}

/// This node, as the lock names its holder.
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

/// A domain whose order failed, and when to try again.
struct Failed {
    retry: Duration,
    at: tokio::time::Instant,
}

impl Manager {
    /// Orders what is missing or due, for ever.
    pub async fn run(mut self) {
        let node = node_name();
        let mut failed: HashMap<String, Failed> = HashMap::new();
        let mut table_changes = self.table.changes();
        loop {
            let domains: BTreeSet<String> = self
                .config
                .domains
                .iter()
                .chain(self.wanted.borrow_and_update().iter())
                .cloned()
                .collect();
            failed.retain(|d, _| domains.contains(d));
            let now = unix_now();
            let due: Vec<&String> = domains
                .iter()
                .filter(|d| self.due_at(d) <= now)
                .filter(|d| {
                    failed
                        .get(*d)
                        .is_none_or(|f| f.at <= tokio::time::Instant::now())
                })
                .collect();
            let mut wait = IDLE_CHECK;
            if !due.is_empty() {
                match lock::try_take(&self.store, &node, LOCK_TERM).await {
                    Ok(Some(held)) => {
                        self.order_all(&due, &mut failed).await;
                        held.release().await;
                    }
                    Ok(None) => {
                        tracing::debug!("another node is ordering ACME certificates");
                        wait = LOCKED_RETRY;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "taking the ACME lock in the store");
                        wait = LOCKED_RETRY;
                    }
                }
            }
            // The next renewal or retry, if sooner.
            let now = unix_now();
            for d in &domains {
                let at = self.due_at(d);
                if at > now {
                    wait = wait.min(Duration::from_secs((at - now).unsigned_abs()));
                }
                if let Some(f) = failed.get(d) {
                    wait = wait.min(f.at.saturating_duration_since(tokio::time::Instant::now()));
                }
            }
            let wait = wait.max(Duration::from_secs(1));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = self.wanted.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = table_changes.changed() => {}
            }
        }
    }

    /// When `domain`'s certificate is due: now if there is none.
    fn due_at(&self, domain: &str) -> i64 {
        self.table
            .get(&cert_name(domain))
            .map_or(0, |c: Arc<Certificate>| {
                renew_at(c.not_before, c.not_after, self.config.renew_before)
            })
    }

    async fn order_all(&self, due: &[&String], failed: &mut HashMap<String, Failed>) {
        let account = match order::account(&self.config, &self.store).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("ACME: {e:#}");
                for d in due {
                    note_failure(failed, d);
                }
                return;
            }
        };
        for domain in due {
            // Another node may have renewed it while this one waited for the lock.
            if self.due_at(domain) > unix_now() {
                continue;
            }
            tracing::info!(%domain, directory = %self.config.directory, "ordering a certificate");
            let stored = match order::order(&account, domain, &self.store, &self.challenges).await {
                Ok((chain, key)) => self
                    .certs
                    .put(&cert_name(domain), &chain, &key)
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match stored {
                Ok(view) => {
                    failed.remove(*domain);
                    tracing::info!(%domain, cert = %cert_name(domain), expires = %view.expires, "certificate ordered and stored");
                }
                Err(e) => {
                    let retry = note_failure(failed, domain);
                    tracing::error!(%domain, ?retry, "ordering a certificate: {e:#}");
                }
            }
        }
    }
}

/// Records a failure of `domain`; when it is tried again.
fn note_failure(failed: &mut HashMap<String, Failed>, domain: &str) -> Duration {
    let retry = failed
        .get(domain)
        .map_or(FAILED_FIRST_RETRY, |f| (f.retry * 2).min(FAILED_MAX_RETRY));
    failed.insert(
        domain.to_string(),
        Failed {
            retry,
            at: tokio::time::Instant::now() + retry,
        },
    );
    retry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_a_month_before_expiry_or_at_two_thirds_of_a_short_life() {
        let day = 86_400;
        let month = Duration::from_secs(30 * 86_400);
        let start = 1_000_000;
        assert_eq!(renew_at(start, start + 90 * day, month), start + 60 * day);
        assert_eq!(renew_at(start, start + 6 * day, month), start + 4 * day);
        assert_eq!(
            renew_at(start, start + 90 * day, Duration::from_secs(7 * 86_400)),
            start + 83 * day
        );
    }
}
