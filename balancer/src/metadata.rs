//! Answering a client's `metadata` request: the balancer asks one of its healthy targets and
//! relays the answer under the client's id.
//!
//! Clients ask once, when they start, to learn the inputs to send. So each request opens a
//! short-lived connection of its own to a healthy target rather than sharing the upstream
//! connections (whose reader matches only `result` answers) or keeping a per-target cache:
//! the answer is never stale after a rollout, and the balancer holds no state for it. The
//! exchange runs in its own task, bounded by [`METADATA_TIMEOUT`] per target tried, so the
//! client's connection goes on being read meanwhile; the client's in-flight permit travels
//! with it and is released when the answer is written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tidepool_protocol::{
    tls::TlsConnector, Client, ClientOptions, ErrorCode, ErrorReply, Message, MetadataResult,
    RequestId, CONNECTION_ID,
};
use tokio::sync::OwnedSemaphorePermit;

use crate::dispatch::Router;
use crate::pending::ClientConn;
use crate::upstream;

/// How long one target may take to connect and answer.
pub(crate) const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Most targets tried before the request is answered `unavailable`.
const TARGETS_TRIED: usize = 3;

/// Answers `metadata` request `id` of `conn` from a healthy target, in a task of its own.
pub(crate) fn answer(
    router: &Router,
    conn: &Arc<ClientConn>,
    id: RequestId,
    permit: OwnedSemaphorePermit,
) {
    if id == CONNECTION_ID {
        conn.send(
            Message::Error(ErrorReply::new(
                id,
                ErrorCode::BadRequest,
                "request id 0 is reserved for connection errors; number requests from 1",
            )),
            Some(permit),
        );
        return;
    }
    let targets = router.healthy_targets();
    let tls = router.upstream_tls();
    let conn = Arc::clone(conn);
    tokio::spawn(async move {
        let answer = ask(&targets, tls.as_ref(), id).await;
        conn.send(answer, Some(permit));
    });
}

/// Asks the targets in turn until one answers.
async fn ask(targets: &[SocketAddr], tls: Option<&TlsConnector>, id: RequestId) -> Message {
    let mut last_error = None;
    for &target in targets.iter().take(TARGETS_TRIED) {
        let exchange = async {
            // The same TLS as the target's other connections: a worker that admits only
            // the balancer's certificate answers this too.
            let (read, write) = upstream::connect(target, tls).await?.into_split();
            let client =
                Client::from_parts(target.to_string(), read, write, ClientOptions::default());
            client.metadata(METADATA_TIMEOUT).await
        };
        match tokio::time::timeout(METADATA_TIMEOUT, exchange).await {
            Ok(Ok(model)) => {
                return Message::MetadataResult(MetadataResult {
                    id,
                    model,
                    worker: Some(target.to_string()),
                })
            }
            Ok(Err(error)) => last_error = Some(format!("{target}: {error}")),
            Err(_) => last_error = Some(format!("{target}: no answer within {METADATA_TIMEOUT:?}")),
        }
        tracing::debug!(%target, error = ?last_error, "metadata from a target failed");
    }
    let message = match last_error {
        Some(error) => format!("no healthy target described its model (last: {error}); retry"),
        None => "no healthy target to describe the model; retry once a worker is ready".to_owned(),
    };
    Message::Error(ErrorReply::new(id, ErrorCode::Unavailable, message).retry_after(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_targets_the_answer_is_unavailable_under_the_request_id() {
        let Message::Error(reply) = ask(&[], None, 9).await else {
            panic!("an error")
        };
        assert_eq!((reply.id, reply.code), (9, ErrorCode::Unavailable));
        assert!(
            reply.message.contains("no healthy target"),
            "{}",
            reply.message
        );
    }

    #[tokio::test]
    async fn a_target_that_refuses_connections_is_named_in_the_error() {
        // A port nothing listens on: bind one, then close it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let Message::Error(reply) = ask(&[addr], None, 4).await else {
            panic!("an error")
        };
        assert_eq!(reply.code, ErrorCode::Unavailable);
        assert!(
            reply.message.contains(&addr.to_string()),
            "{}",
            reply.message
        );
    }
}
