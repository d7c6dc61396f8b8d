//! The HTTP admin API (axum) and `/metrics`.
//!
//! - `GET /targets`: every target, draining ones included: address, state, outstanding,
//!   weight, routed, since when (RFC 3339).
//! - `POST /targets` with `{"addr": "host:port", "weight": 2}` (weight optional):
//!   registers; `201 Created` when new, `200 OK` when already registered.
//! - `DELETE /targets/{addr}`: starts draining; `202 Accepted`, or `404` when unknown.
//! - `GET /healthz`: `200 ok` while serving, `503` once shutdown began.
//! - `GET /metrics`: Prometheus text.
//!
//! The routes hold a [`Handle`], the same view a program embedding the balancer gets.

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::discovery::resolve_one;
use crate::handle::Handle;
use crate::target::TargetInfo;

/// The admin routes over a handle to the running balancer.
pub(crate) fn router(handle: Handle) -> Router {
    Router::new()
        .route("/targets", get(list).post(register))
        .route("/targets/{addr}", axum::routing::delete(deregister))
        .route("/healthz", get(healthz))
        .route("/scaling", get(scaling))
        .route("/metrics", get(metrics))
        .with_state(handle)
}

async fn list(State(handle): State<Handle>) -> Json<Vec<TargetInfo>> {
    Json(handle.targets())
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

async fn register(State(handle): State<Handle>, Json(body): Json<Registration>) -> Response {
    if handle.shutting_down() {
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
    let addr = match resolve_one(&body.addr).await {
        Ok(addr) => addr,
        Err(error) => return problem(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let (target, new) = handle.group().register(addr, body.weight.unwrap_or(1));
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(TargetInfo::from(&*target))).into_response()
}

async fn deregister(State(handle): State<Handle>, Path(addr): Path<String>) -> Response {
    // The same names POST accepts: a worker registered as `host:port` deregisters as such.
    let addr = match addr.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => match resolve_one(&addr).await {
            Ok(addr) => addr,
            Err(error) => return problem(StatusCode::BAD_REQUEST, error.to_string()),
        },
    };
    let Some(target) = handle.group().get(addr) else {
        return problem(
            StatusCode::NOT_FOUND,
            format!("target {addr} is not registered"),
        );
    };
    handle.deregister(addr);
    // Read after deregistering: the answer shows the target draining.
    (StatusCode::ACCEPTED, Json(TargetInfo::from(&*target))).into_response()
}

async fn scaling(State(handle): State<Handle>) -> Response {
    match handle.scaling() {
        Some(status) => Json(status).into_response(),
        None => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "no scaling signal yet: the first sample is taken a second after start".to_owned(),
        ),
    }
}

async fn healthz(State(handle): State<Handle>) -> Response {
    if handle.shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(handle): State<Handle>) -> Response {
    let body = handle.metrics_text();
    let body = match handle.scaling() {
        Some(status) => body + &status.prometheus(),
        None => body,
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Serves the admin API on `listener` (plain TCP, or TLS) until `stop`.
pub(crate) async fn serve<L>(
    listener: L,
    handle: Handle,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router(handle))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
