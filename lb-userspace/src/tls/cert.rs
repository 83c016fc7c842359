//! A certificate as lb takes it: a PEM chain (leaf first) and the leaf's private key,
//! checked before it is stored (the PEM parses, the key signs for the leaf, the dates
//! hold) and stored as `{"schema": 1, "cert": PEM, "key": PEM}`.
use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};

const SCHEMA: u32 = 1;

/// A certificate chain with its key, ready to serve.
#[derive(Debug)]
pub struct Certificate {
    pub name: String,
    /// The chain, leaf first, as PEM (certificates only).
    pub chain_pem: String,
    /// The leaf's private key, as PEM. Never shown by the API.
    key_pem: String,
    /// The leaf's DNS names (subject alternative names; its common name when it has none),
    /// lower case. `*.example.com` for a wildcard.
    pub domains: Vec<String>,
    /// Validity, in seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub certified: Arc<CertifiedKey>,
}

/// Why a certificate was refused; [`field`](Self::field) names the part at fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no PEM certificate (-----BEGIN CERTIFICATE-----) found")]
    NoCertificate,
    #[error("the PEM does not parse: {0}")]
    Pem(String),
    #[error("not an X.509 certificate: {0}")]
    NotX509(String),
    #[error("no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) found")]
    NoKey,
    #[error("the private key is not one lb can sign with (RSA, ECDSA P-256/P-384, Ed25519): {0}")]
    UnsupportedKey(String),
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    #[error("the certificate expired at {0} (UTC)")]
    Expired(String),
    #[error("the certificate is not valid before {0} (UTC)")]
    NotYetValid(String),
    #[error("not a stored certificate: {0}")]
    Stored(String),
}

impl CertError {
    /// The API field at fault: `cert` or `key`.
    pub fn field(&self) -> &'static str {
        match self {
            CertError::NoKey | CertError::UnsupportedKey(_) | CertError::KeyMismatch => "key",
            _ => "cert",
        }
    }
}

/// The stored form.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    schema: u32,
    cert: String,
    key: String,
}

impl Certificate {
    /// The certificate of `cert_pem` (one or more CERTIFICATE blocks, leaf first) with the
    /// key of `key_pem`; both may be the same text (DFP's one file: chain and key). Dates
    /// are not checked here: see [`check_dates`](Self::check_dates).
    pub fn parse(name: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CertError::Pem(e.to_string()))?;
        let leaf = chain.first().ok_or(CertError::NoCertificate)?;
        let (domains, not_before, not_after) = leaf_facts(leaf)?;
        let key = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
            Ok(key) => key,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(CertError::NoKey),
            Err(e) => return Err(CertError::Pem(e.to_string())),
        };
        let key_pem = key_to_pem(&key);
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CertError::UnsupportedKey(e.to_string()))?;
        let chain_pem = chain.iter().map(|c| to_pem("CERTIFICATE", c)).collect();
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(CertError::KeyMismatch);
            }
            // The key cannot tell its public half: nothing to compare.
            Err(_) => {}
        }
        Ok(Self {
            name: name.to_string(),
            chain_pem,
            key_pem,
            domains,
            not_before,
            not_after,
            certified: Arc::new(certified),
        })
    }

    /// Refuses a certificate outside its validity now: what a new one must pass. (One
    /// already stored that expires is still served, with a warning: clients decide.)
    pub fn check_dates(&self) -> Result<(), CertError> {
        let now = unix_now();
        if now > self.not_after {
            return Err(CertError::Expired(utc(self.not_after)));
        }
        if now < self.not_before {
            return Err(CertError::NotYetValid(utc(self.not_before)));
        }
        Ok(())
    }

    pub fn to_stored(&self) -> Vec<u8> {
        let stored = Stored {
            schema: SCHEMA,
            cert: self.chain_pem.clone(),
            key: self.key_pem.clone(),
        };
        serde_json::to_vec(&stored).expect("a certificate serialises")
    }

    pub fn from_stored(name: &str, bytes: &[u8]) -> Result<Self, CertError> {
        let stored: Stored =
            serde_json::from_slice(bytes).map_err(|e| CertError::Stored(e.to_string()))?;
        if stored.schema != SCHEMA {
            return Err(CertError::Stored(format!(
                "schema {} (this lb reads {SCHEMA})",
                stored.schema
            )));
        }
        Self::parse(name, &stored.cert, &stored.key)
    }

    /// When it expires, as RFC 3339 UTC.
    pub fn expires(&self) -> String {
        utc(self.not_after)
    }

    /// Whether it serves `host` (lower case): one of its names, or under a wildcard one.
    pub fn covers(&self, host: &str) -> bool {
        self.domains.iter().any(|d| match d.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => d == host,
        })
    }
}

/// The leaf's DNS names and validity.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64, i64), CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| CertError::NotX509(e.to_string()))?;
    let mut domains = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                domains.push(d.to_ascii_lowercase());
            }
        }
    }
    if domains.is_empty()
        && let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
    {
        domains.push(cn.to_ascii_lowercase());
    }
    let validity = cert.validity();
    Ok((
        domains,
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

fn key_to_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    to_pem(label, key.secret_der())
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(secs: i64) -> String {
    humantime::format_rfc3339_seconds(
        UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64),
    )
    .to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed ECDSA P-256 certificate for `names`, valid from `from` to `until`
    /// (seconds from now), and its key, as PEM.
    pub(crate) fn self_signed(names: &[&str], from: i64, until: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
        .unwrap();
        let now = time_now();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn time_now() -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc()
    }

    #[test]
    fn a_good_pair_parses_with_its_names_and_dates() {
        let (cert, key) = self_signed(&["example.com", "*.example.org"], -60, 86_400);
        let c = Certificate::parse("site", &cert, &key).unwrap();
        assert_eq!(c.domains, ["example.com", "*.example.org"]);
        c.check_dates().unwrap();
        assert!(c.covers("example.com"));
        assert!(c.covers("www.example.org"));
        assert!(!c.covers("example.org"), "a wildcard is one label deep");
        assert!(!c.covers("a.b.example.org"));
        // DFP's single file: chain and key together.
        let both = format!("{cert}{key}");
        let c2 = Certificate::parse("site", &both, &both).unwrap();
        assert_eq!(c2.domains, c.domains);
        // Stored and read back.
        let back = Certificate::from_stored("site", &c.to_stored()).unwrap();
        assert_eq!(back.chain_pem, c.chain_pem);
        assert_eq!(back.not_after, c.not_after);
    }

    #[test]
    fn bad_pairs_are_refused_naming_the_part() {
        let (cert, key) = self_signed(&["a.test"], -60, 86_400);
        let (_, other_key) = self_signed(&["a.test"], -60, 86_400);
        let e = Certificate::parse("x", &cert, &other_key).unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch), "{e}");
        assert_eq!(e.field(), "key");
        let e = Certificate::parse("x", "hello", &key).unwrap_err();
        assert!(matches!(e, CertError::NoCertificate), "{e}");
        assert_eq!(e.field(), "cert");
        let e = Certificate::parse("x", &cert, &cert).unwrap_err();
        assert!(matches!(e, CertError::NoKey), "{e}");
        let torn = cert.replace("-----END CERTIFICATE-----", "");
        assert!(Certificate::parse("x", &torn, &key).is_err());
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = Certificate::parse("x", garbage, &key).unwrap_err();
        assert!(matches!(e, CertError::NotX509(_)), "{e}");
        let (old, old_key) = self_signed(&["a.test"], -86_400, -60);
        let e = Certificate::parse("x", &old, &old_key)
            .unwrap()
            .check_dates()
            .unwrap_err();
        assert!(matches!(e, CertError::Expired(_)), "{e}");
        assert!(e.to_string().contains("expired"), "{e}");
        let (early, early_key) = self_signed(&["a.test"], 86_400, 2 * 86_400);
        let e = Certificate::parse("x", &early, &early_key)
            .unwrap()
            .check_dates()
            .unwrap_err();
        assert!(matches!(e, CertError::NotYetValid(_)), "{e}");
    }
}
