//! The HTTP-01 challenges being answered: the ordering node writes each token's key
//! authorization to the store (`challenge.<token>`), and every node follows them, so the
//! CA's request may reach any of them (a VIP, DNS round robin) and get the answer.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use crate::store::{Entry, Store, follow::Follower};

/// Where a CA asks for a token (RFC 8555, section 8.3).
pub const PATH_PREFIX: &str = "/.well-known/acme-challenge/";

const ENTRY_PREFIX: &str = "challenge.";

/// The store entry of `token`'s answer.
pub fn entry_name(token: &str) -> String {
    format!("{ENTRY_PREFIX}{token}")
}

/// Token → key authorization, as the store holds them.
#[derive(Debug, Default)]
pub struct Challenges {
    answers: RwLock<HashMap<String, String>>,
}

impl Challenges {
    /// The answer to a request for `path`, when it asks for a token being validated.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(PATH_PREFIX)?;
        self.answers.read().unwrap().get(token).cloned()
    }

    /// Whether this node has `token`'s answer (the ordering node waits for it).
    pub fn has(&self, token: &str) -> bool {
        self.answers.read().unwrap().contains_key(token)
    }
}

/// A stored challenge's token and answer; `None` for the keyspace's other entries.
fn challenge(entry: &Entry) -> Option<(String, String)> {
    let token = entry.name.strip_prefix(ENTRY_PREFIX)?;
    let answer = String::from_utf8(entry.value.clone()).ok()?;
    Some((token.to_string(), answer))
}

impl Follower for Challenges {
    fn replace_all(&self, entries: &[Entry]) {
        *self.answers.write().unwrap() = entries.iter().filter_map(challenge).collect();
    }

    fn put(&self, entry: &Entry) {
        if let Some((token, answer)) = challenge(entry) {
            self.answers.write().unwrap().insert(token, answer);
        }
    }

    fn remove(&self, name: &str) {
        if let Some(token) = name.strip_prefix(ENTRY_PREFIX) {
            self.answers.write().unwrap().remove(token);
        }
    }
}

/// Follows the store's challenges into `challenges` for ever.
pub async fn follow(store: Arc<dyn Store>, challenges: Arc<Challenges>) {
    crate::store::follow::follow(store, "ACME challenges", &*challenges).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, value: &str) -> Entry {
        Entry {
            name: name.into(),
            value: value.into(),
            revision: 1,
        }
    }

    #[test]
    fn answers_only_tokens_being_validated_and_only_under_the_acme_path() {
        let c = Challenges::default();
        c.replace_all(&[entry("challenge.tok1", "tok1.thumb"), entry("lock", "{}")]);
        assert_eq!(
            c.answer("/.well-known/acme-challenge/tok1").as_deref(),
            Some("tok1.thumb")
        );
        assert_eq!(c.answer("/.well-known/acme-challenge/lock"), None);
        assert_eq!(c.answer("/tok1"), None);
        c.put(&entry("challenge.tok2", "tok2.thumb"));
        assert!(c.has("tok2"));
        c.remove("challenge.tok1");
        assert_eq!(c.answer("/.well-known/acme-challenge/tok1"), None);
    }
}
