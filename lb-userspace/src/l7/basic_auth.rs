//! HTTP basic auth for a route (DFP's `users`): a request without the credentials of one
//! of its users is answered 401 with a `WWW-Authenticate` challenge naming the service.
//!
//! Checking a password against a crypt hash costs milliseconds (bcrypt far more), too much
//! per request: credentials that passed are remembered (by a SHA-256 of user, password and
//! hash, never the password), and a check that must hash runs off the worker's thread.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use base64::Engine;
use http::HeaderValue;
use sha2::{Digest, Sha256};

/// Credentials remembered per route; beyond this the memory starts over.
const REMEMBERED: usize = 4096;

/// A route's users and the credentials already seen to pass.
#[derive(Debug, Default)]
pub struct BasicAuth {
    /// Name -> password hash.
    users: HashMap<String, Arc<str>>,
    passed: Mutex<HashSet<[u8; 32]>>,
    /// `Basic realm="<service>"`.
    pub challenge: Option<HeaderValue>,
    /// The users as given, to tell whether a new route table has the same.
    given: Vec<(String, String)>,
}

impl BasicAuth {
    /// `users` as (name, password hash); `service` names the realm.
    pub fn new(service: &str, users: &[(String, String)]) -> Self {
        let realm = service.replace(['"', '\\'], "");
        Self {
            users: users
                .iter()
                .map(|(n, h)| (n.clone(), Arc::from(h.as_str())))
                .collect(),
            passed: Mutex::default(),
            challenge: HeaderValue::from_str(&format!("Basic realm=\"{realm}\"")).ok(),
            given: users.to_vec(),
        }
    }

    /// Whether these are the users it was made for.
    pub fn is_for(&self, users: &[(String, String)]) -> bool {
        self.given == users
    }

    /// Whether `authorization` holds the credentials of one of the users.
    pub async fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(credentials) else {
            return false;
        };
        let Some(hash) = self.users.get(&user).cloned() else {
            return false;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(&password)
            .chain_update([0])
            .chain_update(hash.as_bytes())
            .finalize()
            .into();
        if self.passed.lock().unwrap().contains(&key) {
            return true;
        }
        let checked =
            tokio::task::spawn_blocking(move || crate::passwords::verify(&password, &hash))
                .await
                .unwrap_or(false);
        if checked {
            let mut passed = self.passed.lock().unwrap();
            if passed.len() >= REMEMBERED {
                passed.clear();
            }
            passed.insert(key);
        }
        checked
    }
}

/// `Basic base64(user:password)` as user and password.
fn credentials(value: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let value = value.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_pass);
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[tokio::test]
    async fn only_a_users_credentials_pass() {
        let auth = BasicAuth::new(
            "go-demo",
            &[
                ("admin".into(), crate::passwords::hash("s3cret")),
                ("bob".into(), crate::passwords::hash("pa:ss")),
            ],
        );
        assert_eq!(auth.challenge.as_ref().unwrap(), "Basic realm=\"go-demo\"");
        assert!(auth.admits(Some(&basic("admin:s3cret"))).await);
        assert!(
            auth.admits(Some(&basic("admin:s3cret"))).await,
            "remembered"
        );
        assert!(
            auth.admits(Some(&basic("bob:pa:ss"))).await,
            "a colon in a password"
        );
        for bad in [
            "admin:wrong",
            "admin:",
            "eve:s3cret",
            "admins3cret",
            "bob:s3cret",
        ] {
            assert!(!auth.admits(Some(&basic(bad))).await, "{bad}");
        }
        assert!(!auth.admits(None).await);
        for raw in ["Bearer abc", "Basic !!!", "Basic"] {
            assert!(
                !auth.admits(Some(&HeaderValue::from_static(raw))).await,
                "{raw}"
            );
        }
    }
}
