//! Claims: what a service holds for the whole group, so that two nodes cannot both give one
//! VIP, or one HTTP route, to different services. Each node checks a new service only
//! against the services it knows; two nodes writing at once both pass that check. A claim
//! is a key under `<prefix>/claims/` that holds the name of the service having it. It is
//! taken in the same compare-and-set as the service's document and released with it, so
//! only one of two racing writers wins.
//!
//! A claim held by a service whose document does not exist is free (a crash of the file
//! store between its steps can leave one behind). Services stored by an lb without claims
//! take theirs on their next write.
use std::collections::HashMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};

use super::StoreError;
use crate::model::{Protocol, Service};

/// Claim ids longer than this are replaced by a hash (a file name has at most 255 bytes).
const MAX_READABLE_ID: usize = 200;

/// Kept as they are in a path claim; everything else is percent-encoded, `/` included, so
/// an id is one segment (one file name in the file store).
const PATH_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One thing a service holds for the group: `<kind>/<id>`, relative to `<prefix>/claims/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Claim {
    key: String,
    /// The API field that makes the claim, for errors.
    field: &'static str,
    /// What is claimed, in words, for errors.
    what: String,
}

impl Claim {
    fn new(kind: &str, id: String, field: &'static str, what: String) -> Self {
        let id = if id.len() > MAX_READABLE_ID {
            let digest = Sha256::digest(id.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256-{hex}")
        } else {
            id
        };
        Self {
            key: format!("{kind}/{id}"),
            field,
            what,
        }
    }

    /// The layer-4 VIP `vip`: `vip/10.0.0.1:80:tcp`.
    pub fn vip(vip: std::net::SocketAddrV4, protocol: Protocol) -> Self {
        let proto = match protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        Self::new(
            "vip",
            format!("{vip}:{proto}"),
            "vip",
            format!("{vip} {protocol:?}"),
        )
    }

    /// The path prefix `path` on `domain` (any host when none):
    /// `path/example.com:%2Fdemo`, `path/*:%2Fdemo`.
    pub fn http_path(domain: Option<&str>, path: &str) -> Self {
        Self::http_path_when(domain, path, "", None)
    }

    /// As [`http_path`](Self::http_path), for requests that also meet `conditions`
    /// (none: any request), on lb's HTTP listener at `port` (none: the `--http` one):
    /// `path/example.com:%2Fdemo%3Fx-version%3A%203`, `path/example.com:8081:%2Fdemo`.
    pub fn http_path_when(
        domain: Option<&str>,
        path: &str,
        conditions: &str,
        port: Option<u16>,
    ) -> Self {
        let host = on_port(domain.unwrap_or("*"), port);
        let on = in_words(domain.unwrap_or("any host"), port);
        let (id, what) = if conditions.is_empty() {
            (path.to_string(), format!("{path} on {on}"))
        } else {
            (
                format!("{path}?{conditions}"),
                format!("{path} on {on} when {conditions}"),
            )
        };
        let encoded = utf8_percent_encode(&id, PATH_KEEP);
        Self::new("path", format!("{host}:{encoded}"), "http.paths", what)
    }

    /// Every path of `domain`, for a route with a domain and no paths, on lb's HTTP
    /// listener at `port` (none: the `--http` one): `domain/example.com`,
    /// `domain/example.com:8081`.
    pub fn http_domain(domain: &str, port: Option<u16>) -> Self {
        Self::new(
            "domain",
            on_port(domain, port),
            "http.domain",
            format!("every path on {}", in_words(domain, port)),
        )
    }

    /// The default backend (there is one per HTTP listener): `default/backend`,
    /// `default/backend:8081`.
    pub fn default_backend(port: Option<u16>) -> Self {
        Self::new(
            "default",
            on_port("backend", port),
            "http.default_backend",
            in_words("the default backend", port),
        )
    }

    /// `<kind>/<id>`: two segments, neither empty, `.` or `..`, and no more `/`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The API field whose value makes this claim.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is claimed, in words.
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// `name`, or `name:port` for a route on an HTTP listener of its own (neither a host
/// name nor a percent-encoded path holds a ':').
fn on_port(name: &str, port: Option<u16>) -> String {
    match port {
        None => name.to_string(),
        Some(p) => format!("{name}:{p}"),
    }
}

/// `name`, and the port when it is one of its own, for errors.
fn in_words(name: &str, port: Option<u16>) -> String {
    match port {
        None => name.to_string(),
        Some(p) => format!("{name} on port {p}"),
    }
}

/// What a service claims: its VIP and protocol (layer 4), or each of its HTTP route's
/// (domain, path) pairs, its domains when it has no paths, and the default backend.
pub fn claims_of(svc: &Service) -> Vec<Claim> {
    let mut claims = Vec::new();
    if let Some(vip) = svc.l4_vip() {
        claims.push(Claim::vip(vip, svc.protocol));
    }
    if let Some(route) = &svc.http {
        // A route with conditions shares its paths with one without, or with other
        // conditions: what it claims is the paths under its conditions.
        let conditions = route.conditions();
        let hosts: Vec<Option<&str>> = if route.domains.is_empty() {
            vec![None]
        } else {
            route.domains.iter().map(|d| Some(d.as_str())).collect()
        };
        for host in hosts {
            for p in &route.paths {
                claims.push(Claim::http_path_when(host, p, &conditions, route.port));
            }
            if let Some(d) = host
                && route.paths.is_empty()
            {
                claims.push(Claim::http_domain(d, route.port));
            }
        }
        if route.default_backend {
            claims.push(Claim::default_backend(route.port));
        }
    }
    claims.sort();
    claims.dedup();
    claims
}

/// The claims a write moves: those the new version holds, and those the version it
/// replaces held (released unless the new one holds them too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub hold: Vec<Claim>,
    pub previous: Vec<Claim>,
}

impl Claims {
    /// What a delete moves: it holds nothing, and releases what the deleted version held.
    pub fn released(previous: &[Claim]) -> Self {
        Self {
            hold: Vec::new(),
            previous: previous.to_vec(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hold.is_empty() && self.previous.is_empty()
    }

    /// Every claim key a write must read first: held and released, once each.
    pub fn all(&self) -> Vec<&Claim> {
        let mut all: Vec<&Claim> = self.hold.iter().chain(&self.previous).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Refuses, before anything is read or written, a write of `name` whose document and
    /// claims would not fit in one transaction of a store that holds at most `max_ops`
    /// operations (etcd's `--max-txn-ops` and Consul's `/v1/txn` are 128 by default).
    pub fn check_fit(&self, name: &str, max_ops: usize) -> Result<(), StoreError> {
        let claims = self.all();
        if claims.len() < max_ops {
            return Ok(());
        }
        // Named by the field that makes most of them (the paths, as a rule).
        let mut by_field: HashMap<&'static str, usize> = HashMap::new();
        for c in &claims {
            *by_field.entry(c.field).or_default() += 1;
        }
        let field = by_field
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map_or("http.paths", |(f, _)| f);
        Err(StoreError::TooManyClaims {
            name: name.to_string(),
            count: claims.len(),
            max: max_ops - 1,
            field,
        })
    }
}

/// A claim key as a store read it: who holds it, at which revision, and whether that
/// service's document exists (a claim of a service that is gone is free).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub holder: String,
    pub revision: u64,
    pub holder_exists: bool,
}

/// What a store writes besides the document, and what it must find unchanged: built from
/// what it read, by [`plan`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClaimPlan<'a> {
    /// Claims to set to the writer's name: free ones, and ones of services that are gone.
    pub take: Vec<&'a Claim>,
    /// Claims the writer holds and lets go.
    pub release: Vec<(&'a Claim, u64)>,
    /// Every claim key read, with the revision read (0: absent): the write holds only if
    /// none changed meanwhile.
    pub unchanged: Vec<(&'a Claim, u64)>,
    /// Services whose claims are taken over: their documents must still be absent.
    pub gone: Vec<String>,
}

/// The plan for `name` to hold `claims.hold` and let go of the rest of `claims.previous`,
/// given what each claim key holds now (`found`, absent keys missing); a conflict naming
/// the claim and its holder when another service holds one.
pub fn plan<'a>(
    name: &str,
    claims: &'a Claims,
    found: &HashMap<String, Held>,
) -> Result<ClaimPlan<'a>, StoreError> {
    let mut plan = ClaimPlan::default();
    for claim in claims.all() {
        let now = found.get(claim.key());
        plan.unchanged.push((claim, now.map_or(0, |h| h.revision)));
        let held = claims.hold.contains(claim);
        match now {
            Some(h) if h.holder == name => {
                if !held {
                    plan.release.push((claim, h.revision));
                }
            }
            Some(h) if h.holder_exists => {
                if held {
                    return Err(StoreError::Claimed {
                        claim: claim.clone(),
                        holder: h.holder.clone(),
                    });
                }
            }
            Some(h) => {
                if held {
                    plan.take.push(claim);
                    plan.gone.push(h.holder.clone());
                }
            }
            None => {
                if held {
                    plan.take.push(claim);
                }
            }
        }
    }
    plan.gone.sort();
    plan.gone.dedup();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceSpec;

    fn service(json: serde_json::Value) -> Service {
        let spec: ServiceSpec = serde_json::from_value(json).unwrap();
        spec.validate("web").unwrap()
    }

    fn keys(claims: &[Claim]) -> Vec<&str> {
        claims.iter().map(Claim::key).collect()
    }

    #[test]
    fn a_service_claims_its_vip_or_its_routes() {
        let l4 = service(serde_json::json!({
            "vip": "10.0.0.1:80", "protocol": "udp", "backends": ["10.0.1.1:80"]
        }));
        assert_eq!(keys(&claims_of(&l4)), ["vip/10.0.0.1:80:udp"]);
        let http = service(serde_json::json!({
            "http": {"paths": ["/demo", "/a%b/ü"], "domain": "Example.com", "default_backend": true},
            "backends": ["10.0.1.1:80"]
        }));
        assert_eq!(
            keys(&claims_of(&http)),
            [
                "default/backend",
                "path/example.com:%2Fa%25b%2F%C3%BC",
                "path/example.com:%2Fdemo",
            ]
        );
        let domain_only = service(serde_json::json!({
            "http": {"domain": "*.example.com"}, "backends": ["10.0.1.1:80"]
        }));
        assert_eq!(keys(&claims_of(&domain_only)), ["domain/*.example.com"]);
        let any_host = service(serde_json::json!({
            "http": {"paths": ["/x/"]}, "backends": ["10.0.1.1:80"]
        }));
        assert_eq!(keys(&claims_of(&any_host)), ["path/*:%2Fx"]);
        assert_eq!(claims_of(&any_host)[0].field(), "http.paths");
    }

    #[test]
    fn a_route_on_a_port_of_its_own_claims_on_that_port_only() {
        let on_8081 = service(serde_json::json!({
            "http": {"paths": ["/demo"], "domain": "example.com", "default_backend": true, "port": 8081},
            "backends": ["10.0.1.1:80"]
        }));
        assert_eq!(
            keys(&claims_of(&on_8081)),
            ["default/backend:8081", "path/example.com:8081:%2Fdemo"]
        );
        let any_host = service(serde_json::json!({
            "http": {"paths": ["/x"], "port": 8081}, "backends": ["10.0.1.1:80"]
        }));
        assert_eq!(keys(&claims_of(&any_host)), ["path/*:8081:%2Fx"]);
        assert_eq!(
            claims_of(&any_host)[0].what(),
            "/x on any host on port 8081"
        );
        let domain_only = service(serde_json::json!({
            "http": {"domain": "example.com", "port": 8081}, "backends": ["10.0.1.1:80"]
        }));
        assert_eq!(keys(&claims_of(&domain_only)), ["domain/example.com:8081"]);
    }

    #[test]
    fn a_long_route_claims_a_hash_of_fixed_length() {
        let long = format!("/{}", "a".repeat(1000));
        // A route with conditions claims its paths under them: no clash with the same
        // paths asking nothing.
        let plain = Claim::http_path_when(Some("example.com"), "/demo", "", None);
        let v2 = Claim::http_path_when(Some("example.com"), "/demo", "x-version: 2", None);
        assert_eq!(plain, Claim::http_path(Some("example.com"), "/demo"));
        assert_eq!(v2.key(), "path/example.com:%2Fdemo%3Fx-version%3A%202");
        assert_ne!(plain.key(), v2.key());
        let c = Claim::http_path(Some("example.com"), &long);
        assert!(c.key().starts_with("path/sha256-"), "{}", c.key());
        assert_eq!(c.key().len(), "path/sha256-".len() + 64);
        assert_ne!(
            c,
            Claim::http_path(Some("example.com"), &format!("{long}b"))
        );
    }

    fn held(holder: &str, revision: u64, holder_exists: bool) -> Held {
        Held {
            holder: holder.into(),
            revision,
            holder_exists,
        }
    }

    #[test]
    fn a_plan_takes_free_claims_keeps_its_own_and_releases_the_dropped() {
        let (a, b, c) = (
            Claim::vip("10.0.0.1:80".parse().unwrap(), Protocol::Tcp),
            Claim::vip("10.0.0.2:80".parse().unwrap(), Protocol::Tcp),
            Claim::vip("10.0.0.3:80".parse().unwrap(), Protocol::Tcp),
        );
        let claims = Claims {
            hold: vec![a.clone(), b.clone()],
            previous: vec![b.clone(), c.clone()],
        };
        let found: HashMap<String, Held> = [
            (b.key().to_string(), held("web", 7, true)),
            (c.key().to_string(), held("web", 5, true)),
        ]
        .into();
        let p = plan("web", &claims, &found).unwrap();
        assert_eq!(p.take, [&a]);
        assert_eq!(p.release, [(&c, 5)]);
        assert_eq!(p.unchanged, [(&a, 0), (&b, 7), (&c, 5)]);
        assert!(p.gone.is_empty());
    }

    #[test]
    fn a_claim_of_another_service_is_refused_unless_that_service_is_gone() {
        let a = Claim::vip("10.0.0.1:80".parse().unwrap(), Protocol::Tcp);
        let claims = Claims {
            hold: vec![a.clone()],
            previous: vec![],
        };
        let found: HashMap<String, Held> = [(a.key().to_string(), held("db", 3, true))].into();
        match plan("web", &claims, &found) {
            Err(StoreError::Claimed { claim, holder }) => {
                assert_eq!((claim, holder.as_str()), (a.clone(), "db"));
            }
            other => panic!("{other:?}"),
        }
        let found: HashMap<String, Held> = [(a.key().to_string(), held("db", 3, false))].into();
        let p = plan("web", &claims, &found).unwrap();
        assert_eq!(p.take, [&a]);
        assert_eq!(p.gone, ["db"]);
        // Releasing a claim someone else holds leaves it alone.
        let letting_go = Claims {
            hold: vec![],
            previous: vec![a.clone()],
        };
        let found: HashMap<String, Held> = [(a.key().to_string(), held("db", 3, true))].into();
        assert!(plan("web", &letting_go, &found).unwrap().release.is_empty());
    }
}
