//! What the native API and the Docker Flow Proxy one share: the state they serve from, and
//! the one mapping from a failed write to its HTTP status.
use std::sync::Arc;

use axum::http::StatusCode;

use crate::{
    controller::ControlError,
    dataplane::DataplaneError,
    reconcile::{ReconcileError, Reconciler},
    store::StoreError,
};

pub type Shared = Arc<Reconciler>;

/// The HTTP status a failed write answers with.
pub fn status_of(e: &ReconcileError) -> StatusCode {
    match e {
        ReconcileError::Control(ControlError::Invalid(_)) => StatusCode::BAD_REQUEST,
        ReconcileError::Control(ControlError::NotFound(_)) => StatusCode::NOT_FOUND,
        ReconcileError::Control(ControlError::LocalListener(_)) => StatusCode::CONFLICT,
        ReconcileError::Control(ControlError::Dataplane(DataplaneError::Full(_))) => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        ReconcileError::Control(ControlError::Dataplane(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        ReconcileError::Store(StoreError::Conflict { .. } | StoreError::Claimed { .. }) => {
            StatusCode::CONFLICT
        }
        ReconcileError::Store(StoreError::Invalid(_) | StoreError::TooManyClaims { .. }) => {
            StatusCode::BAD_REQUEST
        }
        ReconcileError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        ReconcileError::Stopped(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
