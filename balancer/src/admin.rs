//! The HTTP admin API (axum) and `/metrics`.
//!
//! - `GET /targets`: every target, draining ones included: address, state, outstanding,
//!   weight, routed, since when (RFC 3339).
//! - `POST /targets` with `{"addr": "host:port", "weight": 2}` (weight optional):
//!   registers; `201 Created` when new (or revived from draining), `200 OK` when already
//!   registered; `400` for the balancer's own or an unroutable address, `403` outside
//!   `--register-allow`, `429` at `--max-targets`.
//! - `DELETE /targets/{addr}`: starts draining; `202 Accepted`, or `404` when unknown.
//! - `GET /healthz`: `200 ok` while serving, `503` once shutdown began.
//! - `GET /scaling`: the autoscaling signal and decision (JSON).
//! - `GET /metrics`: Prometheus text.
//!
//! With an admin token (`crate::auth` says why and how), the three `/targets` routes need
//! it, and with `--admin-auth-reads` `/metrics` and `/scaling` too; `/healthz` never does.
//!
//! The routes hold a [`Handle`], the same view a program embedding the balancer gets.

use std::net::SocketAddr;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::{middleware, Extension, Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AdminAuth};
use crate::discovery::resolve_one;
use crate::handle::Handle;
use crate::target::TargetInfo;
use crate::validation::TargetRefusal;

/// The admin routes over a handle to the running balancer, guarded by `auth`.
pub(crate) fn router(handle: Handle, auth: AdminAuth) -> Router {
    let guard = middleware::from_fn_with_state(auth.clone(), auth::require);
    let mut reads = Router::new()
        .route("/scaling", get(scaling))
        .route("/metrics", get(metrics));
    if auth.guards_reads() {
        reads = reads.route_layer(guard.clone());
    }
    Router::new()
        .route("/targets", get(list).post(register))
        .route("/targets/{addr}", axum::routing::delete(deregister))
        // Everything above needs the token (when there is one); what follows may not.
        .route_layer(guard)
        .merge(reads)
        .route("/healthz", get(healthz))
        .layer(Extension(auth))
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

async fn register(
    State(handle): State<Handle>,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    Json(body): Json<Registration>,
) -> Response {
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
    let (target, new) = match handle.group().register(addr, body.weight.unwrap_or(1)) {
        Ok(registered) => registered,
        Err(reason) => {
            let peer = peer.map(|Extension(ConnectInfo(Peer(p)))| p.to_string());
            tracing::warn!(
                target = %addr,
                peer = peer.as_deref().unwrap_or("unknown"),
                reason = reason.reason(),
                "registration refused: {reason}"
            );
            let status = match reason {
                TargetRefusal::NotAllowed { .. } => StatusCode::FORBIDDEN,
                TargetRefusal::Full { .. } => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::BAD_REQUEST,
            };
            return problem(status, format!("target {addr} refused: {reason}"));
        }
    };
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

async fn metrics(State(handle): State<Handle>, Extension(auth): Extension<AdminAuth>) -> Response {
    let body = handle.metrics_text() + &auth.prometheus();
    let body = match handle.scaling() {
        Some(status) => body + &status.prometheus(),
        None => body,
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The address of the client of one admin request, from whichever listener served it
/// (axum's own `ConnectInfo<SocketAddr>` knows only a plain `TcpListener`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, crate::tls::TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, crate::tls::TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Serves the admin API on `listener` (plain TCP, or TLS) until `stop`. Each request
/// knows its peer's address (`ConnectInfo`), for the log lines of refusals.
pub(crate) async fn serve<L>(
    listener: L,
    handle: Handle,
    auth: AdminAuth,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    Peer: for<'a> Connected<IncomingStream<'a, L>>,
{
    let app = router(handle, auth).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
