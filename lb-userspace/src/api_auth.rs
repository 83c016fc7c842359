//! Who may call the API, and from where. The API decides where every VIP's traffic goes, so:
//!
//! - with `--api-token-file`, every call that changes something (and, unless
//!   `--api-read-open`, every read) must carry the token, as `Authorization: Bearer TOKEN` or
//!   as the password of basic auth (DFP-style `http://user:TOKEN@host/...` URLs);
//! - without one the API serves loopback (or a Unix socket) only, unless `--api-insecure`;
//! - every call that changes something, token or not, is refused when a browser sent it for
//!   another site (`Sec-Fetch-Site`, `Origin`) or under a `Host` the API does not answer to
//!   (DNS rebinding): a page in a browser on the host must not reconfigure lb, and a browser
//!   that cached the basic-auth password would otherwise send it along;
//! - `/health` and `/ready` are always open (liveness probes).
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    path::Path,
    str::FromStr,
    sync::Arc,
};

use anyhow::bail;
use axum::{
    Json,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header, uri::Authority},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine;
use serde_json::json;
use subtle::ConstantTimeEq;

/// The API token. Its bytes are never printed.
#[derive(Clone)]
pub struct ApiToken(Vec<u8>);

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// The token in `path` (surrounding whitespace ignored). The file must be a regular file
    /// that only its owner can read (mode 0600 or 0400), and hold a token that can be sent
    /// in a header: printable ASCII without spaces.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let bytes = crate::secret_file::read("--api-token-file", path)?;
        let Ok(text) = String::from_utf8(bytes) else {
            bail!("--api-token-file {}: not UTF-8 text", path.display());
        };
        let token = text.trim();
        if token.is_empty() {
            bail!("--api-token-file {}: the file is empty", path.display());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "--api-token-file {}: the token must be printable ASCII without spaces (for example `openssl rand -hex 32`)",
                path.display()
            );
        }
        Ok(Self(token.as_bytes().to_vec()))
    }

    pub fn new(token: &str) -> Self {
        Self(token.as_bytes().to_vec())
    }

    /// Whether `given` is the token, in time that does not depend on where they differ.
    fn matches(&self, given: &[u8]) -> bool {
        self.0.ct_eq(given).into()
    }
}

/// The rules the API applies to each request.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// `--api-token-file`.
    pub token: Option<ApiToken>,
    /// `--api-read-open`: reads need no token.
    pub read_open: bool,
    /// `--api-host`: DNS names the API answers to besides IP literals and `localhost`
    /// (lowercase).
    pub hosts: Vec<String>,
}

/// What a request does, for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `/health` and `/ready`: open to all.
    Probe,
    /// A GET that changes nothing.
    Read,
    /// Anything else, the DFP's `reconfigure` and `remove` GETs included.
    Change,
}

fn kind_of(method: &Method, path: &str) -> Kind {
    if path == "/health" || path == "/ready" {
        return Kind::Probe;
    }
    if method != Method::GET && method != Method::HEAD {
        return Kind::Change;
    }
    let one_of = |dir: &str| {
        path.strip_prefix(dir)
            .is_some_and(|name| !name.is_empty() && !name.contains('/'))
    };
    // A certificate's chain is public (every handshake sends it); its key is never shown.
    let read = one_of("/v1/services/")
        || one_of("/v1/certs/")
        || matches!(
            path,
            "/v1/services"
                | "/v1/certs"
                | "/v1/stats"
                | "/metrics"
                | "/v1/docker-flow-proxy/config"
                | "/v1/docker-flow-proxy/certs"
                | "/v1/docker-flow-proxy/ping"
        );
    if read { Kind::Read } else { Kind::Change }
}

/// A refused request: its status, why, and the header at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    status: StatusCode,
    message: String,
    field: &'static str,
}

fn forbidden(field: &'static str, message: String) -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        message,
        field,
    }
}

impl AccessPolicy {
    /// Whether a request may go on to the handlers.
    pub fn check(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        match kind_of(method, uri.path()) {
            Kind::Probe => Ok(()),
            Kind::Read if self.read_open => Ok(()),
            Kind::Read => self.check_token(headers),
            Kind::Change => {
                self.check_browser(uri, headers)?;
                self.check_token(headers)
            }
        }
    }

    fn check_token(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let unauthorized = |message: &str| Refusal {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_string(),
            field: "Authorization",
        };
        match credential(headers) {
            None => Err(unauthorized(
                "this call needs the API token: send `Authorization: Bearer TOKEN`, or basic auth with the token as password",
            )),
            Some(given) if token.matches(&given) => Ok(()),
            Some(_) => Err(unauthorized("the API token sent is not the right one")),
        }
    }

    /// The browser guards: refuses what a browser sent on behalf of another site, and
    /// requests for a host name the API does not answer to.
    fn check_browser(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = request_host(uri, headers)?;
        if let Some(host) = &host
            && !self.host_allowed(host)
        {
            return Err(forbidden(
                "Host",
                format!(
                    "Host {host:?} is not a name this API answers to: an IP address, localhost, or one given with --api-host"
                ),
            ));
        }
        if let Some(site) = single(headers, "sec-fetch-site")? {
            let site = site.trim().to_ascii_lowercase();
            if site != "same-origin" && site != "none" {
                return Err(forbidden(
                    "Sec-Fetch-Site",
                    format!("Sec-Fetch-Site is {site:?}: a browser sent this for another site"),
                ));
            }
        }
        if let Some(origin) = single(headers, "origin")?
            && !host.as_ref().is_some_and(|h| same_origin(origin, h))
        {
            return Err(forbidden(
                "Origin",
                format!(
                    "Origin {origin:?} is not this API's host: a page of another site sent this"
                ),
            ));
        }
        Ok(())
    }

    /// An IP literal, `localhost`, or a name given with `--api-host`; any port.
    fn host_allowed(&self, host: &Authority) -> bool {
        let name = host.host();
        let ip = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
            None => name.parse::<IpAddr>().is_ok(),
        };
        ip || name.eq_ignore_ascii_case("localhost")
            || self.hosts.iter().any(|h| name.eq_ignore_ascii_case(h))
    }
}

/// The value of a header that may appear at most once.
fn single<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, Refusal> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(forbidden(
            field_name(name),
            format!("{} given more than once", field_name(name)),
        ));
    }
    first
        .map(|v| {
            v.to_str().map_err(|_| {
                forbidden(
                    field_name(name),
                    format!("{} is not text", field_name(name)),
                )
            })
        })
        .transpose()
}

fn field_name(header: &str) -> &'static str {
    match header {
        "host" => "Host",
        "origin" => "Origin",
        _ => "Sec-Fetch-Site",
    }
}

/// The host the request was sent to: its `Host` header, or the authority of its target
/// (h2's `:authority`, or an absolute-form target), which must then agree. None when the
/// request names none (an HTTP/1.0 client): no browser sends such a request, so it is let
/// through.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Result<Option<Authority>, Refusal> {
    let parse = |s: &str| {
        Authority::from_str(s)
            .ok()
            .filter(host_and_port)
            .ok_or_else(|| forbidden("Host", format!("Host {s:?} is not HOST[:PORT]")))
    };
    let header = single(headers, "host")?.map(parse).transpose()?;
    match (header, uri.authority()) {
        (Some(h), Some(target)) if !h.as_str().eq_ignore_ascii_case(target.as_str()) => {
            Err(forbidden(
                "Host",
                format!("Host {h} and the request's target {target} differ"),
            ))
        }
        (Some(h), _) => Ok(Some(h)),
        (None, target) => target.map(|t| parse(t.as_str())).transpose(),
    }
}

/// Whether an authority is just `host[:port]`: no user, a port that is a number.
fn host_and_port(a: &Authority) -> bool {
    if a.as_str().contains('@') {
        return false;
    }
    // Without a user part the host comes first.
    let after_host = &a.as_str()[a.host().len()..];
    after_host.is_empty()
        || after_host
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok())
}

/// Whether `origin` (`scheme://host[:port]`) is `host`, a port left out meaning the
/// scheme's default on both sides (a TLS proxy in front of the API may add `https`).
fn same_origin(origin: &str, host: &Authority) -> bool {
    let Ok(uri) = Uri::from_str(origin) else {
        return false;
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return false;
    };
    let default = match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    host_and_port(authority)
        && authority.host().eq_ignore_ascii_case(host.host())
        && authority.port_u16().or(default) == host.port_u16().or(default)
}

/// The credential a request carries: a bearer token, or a basic-auth password.
fn credential(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.as_bytes().to_vec())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        Some(decoded[colon + 1..].to_vec())
    } else {
        None
    }
}

/// The JSON answer to a refused request (DFP's `Status` and `Message` too on its paths, so
/// DFP clients read it as they read DFP's own errors).
fn refusal_response(refusal: Refusal, path: &str) -> Response {
    let mut body = json!({"error": refusal.message, "field": refusal.field});
    if path.starts_with("/v1/docker-flow-proxy/") {
        body["Status"] = "NOK".into();
        body["Message"] = refusal.message.into();
    }
    let mut response = (refusal.status, Json(body)).into_response();
    if refusal.status == StatusCode::UNAUTHORIZED {
        let challenges = response.headers_mut();
        for challenge in ["Bearer realm=\"lb\"", "Basic realm=\"lb\""] {
            challenges.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
    }
    response
}

/// The middleware in front of every route.
pub async fn guard(State(policy): State<Arc<AccessPolicy>>, req: Request, next: Next) -> Response {
    match policy.check(req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refusal_response(refusal, req.uri().path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(token: Option<&str>, read_open: bool) -> AccessPolicy {
        AccessPolicy {
            token: token.map(ApiToken::new),
            read_open,
            hosts: vec!["lb.internal".into()],
        }
    }

    fn check(
        p: &AccessPolicy,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), (u16, &'static str)> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                axum::http::HeaderName::from_str(name).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let method = Method::from_str(method).unwrap();
        let uri = Uri::from_str(target).unwrap();
        p.check(&method, &uri, &map)
            .map_err(|r| (r.status.as_u16(), r.field))
    }

    const RECONFIGURE: &str = "/v1/docker-flow-proxy/reconfigure?serviceName=a";

    #[test]
    fn kinds_of_calls() {
        let get = Method::GET;
        assert_eq!(kind_of(&get, "/health"), Kind::Probe);
        assert_eq!(kind_of(&Method::POST, "/ready"), Kind::Probe);
        for read in [
            "/v1/services",
            "/v1/services/web",
            "/v1/stats",
            "/metrics",
            "/v1/certs",
            "/v1/certs/site",
            "/v1/docker-flow-proxy/config",
            "/v1/docker-flow-proxy/certs",
            "/v1/docker-flow-proxy/ping",
        ] {
            assert_eq!(kind_of(&get, read), Kind::Read, "{read}");
            assert_eq!(kind_of(&Method::HEAD, read), Kind::Read, "{read}");
        }
        for change in [
            "/v1/docker-flow-proxy/reconfigure",
            "/v1/docker-flow-proxy/remove",
            "/v1/services/",
            "/v1/services/a/b",
            "/elsewhere",
            "/v1/services/../stats",
        ] {
            assert_eq!(kind_of(&get, change), Kind::Change, "{change}");
        }
        assert_eq!(kind_of(&Method::PUT, "/v1/services/web"), Kind::Change);
        assert_eq!(kind_of(&Method::DELETE, "/v1/services/web"), Kind::Change);
        assert_eq!(kind_of(&Method::POST, "/v1/services"), Kind::Change);
        assert_eq!(kind_of(&Method::PUT, "/v1/certs/site"), Kind::Change);
        assert_eq!(kind_of(&Method::DELETE, "/v1/certs/site"), Kind::Change);
        assert_eq!(
            kind_of(&Method::PUT, "/v1/docker-flow-proxy/cert"),
            Kind::Change
        );
        assert_eq!(kind_of(&get, "/v1/docker-flow-proxy/cert"), Kind::Change);
    }

    #[test]
    fn the_token_as_bearer_or_basic_password() {
        let p = policy(Some("s3cret"), false);
        let basic = |cred: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(cred)
            )
        };
        assert_eq!(
            check(&p, "PUT", "/v1/services/a", &[]),
            Err((401, "Authorization"))
        );
        assert_eq!(
            check(&p, "GET", "/v1/services", &[]),
            Err((401, "Authorization"))
        );
        assert_eq!(
            check(
                &p,
                "PUT",
                "/v1/services/a",
                &[("authorization", "Bearer s3cret")]
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &p,
                "PUT",
                "/v1/services/a",
                &[("authorization", "bearer  s3cret")]
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &p,
                "PUT",
                "/v1/services/a",
                &[("authorization", &basic("anyone:s3cret"))]
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &p,
                "PUT",
                "/v1/services/a",
                &[("authorization", &basic(":s3cret"))]
            ),
            Ok(())
        );
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearer ",
            "Token s3cret",
            "s3cret",
            "Basic !!!",
        ] {
            assert_eq!(
                check(&p, "PUT", "/v1/services/a", &[("authorization", wrong)]),
                Err((401, "Authorization")),
                "{wrong}"
            );
        }
        assert_eq!(
            check(
                &p,
                "PUT",
                "/v1/services/a",
                &[("authorization", &basic("s3cret:x"))]
            ),
            Err((401, "Authorization"))
        );
        assert_eq!(
            check(
                &p,
                "GET",
                "/v1/services",
                &[("authorization", "Bearer s3cret")]
            ),
            Ok(())
        );
        assert_eq!(check(&p, "GET", "/health", &[]), Ok(()));
        assert_eq!(check(&p, "GET", "/ready", &[]), Ok(()));
    }

    #[test]
    fn read_open_opens_reads_only() {
        let p = policy(Some("s3cret"), true);
        for read in [
            "/v1/services",
            "/v1/services/web",
            "/v1/stats",
            "/v1/docker-flow-proxy/config?type=json",
            "/v1/docker-flow-proxy/ping",
        ] {
            assert_eq!(check(&p, "GET", read, &[]), Ok(()), "{read}");
        }
        assert_eq!(
            check(&p, "PUT", "/v1/services/web", &[]),
            Err((401, "Authorization"))
        );
        assert_eq!(
            check(&p, "DELETE", "/v1/services/web", &[]),
            Err((401, "Authorization"))
        );
        assert_eq!(
            check(&p, "GET", RECONFIGURE, &[]),
            Err((401, "Authorization"))
        );
        assert_eq!(
            check(&p, "GET", "/v1/docker-flow-proxy/remove?serviceName=a", &[]),
            Err((401, "Authorization"))
        );
    }

    #[test]
    fn browser_guards_refuse_cross_site_calls_token_or_not() {
        for p in [policy(None, false), policy(Some("t"), true)] {
            let auth = ("authorization", "Bearer t");
            let ok = |extra: &[(&str, &str)]| {
                let mut h = vec![auth];
                h.extend_from_slice(extra);
                check(&p, "GET", RECONFIGURE, &h)
            };
            assert_eq!(ok(&[("host", "127.0.0.1:9090")]), Ok(()));
            assert_eq!(
                ok(&[
                    ("host", "127.0.0.1:9090"),
                    ("sec-fetch-site", "same-origin")
                ]),
                Ok(())
            );
            assert_eq!(
                ok(&[("host", "127.0.0.1:9090"), ("sec-fetch-site", "none")]),
                Ok(())
            );
            for site in ["cross-site", "same-site", "Cross-Site", ""] {
                assert_eq!(
                    ok(&[("host", "127.0.0.1:9090"), ("sec-fetch-site", site)]),
                    Err((403, "Sec-Fetch-Site")),
                    "{site}"
                );
            }
            assert_eq!(
                ok(&[
                    ("host", "127.0.0.1:9090"),
                    ("origin", "http://127.0.0.1:9090")
                ]),
                Ok(())
            );
            assert_eq!(
                ok(&[
                    ("host", "LocalHost:9090"),
                    ("origin", "http://localhost:9090")
                ]),
                Ok(())
            );
            assert_eq!(
                ok(&[("host", "lb.internal"), ("origin", "http://lb.internal:80")]),
                Ok(())
            );
            assert_eq!(
                ok(&[("host", "lb.internal"), ("origin", "https://lb.internal")]),
                Ok(())
            );
            for origin in [
                "http://evil.example",
                "http://127.0.0.1:9091",
                "null",
                "http://127.0.0.1",
                "https://127.0.0.1:9090.evil.example",
                "http://127.0.0.1:9090@evil.example",
            ] {
                assert_eq!(
                    ok(&[("host", "127.0.0.1:9090"), ("origin", origin)]),
                    Err((403, "Origin")),
                    "{origin}"
                );
            }
            // An Origin with no Host to compare it with is a browser's: refused.
            assert_eq!(
                ok(&[("origin", "http://127.0.0.1:9090")]),
                Err((403, "Origin"))
            );
            // The same on the native API's writes, which browsers can send as forms.
            assert_eq!(
                check(
                    &p,
                    "DELETE",
                    "/v1/services/a",
                    &[
                        auth,
                        ("host", "127.0.0.1"),
                        ("sec-fetch-site", "cross-site")
                    ]
                ),
                Err((403, "Sec-Fetch-Site"))
            );
            // Reads are not guarded.
            assert_eq!(
                check(
                    &p,
                    "GET",
                    "/v1/services",
                    &[
                        auth,
                        ("host", "evil.example"),
                        ("sec-fetch-site", "cross-site")
                    ]
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn hosts_the_api_answers_to() {
        let p = policy(None, false);
        let put = |host: &str| check(&p, "PUT", "/v1/services/a", &[("host", host)]);
        for good in [
            "127.0.0.1",
            "127.0.0.1:9090",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9090",
            "[fe80::1]:1",
            "localhost",
            "LOCALHOST:9090",
            "lb.internal",
            "LB.Internal:8080",
        ] {
            assert_eq!(put(good), Ok(()), "{good}");
        }
        for bad in [
            "evil.example",
            "evil.example:9090",
            "localhost.evil.example",
            "lb.internal.evil.example",
            "127.0.0.1.nip.io",
            "[127.0.0.1]",
            "::1",
            "user@127.0.0.1",
            "127.0.0.1:x",
            "",
            "localhost.",
        ] {
            assert_eq!(put(bad), Err((403, "Host")), "{bad}");
        }
        // No Host at all (HTTP/1.0): no browser sends that.
        assert_eq!(check(&p, "PUT", "/v1/services/a", &[]), Ok(()));
        // h2's :authority (or an absolute-form target) is the host when there is no header.
        assert_eq!(
            check(&p, "PUT", "http://evil.example/v1/services/a", &[]),
            Err((403, "Host"))
        );
        assert_eq!(
            check(&p, "PUT", "http://127.0.0.1:9090/v1/services/a", &[]),
            Ok(())
        );
        assert_eq!(
            check(
                &p,
                "PUT",
                "http://evil.example/v1/services/a",
                &[("host", "127.0.0.1")]
            ),
            Err((403, "Host"))
        );
        // Two Host headers: which one would a proxy believe?
        assert_eq!(
            check(
                &p,
                "PUT",
                "/v1/services/a",
                &[("host", "127.0.0.1"), ("host", "evil.example")]
            ),
            Err((403, "Host"))
        );
    }

    #[test]
    fn token_files_must_be_private_and_hold_a_token() {
        let dir = std::env::temp_dir().join(format!("lb-api-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(
                &path,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
            )
            .unwrap();
            path
        };
        let good = ApiToken::from_file(&write("good", " s3cret\n", 0o600)).unwrap();
        assert!(good.matches(b"s3cret"));
        assert!(!good.matches(b"s3cre"));
        assert!(ApiToken::from_file(&write("ro", "s3cret", 0o400)).is_ok());
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o700] {
            let path = write(&format!("m{mode:o}"), "s3cret", mode);
            let e = ApiToken::from_file(&path).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(&format!("{mode:04o}")),
                "{e}"
            );
        }
        let e = ApiToken::from_file(&write("empty", " \n", 0o600))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = ApiToken::from_file(&write("spaces", "two words", 0o600))
            .unwrap_err()
            .to_string();
        assert!(e.contains("printable"), "{e}");
        assert!(
            ApiToken::from_file(&dir)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        assert!(format!("{good:?}").contains(".."));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
