//! Header rewriting in both directions: hop-by-hop headers stay on their hop, and the
//! backend learns who asked and how (X-Forwarded-*).
//!
//! What a client says about who it forwards for is believed only from the proxies
//! `--trusted-proxies` names: from them X-Forwarded-For is kept and lb's peer appended, and
//! X-Forwarded-Proto/-Host, X-Forwarded-Port, X-Real-IP and Forwarded pass. From anyone
//! else X-Forwarded-For, -Proto and -Host are replaced by what lb saw, and the others
//! removed, since lb cannot vouch for them and a backend may take them for the client.
use std::net::IpAddr;

use ipnet::IpNet;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, Entry, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE},
};

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a request asks to switch protocols (`Connection: upgrade` with an `Upgrade`).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(token)))
}

fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop headers: those `Connection` names, and the standard ones. With
/// `upgrade`, `Upgrade` stays and `Connection: upgrade` is set again (a protocol switch is
/// the one hop-by-hop exchange a proxy forwards).
/// Whether the client said it takes trailers (`TE: trailers`, as gRPC clients do).
pub(crate) fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    })
}

/// Makes `parts` an HTTP/2 request to `backend`: absolute URI (HTTP/2 sends the scheme
/// and the authority as pseudo-headers: the Host, else the backend's address), no Host
/// header, `TE: trailers` when the client asked for trailers.
pub(crate) fn to_h2_request(
    parts: &mut http::request::Parts,
    backend: &super::backend::Backend,
    trailers: bool,
) -> Result<(), String> {
    let authority = match parts.headers.remove(http::header::HOST) {
        Some(host) => host
            .to_str()
            .map_err(|_| "a Host that is not text\n".to_string())?
            .to_string(),
        None => backend.addr.to_string(),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let scheme = if backend.is_tls() { "https" } else { "http" };
    parts.uri = format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|_| format!("the Host {authority:?} cannot be sent to an HTTP/2 backend\n"))?;
    parts.version = http::Version::HTTP_2;
    if trailers {
        parts
            .headers
            .insert(TE, HeaderValue::from_static("trailers"));
    }
    Ok(())
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the few names there are beats a lookup per hop-by-hop name, and most
    // messages have none.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        // Values are cheap to clone (shared bytes); the Vec is only paid when Connection
        // is there at all.
        let named: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
        for value in &named {
            for token in tokens(value) {
                // Host is end-to-end whatever a client says; the backend needs it.
                let keep = token.eq_ignore_ascii_case("host")
                    || (upgrade && token.eq_ignore_ascii_case("upgrade"));
                if !keep {
                    headers.remove(token);
                }
            }
        }
        headers.remove(CONNECTION);
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

static HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// The clients whose forwarding headers are believed (`--trusted-proxies`); none by
/// default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        Self(nets.into_iter().map(|n| n.trunc()).collect())
    }

    /// Whether a connection from `ip` comes from a trusted proxy. An IPv4 client seen on
    /// an IPv6 socket (`::ffff:a.b.c.d`) is matched as the IPv4 address it is.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Parses one `--trusted-proxies` entry: a CIDR block, or an address alone (a /32 or
/// /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or a CIDR block (like 10.0.0.0/8)"))
}

/// Adds the X-Forwarded-* headers to a request about to leave for a backend. `client` is
/// the client's address as a header value (made once per connection); `trusted` whether
/// that client is a proxy whose forwarding headers are believed.
pub(crate) fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    trusted: bool,
    https: bool,
) {
    let proto = HeaderValue::from_static(if https { "https" } else { "http" });
    if !trusted {
        headers.insert(X_FORWARDED_FOR, client.clone());
        headers.insert(X_FORWARDED_PROTO, proto);
        set_forwarded_host(headers);
        for name in [X_FORWARDED_PORT, X_REAL_IP, FORWARDED] {
            headers.remove(name);
        }
        return;
    }
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            e.insert(client.clone());
        }
        Entry::Occupied(mut e) => {
            // Append to what earlier proxies wrote, folding repeated headers into one.
            let mut joined = Vec::with_capacity(64);
            for value in e.iter() {
                joined.extend_from_slice(value.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client.as_bytes());
            let value = HeaderValue::from_bytes(&joined).unwrap_or_else(|_| client.clone());
            e.insert(value);
        }
    }
    // The trusted proxy knows better how the client came (it may have ended TLS).
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, proto);
    }
    if !headers.contains_key(X_FORWARDED_HOST) {
        set_forwarded_host(headers);
    }
}

fn set_forwarded_host(headers: &mut HeaderMap) {
    match headers.get(HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_go_with_what_connection_names() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
            ("host", "h"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(http::HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-kept"]);
    }

    #[test]
    fn upgrade_keeps_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, x-a"),
            ("upgrade", "websocket"),
            ("x-a", "1"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-a"));
    }

    fn claimed() -> HeaderMap {
        map(&[
            ("host", "example.com"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "front.example"),
            ("x-forwarded-port", "443"),
            ("x-real-ip", "1.1.1.1"),
            ("forwarded", "for=1.1.1.1"),
        ])
    }

    #[test]
    fn a_trusted_proxy_keeps_its_headers_and_lb_appends() {
        let client = HeaderValue::from_static("10.0.0.1");
        let mut h = claimed();
        add_forwarded(&mut h, &client, true, false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "front.example");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(h["x-real-ip"], "1.1.1.1");
        assert_eq!(h["forwarded"], "for=1.1.1.1");

        let mut h = map(&[("host", "example.com")]);
        add_forwarded(&mut h, &client, true, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }

    #[test]
    fn anyone_else_gets_what_lb_saw() {
        let client = HeaderValue::from_static("10.0.0.1");
        let mut h = claimed();
        add_forwarded(&mut h, &client, false, false);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        for gone in ["x-forwarded-port", "x-real-ip", "forwarded"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        let mut h = map(&[("x-forwarded-host", "evil.example")]);
        add_forwarded(&mut h, &client, false, false);
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn a_client_over_tls_is_told_as_https() {
        let client = HeaderValue::from_static("10.0.0.1");
        let mut h = map(&[("x-forwarded-proto", "http")]);
        add_forwarded(&mut h, &client, false, true);
        assert_eq!(h["x-forwarded-proto"], "https");
        // A trusted proxy's own word stands; without one, what lb saw.
        let mut h = map(&[("x-forwarded-proto", "http")]);
        add_forwarded(&mut h, &client, true, true);
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = map(&[]);
        add_forwarded(&mut h, &client, true, true);
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn trusted_proxies_match_by_cidr() {
        let nets = ["10.1.0.0/16", "192.0.2.7", "2001:db8::/32", "172.16.5.9/12"];
        let trusted = TrustedProxies::new(nets.iter().map(|n| parse_cidr(n).unwrap()));
        for ip in [
            "10.1.2.3",
            "192.0.2.7",
            "2001:db8::1",
            "::ffff:10.1.0.1",
            "172.31.0.1",
        ] {
            assert!(trusted.trusts(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.2.0.1", "192.0.2.8", "2001:db9::1", "::1"] {
            assert!(!trusted.trusts(ip.parse().unwrap()), "{ip}");
        }
        assert!(!TrustedProxies::default().trusts("127.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "", "10.0.0/8"] {
            let e = parse_cidr(bad).unwrap_err();
            assert!(e.contains("CIDR"), "{e}");
        }
    }
}
