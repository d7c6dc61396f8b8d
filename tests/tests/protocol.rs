//! The protocol against a live server: pipelining, cancel, deadlines and every malformed
//! frame answered with the right code.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::join_all;
use serde::Serialize;
use tidepool_protocol::{
    encode_frame, CallOptions, Client, ErrorCode, Message, MessageCodec, Tensor, Tensors,
};
use tidepool_tests::stand_in::{StandIn, StandInConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn item(i: u32) -> Tensors {
    [(
        "x".to_owned(),
        Tensor::from_vec(vec![2], vec![i as f32, -(i as f32)]).unwrap(),
    )]
    .into()
}

#[tokio::test]
async fn ten_thousand_pipelined_requests_on_one_connection() {
    let server = StandIn::start(StandInConfig {
        delay: Duration::from_millis(5),
        ..StandInConfig::default()
    })
    .await;
    let client = Client::connect(server.addr()).await.unwrap();
    let calls = (0..10_000u32).map(|i| {
        let client = client.clone();
        tokio::spawn(async move { (i, client.infer(item(i)).await) })
    });
    let results = join_all(calls).await;
    for joined in results {
        let (i, result) = joined.unwrap();
        let result = result.unwrap();
        assert_eq!(
            result.outputs["x"].to_vec::<f32>().unwrap(),
            vec![i as f32, -(i as f32)]
        );
    }
    assert_eq!(
        server
            .stats()
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        server
            .stats()
            .max_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100
    );
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn dropped_call_sends_cancel_and_deadline_is_enforced() {
    let server = StandIn::start(StandInConfig {
        delay: Duration::from_secs(30),
        ..StandInConfig::default()
    })
    .await;
    let client = Client::connect(server.addr()).await.unwrap();
    let err = client
        .infer_with(
            item(1),
            CallOptions {
                deadline: Some(Duration::from_millis(50)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::DeadlineExceeded, "{err}");
    // The abandoned call was cancelled on the server.
    for _ in 0..100 {
        if server
            .stats()
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        server
            .stats()
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn ping_and_not_ready() {
    let server = StandIn::start(StandInConfig::default()).await;
    let client = Client::connect(server.addr()).await.unwrap();
    client.ping(Duration::from_secs(5)).await.unwrap();
    server.set_ready(false);
    let err = client.ping(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable);
}

#[tokio::test]
async fn lost_connection_fails_every_call_once() {
    let server = StandIn::start(StandInConfig {
        delay: Duration::from_secs(30),
        ..StandInConfig::default()
    })
    .await;
    let client = Client::connect(server.addr()).await.unwrap();
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.infer(item(i)).await })
        })
        .collect();
    while server
        .stats()
        .received
        .load(std::sync::atomic::Ordering::Relaxed)
        < 50
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(
            matches!(err, tidepool_protocol::Error::ConnectionLost { .. }),
            "{err}"
        );
    }
    assert!(client.is_closed());
    assert!(client.infer(item(0)).await.is_err());
}

/// Sends raw bytes, returns the frames the server answered until it closed or went quiet.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8], close_write: bool) -> Vec<Message> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if close_write {
        stream.shutdown().await.unwrap();
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read_to_end(&mut buf)).await;
    let mut codec = MessageCodec::default();
    let mut bytes = BytesMut::from(&buf[..]);
    let mut out = Vec::new();
    while let Ok(Some(frame)) = tokio_util::codec::Decoder::decode(&mut codec, &mut bytes) {
        out.push(frame.unwrap());
    }
    out
}

fn raw_frame<T: Serialize>(value: &T) -> Vec<u8> {
    let body = rmp_serde::to_vec_named(value).unwrap();
    let mut out = BytesMut::new();
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out.to_vec()
}

fn error_of(msg: &Message) -> (u64, ErrorCode) {
    match msg {
        Message::Error(e) => (e.id, e.code),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_frames_get_the_right_code() {
    let server = StandIn::start(StandInConfig {
        max_frame: 1 << 20,
        ..StandInConfig::default()
    })
    .await;
    let ping = encode_frame(&Message::Ping { id: 77 }).unwrap();

    // Zero length: bad_request, then the connection closes (the ping after it is not read).
    let mut bytes = vec![0, 0, 0, 0];
    bytes.extend_from_slice(&ping);
    let answers = exchange(server.addr(), &bytes, false).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(error_of(&answers[0]), (0, ErrorCode::BadRequest));

    // Over the maximum: too_large from the prefix alone, then close.
    let answers = exchange(server.addr(), &(2u32 << 20).to_be_bytes(), false).await;
    assert_eq!(answers.len(), 1);
    assert_eq!(error_of(&answers[0]), (0, ErrorCode::TooLarge));

    // Truncated: the peer closes mid-frame.
    let answers = exchange(server.addr(), &ping[..ping.len() - 1], true).await;
    assert_eq!(answers.len(), 1);
    assert_eq!(error_of(&answers[0]), (0, ErrorCode::BadRequest));

    #[derive(Serialize)]
    struct Typed<'a, T: Serialize> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: u64,
        inputs: T,
    }
    #[derive(Serialize)]
    struct Wire {
        dtype: &'static str,
        shape: Vec<u64>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    }
    let mut bytes = Vec::new();
    // Wrong key type: inputs is a string.
    bytes.extend(raw_frame(&Typed {
        kind: "infer",
        id: 1,
        inputs: "x",
    }));
    // Bad tensor length.
    bytes.extend(raw_frame(&Typed {
        kind: "infer",
        id: 2,
        inputs: [(
            "x",
            Wire {
                dtype: "f32",
                shape: vec![4],
                data: vec![0; 15],
            },
        )]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>(),
    }));
    // Unknown type.
    bytes.extend(raw_frame(&Typed {
        kind: "launch",
        id: 3,
        inputs: (),
    }));
    // The connection survived all three: this ping is answered.
    bytes.extend_from_slice(&ping);
    let answers = exchange(server.addr(), &bytes, false).await;
    let codes: Vec<_> = answers
        .iter()
        .map(|m| match m {
            Message::Pong { id, .. } => (*id, None),
            other => {
                let (id, code) = error_of(other);
                (id, Some(code))
            }
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            (1, Some(ErrorCode::BadRequest)),
            (2, Some(ErrorCode::BadRequest)),
            (3, Some(ErrorCode::BadRequest)),
            (77, None)
        ]
    );
}

#[tokio::test]
async fn duplicate_id_in_flight_is_a_bad_request() {
    let server = StandIn::start(StandInConfig {
        delay: Duration::from_millis(300),
        ..StandInConfig::default()
    })
    .await;
    let infer = Message::Infer(tidepool_protocol::Infer {
        id: 5,
        inputs: item(1),
        ..Default::default()
    });
    let mut bytes = encode_frame(&infer).unwrap();
    bytes.extend(encode_frame(&infer).unwrap());
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut frames = tokio_util::codec::FramedRead::new(stream, MessageCodec::default());
    use futures::StreamExt;
    let first = frames.next().await.unwrap().unwrap().unwrap();
    assert_eq!(error_of(&first), (5, ErrorCode::BadRequest));
    let second = frames.next().await.unwrap().unwrap().unwrap();
    assert!(
        matches!(second, Message::Result(ref r) if r.id == 5),
        "{second:?}"
    );
    let _ = Bytes::new();
}
