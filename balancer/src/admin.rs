//! The HTTP admin API (axum) and `/metrics`.
//!
//! - `GET /targets`: every target, draining ones included: address, state, outstanding,
//!   weight, routed, since when (RFC 3339).
//! - `POST /targets` with `{"addr": "host:port", "weight": 2}` (weight optional):
//!   registers; `201 Created` when new, `200 OK` when already registered.
//! - `DELETE /targets/{addr}`: starts draining; `202 Accepted`, or `404` when unknown.
//! - `GET /healthz`: `200 ok` while serving, `503` once shutdown began.
//! - `GET /metrics`: Prometheus text.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::balancer::Shared;
use crate::target::TargetInfo;

/// The admin routes over the balancer's shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/targets", get(list).post(register))
        .route("/targets/{addr}", axum::routing::delete(deregister))
        .route("/healthz", get(healthz))
        .route("/scaling", get(scaling))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn list(State(shared): State<Arc<Shared>>) -> Json<Vec<TargetInfo>> {
    Json(shared.registry.infos())
}

/// The body of `POST /targets`.
#[derive(Debug, Deserialize)]
struct Registration {
    addr: String,
    #[serde(default)]
    weight: Option<u32>,
}

fn problem(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn register(State(shared): State<Arc<Shared>>, Json(body): Json<Registration>) -> Response {
    if shared.shutting_down.is_cancelled() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the balancer is shutting down".to_owned(),
        );
    }
    if body.weight == Some(0) {
        return problem(
            StatusCode::BAD_REQUEST,
            "weight must be at least 1".to_owned(),
        );
    }
    let addr = match crate::balancer::resolve_one(&body.addr).await {
        Ok(addr) => addr,
        Err(error) => return problem(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let (target, new) = shared
        .registry
        .register(&shared, addr, body.weight.unwrap_or(1));
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(TargetInfo::from(&*target))).into_response()
}

async fn deregister(State(shared): State<Arc<Shared>>, Path(addr): Path<String>) -> Response {
    // The same names POST accepts: a worker registered as `host:port` deregisters as such.
    let addr = match addr.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => match crate::balancer::resolve_one(&addr).await {
            Ok(addr) => addr,
            Err(error) => return problem(StatusCode::BAD_REQUEST, error.to_string()),
        },
    };
    let Some(target) = shared.registry.get(addr) else {
        return problem(
            StatusCode::NOT_FOUND,
            format!("target {addr} is not registered"),
        );
    };
    shared.registry.deregister(&shared, addr);
    (StatusCode::ACCEPTED, Json(TargetInfo::from(&*target))).into_response()
}

async fn scaling(State(shared): State<Arc<Shared>>) -> Response {
    let status = shared
        .scaling
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match status {
        Some(status) => Json(status).into_response(),
        None => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "no scaling signal yet: the first sample is taken a second after start".to_owned(),
        ),
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutting_down.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let body = shared
        .metrics
        .render(&shared.registry.all(), shared.queue.signal.len());
    let scaling = shared
        .scaling
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let body = match scaling {
        Some(status) => body + &crate::metrics::render_scaling(&status),
        None => body,
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Serves the admin API on `listener` until `stop`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
