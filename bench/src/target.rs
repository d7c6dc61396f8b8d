//! The tiny targets of the balancer benchmarks (`bench-target`).
//!
//! - **Echo** (service time zero): each `infer` is answered at once with its inputs as
//!   outputs, on the connection's own task: as cheap as a target can be, so that what the
//!   benchmark sees is the path in front of it.
//! - **Serial** (service time above zero): items go through a bounded queue to one "model"
//!   thread that takes the service time per item, one at a time, like a worker with
//!   `--max-batch 1`. Its capacity is 1/service items/s; past it the queue grows, which is
//!   what makes a slow target hurt a balancer that keeps sending to it.
//!
//! `ping` is answered `pong` at once in both, as a loaded worker's health check is.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tidepool_protocol::{ErrorCode, ErrorReply, Infer, InferResult, Message, MessageCodec};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// Items a serial target holds queued before it stops reading (TCP backpressure).
const MODEL_QUEUE: usize = 1 << 16;
/// Answers a connection holds before its writer makes the model wait.
const ANSWER_QUEUE: usize = 4096;

type Job = (Infer, mpsc::Sender<Message>);

/// Serves `listener` until `stop`, answering each item after `service` (zero: at once).
pub async fn serve(
    listener: TcpListener,
    service: Duration,
    name: String,
    stop: CancellationToken,
) {
    let model = (!service.is_zero()).then(|| {
        let (tx, rx) = mpsc::channel::<Job>(MODEL_QUEUE);
        let name = name.clone();
        std::thread::spawn(move || model_thread(rx, service, &name));
        tx
    });
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, model.clone(), name.clone()));
    }
}

/// Takes `service` per item, one at a time; ends when every connection has gone.
fn model_thread(mut rx: mpsc::Receiver<Job>, service: Duration, name: &str) {
    while let Some((infer, answers)) = rx.blocking_recv() {
        std::thread::sleep(service);
        let _ = answers.blocking_send(result(infer, name, service));
    }
}

fn result(infer: Infer, name: &str, service: Duration) -> Message {
    Message::Result(InferResult {
        id: infer.id,
        outputs: infer.inputs,
        queue_us: Some(0),
        infer_us: Some(service.as_micros() as u64),
        batch_size: Some(1),
        worker: Some(name.to_owned()),
    })
}

async fn connection(stream: TcpStream, model: Option<mpsc::Sender<Job>>, name: String) {
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, MessageCodec::default());
    let mut sink = FramedWrite::new(write, MessageCodec::default());
    let (tx, mut rx) = mpsc::channel::<Message>(ANSWER_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.feed(msg).await.is_err() {
                return;
            }
            // Write everything already answered in one go.
            while let Ok(msg) = rx.try_recv() {
                if sink.feed(msg).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(frame) = frames.next().await {
        let answer = match frame {
            Err(error) => {
                let _ = tx.send(Message::Error(error.reply())).await;
                break;
            }
            Ok(Err(error)) => Message::Error(error.reply()),
            Ok(Ok(Message::Ping { id })) => Message::pong(id),
            Ok(Ok(Message::Infer(infer))) => match &model {
                None => result(infer, &name, Duration::ZERO),
                Some(model) => {
                    if model.send((infer, tx.clone())).await.is_err() {
                        break;
                    }
                    continue;
                }
            },
            Ok(Ok(Message::Cancel { .. })) => continue,
            Ok(Ok(other)) => Message::Error(ErrorReply::new(
                other.id(),
                ErrorCode::BadRequest,
                format!("a {} frame is not a request", other.kind()),
            )),
        };
        if tx.send(answer).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
