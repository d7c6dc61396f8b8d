//! Feeds arbitrary frame bodies to the raw scanner (`RawMessage::scan`) and its splicer
//! (`RawMessage::write_frame`), with the full decoder (`Message::decode`) as the reference:
//! - the scan accepts only what the full decoder accepts, and finds the same kind, id and
//!   `deadline_ms` (the full message, tensors included, is the same);
//! - the scan accepts every `infer` and `result` as the encoder writes it, so the bodies it
//!   leaves to the full decoder are only the unusual encodings and the broken ones;
//! - `decode_body` reads every body as the full decoder does;
//! - splicing a new id, `deadline_ms` and `client` into an accepted body gives a frame that
//!   the full decoder reads back with those values and everything else unchanged.
//!
//! Input layout: 8 bytes of new id (little-endian), 1 byte of flags (bit 0: rewrite the
//! deadline, bit 1: rewrite the client), 8 bytes of deadline, 1 byte of client length and that
//! many bytes of client (read as UTF-8, lossily), then the body.
#![no_main]

use bytes::{Buf, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tidepool_protocol::raw::decode_body;
use tidepool_protocol::{Frame, Message, RawKind, RawMessage, Rewrite};

fuzz_target!(|data: &[u8]| {
    let Some((id, data)) = data.split_first_chunk::<8>() else { return };
    let Some((&flags, data)) = data.split_first() else { return };
    let Some((deadline, data)) = data.split_first_chunk::<8>() else { return };
    let Some((&client_len, data)) = data.split_first() else { return };
    let client_len = usize::from(client_len).min(data.len());
    let (client, body) = data.split_at(client_len);
    let client = String::from_utf8_lossy(client);
    let rewrite = Rewrite {
        id: u64::from_le_bytes(*id),
        deadline_ms: (flags & 1 != 0).then(|| u64::from_le_bytes(*deadline)),
        client: (flags & 2 != 0).then_some(&*client),
    };
    let body = Bytes::copy_from_slice(body);
    let decoded = Message::decode(&body);

    match RawMessage::scan(body.clone()) {
        Some(raw) => {
            let msg = decoded
                .as_ref()
                .unwrap_or_else(|e| panic!("the scan accepted a body the decoder refuses: {e}"));
            assert_eq!(raw.id(), msg.id());
            match (msg, raw.kind()) {
                (Message::Infer(infer), RawKind::Infer) => {
                    assert_eq!(raw.deadline_ms(), infer.deadline_ms)
                }
                // A result's deadline_ms is an unknown key to the decoder, found but unused.
                (Message::Result(_), RawKind::Result) => {}
                (msg, kind) => panic!("scanned as {kind:?}, decoded as {msg:?}"),
            }
            assert_same(&raw.to_message(), msg);
            check_splice(&raw, msg, &rewrite);
        }
        None => {
            // Refused: fine for anything but the encoder's own form of an infer or result.
            if let Ok(msg @ (Message::Infer(_) | Message::Result(_))) = &decoded {
                let canonical = msg.to_msgpack().expect("a decoded message re-encodes");
                assert!(
                    canonical[..] != body[..],
                    "the scan refused an {} exactly as the encoder writes it",
                    msg.kind()
                );
                let raw = RawMessage::scan(Bytes::from(canonical))
                    .expect("the scan accepts the re-encoded infer or result");
                assert_same(&raw.to_message(), msg);
            }
        }
    }

    match (decode_body(body), decoded) {
        (Ok(Frame::Raw(raw)), Ok(msg)) => assert_same(&raw.to_message(), &msg),
        (Ok(Frame::Message(got)), Ok(msg)) => assert_same(&got, &msg),
        (Err(got), Err(want)) => assert_eq!(got.to_string(), want.to_string()),
        (got, want) => panic!("decode_body gave {got:?}, the decoder {want:?}"),
    }
});

/// Splices `rewrite` into `raw` and checks that the full decoder reads `msg` back, changed
/// exactly as `rewrite` says (`Rewrite::applied_to`).
fn check_splice(raw: &RawMessage, msg: &Message, rewrite: &Rewrite<'_>) {
    let mut frame = BytesMut::from(&b"kept"[..]);
    raw.write_frame(rewrite, &mut frame, usize::MAX)
        .expect("no limit to exceed");
    assert_eq!(&frame[..4], b"kept", "what was in the buffer stays");
    frame.advance(4);
    let len = frame.get_u32() as usize;
    assert_eq!(len, frame.len(), "the length prefix covers the body");
    let back = Message::decode(&frame.freeze()).expect("a spliced frame decodes");
    assert_same(&back, &rewrite.applied_to(msg));
}

/// `got` and `want` are the same message, compared as their encodings: a float field (a
/// padding value, a busy share) may hold NaN, which a faithful decode keeps and `==` calls
/// unequal to itself.
fn assert_same(got: &Message, want: &Message) {
    assert_eq!(
        got.to_msgpack().expect("a decoded message encodes"),
        want.to_msgpack().expect("a decoded message encodes"),
        "{got:?} is not {want:?}"
    );
}
