//! The Docker Flow Proxy API, as a second view of lb's own model, so that deploy scripts
//! written for DFP work unchanged: `reconfigure` and `remove` (query parameters, by GET,
//! POST or PUT as DFP takes them), `reload`, `config` (text, or `type=json`), `ping`, and
//! `cert` (PUT) and `certs` (see `api_certs`). A reconfigure becomes a `PUT` of a native
//! service per destination (stored like every other change); DFP's answers
//! (`{"Status": "OK", ...}`) are kept, and errors also carry lb's `error` and `field`.
//!
//! - `params`: DFP's documented parameters, and what lb does with each
//! - `destinations`: several destinations of one service (`servicePath.1`, `port.1`...)
//! - `view`: lb's services in DFP's shapes
mod destinations;
mod params;
mod view;

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use crate::{
    api_certs::Certs,
    controller::ControlError,
    model::{
        DiscoverySpec, HeaderEdits, HttpSpec, PathRewrite, Service, ServiceSpec, SniSpec, UserSpec,
    },
    reconcile::ReconcileError,
    web::Shared,
};

/// How long `reload` waits for the store to be listed again before it answers 503.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// A DFP error: `{"Status": "NOK", "Message": ...}` plus lb's `error` and `field`.
#[derive(Debug)]
struct Nok {
    status: StatusCode,
    field: String,
    message: String,
}

impl IntoResponse for Nok {
    fn into_response(self) -> Response {
        let body = json!({
            "Status": "NOK",
            "Message": self.message,
            "error": self.message,
            "field": self.field,
        });
        (self.status, Json(body)).into_response()
    }
}

fn nok(status: StatusCode, field: &str, message: impl Into<String>) -> Nok {
    Nok {
        status,
        field: field.to_string(),
        message: message.into(),
    }
}

/// Query parameters from pairs, for the tests.
#[cfg(test)]
fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A comma-separated parameter as a list (empty items dropped).
fn list(params: &HashMap<String, String>, name: &str) -> Vec<String> {
    params
        .get(name)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn flag(params: &HashMap<String, String>, name: &str) -> Result<bool, Nok> {
    match params.get(name).map(String::as_str) {
        None | Some("" | "false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(nok(
            StatusCode::BAD_REQUEST,
            name,
            format!("{name}: {other:?} is not true or false"),
        )),
    }
}

/// The mandatory `serviceName`.
fn service_name(params: &HashMap<String, String>) -> Result<String, Nok> {
    params
        .get("serviceName")
        .filter(|n| !n.is_empty())
        .cloned()
        .ok_or_else(|| {
            nok(
                StatusCode::BAD_REQUEST,
                "serviceName",
                "serviceName parameter is mandatory",
            )
        })
}

/// The native spec a reconfigure of service `name` asks for.
fn spec_of(
    params: &HashMap<String, String>,
    name: &str,
    balancer: &Balancer,
) -> Result<ServiceSpec, Nok> {
    let port = port_param(params)?;
    let mut spec = ServiceSpec::default();
    match params.get("reqMode").map_or("http", String::as_str) {
        "http" => spec.http = Some(http_route(params, balancer.http_port)?),
        "tcp" => {
            spec.vip = Some(tcp_vip(params, port, balancer.address)?);
            spec.protocol = Some("tcp".into());
            // The balancer's own address: `srcPort` may be a port the host listens on.
            spec.override_local_listener = Some(flag(params, "overrideLocalListener")?);
        }
        "sni" => {
            on_listener(params, Some(balancer.https_port.unwrap_or(443)), "--https")?;
            spec.http = Some(sni_route(params)?);
        }
        other => {
            return Err(nok(
                StatusCode::BAD_REQUEST,
                "reqMode",
                format!("reqMode: {other:?} is not http, tcp or sni"),
            ));
        }
    }
    match (list(params, "backends"), params.get("discovery")) {
        (backends, None) if !backends.is_empty() => {
            spec.backends = Some(
                with_ports(backends, port)?
                    .into_iter()
                    .map(serde_json::Value::String)
                    .collect(),
            );
        }
        (backends, Some(kind)) if backends.is_empty() => {
            spec.discovery = Some(DiscoverySpec {
                kind: Some(kind.clone()),
                service: params.get("serviceName").cloned(),
                ..DiscoverySpec::default()
            });
        }
        (_, Some(_)) => {
            return Err(nok(
                StatusCode::BAD_REQUEST,
                "backends",
                "backends: give backends or discovery, not both",
            ));
        }
        // As in Swarm: the instances are what the service's name resolves to.
        (_, None) => spec.discovery = Some(dns_discovery(params, name, port)?),
    }
    Ok(spec)
}

/// DFP's own way to find a service's instances: its name in DNS (Swarm's virtual IP), or
/// with `discoveryType=DNS` every task's address (`tasks.<serviceName>`), on `port`; or
/// the host `outboundHostname` names (a service running elsewhere).
fn dns_discovery(
    params: &HashMap<String, String>,
    service: &str,
    port: Option<&str>,
) -> Result<DiscoverySpec, Nok> {
    let outbound = params.get("outboundHostname").filter(|h| !h.is_empty());
    let name = match params.get("discoveryType").map(String::as_str) {
        _ if let Some(host) = outbound => host.clone(),
        None | Some("" | "Overlay" | "overlay") => service.to_string(),
        Some("DNS" | "dns") => format!("tasks.{service}"),
        Some(other) => {
            return Err(nok(
                StatusCode::BAD_REQUEST,
                "discoveryType",
                format!("discoveryType: {other:?} is not DNS or Overlay"),
            ));
        }
    };
    let Some(port) = port.and_then(|p| p.parse().ok()) else {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "port",
            "port parameter is mandatory: the port of the instances found through DNS \
             (or give backends=ip[:port],... or discovery=etcd|consul)",
        ));
    };
    Ok(DiscoverySpec {
        kind: Some("dns".into()),
        service: Some(name),
        port: Some(port),
        ..DiscoverySpec::default()
    })
}

/// The port of its own an http destination is served on (`http.port`): its `srcPort`,
/// unless that is lb's `--http` listener's (or none is given). As DFP's frontend per
/// port, lb opens a listener there.
fn own_port(params: &HashMap<String, String>, http_port: Option<u16>) -> Result<Option<u16>, Nok> {
    let Some(src) = params
        .get("srcPort")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    match src.parse::<u16>() {
        Ok(port) if port != 0 => Ok((Some(port) != http_port).then_some(port)),
        _ => Err(nok(
            StatusCode::BAD_REQUEST,
            "srcPort",
            format!("srcPort: {src:?} is not a port (1-65535)"),
        )),
    }
}

/// Checks that `srcPort`, if given, is the port of lb's listener for the mode (`flag`
/// names it): TLS passed through is served on lb's one HTTPS listener, so any other port
/// is refused rather than served where the client does not look.
fn on_listener(
    params: &HashMap<String, String>,
    listener: Option<u16>,
    flag: &str,
) -> Result<(), Nok> {
    let Some(src) = params
        .get("srcPort")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    else {
        return Ok(());
    };
    let message = match listener {
        Some(port) if src.parse() == Ok(port) => return Ok(()),
        Some(port) => {
            format!("srcPort: {src}: lb serves this mode on its {flag} listener, port {port}")
        }
        None => format!("srcPort: {src}: lb's {flag} listener is off"),
    };
    Err(nok(StatusCode::BAD_REQUEST, "srcPort", message))
}

/// The route of a `reqMode=sni` service: TLS for `serviceDomain` passed through whole on
/// lb's HTTPS listener.
fn sni_route(params: &HashMap<String, String>) -> Result<HttpSpec, Nok> {
    // DFP's own example: `pathType=req_ssl_sni -i -m beg` and the names in servicePath.
    let sni = match params.get("pathType").map(String::as_str) {
        Some(path_type) if path_type.starts_with("req_ssl_sni") => Some(SniSpec {
            kind: sni_match_kind(path_type)?,
            values: list(params, "servicePath"),
        }),
        _ => None,
    };
    let domains = service_domains(params, true)?;
    if domains.is_empty() && sni.is_none() {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "serviceDomain",
            "serviceDomain: reqMode sni needs a domain (or pathType=req_ssl_sni with the names in servicePath)",
        ));
    }
    if params.get("sessionType").map(String::as_str) == Some("sticky-server") {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "sessionType",
            "sessionType: TLS passed through carries no cookie lb can read",
        ));
    }
    if params.get("timeoutServer").is_some_and(|t| !t.is_empty()) {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "timeoutServer",
            "timeoutServer: TLS passed through is one tunnel: its idle time is timeoutTunnel",
        ));
    }
    Ok(HttpSpec {
        domain: Some(domains),
        tls_passthrough: Some(true),
        sni,
        tunnel_timeout_ms: seconds_param(params, "timeoutTunnel")?,
        ..HttpSpec::default()
    })
}

/// The comparison of `req_ssl_sni [-i] [-m beg|end|reg|str]` (exact when none is named).
fn sni_match_kind(path_type: &str) -> Result<String, Nok> {
    let mut words = path_type.split_whitespace().skip(1);
    let mut kind = "str";
    while let Some(word) = words.next() {
        match word {
            // lb compares server names without case, as DFP's examples ask.
            "-i" => {}
            "-m" => kind = words.next().unwrap_or(""),
            _ => kind = "",
        }
    }
    if matches!(kind, "beg" | "end" | "reg" | "str") {
        Ok(kind.to_string())
    } else {
        Err(nok(
            StatusCode::BAD_REQUEST,
            "pathType",
            format!(
                "pathType: {path_type:?}: lb compares req_ssl_sni with -m beg, end, reg or str"
            ),
        ))
    }
}

/// `serviceDomain` (several, comma-separated; `*domain.com` is DFP's wildcard, any host
/// ending so) as `serviceDomainAlgo` compares them: `hdr(host)`, the default, the name
/// itself; `hdr_dom(host)` (or the old `serviceDomainMatchAll=true`) the name and its
/// subdomains; `hdr_end(host)` any host ending so; `req.ssl_sni` (with `reqMode=sni`,
/// where lb compares the TLS server name in any case) the name itself.
fn service_domains(params: &HashMap<String, String>, sni: bool) -> Result<Vec<String>, Nok> {
    let names = list(params, "serviceDomain");
    let algo = match params.get("serviceDomainAlgo").map(|a| a.trim()) {
        Some(algo) if !algo.is_empty() => algo.to_string(),
        _ if flag(params, "serviceDomainMatchAll")? => "hdr_dom(host)".to_string(),
        _ => "hdr(host)".to_string(),
    };
    // HAProxy's fetch, and the header it reads (DFP's docs also write `hdr_dom()`).
    let (fetch, header) = match algo.split_once('(') {
        Some((fetch, rest)) => (fetch, rest.trim_end_matches(')').trim()),
        None => (algo.as_str(), "host"),
    };
    let refuse = |why: &str| {
        Err(nok(
            StatusCode::BAD_REQUEST,
            "serviceDomainAlgo",
            format!("serviceDomainAlgo: {algo:?}: {why}"),
        ))
    };
    if !(header.is_empty() || header.eq_ignore_ascii_case("host")) {
        return refuse("lb matches domains against the Host header only");
    }
    let mut domains = Vec::new();
    for name in names {
        let plain = !name.starts_with('*');
        match fetch {
            "hdr" => domains.push(name),
            "hdr_dom" if plain => {
                domains.push(format!("*.{name}"));
                domains.push(name);
            }
            "hdr_end" if plain => domains.push(format!("*{name}")),
            "hdr_dom" | "hdr_end" => domains.push(name),
            "req.ssl_sni" | "req_ssl_sni" if sni => domains.push(name),
            "req.ssl_sni" | "req_ssl_sni" => {
                return refuse(
                    "lb routes HTTP by the Host header; the server name is compared with reqMode=sni",
                );
            }
            _ => return refuse("lb takes hdr(host), hdr_dom(host), hdr_end(host) or req.ssl_sni"),
        }
    }
    // The name first: redirects (redirectFromDomain) go to the first domain.
    domains.sort_by_key(|d| d.starts_with('*'));
    Ok(domains)
}

/// `compressionAlgo=gzip` and `compressionType=text/css text/html` (HAProxy's lists, by
/// spaces; commas are taken too).
fn compression(
    params: &HashMap<String, String>,
) -> Result<Option<crate::model::CompressionSpec>, Nok> {
    let types: Vec<String> = params
        .get("compressionType")
        .map(|t| {
            t.split([' ', ','])
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let algo = params.get("compressionAlgo").map_or("", |a| a.trim());
    match algo {
        "" if types.is_empty() => Ok(None),
        "" => Err(nok(
            StatusCode::BAD_REQUEST,
            "compressionAlgo",
            "compressionAlgo: needed with compressionType (lb compresses with gzip)",
        )),
        "identity" => Ok(None),
        "gzip" => Ok(Some(crate::model::CompressionSpec {
            algo: algo.to_string(),
            types,
        })),
        other => Err(nok(
            StatusCode::BAD_REQUEST,
            "compressionAlgo",
            format!("compressionAlgo: {other:?}: lb compresses with gzip"),
        )),
    }
}

/// A timeout DFP takes in whole seconds (`timeoutServer=20`), in milliseconds.
fn seconds_param(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, Nok> {
    let Some(value) = params.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(Some(secs.saturating_mul(1000))),
        _ => Err(nok(
            StatusCode::BAD_REQUEST,
            name,
            format!("{name}: {value:?} is not a number of seconds"),
        )),
    }
}

/// `port`, the backends' port where they are listed without one, if given.
fn port_param(params: &HashMap<String, String>) -> Result<Option<&str>, Nok> {
    let port = params.get("port").filter(|p| !p.is_empty());
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "port",
            format!("port: {p:?} is not a port"),
        ));
    }
    Ok(port.map(String::as_str))
}

/// The route of a `reqMode=http` service: `servicePath`, `serviceDomain`,
/// `servicePathExclude`, `isDefaultBackend`, `allowedMethods`, `deniedMethods`,
/// `httpsOnly`, `httpsRedirectCode`, `denyHttp`, `srcPort` (`http_port`: lb's `--http`
/// listener's) and the rest.
fn http_route(params: &HashMap<String, String>, http_port: Option<u16>) -> Result<HttpSpec, Nok> {
    let paths = list(params, "servicePath");
    let domains = service_domains(params, false)?;
    let default_backend = flag(params, "isDefaultBackend")?;
    if paths.is_empty() && domains.is_empty() && !default_backend {
        return Err(nok(
            StatusCode::CONFLICT,
            "servicePath",
            "servicePath or serviceDomain parameter is mandatory for reqMode http",
        ));
    }
    Ok(HttpSpec {
        paths: Some(paths),
        paths_exclude: Some(list(params, "servicePathExclude")),
        domain: Some(domains),
        default_backend: Some(default_backend),
        balance: None,
        allowed_methods: Some(list(params, "allowedMethods")),
        denied_methods: Some(list(params, "deniedMethods")),
        https_only: Some(flag(params, "httpsOnly")?),
        https_redirect_code: redirect_code(params)?,
        deny_http: Some(flag(params, "denyHttp")?),
        users: Some(users(params)?),
        request_headers: Some(header_edits(
            params,
            &["addReqHeader", "addHeader"],
            &["setReqHeader", "setHeader"],
            "delReqHeader",
        )?),
        response_headers: Some(header_edits(
            params,
            &["addResHeader"],
            &["setResHeader"],
            "delResHeader",
        )?),
        path_rewrite: Some(path_rewrites(params)?),
        // DFP leaves ACME to a companion (docker-flow-letsencrypt) that stores
        // certificates through `cert`.
        tls: None,
        backend_protocol: None,
        tls_passthrough: None,
        sni: None,
        match_headers: Some(service_headers(params)?),
        match_user_agents: Some(list(params, "userAgent")),
        redirect_from: Some(list(params, "redirectFromDomain")),
        server_timeout_ms: seconds_param(params, "timeoutServer")?,
        tunnel_timeout_ms: seconds_param(params, "timeoutTunnel")?,
        compression: compression(params)?,
        port: own_port(params, http_port)?,
        // DFP's own: the cookie is named after the service; any other type is none.
        sticky_cookie: (params.get("sessionType").map(String::as_str) == Some("sticky-server"))
            .then(|| params.get("serviceName").cloned())
            .flatten(),
        // DFP's sslVerifyNone "also turns on SSL on the backend side".
        backend_tls: flag(params, "sslVerifyNone")?.then_some(crate::model::BackendTlsSpec {
            verify: false,
            ca: None,
            server_name: None,
        }),
    })
}

/// `serviceHeader=X-Version:3,name:viktor`: headers a request must have, with those
/// values.
fn service_headers(
    params: &HashMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, Nok> {
    let mut headers = std::collections::BTreeMap::new();
    for item in list(params, "serviceHeader") {
        let Some((name, value)) = item.split_once(':') else {
            return Err(nok(
                StatusCode::BAD_REQUEST,
                "serviceHeader",
                format!("serviceHeader: {item:?} is not Name:value"),
            ));
        };
        headers.insert(name.trim().to_string(), value.trim().to_string());
    }
    Ok(headers)
}

/// DFP's header parameters: `Name value` items (or `Name: value`) by commas to add or set,
/// names by commas to delete. `addHeader` and `setHeader` are DFP's older names.
fn header_edits(
    params: &HashMap<String, String>,
    add: &[&str],
    set: &[&str],
    delete: &str,
) -> Result<HeaderEdits, Nok> {
    let mut edits = HeaderEdits {
        delete: list(params, delete),
        ..HeaderEdits::default()
    };
    for (names, into) in [(add, &mut edits.add), (set, &mut edits.set)] {
        for &param in names {
            for item in list(params, param) {
                let Some((name, value)) = item
                    .split_once(": ")
                    .or_else(|| item.split_once(' '))
                    .map(|(n, v)| (n.trim_end_matches(':'), v.trim()))
                else {
                    let message = format!("{param}: {item:?} is not `Name value`");
                    return Err(nok(StatusCode::BAD_REQUEST, param, message));
                };
                into.insert(name.to_string(), value.to_string());
            }
        }
    }
    Ok(edits)
}

/// `reqPathSearchReplace`: `search,replace` rules separated by `:`; or DFP's older
/// `reqPathSearch` with `reqPathReplace`. HAProxy's `\1` in a replacement is `${1}` here.
fn path_rewrites(params: &HashMap<String, String>) -> Result<Vec<PathRewrite>, Nok> {
    let rule = |search: &str, replace: &str| PathRewrite {
        search: search.to_string(),
        replace: haproxy_groups(replace),
    };
    let mut rules = Vec::new();
    if let Some(all) = params.get("reqPathSearchReplace").filter(|v| !v.is_empty()) {
        for item in all.split(':').filter(|i| !i.is_empty()) {
            let Some((search, replace)) = item.split_once(',') else {
                let message = format!("reqPathSearchReplace: {item:?} is not `search,replace`");
                return Err(nok(
                    StatusCode::BAD_REQUEST,
                    "reqPathSearchReplace",
                    message,
                ));
            };
            rules.push(rule(search, replace));
        }
    }
    if let Some(search) = params.get("reqPathSearch").filter(|v| !v.is_empty()) {
        let replace = params.get("reqPathReplace").map_or("", String::as_str);
        rules.push(rule(search, replace));
    }
    Ok(rules)
}

/// `\1` (HAProxy's group reference) as `${1}`, and a literal `$` kept literal.
fn haproxy_groups(replace: &str) -> String {
    let mut out = String::with_capacity(replace.len());
    let mut chars = replace.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                let digit = chars.next().expect("peeked");
                out.push_str(&format!("${{{digit}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// Where DFP reads `usersSecret`: Docker's secrets, `dfp_users_<usersSecret>`.
const SECRETS_DIR: &str = "/run/secrets";

/// Basic auth users from `users` (`user:pass,...`) and the `usersSecret` file (the same,
/// by commas or lines); passwords are hashes when `usersPassEncrypted` says so.
fn users(params: &HashMap<String, String>) -> Result<Vec<UserSpec>, Nok> {
    let encrypted = flag(params, "usersPassEncrypted")?;
    let mut entries: Vec<(String, &str)> = list(params, "users")
        .into_iter()
        .map(|e| (e, "users"))
        .collect();
    if let Some(secret) = params.get("usersSecret").filter(|s| !s.is_empty()) {
        let bad = |why: String| {
            nok(
                StatusCode::BAD_REQUEST,
                "usersSecret",
                format!("usersSecret: {why}"),
            )
        };
        if !secret
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || secret.starts_with('.')
        {
            return Err(bad(format!("{secret:?} is not a secret name")));
        }
        let path = std::path::Path::new(SECRETS_DIR).join(format!("dfp_users_{secret}"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| bad(format!("reading {}: {e}", path.display())))?;
        entries.extend(
            text.split([',', '\n'])
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(|e| (e.to_string(), "usersSecret")),
        );
    }
    entries
        .into_iter()
        .map(|(entry, from)| {
            let Some((name, password)) = entry.split_once(':') else {
                let message = format!("{from}: an entry is not user:password");
                return Err(nok(StatusCode::BAD_REQUEST, from, message));
            };
            let password = Some(password.to_string());
            Ok(UserSpec {
                name: name.to_string(),
                password: if encrypted { None } else { password.clone() },
                password_hash: if encrypted { password } else { None },
            })
        })
        .collect()
}

fn redirect_code(params: &HashMap<String, String>) -> Result<Option<u16>, Nok> {
    let Some(code) = params.get("httpsRedirectCode").filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    code.parse().map(Some).map_err(|_| {
        let message = format!("httpsRedirectCode: {code:?} is not a status code");
        nok(StatusCode::BAD_REQUEST, "httpsRedirectCode", message)
    })
}

/// The VIP of a `reqMode=tcp` service: the balancer's own address, on `srcPort`.
fn tcp_vip(
    params: &HashMap<String, String>,
    port: Option<&str>,
    address: Option<Ipv4Addr>,
) -> Result<String, Nok> {
    let Some(src) = params.get("srcPort").filter(|p| !p.is_empty()) else {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "srcPort",
            "srcPort parameter is mandatory for reqMode tcp",
        ));
    };
    if port.is_none() {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "port",
            "port parameter is mandatory for reqMode tcp",
        ));
    }
    let Some(address) = address else {
        return Err(nok(
            StatusCode::BAD_REQUEST,
            "reqMode",
            "this lb has no address of its own for tcp services (start it with --address)",
        ));
    };
    Ok(format!("{address}:{src}"))
}

/// `backends` as ip:port, `port` added to those listed without one.
fn with_ports(backends: Vec<String>, port: Option<&str>) -> Result<Vec<String>, Nok> {
    backends
        .into_iter()
        .map(|b| match port {
            _ if b.contains(':') => Ok(b),
            Some(p) => Ok(format!("{b}:{p}")),
            None => Err(nok(
                StatusCode::BAD_REQUEST,
                "port",
                format!("port: needed for backend {b} (or give it as ip:port)"),
            )),
        })
        .collect()
}

async fn reconfigure(
    State((s, balancer, certs)): State<(Shared, Balancer, Certs)>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let name = match service_name(&params) {
        Ok(name) => name,
        Err(answer) => return answer.into_response(),
    };
    let unknown = match params::check(&params) {
        Ok(unknown) => unknown,
        Err(answer) => return answer.into_response(),
    };
    for param in &unknown {
        tracing::warn!(service = %name, %param, "reconfigure: not a Docker Flow Proxy parameter; ignored");
    }
    let dests = match destinations::destinations(&params) {
        Ok(dests) => dests,
        Err(answer) => return answer.into_response(),
    };
    let mut group = Vec::new();
    for d in &dests {
        let spec = params::check_destination(&d.params)
            .and_then(|()| spec_of(&d.params, &name, &balancer))
            .map_err(|e| d.named(e, &params));
        match spec {
            Ok(spec) => group.push((d.service_name(&name), spec)),
            Err(answer) => return answer.into_response(),
        }
    }
    // serviceCert: checked before anything changes, stored under the service's name.
    let cert = match params.get("serviceCert").filter(|c| !c.is_empty()) {
        Some(pem) => match Certs::check(&name, pem, pem) {
            Ok(cert) => Some(cert),
            Err(e) => {
                let message = format!("serviceCert: {e}");
                return nok(e.status(), "serviceCert", message).into_response();
            }
        },
        None => None,
    };
    let written = write_destinations(&s, &name, &dests, group, &params).await;
    if let (Ok(_), Some(cert)) = (&written, cert)
        && let Err(e) = certs.store(cert).await
    {
        let message = format!("serviceCert: the service is in place, its certificate is not: {e}");
        return nok(e.status(), "serviceCert", message).into_response();
    }
    match written {
        Ok(services) => {
            let members: Vec<(u32, &Service)> = dests
                .iter()
                .zip(&services)
                .map(|(d, svc)| (d.index.unwrap_or(0), svc))
                .collect();
            let mut body = view::service(&name, &members);
            body["Status"] = "OK".into();
            body["Message"] = "".into();
            if !unknown.is_empty() {
                body["Warnings"] = unknown
                    .iter()
                    .map(|p| format!("{p}: not a Docker Flow Proxy parameter; ignored"))
                    .collect();
            }
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(answer) => answer.into_response(),
    }
}

/// The lb services that serve DFP service `name`: itself and its destinations `name.N`.
async fn members(s: &Shared, name: &str) -> Result<Vec<String>, Nok> {
    let name = name.to_string();
    let listed = s
        .controller()
        .call(move |c| {
            c.list()
                .into_iter()
                .map(|svc| svc.name)
                .filter(|n| destinations::member(&name, n).is_some())
                .collect()
        })
        .await;
    listed.map_err(|e| failure(e.into()))
}

/// Writes DFP service `name`'s destinations (`group`, one lb service each) and removes
/// the destinations it had and no longer has. With several, all are checked first,
/// against the other services and each other, so that a refused one changes nothing.
async fn write_destinations(
    s: &Shared,
    name: &str,
    dests: &[destinations::Destination],
    group: Vec<(String, ServiceSpec)>,
    given: &HashMap<String, String>,
) -> Result<Vec<Service>, Nok> {
    let had = members(s, name).await?;
    let stale: Vec<&String> = had
        .iter()
        .filter(|n| !group.iter().any(|(g, _)| g == *n))
        .collect();
    if group.len() > 1 || !stale.is_empty() {
        s.check_group(group.clone(), had.clone())
            .await
            .map_err(|(i, e)| dests[i].named(failure(e), given))?;
    }
    // Those no longer wanted go first: their paths or VIP may be the new ones'.
    for n in stale {
        match s.delete(n).await {
            Ok(()) | Err(ReconcileError::Control(ControlError::NotFound(_))) => {}
            Err(e) => return Err(failure(e)),
        }
    }
    let mut written = Vec::new();
    for (i, (n, spec)) in group.into_iter().enumerate() {
        match s.put(&n, spec).await {
            Ok(svc) => written.push(svc),
            Err(e) => {
                let mut answer = dests[i].named(failure(e), given);
                if i > 0 {
                    // Checked together a moment ago: another write came between.
                    answer.message = format!(
                        "{} (the destinations before it were written)",
                        answer.message
                    );
                }
                return Err(answer);
            }
        }
    }
    Ok(written)
}

fn failure(e: ReconcileError) -> Nok {
    let status = crate::web::status_of(&e);
    let field = match &e {
        ReconcileError::Control(ControlError::Invalid(v) | ControlError::LocalListener(v)) => {
            dfp_field(&v.field)
        }
        ReconcileError::Store(crate::store::StoreError::Claimed { claim, .. }) => {
            dfp_field(claim.field())
        }
        _ => String::new(),
    };
    nok(status, &field, e.to_string())
}

/// The DFP parameter behind one of lb's fields.
fn dfp_field(field: &str) -> String {
    let name = match field.split(['.', '[']).collect::<Vec<_>>().as_slice() {
        ["name", ..] => "serviceName",
        ["http", "paths", ..] => "servicePath",
        ["http", "paths_exclude", ..] => "servicePathExclude",
        ["http", "domain", ..] => "serviceDomain",
        ["http", "default_backend", ..] => "isDefaultBackend",
        ["http", "allowed_methods", ..] => "allowedMethods",
        ["http", "denied_methods", ..] => "deniedMethods",
        ["http", "https_redirect_code", ..] => "httpsRedirectCode",
        ["http", "users", ..] => "users",
        ["http", "request_headers", "set", ..] => "setReqHeader",
        ["http", "request_headers", "delete", ..] => "delReqHeader",
        ["http", "request_headers", ..] => "addReqHeader",
        ["http", "response_headers", "set", ..] => "setResHeader",
        ["http", "response_headers", "delete", ..] => "delResHeader",
        ["http", "response_headers", ..] => "addResHeader",
        ["http", "path_rewrite", ..] => "reqPathSearchReplace",
        ["http", "server_timeout_ms"] => "timeoutServer",
        ["http", "tunnel_timeout_ms"] => "timeoutTunnel",
        ["http", "sticky_cookie"] => "sessionType",
        ["http", "compression", "algo"] => "compressionAlgo",
        ["http", "compression", ..] => "compressionType",
        ["vip", ..] | ["http", "port"] => "srcPort",
        ["backends", ..] => "backends",
        ["discovery", "port"] => "port",
        ["discovery", "service"] => "serviceName",
        ["discovery", ..] => "discovery",
        _ => field,
    };
    name.to_string()
}

async fn remove(
    State((s, _, _)): State<(Shared, Balancer, Certs)>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let name = match service_name(&params) {
        Ok(name) => name,
        Err(answer) => return answer.into_response(),
    };
    let had = match members(&s, &name).await {
        Ok(had) => had,
        Err(answer) => return answer.into_response(),
    };
    // DFP answers OK for a service it does not have; scripts rely on that.
    let message = if had.is_empty() {
        format!("service {name} was not configured")
    } else {
        String::new()
    };
    // The service and every destination of it.
    for n in &had {
        match s.delete(n).await {
            // Removed meanwhile by another request.
            Ok(()) | Err(ReconcileError::Control(ControlError::NotFound(_))) => {}
            Err(e) => return failure(e).into_response(),
        }
    }
    let body = json!({"Status": "OK", "Message": message, "ServiceName": name});
    (StatusCode::OK, Json(body)).into_response()
}

/// `config`: a text rendering of what lb routes (DFP shows its HAProxy file), or with
/// `type=json` every service keyed by name, as DFP answers.
async fn config(
    State((s, _, _)): State<(Shared, Balancer, Certs)>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let json = match params.get("type").map(String::as_str) {
        None | Some("") => false,
        Some("json") => true,
        Some(other) => {
            return nok(
                StatusCode::BAD_REQUEST,
                "type",
                format!("type: {other:?}: give type=json, or no type for text"),
            )
            .into_response();
        }
    };
    let services = match s.controller().call(|c| c.list()).await {
        Ok(services) => services,
        Err(e) => return failure(e.into()).into_response(),
    };
    if json {
        (StatusCode::OK, Json(view::config(&services))).into_response()
    } else {
        let text = view::config_text(&services);
        (
            StatusCode::OK,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response()
    }
}

/// `reload`: the store listed again and applied, as at start.
async fn reload(State((s, _, _)): State<(Shared, Balancer, Certs)>) -> Response {
    if tokio::time::timeout(RELOAD_WAIT, s.reload()).await.is_err() {
        let message = "the store could not be listed again in time; lb keeps what it has";
        return nok(StatusCode::SERVICE_UNAVAILABLE, "", message).into_response();
    }
    let body = json!({"Status": "OK", "Message": ""});
    (StatusCode::OK, Json(body)).into_response()
}

/// `PUT cert?certName=NAME` with the PEM (chain and key) as the body: checked and stored
/// as `/v1/certs/NAME` is.
async fn put_cert(
    State(certs): State<Certs>,
    Query(params): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    let Some(name) = params.get("certName").filter(|n| !n.is_empty()) else {
        let message = "certName is required: the certificate's name";
        return nok(StatusCode::BAD_REQUEST, "certName", message).into_response();
    };
    let pem = String::from_utf8_lossy(&body);
    match certs.put(name, &pem, &pem).await {
        Ok(_) => {
            let body = json!({"Status": "OK", "Message": "", "Certs": null});
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => {
            let field = match e.field() {
                Some("name") => "certName",
                _ => "body",
            };
            nok(e.status(), field, e.to_string()).into_response()
        }
    }
}

/// `certs`: every stored certificate, DFP's shape; `CertContent` is the chain only (lb
/// never shows a key).
async fn list_certs(State(certs): State<Certs>) -> Response {
    match certs.list().await {
        Ok(list) => {
            let certs: Vec<_> = list
                .iter()
                .map(|c| {
                    json!({"ServiceName": c.name, "CertsDir": "/certs", "CertContent": c.chain_pem})
                })
                .collect();
            let body = json!({"Status": "OK", "Message": "", "Certs": certs});
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => nok(e.status(), "", e.to_string()).into_response(),
    }
}

async fn ping() -> Response {
    (StatusCode::OK, Json(json!({"Status": "OK"}))).into_response()
}

/// The balancer as DFP's parameters name it: its own address (the VIP of `reqMode=tcp`
/// services, on `srcPort`), and the ports of its HTTP and HTTPS listeners.
#[derive(Debug, Clone, Copy, Default)]
pub struct Balancer {
    pub address: Option<Ipv4Addr>,
    pub http_port: Option<u16>,
    pub https_port: Option<u16>,
}

/// The DFP endpoints.
pub fn router(state: Shared, balancer: Balancer, certs: Certs) -> Router {
    let cert_routes = Router::new()
        .route("/v1/docker-flow-proxy/cert", axum::routing::put(put_cert))
        .route("/v1/docker-flow-proxy/certs", get(list_certs))
        .with_state(certs.clone());
    Router::new()
        .route(
            "/v1/docker-flow-proxy/reconfigure",
            get(reconfigure).post(reconfigure).put(reconfigure),
        )
        .route(
            "/v1/docker-flow-proxy/remove",
            get(remove).post(remove).put(remove),
        )
        .route(
            "/v1/docker-flow-proxy/reload",
            get(reload).post(reload).put(reload),
        )
        .route("/v1/docker-flow-proxy/config", get(config))
        .route("/v1/docker-flow-proxy/ping", get(ping))
        .with_state((state, balancer, certs))
        .merge(cert_routes)
}
