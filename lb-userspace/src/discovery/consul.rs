//! The instances of a service, from Consul's health API (`/v1/health/service/<name>`),
//! followed with blocking queries. Each time the set of usable instances changes, the whole
//! list (sorted, without repeats) goes out on a channel; the first answer goes out at once.
//!
//! Which instances are usable: with `passing_only`, those whose checks all pass (Consul
//! filters them with `?passing`); without it, passing and warning ones, that is every
//! instance with no check in `critical` (an instance or node in maintenance has a critical
//! check, so it is left out too).
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::instances::{Instances, SourceError};
use crate::{
    consul_http::{ConsulClient, blocking_timeout, next_index, wait_param},
    retry::Backoff,
};

#[derive(Debug, Clone, Copy)]
pub struct HealthOptions {
    /// Only instances whose checks all pass; otherwise warning ones count too.
    pub passing_only: bool,
    /// How long each blocking query waits for a change.
    pub wait: Duration,
}

impl Default for HealthOptions {
    fn default() -> Self {
        Self {
            passing_only: true,
            wait: Duration::from_secs(30),
        }
    }
}

/// The least time between the starts of two queries.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// The wait after a failed query: doubling from the least to the most, in a row of failures.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    node: Node,
    service: Service,
    #[serde(default)]
    checks: Vec<Check>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    address: String,
    port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    status: String,
}

/// The usable instances among `entries`, and the instances skipped for not having an IPv4
/// address (as "id: address").
fn instances(entries: &[ServiceEntry], passing_only: bool) -> (Vec<SocketAddrV4>, Vec<String>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for e in entries {
        let usable = if passing_only {
            e.checks.iter().all(|c| c.status == "passing")
        } else {
            e.checks.iter().all(|c| c.status != "critical")
        };
        if !usable {
            continue;
        }
        let addr = if e.service.address.is_empty() {
            &e.node.address
        } else {
            &e.service.address
        };
        match addr.parse::<Ipv4Addr>() {
            Ok(ip) => out.push(SocketAddrV4::new(ip, e.service.port)),
            Err(_) => skipped.push(format!("{}: {addr:?}", e.service.id)),
        }
    }
    out.sort();
    out.dedup();
    (out, skipped)
}

/// `name` as one path segment.
fn encode_segment(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Follows the instances of `service` until the receiver is dropped. Errors (naming the
/// agent and the reason) are sent as they happen and the query retried with backoff; the
/// first list after an error is sent even if it did not change.
pub fn watch_service(
    client: Arc<ConsulClient>,
    service: &str,
    options: HealthOptions,
) -> Instances {
    let (tx, rx) = mpsc::channel(16);
    let base = format!("/v1/health/service/{}", encode_segment(service));
    let service = service.to_string();
    tokio::spawn(async move {
        let mut index = 0u64;
        let mut last: Option<Vec<SocketAddrV4>> = None;
        let mut warned = HashSet::new();
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        let mut last_start = None::<tokio::time::Instant>;
        loop {
            if let Some(t) = last_start {
                tokio::time::sleep_until(t + MIN_INTERVAL).await;
            }
            last_start = Some(tokio::time::Instant::now());
            let mut params = Vec::new();
            if options.passing_only {
                params.push("passing".to_string());
            }
            let mut timeout = crate::consul_http::REQUEST_TIMEOUT;
            if index > 0 {
                params.push(format!("index={index}"));
                params.push(format!("wait={}", wait_param(options.wait)));
                timeout = blocking_timeout(options.wait);
            }
            let path = if params.is_empty() {
                base.clone()
            } else {
                format!("{base}?{}", params.join("&"))
            };
            let answer = tokio::select! {
                a = client.request(Method::GET, &path, None, timeout) => a,
                () = tx.closed() => return,
            };
            let parsed = match answer {
                Err(e) => Err(SourceError::Consul(e)),
                Ok(reply) if reply.status != StatusCode::OK => Err(SourceError::ConsulStatus {
                    body: reply.body_text(),
                    addr: reply.addr,
                    status: reply.status,
                }),
                Ok(reply) => serde_json::from_slice::<Vec<ServiceEntry>>(&reply.body)
                    .map(|entries| (entries, reply.index.unwrap_or(0)))
                    .map_err(|source| SourceError::ConsulListing {
                        addr: reply.addr,
                        source,
                    }),
            };
            match parsed {
                Ok((entries, answered)) => {
                    backoff.reset();
                    let (list, skipped) = instances(&entries, options.passing_only);
                    for s in skipped {
                        if warned.insert(s.clone()) {
                            tracing::warn!(service = %service, instance = %s, "skipping an instance without an IPv4 address");
                        }
                    }
                    if last.as_ref() != Some(&list) {
                        if tx.send(Ok(list.clone())).await.is_err() {
                            return;
                        }
                        last = Some(list);
                    }
                    index = next_index(index, answered);
                }
                Err(e) => {
                    last = None;
                    index = 0;
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        () = backoff.wait() => {}
                        () = tx.closed() => return,
                    }
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, node: &str, addr: &str, port: u16, checks: &[&str]) -> ServiceEntry {
        ServiceEntry {
            node: Node {
                address: node.into(),
            },
            service: Service {
                id: id.into(),
                address: addr.into(),
                port,
            },
            checks: checks
                .iter()
                .map(|s| Check {
                    status: s.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn which_instances_count() {
        let entries = [
            entry("a", "10.0.0.9", "10.0.0.2", 80, &["passing", "passing"]),
            entry("b", "10.0.0.9", "", 81, &["passing", "warning"]),
            entry("c", "10.0.0.9", "10.0.0.3", 80, &["passing", "critical"]),
            entry("d", "10.0.0.9", "fe80::1", 80, &["passing"]),
            entry("e", "10.0.0.9", "10.0.0.2", 80, &["passing"]),
        ];
        let (passing, skipped) = instances(&entries, true);
        assert_eq!(passing, ["10.0.0.2:80".parse::<SocketAddrV4>().unwrap()]);
        assert_eq!(skipped, ["d: \"fe80::1\""]);
        let (usable, _) = instances(&entries, false);
        assert_eq!(
            usable,
            [
                "10.0.0.2:80".parse().unwrap(),
                "10.0.0.9:81".parse().unwrap()
            ] as [SocketAddrV4; 2],
            "warning counts, the node address stands in for an empty one"
        );
    }

    #[test]
    fn service_names_are_one_segment() {
        assert_eq!(encode_segment("web-1.v2"), "web-1.v2");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
