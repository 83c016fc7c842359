//! The certificates served, chosen per handshake by SNI: swapped whole on every change
//! (connections already open keep the one they were given), read without locking.
//!
//! A name a certificate lists exactly wins over a wildcard that covers it; between two
//! that list it alike, the one that expires last (a renewal wins over what it renews). A
//! client that sends no SNI, or a name no certificate covers, gets the default: the
//! certificate named `default` if there is one, else the first by name (as HAProxy serves
//! the first certificate it loaded).
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use super::cert::Certificate;

#[derive(Default)]
struct Lookup {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the parent of `*.parent`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl Lookup {
    fn build(certs: &BTreeMap<String, Arc<Certificate>>) -> Self {
        let mut exact: HashMap<String, &Certificate> = HashMap::new();
        let mut wildcard: HashMap<String, &Certificate> = HashMap::new();
        for cert in certs.values() {
            for d in &cert.domains {
                let (map, key) = match d.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, d.as_str()),
                };
                let slot = map.entry(key.to_string()).or_insert(cert);
                if cert.not_after > slot.not_after {
                    *slot = cert;
                }
            }
        }
        let default = certs.get("default").or_else(|| certs.values().next());
        let keyed = |m: HashMap<String, &Certificate>| {
            m.into_iter()
                .map(|(k, c)| (k, c.certified.clone()))
                .collect()
        };
        Self {
            exact: keyed(exact),
            wildcard: keyed(wildcard),
            default: default.map(|c| c.certified.clone()),
        }
    }

    fn find(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.exact
            .get(&host)
            .or_else(|| {
                let (_, parent) = host.split_once('.')?;
                self.wildcard.get(parent)
            })
            .or(self.default.as_ref())
            .cloned()
    }
}

/// The certificates this node serves.
pub struct CertTable {
    lookup: ArcSwap<Lookup>,
    certs: Mutex<BTreeMap<String, Arc<Certificate>>>,
    /// How many certificates there are, for whoever waits for the first or for a change.
    count: watch::Sender<usize>,
}

impl std::fmt::Debug for CertTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertTable")
            .field("count", &*self.count.borrow())
            .finish()
    }
}

impl Default for CertTable {
    fn default() -> Self {
        Self {
            lookup: ArcSwap::from_pointee(Lookup::default()),
            certs: Mutex::new(BTreeMap::new()),
            count: watch::Sender::new(0),
        }
    }
}

impl CertTable {
    /// Replaces every certificate.
    pub fn replace_all_certs(&self, certs: Vec<Certificate>) {
        let mut held = self.certs.lock().unwrap();
        *held = certs
            .into_iter()
            .map(|c| (c.name.clone(), Arc::new(c)))
            .collect();
        self.publish(&held);
    }

    /// Adds `cert`, or replaces the one of its name.
    pub fn put_cert(&self, cert: Certificate) {
        let mut held = self.certs.lock().unwrap();
        held.insert(cert.name.clone(), Arc::new(cert));
        self.publish(&held);
    }

    pub fn remove_cert(&self, name: &str) {
        let mut held = self.certs.lock().unwrap();
        if held.remove(name).is_some() {
            self.publish(&held);
        }
    }

    fn publish(&self, held: &BTreeMap<String, Arc<Certificate>>) {
        self.lookup.store(Arc::new(Lookup::build(held)));
        // Every change is told, even one that keeps the count.
        self.count.send_modify(|n| *n = held.len());
    }

    /// Told of every change of the table.
    pub fn changes(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// The certificate named `name`, if the table holds it.
    pub fn get(&self, name: &str) -> Option<Arc<Certificate>> {
        self.certs.lock().unwrap().get(name).cloned()
    }

    /// Waits until there is at least one certificate.
    pub async fn wait_for_one(&self) {
        let mut count = self.count.subscribe();
        let _ = count.wait_for(|n| *n > 0).await;
    }

    /// The certificate served for `host`, if any (what a handshake naming it gets).
    pub fn find(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.lookup.load().find(host)
    }
}

impl ResolvesServerCert for CertTable {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let lookup = self.lookup.load();
        match hello.server_name() {
            Some(name) => lookup.find(name),
            None => lookup.default.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::cert::tests::self_signed;

    fn cert(name: &str, domains: &[&str], days: i64) -> Certificate {
        let (c, k) = self_signed(domains, -60, days * 86_400);
        Certificate::parse(name, &c, &k).unwrap()
    }

    fn serves(table: &CertTable, host: &str) -> Option<Vec<u8>> {
        table.find(host).map(|c| c.cert[0].to_vec())
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let table = CertTable::default();
        assert!(serves(&table, "a.test").is_none());
        let a = cert("a", &["a.test"], 30);
        let wild = cert("wild", &["*.b.test"], 30);
        let (a_der, wild_der) = (
            a.certified.cert[0].to_vec(),
            wild.certified.cert[0].to_vec(),
        );
        table.replace_all_certs(vec![wild, a]);
        assert_eq!(serves(&table, "a.test").unwrap(), a_der);
        assert_eq!(
            serves(&table, "A.Test.").unwrap(),
            a_der,
            "case and root dot"
        );
        assert_eq!(serves(&table, "x.b.test").unwrap(), wild_der);
        // Nothing covers it: the first by name.
        assert_eq!(serves(&table, "other.test").unwrap(), a_der);
        let default = cert("default", &["d.test"], 30);
        let d_der = default.certified.cert[0].to_vec();
        table.put_cert(default);
        assert_eq!(serves(&table, "other.test").unwrap(), d_der);
        table.remove_cert("default");
        assert_eq!(serves(&table, "other.test").unwrap(), a_der);
    }

    #[test]
    fn the_certificate_that_expires_last_wins() {
        let table = CertTable::default();
        let old = cert("old", &["a.test"], 10);
        let new = cert("new", &["a.test"], 90);
        let new_der = new.certified.cert[0].to_vec();
        table.replace_all_certs(vec![new, old]);
        assert_eq!(serves(&table, "a.test").unwrap(), new_der);
    }
}
