//! Interop with an independent MessagePack encoder (Python's `msgpack`, see
//! `interop/interop.py`): Rust decodes the frames Python made, and writes the frames that
//! the same script checks (`make test` runs `interop.py check`).
//!
//! Set `TIDEPOOL_BLESS=1` to rewrite the `rust_*.bin` fixtures after a deliberate change.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use tidepool_protocol::{
    encode_frame, DType, ErrorCode, ErrorReply, Infer, InferResult, Message, MessageCodec,
    MetadataResult, ModelMetadata, PaddingMetadata, Tensor, TensorMetadata,
};
use tokio_util::codec::Decoder;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/fixtures")
}

fn expected() -> BTreeMap<&'static str, Message> {
    let x = Tensor::from_vec(vec![2, 3], vec![0.5f32, 1.0, 1.5, 2.0, 2.5, 3.0]).unwrap();
    let y = Tensor::from_vec(vec![2], vec![0.25f32, -1.0]).unwrap();
    [
        (
            "infer",
            Message::Infer(Infer {
                id: 1,
                inputs: [("x".to_owned(), x)].into(),
                deadline_ms: Some(100),
                client: None,
                ..Infer::default()
            }),
        ),
        (
            "result",
            Message::Result(InferResult {
                id: 1,
                outputs: [("y".to_owned(), y)].into(),
                queue_us: Some(150),
                infer_us: Some(4200),
                batch_size: Some(8),
                worker: Some("worker-1".to_owned()),
            }),
        ),
        (
            "error",
            Message::Error(
                ErrorReply::new(
                    2,
                    ErrorCode::Overloaded,
                    "queue full (1024 items); retry later",
                )
                .retry_after(50),
            ),
        ),
        ("cancel", Message::Cancel { id: 3 }),
        ("ping", Message::Ping { id: 4 }),
        ("pong", Message::pong(4)),
        ("unknown_keys", Message::Ping { id: 5 }),
        ("metadata", Message::Metadata { id: 6 }),
        (
            "metadata_result",
            Message::MetadataResult(MetadataResult {
                id: 6,
                model: ModelMetadata {
                    name: "encoder".to_owned(),
                    version: Some("2".to_owned()),
                    platform: "onnxruntime".to_owned(),
                    hash: None,
                    inputs: vec![text("input_ids"), text("attention_mask")],
                    outputs: vec![TensorMetadata {
                        name: "embedding".to_owned(),
                        dtype: DType::F32,
                        shape: vec![4],
                        dims: vec![String::new()],
                    }],
                    batched: true,
                    max_batch: 32,
                    max_batch_tokens: None,
                    padding: Some(PaddingMetadata {
                        axes: vec!["sequence".to_owned()],
                        values: [
                            ("attention_mask".to_owned(), 0.0),
                            ("input_ids".to_owned(), 0.0),
                        ]
                        .into(),
                    }),
                    padding_note: None,
                },
                worker: Some("worker-1".to_owned()),
            }),
        ),
    ]
    .into()
}

/// A text input of one dynamic dimension named `sequence`.
fn text(name: &str) -> TensorMetadata {
    TensorMetadata {
        name: name.to_owned(),
        dtype: DType::I64,
        shape: vec![-1],
        dims: vec!["sequence".to_owned()],
    }
}

fn decode_one(bytes: &[u8]) -> Message {
    let mut buf = BytesMut::from(bytes);
    let msg = MessageCodec::default()
        .decode(&mut buf)
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(buf.is_empty(), "trailing bytes after the frame");
    msg
}

#[test]
fn rust_decodes_python_frames() {
    for (name, message) in expected() {
        let path = fixtures().join(format!("py_{name}.bin"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(decode_one(&bytes), message, "{}", path.display());
    }
}

#[test]
fn rust_frames_match_the_checked_fixtures() {
    let bless = std::env::var_os("TIDEPOOL_BLESS").is_some();
    for (name, message) in expected() {
        if name == "unknown_keys" {
            continue;
        }
        let frame = encode_frame(&message).unwrap();
        let path = fixtures().join(format!("rust_{name}.bin"));
        if bless {
            std::fs::write(&path, &frame).unwrap();
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with TIDEPOOL_BLESS=1)", path.display()));
        assert_eq!(
            frame,
            on_disk,
            "{}: the encoder's output changed",
            path.display()
        );
        assert_eq!(decode_one(&on_disk), message);
    }
}
