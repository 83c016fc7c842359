//! The HTTP API: JSON in and out, every error a JSON object naming the field at fault.
use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use crate::{
    controller::{ControlError, Controller},
    model::ServiceSpec,
    reconcile::ReconcileError,
    store::StoreError,
    supervise::Supervisor,
    web::{Shared, status_of},
};

/// An error answer: status, message and (for bad input) the field.
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = f.into();
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        ReconcileError::Control(e).into()
    }
}

/// The status from `status_of` (the one mapping, which the DFP API uses too), and the
/// message and field the native API adds.
impl From<ReconcileError> for ApiError {
    fn from(e: ReconcileError) -> Self {
        let status = status_of(&e);
        let (message, field) = match &e {
            ReconcileError::Control(ControlError::Invalid(v) | ControlError::LocalListener(v)) => {
                (v.to_string(), Some(v.field.clone()))
            }
            ReconcileError::Control(ControlError::NotFound(_)) => {
                (e.to_string(), Some("name".to_string()))
            }
            ReconcileError::Store(StoreError::Invalid(m)) => (m.clone(), Some("name".to_string())),
            ReconcileError::Control(ControlError::Dataplane(d)) => {
                tracing::error!(error = %d, "applying to the data plane");
                (d.to_string(), None)
            }
            ReconcileError::Store(StoreError::Claimed { claim, .. }) => {
                (e.to_string(), Some(claim.field().to_string()))
            }
            ReconcileError::Store(StoreError::TooManyClaims { field, .. }) => {
                (e.to_string(), Some((*field).to_string()))
            }
            ReconcileError::Store(StoreError::Conflict { .. }) => {
                (format!("{e}; read the service again and retry"), None)
            }
            ReconcileError::Store(_) | ReconcileError::Stopped(_) => (e.to_string(), None),
        };
        ApiError {
            status,
            message,
            field,
        }
    }
}

/// Parses a JSON body, naming the field a type error is in.
fn parse_spec(body: &[u8]) -> Result<ServiceSpec, ApiError> {
    let bad = |field: String, message: String| ApiError {
        status: StatusCode::BAD_REQUEST,
        message,
        field: Some(field),
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return bad("body".into(), format!("body: not valid JSON: {inner}"));
        }
        // serde names an unknown field in its message; point at it.
        let field = match inner.to_string().strip_prefix("unknown field `") {
            Some(rest) => rest.split('`').next().unwrap_or_default().to_string(),
            None if path == "." => "body".to_string(),
            None => path,
        };
        bad(field.clone(), format!("{field}: {inner}"))
    })
}

/// Runs `f` on the controller (on its own thread: map reads are syscalls).
async fn with_controller<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&mut Controller) -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ApiError> {
    let answer = state
        .controller()
        .call(f)
        .await
        .map_err(ReconcileError::from)?;
    Ok(answer?)
}

/// `PUT`'s one parameter: `drain=false` cuts the backends the write leaves out at once,
/// rather than letting their tracked flows finish (`drain=true`, the default).
fn parse_put_query(query: Option<&str>) -> Result<bool, ApiError> {
    let bad = |field: &str, message: &str| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("{field}: {message}"),
        field: Some(field.to_string()),
    };
    let mut drain = true;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("drain", "true") => drain = true,
            ("drain", "false") => drain = false,
            ("drain", _) => return Err(bad("drain", "must be true or false")),
            (other, _) => return Err(bad(other, "is not a parameter of PUT (drain)")),
        }
    }
    Ok(drain)
}

async fn put_service(
    State(s): State<Shared>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let drain = parse_put_query(query.as_deref())?;
    let mut spec = parse_spec(&body)?;
    spec.cut_removed = !drain;
    let svc = s.put(&name, spec).await?;
    Ok(Json(svc).into_response())
}

async fn get_service(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let view = with_controller(&s, move |c| c.get(&name)).await?;
    Ok(Json(view).into_response())
}

async fn delete_service(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_services(State(s): State<Shared>) -> Result<Response, ApiError> {
    let list = with_controller(&s, |c| Ok(c.list())).await?;
    Ok(Json(list).into_response())
}

/// XDP's drops by reason, the SYN flood defence, and the HTTP proxy's requests per service
/// and own answers.
async fn stats(
    State(s): State<Shared>,
    proxy: Option<Arc<crate::l7::Proxy>>,
) -> Result<Response, ApiError> {
    let (drops, flood) = with_controller(&s, |c| Ok((c.drops(), c.flood()))).await?;
    let drops: serde_json::Map<String, serde_json::Value> = drops
        .into_iter()
        .map(|(r, n)| (r.name().to_string(), n.into()))
        .collect();
    let mut body = json!({ "drops": drops, "syn_flood": flood });
    if let Some(p) = proxy {
        body["http"] = serde_json::to_value(p.stats()).unwrap_or_default();
    }
    Ok(Json(body).into_response())
}

async fn ready(State(s): State<Shared>, supervisor: Supervisor) -> Response {
    let mut stopped = supervisor.dead();
    if s.controller().has_failed() {
        stopped.push("controller: a command panicked".into());
    }
    readiness(&stopped, s.is_ready()).into_response()
}

/// 200 once every stored service has been restored, 503 before, and 503 naming them when
/// parts of lb have `stopped`.
fn readiness(stopped: &[String], restored: bool) -> (StatusCode, String) {
    if !stopped.is_empty() {
        let message = format!("stopped: {}", stopped.join("; "));
        (StatusCode::SERVICE_UNAVAILABLE, message)
    } else if restored {
        (StatusCode::OK, "ready".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "restoring services from the store".into(),
        )
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        field: None,
    }
}

/// What the API serves besides the services.
pub struct Extras {
    /// The balancer's own address and listeners, as DFP's parameters name them.
    pub balancer: crate::dfp::Balancer,
    /// The HTTP proxy, for its counters.
    pub proxy: Option<Arc<crate::l7::Proxy>>,
    /// The daemon's parts, for `/ready`.
    pub supervisor: Supervisor,
    /// Who may call which endpoint, applied before any of them.
    pub access: Arc<crate::api_auth::AccessPolicy>,
    /// The TLS certificates in the store.
    pub certs: crate::api_certs::Certs,
}

/// The native API and the Docker Flow Proxy one.
pub fn router(state: Shared, extras: Extras) -> Router {
    let Extras {
        balancer,
        proxy,
        supervisor,
        access,
        certs,
    } = extras;
    let dfp = crate::dfp::router(state.clone(), balancer, certs.clone());
    let metrics_proxy = proxy.clone();
    let metrics_route =
        get(move |s: State<Shared>| crate::metrics::metrics(s, metrics_proxy.clone()));
    let stats_route = get(move |s: State<Shared>| stats(s, proxy.clone()));
    let ready_route = get(move |s: State<Shared>| ready(s, supervisor.clone()));
    Router::new()
        .route("/v1/services", get(list_services))
        .route(
            "/v1/services/{name}",
            get(get_service).put(put_service).delete(delete_service),
        )
        .route("/v1/stats", stats_route)
        .route("/metrics", metrics_route)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", ready_route)
        .with_state(state)
        .merge(dfp)
        .merge(crate::api_certs::router(certs))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            access,
            crate::api_auth::guard,
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_restored_and_every_part_runs() {
        assert_eq!(readiness(&[], true), (StatusCode::OK, "ready".into()));
        assert_eq!(readiness(&[], false).0, StatusCode::SERVICE_UNAVAILABLE);
        let stopped = vec![
            "http worker 1: it panicked: boom".to_string(),
            "store: it stopped".to_string(),
        ];
        assert_eq!(
            readiness(&stopped, true),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "stopped: http worker 1: it panicked: boom; store: it stopped".into()
            )
        );
    }

    #[test]
    fn a_put_drains_removed_backends_unless_told_not_to() {
        let drain = |q: Option<&str>| parse_put_query(q).map_err(|e| e.field.unwrap());
        assert_eq!(drain(None), Ok(true));
        assert_eq!(drain(Some("")), Ok(true));
        assert_eq!(drain(Some("drain=true")), Ok(true));
        assert_eq!(drain(Some("drain=false")), Ok(false));
        assert_eq!(drain(Some("drain=no")), Err("drain".into()));
        assert_eq!(drain(Some("drain=false&force=1")), Err("force".into()));
    }
}
