//! TLS certificates over the API: `PUT/GET/DELETE /v1/certs/{name}` and `GET /v1/certs`.
//! A certificate is checked (PEM, key, dates) before it is stored under
//! `<prefix>/certs/<name>`, so that every node, and a replacement node, serves it; a GET
//! shows its chain, names and dates, never its key. DFP's `cert` and `certs` calls go
//! through the same [`Certs`].
use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    store::{Expect, Store, StoreError, check_name},
    tls::{CertError, CertTable, Certificate},
};

/// The stored certificates, and this node's table of those it serves.
#[derive(Clone)]
pub struct Certs {
    store: Arc<dyn Store>,
    table: Arc<CertTable>,
}

/// A certificate as the API shows it: never the key.
#[derive(Debug, Serialize)]
pub struct CertView {
    pub name: String,
    pub domains: Vec<String>,
    /// RFC 3339, UTC.
    pub expires: String,
    /// The chain, leaf first, as PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
}

impl CertView {
    fn of(c: &Certificate, with_chain: bool) -> Self {
        Self {
            name: c.name.clone(),
            domains: c.domains.clone(),
            expires: c.expires(),
            cert: with_chain.then(|| c.chain_pem.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("name: {0}")]
    Name(String),
    #[error("{}: {}", .0.field(), .0)]
    Invalid(#[from] CertError),
    #[error("no certificate {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CertsError {
    pub fn status(&self) -> StatusCode {
        match self {
            CertsError::Name(_) | CertsError::Invalid(_) => StatusCode::BAD_REQUEST,
            CertsError::NotFound(_) => StatusCode::NOT_FOUND,
            CertsError::Store(StoreError::Conflict { .. }) => StatusCode::CONFLICT,
            CertsError::Store(StoreError::Invalid(_)) => StatusCode::BAD_REQUEST,
            CertsError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            CertsError::Name(_) | CertsError::NotFound(_) => Some("name"),
            CertsError::Invalid(e) => Some(e.field()),
            CertsError::Store(_) => None,
        }
    }
}

impl IntoResponse for CertsError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.to_string() });
        if let Some(f) = self.field() {
            body["field"] = f.into();
        }
        (self.status(), Json(body)).into_response()
    }
}

impl Certs {
    pub fn new(store: Arc<dyn Store>, table: Arc<CertTable>) -> Self {
        Self { store, table }
    }

    /// Checks and stores `name`'s chain and key (the same text may hold both), replacing
    /// what was there; served on this node at once, on the others as their watch sees it.
    pub async fn put(&self, name: &str, cert: &str, key: &str) -> Result<CertView, CertsError> {
        let certificate = Self::check(name, cert, key)?;
        self.store(certificate).await
    }

    /// `name`'s chain and key as [`put`](Self::put) takes them, checked, not yet stored.
    pub fn check(name: &str, cert: &str, key: &str) -> Result<Certificate, CertsError> {
        check_name(name).map_err(|e| CertsError::Name(e.to_string()))?;
        let certificate = Certificate::parse(name, cert, key)?;
        certificate.check_dates()?;
        Ok(certificate)
    }

    /// Stores a checked certificate.
    pub async fn store(&self, certificate: Certificate) -> Result<CertView, CertsError> {
        self.store
            .put(&certificate.name, &certificate.to_stored(), Expect::Any)
            .await?;
        let view = CertView::of(&certificate, false);
        self.table.put_cert(certificate);
        Ok(view)
    }

    /// Every stored certificate, by name.
    pub async fn list(&self) -> Result<Vec<Certificate>, CertsError> {
        let snapshot = self.store.list().await?;
        let mut certs: Vec<Certificate> = snapshot
            .entries
            .iter()
            .filter_map(|e| Certificate::from_stored(&e.name, &e.value).ok())
            .collect();
        certs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(certs)
    }

    pub async fn get(&self, name: &str) -> Result<Certificate, CertsError> {
        let snapshot = self.store.list().await?;
        snapshot
            .entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| Certificate::from_stored(&e.name, &e.value).ok())
            .ok_or_else(|| CertsError::NotFound(name.to_string()))
    }

    pub async fn delete(&self, name: &str) -> Result<(), CertsError> {
        check_name(name).map_err(|e| CertsError::Name(e.to_string()))?;
        if !self.store.delete(name, Expect::Any).await? {
            return Err(CertsError::NotFound(name.to_string()));
        }
        self.table.remove_cert(name);
        Ok(())
    }
}

/// `PUT /v1/certs/{name}`: `{"cert": PEM chain, "key": PEM key}`, or the PEM text itself
/// holding both (as DFP and HAProxy take a certificate).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertBody {
    cert: String,
    key: String,
}

fn parse_body(body: &[u8]) -> Result<(String, String), CertsError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| CertsError::Invalid(CertError::Pem("the body is not UTF-8".into())))?;
    if text.trim_start().starts_with("-----BEGIN") {
        return Ok((text.to_string(), text.to_string()));
    }
    let parsed: CertBody = serde_json::from_str(text).map_err(|e| {
        CertsError::Invalid(CertError::Pem(format!(
            "expected {{\"cert\": PEM, \"key\": PEM}} or a PEM text: {e}"
        )))
    })?;
    Ok((parsed.cert, parsed.key))
}

async fn put_cert(
    State(certs): State<Certs>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, CertsError> {
    let (cert, key) = parse_body(&body)?;
    let view = certs.put(&name, &cert, &key).await?;
    Ok(Json(view).into_response())
}

async fn get_cert(
    State(certs): State<Certs>,
    Path(name): Path<String>,
) -> Result<Response, CertsError> {
    let cert = certs.get(&name).await?;
    Ok(Json(CertView::of(&cert, true)).into_response())
}

async fn delete_cert(
    State(certs): State<Certs>,
    Path(name): Path<String>,
) -> Result<StatusCode, CertsError> {
    certs.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_certs(State(certs): State<Certs>) -> Result<Response, CertsError> {
    let views: Vec<CertView> = certs
        .list()
        .await?
        .iter()
        .map(|c| CertView::of(c, false))
        .collect();
    Ok(Json(views).into_response())
}

pub fn router(certs: Certs) -> Router {
    Router::new()
        .route("/v1/certs", get(list_certs))
        .route(
            "/v1/certs/{name}",
            get(get_cert).put(put_cert).delete(delete_cert),
        )
        .with_state(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_json_or_pem() {
        let (c, k) = parse_body(br#"{"cert": "C", "key": "K"}"#).unwrap();
        assert_eq!((c.as_str(), k.as_str()), ("C", "K"));
        let pem = "-----BEGIN CERTIFICATE-----\n...";
        let (c, k) = parse_body(pem.as_bytes()).unwrap();
        assert_eq!((c.as_str(), k.as_str()), (pem, pem));
        let e = parse_body(br#"{"cert": "C"}"#).unwrap_err();
        assert_eq!(e.field(), Some("cert"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }
}
