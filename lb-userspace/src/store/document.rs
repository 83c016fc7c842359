//! The stored form of a service: what `PUT` stored, typed, with a schema version. Its
//! field names are the API's, written out here rather than derived from Rust names. A
//! restore reads it straight into a [`Service`] (through the same checks as the API's),
//! not back through the API's spec.
use std::{collections::BTreeMap, net::SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::{
    backend_entry::BackendOptions,
    drain::{Drain, OnDown},
    forwarding::{EncapSource, Forwarding},
    model::{Check, Discovery, FlowHash, HttpRoute, Protocol, Service, ValidationError},
};

pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredService {
    #[serde(rename = "schema")]
    pub schema: u32,
    /// None for an HTTP service.
    #[serde(rename = "vip", default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<SocketAddrV4>,
    #[serde(rename = "protocol")]
    pub protocol: Protocol,
    /// Empty when `discovery` names where they come from: each node follows the source.
    #[serde(rename = "backends")]
    pub backends: Vec<SocketAddrV4>,
    /// Weights and states of the backends that are not the default (weight 1, active).
    #[serde(
        rename = "backend_options",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub backend_options: BTreeMap<SocketAddrV4, BackendOptions>,
    /// 0 for an HTTP service, and for one whose table follows its discovered instances.
    #[serde(rename = "table_size", default)]
    pub table_size: u32,
    #[serde(rename = "hash", default, skip_serializing_if = "FlowHash::is_default")]
    pub hash: FlowHash,
    #[serde(
        rename = "drain_timeout_s",
        default = "default_drain_timeout",
        skip_serializing_if = "Drain::is_default_timeout"
    )]
    pub drain_timeout_s: u32,
    #[serde(
        rename = "on_down",
        default,
        skip_serializing_if = "Drain::is_default_on_down"
    )]
    pub on_down: OnDown,
    #[serde(
        rename = "forwarding",
        default,
        skip_serializing_if = "Forwarding::is_default"
    )]
    pub forwarding: Forwarding,
    #[serde(
        rename = "encap_source",
        default,
        skip_serializing_if = "EncapSource::is_default"
    )]
    pub encap_source: EncapSource,
    /// The write removed the backends it left out without draining them.
    #[serde(rename = "cut_removed", default, skip_serializing_if = "is_false")]
    pub cut_removed: bool,
    #[serde(rename = "discovery", default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    #[serde(rename = "http", default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRoute>,
    /// None: the default check for the protocol.
    #[serde(rename = "check", default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

fn default_drain_timeout() -> u32 {
    crate::drain::DEFAULT_TIMEOUT_S
}

fn is_false(b: &bool) -> bool {
    !b
}

/// A stored entry lb cannot use.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("not a service document: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("schema {0} (this lb reads {SCHEMA})")]
    Schema(u32),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl StoredService {
    pub fn of(svc: &Service) -> Self {
        let discovered = svc.discovery.is_some();
        Self {
            schema: SCHEMA,
            vip: svc.vip,
            protocol: svc.protocol,
            backends: if discovered {
                Vec::new()
            } else {
                svc.backends.clone()
            },
            backend_options: svc.backend_options.clone(),
            table_size: if discovered { 0 } else { svc.table_size },
            hash: svc.hash,
            drain_timeout_s: svc.drain.timeout_s,
            on_down: svc.drain.on_down,
            forwarding: svc.forwarding,
            encap_source: svc.encap_source,
            cut_removed: svc.cut_removed,
            discovery: svc.discovery.clone(),
            http: svc.http.clone(),
            check: Some(svc.check.clone()),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a stored service serialises")
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        let doc: StoredService = serde_json::from_slice(bytes)?;
        if doc.schema != SCHEMA {
            return Err(DocumentError::Schema(doc.schema));
        }
        Ok(doc)
    }

    /// The service `name` this document describes, with `found` as its backends when
    /// they come from discovery.
    pub fn into_service(
        self,
        name: &str,
        found: Option<Vec<SocketAddrV4>>,
    ) -> Result<Service, DocumentError> {
        let discovered = self.discovery.is_some();
        let mut service = Service {
            name: name.to_string(),
            vip: self.vip,
            protocol: self.protocol,
            backends: self.backends,
            backend_options: self.backend_options,
            table_size: self.table_size,
            hash: self.hash,
            drain: Drain {
                timeout_s: self.drain_timeout_s,
                on_down: self.on_down,
            },
            forwarding: self.forwarding,
            encap_source: self.encap_source,
            cut_removed: self.cut_removed,
            discovery: self.discovery,
            http: self.http,
            check: self
                .check
                .unwrap_or_else(|| Check::default_for(self.protocol)),
        };
        if discovered {
            service = service.with_discovered(found.unwrap_or_default());
        }
        Ok(service.checked()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServiceSpec, discovered_table_size};

    fn service(json: serde_json::Value) -> Service {
        let spec: ServiceSpec = serde_json::from_value(json).unwrap();
        spec.validate("web").unwrap()
    }

    #[test]
    fn a_service_comes_back_as_it_was_stored() {
        for svc in [
            service(serde_json::json!({
                "vip": "10.0.0.100:80", "protocol": "udp",
                "backends": ["10.0.1.1:53", "10.0.1.2:53"], "table_size": 1021,
                "check": {"kind": "tcp", "interval_ms": 500, "rise": 1, "fall": 5}
            })),
            service(serde_json::json!({
                "vip": "10.0.0.100:80", "backends": ["10.0.1.1:80"], "hash": "src_ip"
            })),
            service(serde_json::json!({
                "vip": "10.0.0.100:80", "backends": ["10.0.1.1:80"],
                "drain_timeout_s": 30, "on_down": "shutdown"
            })),
            service(serde_json::json!({
                "vip": "10.0.0.100:80", "backends": ["10.0.1.1:80"],
                "forwarding": "dsr", "encap_source": "per_flow"
            })),
            service(serde_json::json!({
                "vip": "10.0.0.100:80", "backends": ["10.0.1.1:80"], "forwarding": "dsr-l2"
            })),
            Service {
                cut_removed: true,
                ..service(serde_json::json!({"vip": "10.0.0.100:80", "backends": ["10.0.1.1:80"]}))
            },
            service(serde_json::json!({
                "http": {"paths": ["/demo/"], "domain": "Example.com", "balance": "least_outstanding"},
                "backends": ["10.0.1.1:8080"],
                "check": {"kind": "http", "path": "/health", "expect": 204}
            })),
        ] {
            let bytes = StoredService::of(&svc).to_bytes();
            let back = StoredService::parse(&bytes)
                .unwrap()
                .into_service("web", None)
                .unwrap();
            assert_eq!(back, svc);
        }
    }

    #[test]
    fn names_on_the_wire_are_the_apis() {
        let svc = service(serde_json::json!({
            "vip": "10.0.0.100:80", "protocol": "udp", "backends": ["10.0.1.1:53"]
        }));
        let wire: serde_json::Value =
            serde_json::from_slice(&StoredService::of(&svc).to_bytes()).unwrap();
        assert_eq!(wire["protocol"], "udp");
        assert_eq!(wire["vip"], "10.0.0.100:80");
        assert_eq!(wire["backends"][0], "10.0.1.1:53");
        assert_eq!(wire["check"]["kind"], "none");
        assert_eq!(wire["schema"], SCHEMA);
    }

    #[test]
    fn discovered_backends_are_not_stored_and_come_from_the_source() {
        let doc = StoredService::parse(
            br#"{"schema": 1, "vip": "10.0.0.100:80", "protocol": "tcp", "backends": [],
                 "discovery": {"kind": "etcd", "service": "web"}}"#,
        )
        .unwrap();
        let found: Vec<SocketAddrV4> = vec![
            "10.0.1.2:80".parse().unwrap(),
            "10.0.1.1:80".parse().unwrap(),
        ];
        let svc = doc.clone().into_service("web", Some(found)).unwrap();
        assert_eq!(
            svc.backends,
            vec![
                "10.0.1.1:80".parse::<SocketAddrV4>().unwrap(),
                "10.0.1.2:80".parse().unwrap()
            ]
        );
        assert_eq!(svc.table_size, discovered_table_size(2));
        assert!(StoredService::of(&svc).backends.is_empty());
        // Nothing found yet: a service with no backends, not an error.
        assert!(doc.into_service("web", None).unwrap().backends.is_empty());
    }

    #[test]
    fn a_bad_entry_is_refused_naming_what_is_wrong() {
        let parse =
            |s: &str| StoredService::parse(s.as_bytes()).and_then(|d| d.into_service("web", None));
        let e = parse(r#"{"schema": 2, "protocol": "tcp", "backends": []}"#).unwrap_err();
        assert_eq!(e.to_string(), "schema 2 (this lb reads 1)");
        let e = parse(r#"{"schema": 1, "vip": "10.0.0.1:80", "protocol": "sctp", "backends": ["10.0.1.1:80"], "table_size": 251}"#).unwrap_err();
        assert!(e.to_string().starts_with("not a service document"), "{e}");
        let e = parse(r#"{"schema": 1, "vip": "10.0.0.1:80", "protocol": "tcp", "backends": ["10.0.1.1:80"], "table_size": 250}"#).unwrap_err();
        assert!(e.to_string().starts_with("table_size:"), "{e}");
        let e = parse(r#"{"schema": 1, "vip": "10.0.0.1:80", "protocol": "tcp", "backends": ["10.0.1.1:80", "10.0.1.1:80"], "table_size": 251}"#).unwrap_err();
        assert!(e.to_string().starts_with("backends[1]:"), "{e}");
        let e = parse(
            r#"{"schema": 1, "protocol": "tcp", "backends": ["10.0.1.1:80"], "table_size": 251}"#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("vip:"), "{e}");
        let e = parse(r#"{"schema": 1, "vip": "10.0.0.1:80", "protocol": "tcp", "backends": ["10.0.1.1:80"], "table_size": 251, "check": {"kind": "http", "interval_ms": 1000, "timeout_ms": 500, "rise": 2, "fall": 3}}"#).unwrap_err();
        assert!(e.to_string().starts_with("check.path:"), "{e}");
    }

    #[test]
    fn weights_and_states_are_stored_and_restored() {
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "vip": "10.0.0.100:80",
            "backends": ["10.0.1.1:80", {"address": "10.0.1.2:80", "weight": 4, "state": "draining"}],
        }))
        .unwrap();
        let svc = spec.validate("web").unwrap();
        let bytes = StoredService::of(&svc).to_bytes();
        let doc = StoredService::parse(&bytes).unwrap();
        assert_eq!(doc.backend_options.len(), 1);
        assert_eq!(doc.into_service("web", None).unwrap(), svc);
        // A service without options stores none (what older lbs read).
        let plain: ServiceSpec = serde_json::from_value(serde_json::json!({
            "vip": "10.0.0.100:80", "backends": ["10.0.1.1:80"],
        }))
        .unwrap();
        let bytes = StoredService::of(&plain.validate("web").unwrap()).to_bytes();
        assert!(
            !String::from_utf8(bytes)
                .unwrap()
                .contains("backend_options")
        );
    }
}
