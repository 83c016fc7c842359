//! lb's services as Docker Flow Proxy shows them: its service object (the fields of DFP's
//! `Service`, with one `ServiceDest` per destination) for `reconfigure`'s answer and
//! `config?type=json`, keyed by name there as DFP keys it; and a text rendering for
//! `config` without a type. lb adds `Backends`, the addresses it balances over.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddrV4,
};

use serde_json::{Map, Value, json};

use super::destinations::split;
use crate::model::Service;

/// The port the backends share, as DFP's `Port` (a string); empty when they differ.
fn port(svc: &Service) -> String {
    let ports: BTreeSet<u16> = svc.backends.iter().map(SocketAddrV4::port).collect();
    match ports.len() {
        1 => ports.into_iter().next().unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

/// One destination as DFP shows it; lb adds `Backends`.
fn destination(index: u32, svc: &Service) -> Value {
    let route = svc.http.as_ref();
    json!({
        "Index": index,
        "ReqMode": match route {
            Some(r) if r.tls_passthrough => "sni",
            Some(_) => "http",
            None => "tcp",
        },
        "ServicePath": route.map(|r| r.paths.clone()).unwrap_or_default(),
        "ServicePathExclude": route.map(|r| r.paths_exclude.clone()).unwrap_or_default(),
        "ServiceDomain": route.map(|r| r.domains.clone()).unwrap_or_default(),
        "PathType": if route.is_some() { "path_beg" } else { "" },
        "AllowedMethods": route.map(|r| r.allowed_methods.clone()).unwrap_or_default(),
        "DeniedMethods": route.map(|r| r.denied_methods.clone()).unwrap_or_default(),
        "HttpsOnly": route.is_some_and(|r| r.https_only),
        "HttpsRedirectCode": route.and_then(|r| r.https_redirect_code).map_or(String::new(), |c| c.to_string()),
        "DenyHttp": route.is_some_and(|r| r.deny_http),
        "Port": port(svc),
        // DFP's is a number, 0 for none.
        "SrcPort": svc.l4_vip().map(|v| v.port()).or(route.and_then(|r| r.port)).unwrap_or(0),
        "Backends": backends(svc),
    })
}

fn backends(svc: &Service) -> Vec<String> {
    svc.backends.iter().map(ToString::to_string).collect()
}

/// DFP's view of service `name`, served by `members` (lb services with their destination
/// index; 0 for the plain one). The service-wide fields are the first member's.
pub(super) fn service(name: &str, members: &[(u32, &Service)]) -> Value {
    let first = members.first().map(|(_, svc)| *svc);
    let route = first.and_then(|s| s.http.as_ref());
    // DFP's timeouts are strings of seconds, empty for the default.
    let seconds = |ms: Option<u64>| ms.map_or(String::new(), |ms| (ms / 1000).to_string());
    let compression = route.and_then(|r| r.compression.as_ref());
    let mut all: Vec<String> = Vec::new();
    for (_, svc) in members {
        for b in backends(svc) {
            if !all.contains(&b) {
                all.push(b);
            }
        }
    }
    json!({
        "ServiceName": name,
        "AclName": name,
        "IsDefaultBackend": route.is_some_and(|r| r.default_backend),
        "SessionType": if route.is_some_and(|r| r.sticky_cookie.is_some()) { "sticky-server" } else { "" },
        "TimeoutServer": seconds(route.and_then(|r| r.server_timeout_ms)),
        "TimeoutTunnel": seconds(route.and_then(|r| r.tunnel_timeout_ms)),
        "CompressionAlgo": compression.map_or("", |c| c.algo.as_str()),
        "CompressionType": compression.map_or(String::new(), |c| c.types.join(" ")),
        "ServiceDest": members.iter().map(|(i, svc)| destination(*i, svc)).collect::<Vec<_>>(),
        "Backends": all,
    })
}

/// `config?type=json`: every service, keyed by its DFP name (`go-demo.2` is destination
/// 2 of `go-demo`).
pub(super) fn config(services: &[Service]) -> Value {
    let mut groups: BTreeMap<&str, Vec<(u32, &Service)>> = BTreeMap::new();
    for svc in services {
        let (name, index) = split(&svc.name);
        groups.entry(name).or_default().push((index, svc));
    }
    let map: Map<String, Value> = groups
        .into_iter()
        .map(|(name, mut members)| {
            members.sort_by_key(|(i, _)| *i);
            (name.to_string(), service(name, &members))
        })
        .collect();
    Value::Object(map)
}

/// `config`: what lb routes, one block per service, for a person to read.
pub(super) fn config_text(services: &[Service]) -> String {
    let mut out = String::new();
    if services.is_empty() {
        out.push_str("# no services\n");
    }
    for svc in services {
        let _ = writeln!(out, "service {}", svc.name);
        match (&svc.http, svc.l4_vip()) {
            (Some(r), _) => {
                let domain = if r.domains.is_empty() {
                    "any host".to_string()
                } else {
                    r.domains.join(", ")
                };
                let _ = writeln!(out, "  http  {domain}, paths {}", list(&r.paths));
                if !r.paths_exclude.is_empty() {
                    let _ = writeln!(out, "  not   paths {}", list(&r.paths_exclude));
                }
                if r.default_backend {
                    let _ = writeln!(out, "  default backend");
                }
            }
            (None, Some(vip)) => {
                let _ = writeln!(out, "  tcp   {vip}");
            }
            (None, None) => {}
        }
        let backends: Vec<String> = svc.backends.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "  to    {}", list(&backends));
    }
    out
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}
