//! Services as users describe them, and their validation. A [`Service`] is always valid:
//! it comes from [`ServiceSpec::validate`] (the API's strings, parsed, defaults filled in)
//! or from typed values passed through [`Service::checked`] (a stored document); both end in
//! the same checks.
use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddrV4,
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, maglev};
use serde::{Deserialize, Serialize};

use crate::{
    backend_entry::BackendOptions,
    drain::Drain,
    forwarding::{EncapSource, Forwarding},
    l7::DomainPattern,
};

pub const MAX_NAME_LEN: usize = 63;
pub const MAX_BACKENDS: usize = 4096;

/// Bad input, with the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Its name in the API and the store.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

/// What picks a layer-4 service's backend for a new flow (`"hash"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowHash {
    /// Addresses, ports and protocol: connections spread one by one.
    #[default]
    #[serde(rename = "5tuple")]
    FiveTuple,
    /// The client's address without its port: one client's connections all reach the same
    /// backend while the table stands (client affinity).
    #[serde(rename = "src_ip")]
    SrcIp,
}

impl FlowHash {
    fn parse(value: &str) -> Result<Self, ValidationError> {
        match value {
            "5tuple" => Ok(Self::FiveTuple),
            "src_ip" => Ok(Self::SrcIp),
            other => Err(ValidationError::new(
                "hash",
                format!("{other:?} is not 5tuple or src_ip"),
            )),
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The body of `PUT /v1/services/{name}`, as sent. Fields are strings so that a bad value
/// gets an error naming its field rather than a generic parse error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub vip: Option<String>,
    pub protocol: Option<String>,
    /// Each `"ip:port"` or `{"address", "weight", "state"}` (see `backend_entry`).
    pub backends: Option<Vec<serde_json::Value>>,
    /// Maglev table size; a prime. Default: grows with the backend count.
    pub table_size: Option<u32>,
    /// `"5tuple"` (default) or `"src_ip"`: see [`FlowHash`].
    pub hash: Option<String>,
    /// Seconds a backend left out of `backends` keeps its tracked flows (see `drain`).
    pub drain_timeout_s: Option<u32>,
    /// `"drain"` (default) or `"shutdown"`: what a backend its check takes down does with
    /// its tracked flows.
    pub on_down: Option<String>,
    /// `"nat"` (default), `"dsr"` or `"dsr-l2"`: see `forwarding`.
    pub forwarding: Option<String>,
    /// `"balancer"` (default) or `"per_flow"`: the outer source of a `dsr` service.
    pub encap_source: Option<String>,
    /// Where the backends come from, instead of `backends`.
    pub discovery: Option<DiscoverySpec>,
    /// The instances discovery found (filled in by lb, never sent).
    #[serde(skip)]
    pub discovered: Option<Vec<SocketAddrV4>>,
    /// The backends this write leaves out are cut at once, not drained (`?drain=false`,
    /// never in the body).
    #[serde(skip)]
    pub cut_removed: bool,
    /// Makes this an HTTP service, routed by path and host on the `--http` listener.
    pub http: Option<HttpSpec>,
    /// How backends are checked (default: a TCP connect every 2 s, rise 2, fall 3).
    pub check: Option<CheckSpec>,
    /// This write may put a layer-4 VIP on a host address and port where another program
    /// listens (its traffic goes to the backends from then on). Not stored: it answers
    /// for this request only.
    pub override_local_listener: Option<bool>,
}

/// `"http": {"paths": ["/demo"], "paths_exclude": [], "domain": "example.com" | [...],
/// "default_backend": false, "balance": "round_robin" | "least_outstanding",
/// "allowed_methods": ["GET"], "denied_methods": ["DELETE"], "https_only": false,
/// "https_redirect_code": 302, "deny_http": false,
/// "users": [{"name": "admin", "password": "..."} | {"name": "bob", "password_hash": "$6$..."}],
/// "request_headers": {"delete": ["X-A"], "set": {"X-B": "1"}, "add": {"X-C": "2"}},
/// "response_headers": {...}, "path_rewrite": [{"search": "^/demo/", "replace": "/"}],
/// "tls": {"acme": true}, "backend_tls": {"verify": true, "ca": PEM, "server_name": ".."},
/// "backend_protocol": "http1" | "h2", "tls_passthrough": false,
/// "sni": {"match": "beg", "values": ["test."]}, "match_headers": {"X-Version": "3"},
/// "match_user_agents": ["googlebot"], "redirect_from": ["www.example.com"],
/// "server_timeout_ms": 20000, "tunnel_timeout_ms": 3600000, "sticky_cookie": "SERVERID",
/// "compression": {"algo": "gzip", "types": ["text/html"]}, "port": 8081}`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    pub paths: Option<Vec<String>>,
    pub paths_exclude: Option<Vec<String>>,
    /// One domain or a list of them.
    #[serde(default, deserialize_with = "one_or_many_opt::deserialize")]
    pub domain: Option<Vec<String>>,
    pub default_backend: Option<bool>,
    pub balance: Option<String>,
    pub allowed_methods: Option<Vec<String>>,
    pub denied_methods: Option<Vec<String>>,
    pub https_only: Option<bool>,
    pub https_redirect_code: Option<u16>,
    pub deny_http: Option<bool>,
    pub users: Option<Vec<UserSpec>>,
    pub request_headers: Option<HeaderEdits>,
    pub response_headers: Option<HeaderEdits>,
    pub path_rewrite: Option<Vec<PathRewrite>>,
    pub tls: Option<RouteTls>,
    pub backend_tls: Option<BackendTlsSpec>,
    pub backend_protocol: Option<String>,
    pub tls_passthrough: Option<bool>,
    pub sni: Option<SniSpec>,
    pub match_headers: Option<std::collections::BTreeMap<String, String>>,
    pub match_user_agents: Option<Vec<String>>,
    pub redirect_from: Option<Vec<String>>,
    pub server_timeout_ms: Option<u64>,
    pub tunnel_timeout_ms: Option<u64>,
    pub sticky_cookie: Option<String>,
    pub compression: Option<CompressionSpec>,
    pub port: Option<u16>,
}

/// `"sni": {"match": "beg", "values": ["test."]}`: the server names a `tls_passthrough`
/// route takes besides (or instead of) its domain, as HAProxy's `req_ssl_sni -i -m
/// beg|end|reg|str` compares them (case-insensitive; `reg`: a regular expression found
/// anywhere in the name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniSpec {
    #[serde(rename = "match")]
    pub kind: String,
    pub values: Vec<String>,
}

impl SniSpec {
    fn check(&self) -> Result<(), ValidationError> {
        if !matches!(self.kind.as_str(), "beg" | "end" | "reg" | "str") {
            return Err(ValidationError::new(
                "http.sni.match",
                format!("{:?} is not beg, end, reg or str", self.kind),
            ));
        }
        if self.values.is_empty() || self.values.iter().any(String::is_empty) {
            return Err(ValidationError::new(
                "http.sni.values",
                "needs at least one value, none empty",
            ));
        }
        if self.kind == "reg" {
            for (i, v) in self.values.iter().enumerate() {
                path_regex(&format!("(?i){v}"))
                    .map_err(|why| ValidationError::new(format!("http.sni.values[{i}]"), why))?;
            }
        }
        Ok(())
    }

    /// As the proxy matches names.
    pub fn to_l7(&self) -> Vec<crate::l7::SniPattern> {
        use crate::l7::SniPattern;
        self.values
            .iter()
            .map(|v| match self.kind.as_str() {
                "beg" => SniPattern::Begins(v.to_ascii_lowercase()),
                "end" => SniPattern::Ends(v.to_ascii_lowercase()),
                "reg" => SniPattern::Regex(format!("(?i){v}")),
                _ => SniPattern::Exact(v.to_ascii_lowercase()),
            })
            .collect()
    }
}

/// What the backends of an HTTP service speak: HTTP/1.1, or HTTP/2 (gRPC; h2c in the
/// clear, h2 by ALPN over `backend_tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackendProtocol {
    #[default]
    #[serde(rename = "http1")]
    Http1,
    #[serde(rename = "h2")]
    H2,
}

impl BackendProtocol {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `"backend_tls": {"verify": true, "ca": PEM, "server_name": "api.internal"}`: the
/// backends are reached over TLS, their certificate checked against `ca` (default: the
/// system's roots) for `server_name` (default: the backend's address), or not checked at
/// all with `"verify": false` (DFP's `sslVerifyNone`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsSpec {
    #[serde(default = "yes")]
    pub verify: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

fn yes() -> bool {
    true
}

impl BackendTlsSpec {
    /// As the proxy takes it.
    pub fn to_l7(&self) -> crate::l7::BackendTls {
        crate::l7::BackendTls {
            verify: self.verify,
            ca_pem: self.ca.clone(),
            server_name: self.server_name.clone(),
        }
    }

    fn check(&self) -> Result<(), ValidationError> {
        if !self.verify && self.ca.is_some() {
            return Err(ValidationError::new(
                "http.backend_tls.ca",
                "has no use with \"verify\": false",
            ));
        }
        self.to_l7().check().map_err(|why| {
            let (part, message) = why.split_once(": ").unwrap_or(("ca", &why));
            ValidationError::new(format!("http.backend_tls.{part}"), message)
        })
    }
}

/// `"tls": {"acme": true}`: the route's domain gets a certificate from the ACME CA
/// (`--acme-directory`), renewed before it expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTls {
    #[serde(default)]
    pub acme: bool,
}

impl RouteTls {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Headers a route deletes, then sets (replacing), then adds (appending), by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub set: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub add: std::collections::BTreeMap<String, String>,
}

/// The first match of the regular expression `search` in the path the backend is asked for
/// replaced by `replace` (`$1`, `${name}` for groups).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRewrite {
    pub search: String,
    pub replace: String,
}

/// Headers a route may not touch: they frame the message or belong to one hop.
const FRAMING_HEADERS: [&str; 7] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
];

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    fn check(&self, field: &str) -> Result<(), ValidationError> {
        let name_ok = |f: String, n: &str| -> Result<(), ValidationError> {
            let parsed = http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                ValidationError::new(f.clone(), format!("{n:?} is not a header name"))
            })?;
            if FRAMING_HEADERS.contains(&parsed.as_str()) {
                return Err(ValidationError::new(
                    f,
                    format!("{n} frames the message or belongs to one hop: lb sets it"),
                ));
            }
            Ok(())
        };
        for (i, n) in self.delete.iter().enumerate() {
            name_ok(format!("{field}.delete[{i}]"), n)?;
        }
        for (kind, map) in [("set", &self.set), ("add", &self.add)] {
            for (n, v) in map {
                let f = format!("{field}.{kind}.{n}");
                name_ok(f.clone(), n)?;
                if v.contains("%[") {
                    return Err(ValidationError::new(
                        f,
                        "HAProxy sample expressions (%[...]) are not evaluated by lb: give the value itself",
                    ));
                }
                if http::HeaderValue::from_str(v).is_err() {
                    return Err(ValidationError::new(
                        f,
                        format!("{v:?} is not a header value"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The longest regular expression a path rewrite may be, and its compiled size.
pub const MAX_REGEX_LEN: usize = 1024;
pub const MAX_REGEX_SIZE: usize = 1 << 20;

/// `search` compiled, within lb's size limits.
pub fn path_regex(search: &str) -> Result<regex::Regex, String> {
    if search.len() > MAX_REGEX_LEN {
        return Err(format!("longer than {MAX_REGEX_LEN} characters"));
    }
    regex::RegexBuilder::new(search)
        .size_limit(MAX_REGEX_SIZE)
        .build()
        .map_err(|e| e.to_string())
}

/// A lower-case DNS name: dot-separated labels of letters, digits and '-', each 1 to 63
/// long, 253 in all.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// A field that takes one string or a list of them (read into a list).
mod one_or_many {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    impl From<OneOrMany> for Vec<String> {
        fn from(v: OneOrMany) -> Self {
            match v {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            }
        }
    }

    /// One item as a string (readable by lb versions that took only one), more as a list.
    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(OneOrMany::deserialize(d)?.into())
    }
}

/// As `one_or_many`, for a field that may be absent.
mod one_or_many_opt {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        Ok(Option::<super::one_or_many::OneOrMany>::deserialize(d)?.map(Into::into))
    }
}

/// An RFC 6265 cookie name (an HTTP token), kept short.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A user of HTTP basic auth: a password in the clear (hashed before it is stored) or its
/// hash already made (crypt(3) `$6$`/`$5$`, bcrypt `$2y$`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    pub password: Option<String>,
    pub password_hash: Option<String>,
}

/// A user as stored: never the password, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password_hash: String,
}

/// The redirects `https_redirect_code` may be.
pub const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastOutstanding,
}

impl Balance {
    /// Its name in the API and the store.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastOutstanding => "least_outstanding",
        }
    }
}

/// A validated HTTP route: requests whose host matches one of `domains` (any host when
/// none; see [`DomainPattern`]) and whose path starts with one of `paths` (`/demo`
/// matches `/demo` and `/demo/...`; the longest wins) and none of `paths_exclude`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths_exclude: Vec<String>,
    /// Written `domain`: one name as a string (as stored before lists), several as a list.
    #[serde(
        rename = "domain",
        default,
        with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub domains: Vec<String>,
    /// Takes the requests no other route matches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_backend: bool,
    #[serde(default)]
    pub balance: Balance,
    /// Only these methods are forwarded (none: any); others are answered 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_methods: Vec<String>,
    /// These methods are answered 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_methods: Vec<String>,
    /// Requests over plain HTTP are redirected to HTTPS, with `https_redirect_code`
    /// (302 when none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub https_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_redirect_code: Option<u16>,
    /// Requests over plain HTTP are answered 403.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deny_http: bool,
    /// HTTP basic auth: only these users get through (none: anyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Headers changed on the request sent to the backend.
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    /// Headers changed on the response sent to the client.
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
    /// The path the backend is asked for, rewritten by each rule in turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_rewrite: Vec<PathRewrite>,
    #[serde(default, skip_serializing_if = "RouteTls::is_default")]
    pub tls: RouteTls,
    /// The backends are reached over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<BackendTlsSpec>,
    #[serde(default, skip_serializing_if = "BackendProtocol::is_default")]
    pub backend_protocol: BackendProtocol,
    /// A TLS service: connections to the HTTPS listener whose SNI is a domain go whole to
    /// the backends (DFP's `reqMode=sni`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_passthrough: bool,
    /// Server names a `tls_passthrough` route takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<SniSpec>,
    /// Only requests with each of these headers, with that value exactly, take the route
    /// (DFP's `serviceHeader`); another route may take the same paths without them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub match_headers: std::collections::BTreeMap<String, String>,
    /// Only requests whose User-Agent holds one of these, without case (DFP's
    /// `userAgent`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_user_agents: Vec<String>,
    /// Requests for these hosts are redirected (301) to the first domain, same path (DFP's
    /// `redirectFromDomain`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_from: Vec<String>,
    /// How long the backends may take to answer, instead of lb's
    /// `--http-backend-response-timeout` (DFP's `timeoutServer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_timeout_ms: Option<u64>,
    /// How long an upgraded connection (WebSocket) or TLS passed through may sit idle,
    /// instead of lb's `--http-tunnel-timeout` (DFP's `timeoutTunnel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_timeout_ms: Option<u64>,
    /// Sticky sessions: lb inserts this cookie naming the backend that answered, and
    /// sends requests that carry it to that backend while it is healthy (DFP's
    /// `sessionType=sticky-server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// Responses gzipped for clients that accept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionSpec>,
    /// Served on a plain HTTP listener of its own at this port (on the `--http`
    /// listener's address), opened while a route asks for it, instead of on the `--http`
    /// and HTTPS listeners (DFP's `srcPort`). The `--http` listener's own port is the same
    /// as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// `"compression": {"algo": "gzip", "types": ["text/html", "text/"]}`: responses of these
/// media types (a type ending in '/' takes its family; none listed: text and the web's
/// text formats) are gzipped for clients that accept it, as HAProxy's `compression algo
/// gzip` and `compression type` (DFP's `compressionAlgo`, `compressionType`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSpec {
    #[serde(default = "gzip")]
    pub algo: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
}

fn gzip() -> String {
    "gzip".into()
}

impl CompressionSpec {
    fn check(&self) -> Result<(), ValidationError> {
        if self.algo != "gzip" {
            return Err(ValidationError::new(
                "http.compression.algo",
                format!("{:?}: lb compresses with gzip", self.algo),
            ));
        }
        for (i, t) in self.types.iter().enumerate() {
            let ok = t.split_once('/').is_some_and(|(kind, sub)| {
                is_cookie_name(kind) && (sub.is_empty() || is_cookie_name(sub))
            }) && *t == t.to_ascii_lowercase();
            if !ok {
                return Err(ValidationError::new(
                    format!("http.compression.types[{i}]"),
                    format!(
                        "{t:?} is not a media type (type/subtype, or type/ for all of it), lower case"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl HttpRoute {
    /// Whether the two routes take requests for the same host rule: both for any host, or
    /// a domain in common.
    pub fn shares_a_host(&self, other: &HttpRoute) -> bool {
        if self.domains.is_empty() || other.domains.is_empty() {
            return self.domains.is_empty() && other.domains.is_empty();
        }
        self.domains.iter().any(|d| other.domains.contains(d))
    }

    /// What a request must have besides its host and path, as a claim tells it apart
    /// (empty: nothing).
    pub fn conditions(&self) -> String {
        let headers = self
            .match_headers
            .iter()
            .map(|(n, v)| format!("{}: {v}", n.to_ascii_lowercase()));
        let agents = self
            .match_user_agents
            .iter()
            .map(|a| format!("user-agent ~ {}", a.to_ascii_lowercase()));
        headers.chain(agents).collect::<Vec<_>>().join(", ")
    }
}

/// `"check": {"kind": "http" | "tcp", "path": "/health", "expect": 200, "interval_ms": 1000,
/// "timeout_ms": 500, "rise": 2, "fall": 3}`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub kind: Option<String>,
    pub path: Option<String>,
    pub expect: Option<u16>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` answers `expect`.
    Http,
    /// Not checked: always up (the default for UDP services).
    None,
}

/// A validated health check, with HAProxy's meaning of rise and fall: a backend goes
/// down after `fall` failed checks in a row, and up again after `rise` good ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub kind: CheckKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<u16>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    /// Checks go to this port instead of the backend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl CheckKind {
    /// Its name in the API and the store.
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::None => "none",
        }
    }
}

impl Check {
    /// The check of a service that names none: UDP backends answer no TCP check, so
    /// they are not checked.
    pub fn default_for(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Udp => Check::none(),
            Protocol::Tcp => Check::default(),
        }
    }

    /// No checking.
    pub fn none() -> Self {
        Self {
            kind: CheckKind::None,
            ..Self::default()
        }
    }

    /// This check, if lb can run it: a path and status for http checks only, and timings
    /// within the API's limits.
    pub fn checked(self) -> Result<Self, ValidationError> {
        if self.port == Some(0) {
            return Err(ValidationError::new("check.port", "port 0 is not allowed"));
        }
        if self.kind == CheckKind::Http {
            let path = self.path.as_deref().unwrap_or_default();
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ValidationError::new(
                    "check.path",
                    "must be a path starting with /",
                ));
            }
            if !self.expect.is_some_and(|e| (100..=599).contains(&e)) {
                return Err(ValidationError::new(
                    "check.expect",
                    "must be an HTTP status (100 to 599)",
                ));
            }
        } else {
            if self.path.is_some() {
                return Err(ValidationError::new(
                    "check.path",
                    "applies to http checks only",
                ));
            }
            if self.expect.is_some() {
                return Err(ValidationError::new(
                    "check.expect",
                    "applies to http checks only",
                ));
            }
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(ValidationError::new(
                "check.interval_ms",
                "must be 100 to 3600000",
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(ValidationError::new(
                "check.timeout_ms",
                "must be at least 1 and not above interval_ms",
            ));
        }
        for (field, v) in [("check.rise", self.rise), ("check.fall", self.fall)] {
            if !(1..=100).contains(&v) {
                return Err(ValidationError::new(field, "must be 1 to 100"));
            }
        }
        Ok(self)
    }
}

impl Default for Check {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            path: None,
            expect: None,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            port: None,
        }
    }
}

impl CheckSpec {
    /// The check asked for, with the defaults filled in.
    pub fn validate(&self) -> Result<Check, ValidationError> {
        let d = Check::default();
        let kind = match self.kind.as_deref().unwrap_or("tcp") {
            "tcp" => CheckKind::Tcp,
            "http" => CheckKind::Http,
            "none" => CheckKind::None,
            other => {
                return Err(ValidationError::new(
                    "check.kind",
                    format!("{other:?} is not http, tcp or none"),
                ));
            }
        };
        let http = kind == CheckKind::Http;
        let interval_ms = self.interval_ms.unwrap_or(d.interval_ms);
        Check {
            kind,
            path: match &self.path {
                None if http => Some("/".into()),
                path => path.clone(),
            },
            expect: self.expect.or(http.then_some(200)),
            interval_ms,
            timeout_ms: self.timeout_ms.unwrap_or(d.timeout_ms.min(interval_ms)),
            rise: self.rise.unwrap_or(d.rise),
            fall: self.fall.unwrap_or(d.fall),
            port: self.port,
        }
        .checked()
    }
}

fn validate_path(field: &str, p: &str) -> Result<(), ValidationError> {
    if !p.starts_with('/')
        || p.len() > 1024
        || p.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(ValidationError::new(
            field,
            format!("{p:?} is not a path prefix (starts with /, no spaces, ? or #)"),
        ));
    }
    Ok(())
}

/// The longest a route's own timeout may be: a week.
const MAX_ROUTE_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

impl HttpSpec {
    pub fn validate(&self) -> Result<HttpRoute, ValidationError> {
        let mut paths = Vec::new();
        for (i, p) in self.paths.iter().flatten().enumerate() {
            validate_path(&format!("http.paths[{i}]"), p)?;
            // "/demo/" and "/demo" mean the same prefix.
            let p = if p.len() > 1 {
                p.trim_end_matches('/')
            } else {
                p
            };
            if !paths.iter().any(|q: &String| q == p) {
                paths.push(p.to_string());
            }
        }
        let mut paths_exclude = Vec::new();
        for (i, p) in self.paths_exclude.iter().flatten().enumerate() {
            validate_path(&format!("http.paths_exclude[{i}]"), p)?;
            paths_exclude.push(p.trim_end_matches('/').to_string());
        }
        let mut domains: Vec<String> = Vec::new();
        for d in self.domain.iter().flatten() {
            let d = d.trim().to_ascii_lowercase();
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        let default_backend = self.default_backend.unwrap_or(false);
        let balance = match self.balance.as_deref().unwrap_or("round_robin") {
            "round_robin" => Balance::RoundRobin,
            "least_outstanding" => Balance::LeastOutstanding,
            other => {
                return Err(ValidationError::new(
                    "http.balance",
                    format!("{other:?} is not round_robin or least_outstanding"),
                ));
            }
        };
        // Methods are case-sensitive; every standard one is upper case.
        let methods = |list: &Option<Vec<String>>| -> Vec<String> {
            let mut out: Vec<String> = Vec::new();
            for m in list.iter().flatten().map(|m| m.trim().to_ascii_uppercase()) {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
            out
        };
        HttpRoute {
            paths,
            paths_exclude,
            domains,
            default_backend,
            balance,
            allowed_methods: methods(&self.allowed_methods),
            denied_methods: methods(&self.denied_methods),
            https_only: self.https_only.unwrap_or(false),
            https_redirect_code: self.https_redirect_code,
            deny_http: self.deny_http.unwrap_or(false),
            users: users(self.users.as_deref().unwrap_or_default())?,
            request_headers: self.request_headers.clone().unwrap_or_default(),
            response_headers: self.response_headers.clone().unwrap_or_default(),
            path_rewrite: self.path_rewrite.clone().unwrap_or_default(),
            tls: self.tls.unwrap_or_default(),
            backend_tls: self.backend_tls.clone(),
            tls_passthrough: self.tls_passthrough.unwrap_or(false),
            sni: self.sni.clone(),
            match_headers: self.match_headers.clone().unwrap_or_default(),
            match_user_agents: self.match_user_agents.clone().unwrap_or_default(),
            redirect_from: self
                .redirect_from
                .iter()
                .flatten()
                .map(|d| d.trim().to_ascii_lowercase())
                .collect(),
            server_timeout_ms: self.server_timeout_ms,
            tunnel_timeout_ms: self.tunnel_timeout_ms,
            sticky_cookie: self.sticky_cookie.as_ref().map(|c| c.trim().to_string()),
            compression: self.compression.clone().map(|mut c| {
                c.algo = c.algo.trim().to_ascii_lowercase();
                c.types = c
                    .types
                    .iter()
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect();
                c
            }),
            port: self.port,
            backend_protocol: match self.backend_protocol.as_deref() {
                None | Some("http1") => BackendProtocol::Http1,
                Some("h2") => BackendProtocol::H2,
                Some(other) => {
                    return Err(ValidationError::new(
                        "http.backend_protocol",
                        format!("{other:?} is not http1 or h2"),
                    ));
                }
            },
        }
        .checked()
    }
}

/// The users of `specs`, each password hashed.
fn users(specs: &[UserSpec]) -> Result<Vec<User>, ValidationError> {
    let mut users: Vec<User> = Vec::new();
    for (i, u) in specs.iter().enumerate() {
        let field = |f: &str| format!("http.users[{i}].{f}");
        let password_hash = match (&u.password, &u.password_hash) {
            (Some(p), None) if !p.is_empty() => crate::passwords::hash(p),
            (None, Some(h)) => h.trim().to_string(),
            (Some(_), None) => return Err(ValidationError::new(field("password"), "is empty")),
            _ => {
                return Err(ValidationError::new(
                    field("password"),
                    "give one of password (hashed before it is stored) or password_hash",
                ));
            }
        };
        if users.iter().any(|other| other.name == u.name) {
            return Err(ValidationError::new(
                field("name"),
                format!("{:?} is given twice", u.name),
            ));
        }
        users.push(User {
            name: u.name.clone(),
            password_hash,
        });
    }
    Ok(users)
}

impl HttpRoute {
    /// This route, if its paths are path prefixes, its domain a host name, its users well
    /// formed, and it matches something.
    pub fn checked(self) -> Result<Self, ValidationError> {
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() || u.name.contains(':') || u.name.chars().any(char::is_control) {
                return Err(ValidationError::new(
                    format!("http.users[{i}].name"),
                    format!("{:?}: a user name is not empty and has no ':'", u.name),
                ));
            }
            crate::passwords::check_format(&u.password_hash).map_err(|why| {
                ValidationError::new(format!("http.users[{i}].password_hash"), why)
            })?;
        }
        self.request_headers.check("http.request_headers")?;
        self.response_headers.check("http.response_headers")?;
        for (i, rule) in self.path_rewrite.iter().enumerate() {
            path_regex(&rule.search).map_err(|why| {
                ValidationError::new(format!("http.path_rewrite[{i}].search"), why)
            })?;
        }
        for (i, p) in self.paths.iter().enumerate() {
            validate_path(&format!("http.paths[{i}]"), p)?;
        }
        for (i, p) in self.paths_exclude.iter().enumerate() {
            validate_path(&format!("http.paths_exclude[{i}]"), p)?;
        }
        for (i, d) in self.domains.iter().enumerate() {
            if !is_host_name(DomainPattern::parse(d).name()) {
                let field = if self.domains.len() == 1 {
                    "http.domain".to_string()
                } else {
                    format!("http.domain[{i}]")
                };
                return Err(ValidationError::new(
                    field,
                    format!("{d:?} is not a host name (or *.domain, or *domain)"),
                ));
            }
        }
        if let Some(tls) = &self.backend_tls {
            tls.check()?;
        }
        if let Some(name) = &self.sticky_cookie
            && !is_cookie_name(name)
        {
            return Err(ValidationError::new(
                "http.sticky_cookie",
                format!(
                    "{name:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~, up to 64)"
                ),
            ));
        }
        if let Some(c) = &self.compression {
            c.check()?;
        }
        for (field, ms) in [
            ("http.server_timeout_ms", self.server_timeout_ms),
            ("http.tunnel_timeout_ms", self.tunnel_timeout_ms),
        ] {
            if ms.is_some_and(|ms| ms == 0 || ms > MAX_ROUTE_TIMEOUT_MS) {
                return Err(ValidationError::new(
                    field,
                    format!("is from 1 to {MAX_ROUTE_TIMEOUT_MS} (a week)"),
                ));
            }
        }
        for (name, value) in &self.match_headers {
            let field = format!("http.match_headers.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ValidationError::new(field, "is not a header name"));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(ValidationError::new(field, "is not a header value"));
            }
        }
        for (i, from) in self.redirect_from.iter().enumerate() {
            let field = format!("http.redirect_from[{i}]");
            match self.domains.first().map(|d| DomainPattern::parse(d)) {
                None => {
                    return Err(ValidationError::new(
                        field,
                        "needs http.domain: where to redirect to",
                    ));
                }
                Some(DomainPattern::Exact(_)) => {}
                Some(_) => {
                    return Err(ValidationError::new(
                        field,
                        "redirects go to the first domain, and a wildcard is nowhere to redirect to",
                    ));
                }
            }
            if !is_host_name(from) {
                return Err(ValidationError::new(
                    field,
                    format!("{from:?} is not a host name"),
                ));
            }
        }
        for (i, agent) in self.match_user_agents.iter().enumerate() {
            if agent.trim().is_empty() {
                return Err(ValidationError::new(
                    format!("http.match_user_agents[{i}]"),
                    "is empty",
                ));
            }
        }
        if let Some(port) = self.port {
            let why = if port == 0 {
                Some("is a port from 1 to 65535")
            } else if self.tls_passthrough {
                Some("TLS passed through is served on lb's HTTPS listener only")
            } else if self.https_only || self.deny_http {
                Some(
                    "a route on a port of its own is served there over plain HTTP only: https_only and deny_http would leave it unreachable",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ValidationError::new("http.port", format!("{port}: {why}")));
            }
        }
        if let Some(sni) = &self.sni {
            if !self.tls_passthrough {
                return Err(ValidationError::new(
                    "http.sni",
                    "applies to tls_passthrough routes only",
                ));
            }
            sni.check()?;
        }
        if self.tls_passthrough {
            let why = if self.domains.is_empty() && self.sni.is_none() {
                Some(
                    "needs http.domain or http.sni: the names clients ask for in their TLS handshake",
                )
            } else if !self.paths.is_empty() || self.default_backend {
                Some(
                    "takes no paths and no default_backend: lb sees no request in TLS it passes through",
                )
            } else if !self.users.is_empty()
                || self.https_only
                || self.deny_http
                || self.tls.acme
                || self.backend_tls.is_some()
                || self.backend_protocol != BackendProtocol::Http1
                || !self.path_rewrite.is_empty()
                || !self.request_headers.is_empty()
                || !self.response_headers.is_empty()
                || self.server_timeout_ms.is_some()
                || self.sticky_cookie.is_some()
                || self.compression.is_some()
            {
                Some(
                    "goes whole to the backends: users, redirects, ACME, backend TLS, rewriting, sticky_cookie, compression and server_timeout_ms (tunnel_timeout_ms applies) do not",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ValidationError::new("http.tls_passthrough", why));
            }
        }
        if self.tls.acme {
            if self.domains.is_empty() {
                return Err(ValidationError::new(
                    "http.tls.acme",
                    "needs http.domain: the names the certificate is ordered for",
                ));
            }
            if let Some(d) = self
                .domains
                .iter()
                .find(|d| !matches!(DomainPattern::parse(d), DomainPattern::Exact(_)))
            {
                return Err(ValidationError::new(
                    "http.tls.acme",
                    format!(
                        "{d:?}: a wildcard cannot be validated over HTTP (HTTP-01); store its certificate with PUT /v1/certs"
                    ),
                ));
            }
        }
        if let Some(code) = self.https_redirect_code
            && !REDIRECT_CODES.contains(&code)
        {
            return Err(ValidationError::new(
                "http.https_redirect_code",
                format!("{code} is not a redirect (301, 302, 303, 307 or 308)"),
            ));
        }
        for (field, list) in [
            ("http.allowed_methods", &self.allowed_methods),
            ("http.denied_methods", &self.denied_methods),
        ] {
            for (i, m) in list.iter().enumerate() {
                if http::Method::from_bytes(m.as_bytes()).is_err() || m.is_empty() {
                    return Err(ValidationError::new(
                        format!("{field}[{i}]"),
                        format!("{m:?} is not an HTTP method"),
                    ));
                }
            }
        }
        if self.paths.is_empty()
            && self.domains.is_empty()
            && !self.default_backend
            && self.sni.is_none()
        {
            return Err(ValidationError::new(
                "http.paths",
                "an http service needs paths, a domain, or default_backend",
            ));
        }
        Ok(self)
    }
}

/// `"discovery": {"kind": "etcd" | "consul", "service": NAME, "include_warning": false}`,
/// or `{"kind": "dns", "name": DNS_NAME, "port": PORT}` (`name` and `service` are one).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySpec {
    pub kind: Option<String>,
    #[serde(alias = "name")]
    pub service: Option<String>,
    pub include_warning: Option<bool>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    /// Instances under `<prefix>/registry/<service>/` in etcd, each holding `ip:port`.
    Etcd,
    /// Consul's health API: `/v1/health/service/<service>`.
    Consul,
    /// The A records of a DNS name, on the port the discovery gives (Docker Swarm's
    /// `tasks.<service>`).
    Dns,
}

/// A validated discovery source: the backends of a service are whatever instances it
/// lists at the moment, followed as they change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    pub kind: DiscoveryKind,
    pub service: String,
    /// Consul: also take instances whose checks are only warning (default: passing only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_warning: bool,
    /// DNS: the port of every instance (a DNS A record has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl DiscoverySpec {
    pub fn validate(&self) -> Result<Discovery, ValidationError> {
        let kind = match self.kind.as_deref() {
            Some("etcd") => DiscoveryKind::Etcd,
            Some("consul") => DiscoveryKind::Consul,
            Some("dns") => DiscoveryKind::Dns,
            Some(other) => {
                return Err(ValidationError::new(
                    "discovery.kind",
                    format!("{other:?} is not etcd, consul or dns"),
                ));
            }
            None => return Err(ValidationError::new("discovery.kind", "is required")),
        };
        let service = self
            .service
            .clone()
            .ok_or_else(|| ValidationError::new("discovery.service", "is required"))?;
        Discovery {
            kind,
            service,
            include_warning: self.include_warning.unwrap_or(false),
            port: self.port,
        }
        .checked()
    }
}

impl DiscoveryKind {
    /// Its name in the API and the store.
    pub fn name(self) -> &'static str {
        match self {
            DiscoveryKind::Etcd => "etcd",
            DiscoveryKind::Consul => "consul",
            DiscoveryKind::Dns => "dns",
        }
    }
}

impl Discovery {
    /// This source, if its service is a valid name and its options apply to its kind.
    pub fn checked(self) -> Result<Self, ValidationError> {
        validate_name(&self.service)
            .map_err(|e| ValidationError::new("discovery.service", e.message))?;
        if self.include_warning && self.kind != DiscoveryKind::Consul {
            return Err(ValidationError::new(
                "discovery.include_warning",
                "applies to consul only",
            ));
        }
        match (self.kind, self.port) {
            (DiscoveryKind::Dns, None | Some(0)) => Err(ValidationError::new(
                "discovery.port",
                "is required for dns (1 to 65535): the port of every address the name has",
            )),
            (DiscoveryKind::Etcd | DiscoveryKind::Consul, Some(_)) => Err(ValidationError::new(
                "discovery.port",
                "applies to dns only (etcd and consul list each instance's port)",
            )),
            _ => Ok(self),
        }
    }
}

/// A validated service: layer 4 (a VIP balanced by XDP) or HTTP (a route on the `--http`
/// listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// None for an HTTP service.
    pub vip: Option<SocketAddrV4>,
    pub protocol: Protocol,
    /// With `discovery`: the instances found now.
    pub backends: Vec<SocketAddrV4>,
    /// Weights and states that are not the default (weight 1, active), by backend.
    pub backend_options: BTreeMap<SocketAddrV4, BackendOptions>,
    /// The Maglev table size of a layer-4 service (0 for HTTP).
    pub table_size: u32,
    pub hash: FlowHash,
    pub drain: Drain,
    pub forwarding: Forwarding,
    pub encap_source: EncapSource,
    /// The write that made this removed the backends it left out at once, without
    /// draining (`PUT ...?drain=false`). A property of the write, not of the service: not
    /// shown, but stored so that every node cuts them too.
    pub cut_removed: bool,
    pub discovery: Option<Discovery>,
    pub http: Option<HttpRoute>,
    pub check: Check,
}

/// As the API shows it and takes it back: `backends` items carry their options
/// (`backend_entry::to_value`), and fields that do not apply are left out.
impl Serialize for Service {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &self.name)?;
        if let Some(vip) = &self.vip {
            m.serialize_entry("vip", vip)?;
        }
        m.serialize_entry("protocol", &self.protocol)?;
        let backends: Vec<serde_json::Value> = self
            .backends
            .iter()
            .map(|&a| crate::backend_entry::to_value(a, &self.options(&a)))
            .collect();
        m.serialize_entry("backends", &backends)?;
        if self.table_size != 0 {
            m.serialize_entry("table_size", &self.table_size)?;
        }
        if !self.hash.is_default() {
            m.serialize_entry("hash", &self.hash)?;
        }
        if !Drain::is_default_timeout(&self.drain.timeout_s) {
            m.serialize_entry("drain_timeout_s", &self.drain.timeout_s)?;
        }
        if !Drain::is_default_on_down(&self.drain.on_down) {
            m.serialize_entry("on_down", &self.drain.on_down)?;
        }
        if !self.forwarding.is_default() {
            m.serialize_entry("forwarding", &self.forwarding)?;
        }
        if !self.encap_source.is_default() {
            m.serialize_entry("encap_source", &self.encap_source)?;
        }
        if let Some(d) = &self.discovery {
            m.serialize_entry("discovery", d)?;
        }
        if let Some(h) = &self.http {
            m.serialize_entry("http", h)?;
        }
        m.serialize_entry("check", &self.check)?;
        m.end()
    }
}

impl Service {
    /// The port checks go to when it is not the backend's own (and checks run).
    pub fn check_port(&self) -> Option<u16> {
        self.check
            .port
            .filter(|_| self.check.kind != CheckKind::None)
    }

    /// Backend `addr`'s weight and state.
    pub fn options(&self, addr: &SocketAddrV4) -> BackendOptions {
        self.backend_options.get(addr).copied().unwrap_or_default()
    }

    /// The VIP of a layer-4 service (validation guarantees one).
    pub fn l4_vip(&self) -> Option<SocketAddrV4> {
        self.vip.filter(|_| self.http.is_none())
    }

    /// This service with `found` as its backends: what its discovery source lists now,
    /// in order and once each, with the table size that follows their count.
    #[must_use]
    pub fn with_discovered(self, found: Vec<SocketAddrV4>) -> Self {
        let backends = discovered_backends(found);
        let table_size = match self.http {
            Some(_) => 0,
            None => discovered_table_size(backends.len()),
        };
        Self {
            backends,
            table_size,
            ..self
        }
    }

    /// This service, if it is one lb can serve: a VIP or an HTTP route (not both), its
    /// parts valid, backends listed once each (at least one unless discovery finds them)
    /// and a table that suits them.
    pub fn checked(self) -> Result<Self, ValidationError> {
        validate_name(&self.name)?;
        let http = self.http.map(HttpRoute::checked).transpose()?;
        let check = self.check.checked()?;
        match (&http, self.vip) {
            (None, Some(vip)) => {
                check_addr("vip", vip)?;
            }
            (None, None) => return Err(ValidationError::new("vip", "is required (or http)")),
            (Some(_), None) => {}
            (Some(_), Some(_)) => {
                return Err(ValidationError::new(
                    "vip",
                    "an http service is reached through the --http listener and has no vip",
                ));
            }
        }
        if http.is_some() && self.protocol != Protocol::Tcp {
            return Err(ValidationError::new(
                "protocol",
                format!("{:?} is not tcp", self.protocol.name()),
            ));
        }
        let discovery = self.discovery.map(Discovery::checked).transpose()?;
        if discovery.is_none() && self.backends.is_empty() {
            return Err(ValidationError::new(
                "backends",
                "must list at least one backend",
            ));
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(ValidationError::new(
                "backends",
                format!("at most {MAX_BACKENDS} backends"),
            ));
        }
        let mut seen = HashSet::new();
        for (i, &addr) in self.backends.iter().enumerate() {
            let field = format!("backends[{i}]");
            check_addr(&field, addr)?;
            if !seen.insert(addr) {
                return Err(ValidationError::new(
                    field,
                    format!("{addr} is listed twice"),
                ));
            }
        }
        if let Some(addr) = self
            .backend_options
            .keys()
            .find(|a| !self.backends.contains(a))
        {
            return Err(ValidationError::new(
                "backends",
                format!("options for {addr}, which is not a backend"),
            ));
        }
        if (http.is_some() || discovery.is_some())
            && let Some(i) = self
                .backends
                .iter()
                .position(|a| self.backend_options.contains_key(a))
        {
            return Err(ValidationError::new(
                format!("backends[{i}]"),
                "weight and state apply to listed backends of layer-4 services only",
            ));
        }
        let m = self.table_size;
        if http.is_some() && m != 0 {
            return Err(ValidationError::new(
                "table_size",
                "applies to layer-4 services only",
            ));
        }
        if http.is_none()
            && (!maglev::is_prime(m)
                || m > maglev::MAX_TABLE_SIZE
                || (m as usize) < self.backends.len())
        {
            return Err(ValidationError::new(
                "table_size",
                format!(
                    "must be a prime from the backend count up to {}",
                    maglev::MAX_TABLE_SIZE
                ),
            ));
        }
        if http.is_some() && self.drain != Drain::default() {
            return Err(ValidationError::new(
                "drain_timeout_s",
                "drain_timeout_s and on_down apply to layer-4 services only",
            ));
        }
        let drain = self.drain.checked()?;
        Ok(Self {
            http,
            check,
            discovery,
            drain,
            ..self
        })
    }
}

pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            "name",
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ValidationError::new(
            "name",
            "may hold only letters, digits, '-', '_' and '.'",
        ));
    }
    // `.` and `..` would name a directory in a file path or a key path, and a leading dot
    // a hidden file: a name is one plain path segment.
    if name.starts_with('.') {
        return Err(ValidationError::new("name", "may not start with '.'"));
    }
    Ok(())
}

fn parse_addr(field: &str, value: &str) -> Result<SocketAddrV4, ValidationError> {
    let addr: SocketAddrV4 = value.parse().map_err(|_| {
        ValidationError::new(
            field,
            format!("{value:?} is not an IPv4 address with a port (like 10.0.0.1:80)"),
        )
    })?;
    check_addr(field, addr)
}

/// `addr`, if lb can send to it.
fn check_addr(field: &str, addr: SocketAddrV4) -> Result<SocketAddrV4, ValidationError> {
    if addr.port() == 0 {
        return Err(ValidationError::new(field, "port 0 is not allowed"));
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(ValidationError::new(field, format!("{ip} cannot be used")));
    }
    Ok(addr)
}

impl ServiceSpec {
    /// Validates a new service (its table gets the default size).
    pub fn validate(self, name: &str) -> Result<Service, ValidationError> {
        self.validate_after(name, None)
    }

    /// Validates a service that replaces `previous` (if any): unless `table_size` is given,
    /// the table keeps its size while that still suits the backend count (see
    /// [`table_size_after`]).
    pub fn validate_after(
        self,
        name: &str,
        previous: Option<&Service>,
    ) -> Result<Service, ValidationError> {
        validate_name(name)?;
        let http = self.http.as_ref().map(HttpSpec::validate).transpose()?;
        let check = self.check.as_ref().map(CheckSpec::validate).transpose()?;
        let vip = match (&http, self.vip.as_deref()) {
            (None, Some(v)) => Some(parse_addr("vip", v)?),
            (None, None) => {
                return Err(ValidationError::new("vip", "is required (or http)"));
            }
            (Some(_), None) => None,
            (Some(_), Some(_)) => {
                return Err(ValidationError::new(
                    "vip",
                    "an http service is reached through the --http listener and has no vip",
                ));
            }
        };
        let protocol = match self.protocol.as_deref().unwrap_or("tcp") {
            "tcp" => Protocol::Tcp,
            "udp" if http.is_none() => Protocol::Udp,
            other => {
                return Err(ValidationError::new(
                    "protocol",
                    format!(
                        "{other:?} is not {}",
                        if http.is_some() { "tcp" } else { "tcp or udp" }
                    ),
                ));
            }
        };
        if http.is_some() && self.table_size.is_some() {
            return Err(ValidationError::new(
                "table_size",
                "applies to layer-4 services only",
            ));
        }
        let hash = match (&http, self.hash.as_deref()) {
            (_, None) => FlowHash::default(),
            (None, Some(h)) => FlowHash::parse(h)?,
            (Some(_), Some(_)) => {
                return Err(ValidationError::new(
                    "hash",
                    "applies to layer-4 services only",
                ));
            }
        };
        let drain = Drain::from_fields(
            self.drain_timeout_s,
            self.on_down.as_deref(),
            http.is_none(),
        )?;
        let (forwarding, encap_source) = Forwarding::from_fields(
            self.forwarding.as_deref(),
            self.encap_source.as_deref(),
            http.is_none(),
        )?;
        let discovery = self
            .discovery
            .as_ref()
            .map(DiscoverySpec::validate)
            .transpose()?;
        let backends = if discovery.is_some() {
            if self.backends.is_some() {
                return Err(ValidationError::new(
                    "backends",
                    "give backends or discovery, not both",
                ));
            }
            if self.table_size.is_some() {
                return Err(ValidationError::new(
                    "table_size",
                    "follows the instance count when backends come from discovery",
                ));
            }
            // Filled in below, from what the source lists.
            (Vec::new(), BTreeMap::new())
        } else {
            self.listed_backends()?
        };
        let (backends, backend_options) = backends;
        let check = check.unwrap_or_else(|| Check::default_for(protocol));
        let table_size = if http.is_some() || discovery.is_some() {
            0
        } else {
            self.table_size
                .unwrap_or_else(|| table_size_after(previous.map(|p| p.table_size), backends.len()))
        };
        let service = Service {
            name: name.to_string(),
            vip,
            protocol,
            backends,
            backend_options,
            table_size,
            hash,
            drain,
            forwarding,
            encap_source,
            cut_removed: self.cut_removed && http.is_none(),
            discovery,
            http,
            check,
        };
        match service.discovery {
            Some(_) => service.with_discovered(self.discovered.clone().unwrap_or_default()),
            None => service,
        }
        .checked()
    }

    /// The `backends` list given, parsed, with the options of those given as objects (the
    /// list itself is checked with the service).
    #[allow(clippy::type_complexity)]
    fn listed_backends(
        &self,
    ) -> Result<(Vec<SocketAddrV4>, BTreeMap<SocketAddrV4, BackendOptions>), ValidationError> {
        let raw = self
            .backends
            .as_deref()
            .ok_or_else(|| ValidationError::new("backends", "is required (or discovery)"))?;
        if raw.len() > MAX_BACKENDS {
            return Err(ValidationError::new(
                "backends",
                format!("at most {MAX_BACKENDS} backends"),
            ));
        }
        let mut backends = Vec::with_capacity(raw.len());
        let mut options = BTreeMap::new();
        for (i, item) in raw.iter().enumerate() {
            let (addr, o) = crate::backend_entry::parse(i, item, parse_addr)?;
            backends.push(addr);
            if !o.is_default() {
                options.insert(addr, o);
            }
        }
        Ok((backends, options))
    }
}

/// The backends of a service whose discovery source lists `found`: in order, once each.
/// Instances come and go; none at all is a service whose requests fail (and are counted)
/// until one registers.
pub fn discovered_backends(mut found: Vec<SocketAddrV4>) -> Vec<SocketAddrV4> {
    found.sort();
    found.dedup();
    found.truncate(MAX_BACKENDS);
    found
}

/// The table size of a service whose backends come from discovery, `found` of them now.
/// Every node must build the same table from the same instances, whatever order of
/// changes it saw: the size follows the count only.
pub fn discovered_table_size(found: usize) -> u32 {
    maglev::default_table_size(found.max(1))
}

/// The table size of a service with `backends` backends that had `previous`. A size that
/// still gives every backend its 100 slots, and is no more than 4 times the default, is
/// kept: a table re-deals every slot when its size changes, so removing backends then
/// moves only theirs, and adding them re-deals the table only when it must grow.
pub fn table_size_after(previous: Option<u32>, backends: usize) -> u32 {
    let default = maglev::default_table_size(backends);
    match previous {
        Some(size)
            if size as u64 >= backends as u64 * maglev::SLOTS_PER_BACKEND as u64
                && size as u64 <= default as u64 * 4 =>
        {
            size
        }
        _ => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vip: &str, proto: &str, backends: &[&str]) -> ServiceSpec {
        ServiceSpec {
            vip: Some(vip.into()),
            protocol: Some(proto.into()),
            backends: Some(backends.iter().map(|&b| b.into()).collect()),
            ..ServiceSpec::default()
        }
    }

    fn field_of(r: Result<Service, ValidationError>) -> String {
        r.unwrap_err().field
    }

    #[test]
    fn a_good_spec_validates() {
        let s = spec(
            "10.0.0.100:80",
            "tcp",
            &["10.0.1.11:8080", "10.0.1.12:8080"],
        )
        .validate("web")
        .unwrap();
        assert_eq!(s.vip, Some("10.0.0.100:80".parse().unwrap()));
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.table_size, 251);
    }

    #[test]
    fn a_table_keeps_its_size_while_it_suits() {
        // Growing past 100 slots a backend takes the next size; shrinking keeps it.
        assert_eq!(table_size_after(None, 2), 251);
        assert_eq!(table_size_after(Some(251), 3), 509);
        assert_eq!(table_size_after(Some(509), 2), 509);
        assert_eq!(table_size_after(Some(509), 1), 509);
        assert_eq!(
            table_size_after(Some(4093), 1),
            251,
            "far too large for one backend"
        );
        assert_eq!(table_size_after(Some(65537), 700), 65537);
        let prev = spec(
            "10.0.0.100:80",
            "tcp",
            &["10.0.1.1:1", "10.0.1.2:1", "10.0.1.3:1"],
        )
        .validate("a")
        .unwrap();
        assert_eq!(prev.table_size, 509);
        let next = spec("10.0.0.100:80", "tcp", &["10.0.1.1:1", "10.0.1.2:1"])
            .validate_after("a", Some(&prev))
            .unwrap();
        assert_eq!(next.table_size, 509);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(
            field_of(spec("10.0.0.100", "tcp", &["10.0.1.1:1"]).validate("a")),
            "vip"
        );
        assert_eq!(
            field_of(spec("10.0.0.100:0", "tcp", &["10.0.1.1:1"]).validate("a")),
            "vip"
        );
        assert_eq!(
            field_of(spec("10.0.0.100:80", "sctp", &["10.0.1.1:1"]).validate("a")),
            "protocol"
        );
        assert_eq!(
            field_of(spec("10.0.0.100:80", "tcp", &[]).validate("a")),
            "backends"
        );
        assert_eq!(
            field_of(spec("10.0.0.100:80", "tcp", &["10.0.1.1:1", "nope"]).validate("a")),
            "backends[1]"
        );
        assert_eq!(
            field_of(spec("10.0.0.100:80", "tcp", &["10.0.1.1:1", "10.0.1.1:1"]).validate("a")),
            "backends[1]"
        );
        assert_eq!(
            field_of(spec("10.0.0.100:80", "tcp", &["10.0.1.1:1"]).validate(&"x".repeat(64))),
            "name"
        );
        assert_eq!(
            field_of(spec("10.0.0.100:80", "tcp", &["10.0.1.1:1"]).validate("a/b")),
            "name"
        );
        let mut s = spec("10.0.0.100:80", "tcp", &["10.0.1.1:1"]);
        s.table_size = Some(1000);
        assert_eq!(field_of(s.validate("a")), "table_size");
    }

    #[test]
    fn a_layer_4_service_is_hashed_by_its_5_tuple_or_its_clients_address() {
        let plain = spec("10.0.0.100:80", "tcp", &["10.0.1.1:1"]);
        let svc = plain.clone().validate("a").unwrap();
        assert_eq!(svc.hash, FlowHash::FiveTuple);
        assert!(serde_json::to_value(&svc).unwrap().get("hash").is_none());
        let mut sticky = plain.clone();
        sticky.hash = Some("src_ip".into());
        let svc = sticky.validate("a").unwrap();
        assert_eq!(svc.hash, FlowHash::SrcIp);
        assert_eq!(serde_json::to_value(&svc).unwrap()["hash"], "src_ip");
        let mut bad = plain;
        bad.hash = Some("source".into());
        let e = bad.validate("a").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.contains("5tuple or src_ip")),
            ("hash", true)
        );
        let http: ServiceSpec = serde_json::from_value(serde_json::json!({
            "backends": ["10.0.1.1:80"], "http": {"paths": ["/a"]}, "hash": "src_ip"
        }))
        .unwrap();
        assert_eq!(field_of(http.validate("a")), "hash");
    }

    #[test]
    fn the_drain_policy_is_shown_and_taken_back_when_not_the_default() {
        let plain = spec("10.0.0.100:80", "tcp", &["10.0.1.1:1"]);
        let svc = plain.clone().validate("a").unwrap();
        assert_eq!(svc.drain, Drain::default());
        let shown = serde_json::to_value(&svc).unwrap();
        assert!(shown.get("drain_timeout_s").is_none() && shown.get("on_down").is_none());
        let mut quick = plain;
        quick.drain_timeout_s = Some(10);
        quick.on_down = Some("shutdown".into());
        let svc = quick.validate("a").unwrap();
        let shown = serde_json::to_value(&svc).unwrap();
        assert_eq!(
            (&shown["drain_timeout_s"], &shown["on_down"]),
            (&10.into(), &"shutdown".into())
        );
        let back: ServiceSpec = serde_json::from_value(
            shown
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "name")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
        .unwrap();
        assert_eq!(back.validate("a").unwrap(), svc);
        let http: ServiceSpec = serde_json::from_value(serde_json::json!({
            "backends": ["10.0.1.1:80"], "http": {"paths": ["/a"]}, "on_down": "shutdown"
        }))
        .unwrap();
        assert_eq!(field_of(http.validate("a")), "on_down");
    }

    #[test]
    fn dot_names_are_no_service_names() {
        for name in [".", "..", ".hidden", "..."] {
            let e = validate_name(name).unwrap_err();
            assert_eq!(e.field, "name", "{name}");
        }
        validate_name("a.b").unwrap();
        validate_name("a..b").unwrap();
        validate_name("a.").unwrap();
    }

    fn discovered(kind: &str, found: &[&str]) -> ServiceSpec {
        ServiceSpec {
            vip: Some("10.0.0.100:80".into()),
            discovery: Some(DiscoverySpec {
                kind: Some(kind.into()),
                service: Some("web".into()),
                ..DiscoverySpec::default()
            }),
            discovered: Some(found.iter().map(|a| a.parse().unwrap()).collect()),
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn methods_are_upper_cased_and_must_be_methods() {
        let spec = |allowed: &[&str]| HttpSpec {
            paths: Some(vec!["/r".into()]),
            allowed_methods: Some(allowed.iter().map(|m| (*m).to_string()).collect()),
            ..HttpSpec::default()
        };
        let route = spec(&["get", "GET", " head "]).validate().unwrap();
        assert_eq!(route.allowed_methods, ["GET", "HEAD"]);
        let e = spec(&["GET", "GE T"]).validate().unwrap_err();
        assert_eq!(e.field, "http.allowed_methods[1]");
        assert_eq!(
            spec(&[""]).validate().unwrap_err().field,
            "http.allowed_methods[0]"
        );
    }

    #[test]
    fn a_domain_is_one_name_or_a_list_and_reads_as_stored_before_lists() {
        let spec: HttpSpec = serde_json::from_str(r#"{"domain": " Shop.Example.com "}"#).unwrap();
        let route = spec.validate().unwrap();
        assert_eq!(route.domains, ["shop.example.com"]);
        // One domain is written as the string it always was.
        let json = serde_json::to_value(&route).unwrap();
        assert_eq!(json["domain"], "shop.example.com");
        let back: HttpRoute = serde_json::from_value(json).unwrap();
        assert_eq!(back, route);

        let spec: HttpSpec = serde_json::from_str(
            r#"{"domain": ["a.example.com", "*.example.net", "*example.org", "a.example.com"]}"#,
        )
        .unwrap();
        let route = spec.validate().unwrap();
        assert_eq!(
            route.domains,
            ["a.example.com", "*.example.net", "*example.org"]
        );
        let json = serde_json::to_value(&route).unwrap();
        assert_eq!(json["domain"][2], "*example.org");
        assert_eq!(serde_json::from_value::<HttpRoute>(json).unwrap(), route);

        let bad = |domains: &[&str]| {
            HttpSpec {
                domain: Some(domains.iter().map(|d| (*d).to_string()).collect()),
                ..HttpSpec::default()
            }
            .validate()
            .unwrap_err()
            .field
        };
        assert_eq!(bad(&["a b"]), "http.domain");
        assert_eq!(bad(&["ok.com", "*"]), "http.domain[1]");
        assert_eq!(bad(&["ok.com", "**.com"]), "http.domain[1]");
    }

    #[test]
    fn redirects_and_acme_need_plain_names() {
        let spec = |domains: &[&str]| HttpSpec {
            domain: Some(domains.iter().map(|d| (*d).to_string()).collect()),
            redirect_from: Some(vec!["www.a.com".into()]),
            ..HttpSpec::default()
        };
        assert!(spec(&["a.com", "*.a.com"]).validate().is_ok());
        assert_eq!(
            spec(&["*a.com", "a.com"]).validate().unwrap_err().field,
            "http.redirect_from[0]"
        );
        let acme = |domains: &[&str]| HttpSpec {
            domain: Some(domains.iter().map(|d| (*d).to_string()).collect()),
            tls: Some(RouteTls { acme: true }),
            ..HttpSpec::default()
        };
        assert!(acme(&["a.com", "b.com"]).validate().is_ok());
        assert_eq!(
            acme(&["a.com", "*b.com"]).validate().unwrap_err().field,
            "http.tls.acme"
        );
    }

    #[test]
    fn a_route_s_own_timeouts_are_bounded_and_a_passthrough_has_no_server_timeout() {
        let spec = |server: Option<u64>, tunnel: Option<u64>| HttpSpec {
            paths: Some(vec!["/r".into()]),
            server_timeout_ms: server,
            tunnel_timeout_ms: tunnel,
            ..HttpSpec::default()
        };
        assert!(spec(Some(1), Some(MAX_ROUTE_TIMEOUT_MS)).validate().is_ok());
        let field = |s: HttpSpec| s.validate().unwrap_err().field;
        assert_eq!(field(spec(Some(0), None)), "http.server_timeout_ms");
        assert_eq!(
            field(spec(None, Some(MAX_ROUTE_TIMEOUT_MS + 1))),
            "http.tunnel_timeout_ms"
        );
        let pass = |server: Option<u64>| HttpSpec {
            domain: Some(vec!["db.test".into()]),
            tls_passthrough: Some(true),
            server_timeout_ms: server,
            tunnel_timeout_ms: Some(1000),
            ..HttpSpec::default()
        };
        assert!(pass(None).validate().is_ok());
        assert_eq!(field(pass(Some(1000))), "http.tls_passthrough");
    }

    #[test]
    fn a_route_s_own_port_is_served_in_the_clear_only() {
        let on = |port: u16, edit: fn(&mut HttpSpec)| {
            let mut spec = HttpSpec {
                paths: Some(vec!["/r".into()]),
                port: Some(port),
                ..HttpSpec::default()
            };
            edit(&mut spec);
            spec.validate()
        };
        assert_eq!(on(8081, |_| {}).unwrap().port, Some(8081));
        let refused = |r: Result<HttpRoute, ValidationError>| r.unwrap_err().field;
        assert_eq!(refused(on(0, |_| {})), "http.port");
        assert_eq!(
            refused(on(8081, |s| s.https_only = Some(true))),
            "http.port"
        );
        assert_eq!(refused(on(8081, |s| s.deny_http = Some(true))), "http.port");
        let passthrough = on(8443, |s| {
            s.paths = None;
            s.domain = Some(vec!["db.test".into()]);
            s.tls_passthrough = Some(true);
        });
        assert_eq!(refused(passthrough), "http.port");
    }

    #[test]
    fn a_dns_source_needs_its_port_and_the_others_take_none() {
        let spec = |kind: &str, port: Option<u16>| DiscoverySpec {
            kind: Some(kind.into()),
            service: Some("tasks.web".into()),
            port,
            ..DiscoverySpec::default()
        };
        let dns = spec("dns", Some(8080)).validate().unwrap();
        assert_eq!((dns.kind, dns.port), (DiscoveryKind::Dns, Some(8080)));
        for bad in [
            spec("dns", None),
            spec("dns", Some(0)),
            spec("etcd", Some(8080)),
        ] {
            assert_eq!(bad.validate().unwrap_err().field, "discovery.port");
        }
        // `name` is `service`'s other spelling.
        let named: DiscoverySpec =
            serde_json::from_str(r#"{"kind": "dns", "name": "tasks.web", "port": 80}"#).unwrap();
        assert_eq!(named.service.as_deref(), Some("tasks.web"));
    }

    #[test]
    fn discovered_backends_are_sorted_and_sized_by_count_alone() {
        let s = discovered("etcd", &["10.0.1.2:80", "10.0.1.1:80", "10.0.1.2:80"])
            .validate("a")
            .unwrap();
        assert_eq!(
            s.backends,
            [
                "10.0.1.1:80".parse().unwrap(),
                "10.0.1.2:80".parse().unwrap()
            ]
        );
        assert_eq!(s.table_size, maglev::default_table_size(2));
        // No instance yet is a valid service (its packets are dropped and counted).
        assert!(
            discovered("consul", &[])
                .validate("a")
                .unwrap()
                .backends
                .is_empty()
        );
        // The same instances give the same table size whatever came before.
        let big = discovered("etcd", &["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"])
            .validate("a")
            .unwrap();
        let after = discovered("etcd", &["10.0.1.1:80", "10.0.1.2:80"])
            .validate_after("a", Some(&big))
            .unwrap();
        assert_eq!(after.table_size, s.table_size);
    }

    #[test]
    fn bad_discovery_fields_are_named() {
        assert_eq!(
            field_of(discovered("zookeeper", &[]).validate("a")),
            "discovery.kind"
        );
        let mut s = discovered("etcd", &[]);
        s.discovery.as_mut().unwrap().service = Some("a/b".into());
        assert_eq!(field_of(s.validate("a")), "discovery.service");
        let mut s = discovered("etcd", &[]);
        s.discovery.as_mut().unwrap().include_warning = Some(true);
        assert_eq!(field_of(s.validate("a")), "discovery.include_warning");
        let mut s = discovered("etcd", &[]);
        s.backends = Some(vec!["10.0.1.1:1".into()]);
        assert_eq!(field_of(s.validate("a")), "backends");
    }

    #[test]
    fn weighted_and_draining_backends_are_kept_and_shown_as_given() {
        let mut s = spec("10.0.0.1:80", "tcp", &["10.0.1.1:80"]);
        s.backends.as_mut().unwrap().extend([
            serde_json::json!({"address": "10.0.1.2:80", "weight": 3}),
            serde_json::json!({"address": "10.0.1.3:80", "weight": 2, "state": "draining"}),
        ]);
        let svc = s.validate("web").unwrap();
        assert_eq!(svc.options(&"10.0.1.1:80".parse().unwrap()).weight, 1);
        assert_eq!(svc.options(&"10.0.1.2:80".parse().unwrap()).weight, 3);
        assert_eq!(
            svc.options(&"10.0.1.3:80".parse().unwrap()).table_weight(),
            0
        );
        let shown = serde_json::to_value(&svc).unwrap();
        assert_eq!(
            shown["backends"],
            serde_json::json!([
                "10.0.1.1:80",
                {"address": "10.0.1.2:80", "weight": 3},
                {"address": "10.0.1.3:80", "weight": 2, "state": "draining"},
            ])
        );
        // What GET shows, PUT takes back unchanged.
        let mut shown = shown;
        shown.as_object_mut().unwrap().remove("name");
        let again: ServiceSpec = serde_json::from_value(shown).unwrap();
        assert_eq!(again.validate("web").unwrap(), svc);
    }

    #[test]
    fn weights_apply_to_layer4_services_only() {
        let mut s = spec("10.0.0.1:80", "tcp", &[]);
        s.vip = None;
        s.backends = Some(vec![
            serde_json::json!({"address": "10.0.1.2:80", "weight": 3}),
        ]);
        s.http = Some(HttpSpec {
            paths: Some(vec!["/demo".into()]),
            ..HttpSpec::default()
        });
        let e = s.validate("web").unwrap_err();
        assert_eq!(e.field, "backends[0]", "{e}");
    }
}
