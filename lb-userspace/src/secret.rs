//! The group's secret: the keys of the flow hash (which backend and SNAT port a flow gets)
//! and of SYN cookies. Random, never derived from anything an outsider sees, so nobody can
//! aim flows at one Maglev slot or port, nor forge a cookie. Every node of a group must
//! agree on them (the same flow, the same backend, whichever node it reaches; a cookie one
//! node made checks on another), so they live in the store, made once by the first node;
//! a restarted daemon keeps the ones in its pinned maps until the store answers.
use lb_common::hash::SipKey;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// The two keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupKeys {
    pub flow: SipKey,
    pub cookie: SipKey,
}

/// Why stored bytes are not the group's keys.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("not a secret document: {0}")]
    NotADocument(#[source] serde_json::Error),
    #[error("schema {0} (this lb reads 1)")]
    Schema(u32),
    /// A key (named by its field) is not 32 hex digits.
    #[error("{0}: expected 32 hex digits")]
    NotAKey(&'static str),
}

/// The stored form.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    schema: u32,
    /// 32 hex digits each.
    flow_key: String,
    cookie_key: String,
}

fn hex(k: SipKey) -> String {
    format!("{:016x}{:016x}", k.k0, k.k1)
}

fn unhex(s: &str) -> Option<SipKey> {
    if s.len() != 32 {
        return None;
    }
    Some(SipKey {
        k0: u64::from_str_radix(&s[..16], 16).ok()?,
        k1: u64::from_str_radix(&s[16..], 16).ok()?,
    })
}

impl GroupKeys {
    /// Fresh keys from the kernel's random source.
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; 32];
        let mut filled = 0;
        while filled < bytes.len() {
            // SAFETY: the buffer is the unfilled tail of `bytes`, and its length is passed.
            let n = unsafe {
                libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        Ok(Self {
            flow: SipKey {
                k0: word(0),
                k1: word(1),
            },
            cookie: SipKey {
                k0: word(2),
                k1: word(3),
            },
        })
    }

    pub fn to_bytes(self) -> Vec<u8> {
        serde_json::to_vec(&Doc {
            schema: 1,
            flow_key: hex(self.flow),
            cookie_key: hex(self.cookie),
        })
        .expect("serialisable")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecretError> {
        let doc: Doc = serde_json::from_slice(bytes).map_err(SecretError::NotADocument)?;
        if doc.schema != 1 {
            return Err(SecretError::Schema(doc.schema));
        }
        Ok(Self {
            flow: unhex(&doc.flow_key).ok_or(SecretError::NotAKey("flow_key"))?,
            cookie: unhex(&doc.cookie_key).ok_or(SecretError::NotAKey("cookie_key"))?,
        })
    }
}

/// The group's keys from the store: the stored ones, or `proposal` stored as the group's.
pub async fn shared(store: &dyn Store, proposal: GroupKeys) -> Result<GroupKeys, StoreError> {
    let bytes = store.secret(&proposal.to_bytes()).await?;
    GroupKeys::from_bytes(&bytes)
        .map_err(|e| StoreError::Invalid(format!("the stored secret: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_differ() {
        let a = GroupKeys::random().unwrap();
        let b = GroupKeys::random().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.flow, a.cookie);
        assert_eq!(GroupKeys::from_bytes(&a.to_bytes()).unwrap(), a);
        let e = GroupKeys::from_bytes(b"{\"schema\":1,\"flow_key\":\"xy\",\"cookie_key\":\"00\"}")
            .unwrap_err();
        assert_eq!(e.to_string(), "flow_key: expected 32 hex digits");
        let e = GroupKeys::from_bytes(b"{\"schema\":2,\"flow_key\":\"\",\"cookie_key\":\"\"}")
            .unwrap_err();
        assert_eq!(e.to_string(), "schema 2 (this lb reads 1)");
        let e = GroupKeys::from_bytes(b"[]").unwrap_err();
        assert!(e.to_string().starts_with("not a secret document: "), "{e}");
    }
}
