//! Docker Flow Proxy's documented `reconfigure` parameters, and what lb does with each.
//! One that DFP documents and lb does not honour is refused (400 naming it), never
//! dropped behind an OK: some of them protect a service (`users`, `denyHttp`,
//! `allowedMethods`), and dropping them would publish it unprotected. A name DFP does not
//! document is ignored, as DFP ignores it, with a warning.
use std::collections::HashMap;

use axum::http::StatusCode;

use super::{Nok, nok};

/// What lb does with a documented parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Support {
    /// Read by the reconfigure.
    Honoured,
    /// Accepted, with no effect in lb, for the reason given.
    NoEffect(&'static str),
    /// Not done by lb: refused, with what to do instead when there is something.
    Refused(&'static str),
}

use Support::{Honoured, NoEffect, Refused};

struct Param {
    name: &'static str,
    /// DFP also takes it as `name.N`, one of several destinations of the service.
    indexed: bool,
    support: Support,
}

const fn p(name: &'static str, indexed: bool, support: Support) -> Param {
    Param {
        name,
        indexed,
        support,
    }
}

const ONE_HTTPS_PORT: &str = "lb serves HTTPS on its one --https listener (DFP's srcHttpsPort/httpsPort have no counterpart yet)";
const NO_TEMPLATES: &str = "lb has no HAProxy configuration to add to";

/// Every parameter DFP documents for `reconfigure` (its usage guide and its source's
/// service type), and lb's own (`backends`, `discovery`, `overrideLocalListener`).
const PARAMS: &[Param] = &[
    // What lb reads.
    p("serviceName", false, Honoured),
    p("servicePath", true, Honoured),
    p("servicePathExclude", true, Honoured),
    p("serviceDomain", true, Honoured),
    p("isDefaultBackend", false, Honoured),
    p("reqMode", true, Honoured),
    p("port", true, Honoured),
    p("srcPort", true, Honoured),
    p("backends", false, Honoured),
    p("discovery", false, Honoured),
    p("discoveryType", false, Honoured),
    p("allowedMethods", true, Honoured),
    p("users", false, Honoured),
    p("serviceCert", false, Honoured),
    p("outboundHostname", true, Honoured),
    p("addReqHeader", false, Honoured),
    p("setReqHeader", false, Honoured),
    p("delReqHeader", false, Honoured),
    p("addResHeader", false, Honoured),
    p("setResHeader", false, Honoured),
    p("delResHeader", false, Honoured),
    p("addHeader", false, Honoured),
    p("setHeader", false, Honoured),
    p("reqPathSearchReplace", true, Honoured),
    p("reqPathSearch", false, Honoured),
    p("reqPathReplace", false, Honoured),
    p("usersSecret", false, Honoured),
    p("usersPassEncrypted", false, Honoured),
    p("denyHttp", true, Honoured),
    p("httpsOnly", true, Honoured),
    p("httpsRedirectCode", true, Honoured),
    p("deniedMethods", true, Honoured),
    p("overrideLocalListener", false, Honoured),
    p("sslVerifyNone", true, Honoured),
    p("serviceHeader", true, Honoured),
    p("userAgent", true, Honoured),
    p("redirectFromDomain", true, Honoured),
    p("serviceDomainAlgo", false, Honoured),
    p("timeoutServer", true, Honoured),
    p("timeoutTunnel", true, Honoured),
    p("sessionType", false, Honoured),
    p("compressionAlgo", false, Honoured),
    p("compressionType", false, Honoured),
    // Deprecated by DFP for serviceDomainAlgo=hdr_dom(host), which it stands for.
    p("serviceDomainMatchAll", false, Honoured),
    // Prefix matching, the default, is what lb does; another kind is refused.
    p("pathType", true, Honoured),
    // What lb has no use for.
    p(
        "distribute",
        false,
        NoEffect("every lb node applies what the store holds"),
    ),
    p(
        "replicas",
        false,
        NoEffect("lb balances over the instances it finds"),
    ),
    p(
        "aclName",
        false,
        NoEffect("lb orders routes by host, then the longest path"),
    ),
    p(
        "checkResolvers",
        false,
        NoEffect("lb checks backends with its own health checks"),
    ),
    p(
        "proxyInstanceName",
        false,
        NoEffect("lb has no instance filter"),
    ),
    p(
        "xForwardedProto",
        false,
        NoEffect("lb always sends X-Forwarded-Proto"),
    ),
    p(
        "userDef",
        true,
        NoEffect("a value for DFP's templates, which lb has not"),
    ),
    // What lb does not do (yet).
    p(
        "ignoreAuthorization",
        true,
        NoEffect("lb has no global users (DFP's USERS) to ignore"),
    ),
    p("httpsPort", true, Refused(ONE_HTTPS_PORT)),
    p("srcHttpsPort", true, Refused(ONE_HTTPS_PORT)),
    p(
        "verifyClientSsl",
        true,
        Refused("lb does not ask clients for certificates"),
    ),
    p(
        "redirectWhenHttpProto",
        false,
        Refused("lb redirects by how the client reached it: httpsOnly"),
    ),
    p(
        "timeoutClient",
        true,
        Refused("lb's --http-header-timeout bounds an idle client"),
    ),
    p(
        "connectionMode",
        false,
        Refused("lb keeps connections alive on both sides"),
    ),
    p("serviceGroup", true, Refused("")),
    p("balanceGroup", true, Refused("")),
    p("checkTcp", true, Refused("")),
    p("clitcpka", true, Refused("")),
    p("templateFePath", false, Refused(NO_TEMPLATES)),
    p("templateBePath", false, Refused(NO_TEMPLATES)),
    p("backendExtra", false, Refused(NO_TEMPLATES)),
];

/// The parameter `name` stands for, and its index when it is an indexed (`name.N`) form,
/// one of several destinations of the service.
fn lookup(name: &str) -> Option<(&'static Param, Option<u32>)> {
    let (base, index) = match name.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (base, Some(n.parse().unwrap_or(u32::MAX)))
        }
        _ => (name, None),
    };
    let param = PARAMS.iter().find(|p| p.name == base)?;
    // `serviceName.1` is no DFP parameter.
    (index.is_none() || param.indexed).then_some((param, index))
}

/// [`lookup`]'s answer by the parameter's plain name.
pub(super) fn documented(name: &str) -> Option<(&'static str, Option<u32>)> {
    lookup(name).map(|(param, index)| (param.name, index))
}

/// Checks a reconfigure's parameter names: the first (by name) that lb does not honour
/// is refused; the names DFP does not document come back, to be ignored with a warning.
pub(super) fn check(params: &HashMap<String, String>) -> Result<Vec<String>, Nok> {
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    let mut unknown = Vec::new();
    for name in names {
        let Some((param, _)) = lookup(name) else {
            unknown.push(name.clone());
            continue;
        };
        match param.support {
            Honoured | NoEffect(_) => {}
            Refused(instead) => return Err(refused(name, instead)),
        }
    }
    Ok(unknown)
}

/// Checks one destination's parameters (its indexed ones in place of the plain ones):
/// a `pathType` lb matches by.
pub(super) fn check_destination(params: &HashMap<String, String>) -> Result<(), Nok> {
    let sni = params.get("reqMode").is_some_and(|m| m == "sni");
    match params.get("pathType") {
        Some(path_type)
            if path_type != "path_beg" && !(sni && path_type.starts_with("req_ssl_sni")) =>
        {
            Err(refused(
                "pathType",
                "lb matches path prefixes (path_beg), and server names with req_ssl_sni for reqMode=sni",
            ))
        }
        _ => Ok(()),
    }
}

fn refused(name: &str, instead: &str) -> Nok {
    let mut message = format!(
        "{name}: lb does not honour this Docker Flow Proxy parameter, so the service was not \
         changed"
    );
    if !instead.is_empty() {
        message = format!("{message} ({instead})");
    }
    nok(StatusCode::BAD_REQUEST, name, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dfp::query as params;

    const DEMO: [(&str, &str); 4] = [
        ("serviceName", "go-demo"),
        ("servicePath", "/demo"),
        ("port", "8080"),
        ("backends", "10.0.0.1"),
    ];

    #[test]
    fn every_refused_parameter_is_a_400_naming_it() {
        for param in PARAMS.iter().filter(|p| matches!(p.support, Refused(_))) {
            let mut q = params(&DEMO);
            q.insert(param.name.to_string(), "x".into());
            let e = check(&q).expect_err(param.name);
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.field, param.name);
            assert!(e.message.starts_with(param.name), "{}", e.message);
        }
    }

    #[test]
    fn protecting_parameters_are_honoured() {
        let protecting = [
            "users",
            "usersSecret",
            "usersPassEncrypted",
            "denyHttp",
            "httpsOnly",
            "allowedMethods",
            "deniedMethods",
        ];
        for name in protecting {
            let param = PARAMS.iter().find(|p| p.name == name).expect(name);
            assert_eq!(param.support, Honoured, "{name}");
        }
    }

    #[test]
    fn honoured_and_no_effect_parameters_pass_and_unknown_ones_come_back() {
        let mut q = params(&DEMO);
        q.insert("distribute".into(), "true".into());
        q.insert("replicas".into(), "3".into());
        q.insert("pathType".into(), "path_beg".into());
        q.insert("colour".into(), "blue".into());
        q.insert("serviceName.1".into(), "x".into());
        assert_eq!(
            check(&q).unwrap(),
            vec!["colour".to_string(), "serviceName.1".to_string()]
        );
    }

    #[test]
    fn indexed_forms_are_known_by_their_base_name_and_index() {
        assert_eq!(documented("servicePath.1"), Some(("servicePath", Some(1))));
        assert_eq!(documented("port.12"), Some(("port", Some(12))));
        assert_eq!(documented("port"), Some(("port", None)));
        // `users` has no indexed form: its `.1` is no DFP parameter.
        assert_eq!(documented("users.1"), None);
        let mut q = params(&DEMO);
        q.insert("servicePath.1".into(), "/a".into());
        q.insert("users.1".into(), "x".into());
        assert_eq!(check(&q).unwrap(), vec!["users.1".to_string()]);
        // A refused parameter is refused in its indexed form too, by its full name.
        q.insert("checkTcp.1".into(), "true".into());
        assert_eq!(check(&q).unwrap_err().field, "checkTcp.1");
    }

    #[test]
    fn the_readme_says_what_lb_does_with_every_parameter() {
        let readme = include_str!("../../../README.md");
        let table = &readme[readme.find("| parameters | in lb |").expect("the table")..];
        for param in PARAMS {
            assert!(
                table.contains(&format!("`{}`", param.name)),
                "{}",
                param.name
            );
        }
    }

    #[test]
    fn a_path_type_other_than_prefixes_is_refused() {
        let mut q = params(&DEMO);
        q.insert("pathType".into(), "path_reg".into());
        assert_eq!(check_destination(&q).unwrap_err().field, "pathType");
        q.insert("pathType".into(), "req_ssl_sni -i -m beg".into());
        assert!(check_destination(&q).is_err());
        q.insert("reqMode".into(), "sni".into());
        assert!(check_destination(&q).is_ok());
    }
}
