//! Feeds arbitrary bytes to the frame decoder, cut at an arbitrary point, and checks what
//! must hold whatever arrives: no panic; every frame that decodes re-encodes to a frame
//! that decodes to the same message (the same bytes again); errors that are not fatal
//! name a request id only when one was readable; the hand-written `result` writer writes
//! serde's bytes exactly; and every body the `raw` scanner passes (what a balancer
//! forwards) the full decoder (what a worker runs) accepts, with the same id.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tidepool_protocol::{encode_frame, FrameCodec, Message, MessageCodec, RawMessage};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = (cut as usize).min(data.len());
    raw_implies_decode(data);
    let mut codec = MessageCodec::new(1 << 20);
    let mut buf = BytesMut::from(&data[..cut]);
    let mut rest = &data[cut..];
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(Ok(msg))) => {
                // The hand-written `result` writer must write serde's bytes exactly.
                assert_eq!(
                    msg.to_msgpack().expect("a decoded message encodes"),
                    msg.to_msgpack_via_serde().expect("a decoded message encodes with serde"),
                    "the straight writer and serde agree"
                );
                let frame = encode_frame(&msg).expect("a decoded message re-encodes");
                let mut again = BytesMut::from(&frame[..]);
                let back = MessageCodec::new(usize::MAX >> 1)
                    .decode(&mut again)
                    .expect("re-encoded frame is well framed")
                    .expect("re-encoded frame is whole")
                    .expect("re-encoded frame decodes");
                // Compared as bytes, not with `==`: a float field may hold NaN, which a
                // faithful round trip keeps and `PartialEq` calls unequal to itself.
                let twice = encode_frame(&back).expect("the round-tripped message re-encodes");
                assert_eq!(twice, frame, "a decoded message survives a round trip");
            }
            Ok(Some(Err(err))) => assert!(!err.is_fatal()),
            Ok(None) if rest.is_empty() => {
                let _ = codec.decode_eof(&mut buf);
                break;
            }
            Ok(None) => {
                buf.extend_from_slice(rest);
                rest = &[];
            }
            Err(err) => {
                assert!(err.is_fatal());
                break;
            }
        }
    }
});

/// Every frame body in `data` that the raw scanner passes decodes in full, same id.
fn raw_implies_decode(data: &[u8]) {
    let mut frames = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(body)) = frames.decode(&mut buf) {
        if let Some(raw) = RawMessage::scan(body.clone()) {
            let msg = Message::decode(&body).expect("the decoder accepts what raw passes");
            assert_eq!(msg.id(), raw.id());
        }
    }
}
