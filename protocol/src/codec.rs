//! Framing: a 4-byte big-endian length, then that many bytes of MessagePack.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::Error;
use crate::message::Message;

/// The default maximum frame length: 64 MiB.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

const PREFIX: usize = 4;

/// What the decoder yields per frame.
///
/// The outer `Result` of [`Decoder::decode`] is about the framing: an `Err` there
/// (too large, empty, truncated) means the stream cannot go on, and the connection should
/// be answered with [`Error::reply`] and closed. This inner `Result` is about one message:
/// an `Err` here is answered under the request's id and the connection goes on.
pub type Inbound = Result<Message, Error>;

/// The protocol's tokio-util codec.
#[derive(Clone, Copy, Debug)]
pub struct MessageCodec {
    max_frame: usize,
}

impl Default for MessageCodec {
    fn default() -> Self {
        MessageCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl MessageCodec {
    /// A codec that refuses frames longer than `max_frame` bytes (prefix excluded), both
    /// ways.
    pub fn new(max_frame: usize) -> Self {
        MessageCodec { max_frame }
    }

    /// The maximum frame length.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Decoder for MessageCodec {
    type Item = Inbound;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, Error> {
        Ok(FrameCodec::new(self.max_frame)
            .decode(src)?
            .map(|body| Message::decode(&body)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, Error> {
        Ok(FrameCodec::new(self.max_frame)
            .decode_eof(src)?
            .map(|body| Message::decode(&body)))
    }
}

/// The framing alone: yields each frame's body (a slice of the read buffer, without its
/// length prefix) undecoded, with the same framing errors as [`MessageCodec`]. For a proxy
/// that reads bodies with [`raw::decode_body`](crate::raw::decode_body).
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_frame: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame` bytes (prefix excluded).
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame }
    }

    /// The maximum frame length.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        if src.len() < PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len == 0 {
            return Err(Error::EmptyFrame);
        }
        if len > self.max_frame {
            // Refuse before reading (or reserving room for) the body.
            return Err(oversized([src[0], src[1], src[2], src[3]], self.max_frame));
        }
        if src.len() < PREFIX + len {
            src.reserve(PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(PREFIX);
        Ok(Some(src.split_to(len).freeze()))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let expected = if src.len() >= PREFIX {
                    PREFIX + u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize
                } else {
                    PREFIX
                };
                let got = src.len();
                src.clear();
                Err(Error::Truncated { expected, got })
            }
        }
    }
}

impl Encoder<Message> for MessageCodec {
    type Error = Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode_ref(&msg, dst)
    }
}

impl MessageCodec {
    /// Encodes a borrowed message as one frame appended to `dst`.
    pub fn encode_ref(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
        let start = dst.len();
        dst.put_u32(0);
        let mut writer = dst.writer();
        if let Err(e) = msg.write_msgpack(&mut writer) {
            writer.into_inner().truncate(start);
            return Err(e);
        }
        let dst = writer.into_inner();
        let len = dst.len() - start - PREFIX;
        if len > self.max_frame {
            dst.truncate(start);
            return Err(Error::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst[start..start + PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// The error for a length prefix above `max`. A TLS record header read as a length is
/// always far above any sane maximum (0x15030300 is 336 MiB), and it is what a peer that
/// speaks TLS looks like to a connection without it, so it gets an error that says which
/// side to change instead of a frame size nobody sent.
pub(crate) fn oversized(prefix: [u8; 4], max: usize) -> Error {
    // A TLS record: content type, then the protocol version 3.0 to 3.4 (SSL 3 to TLS 1.3).
    const HANDSHAKE: u8 = 0x16;
    const ALERT: u8 = 0x15;
    let tls_version = prefix[1] == 0x03 && prefix[2] <= 0x04;
    match prefix[0] {
        HANDSHAKE if tls_version => Error::TlsHandshakeOnPlainConnection,
        ALERT if tls_version => Error::TlsAlertOnPlainConnection,
        _ => Error::FrameTooLarge {
            len: u32::from_be_bytes(prefix) as usize,
            max,
        },
    }
}

/// Encodes one message as a whole frame, prefix included.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, Error> {
    let mut buf = BytesMut::new();
    MessageCodec::new(u32::MAX as usize).encode_ref(msg, &mut buf)?;
    Ok(buf.to_vec())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::message::{ErrorCode, ErrorReply, Infer, InferResult, Tensors};
    use crate::priority::Priority;
    use crate::tensor::{DType, Tensor};
    use proptest::prelude::*;

    fn frame(body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(body);
        buf
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let whole = encode_frame(&Message::Ping { id: 3 }).unwrap();
        let mut codec = MessageCodec::default();
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.put_u8(*byte);
            let out = codec.decode(&mut buf).unwrap();
            if i + 1 < whole.len() {
                assert!(out.is_none());
            } else {
                assert_eq!(out.unwrap().unwrap(), Message::Ping { id: 3 });
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn tls_records_read_as_a_length_say_which_side_speaks_tls() {
        // A ClientHello's record header (TLS 1.0 record version, as clients send it).
        let mut hello = BytesMut::from(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]);
        let err = FrameCodec::default().decode(&mut hello).unwrap_err();
        assert!(matches!(err, Error::TlsHandshakeOnPlainConnection), "{err}");
        assert!(err.is_fatal());
        assert!(err.to_string().contains("--tls-cert"), "{err}");
        // A server's alert (TLS 1.2 record version, length 2).
        let mut alert = BytesMut::from(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32][..]);
        let err = MessageCodec::default().decode(&mut alert).unwrap_err();
        assert!(matches!(err, Error::TlsAlertOnPlainConnection), "{err}");
        assert!(err.to_string().contains("this port speaks TLS"), "{err}");
        // Not a TLS version: still the plain size error, with the announced length.
        let mut other = BytesMut::from(&[0x15, 0x07, 0x03, 0x00][..]);
        let err = FrameCodec::default().decode(&mut other).unwrap_err();
        assert!(
            matches!(
                err,
                Error::FrameTooLarge {
                    len: 0x1507_0300,
                    ..
                }
            ),
            "{err}"
        );
        // Below the maximum the same bytes are just the start of a large frame.
        let mut big = BytesMut::from(&[0x16, 0x03, 0x01, 0x02, 0x00][..]);
        assert!(FrameCodec::new(u32::MAX as usize)
            .decode(&mut big)
            .unwrap()
            .is_none());
    }

    #[test]
    fn zero_length_is_refused() {
        let mut buf = frame(&[]);
        let err = MessageCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, Error::EmptyFrame));
        assert!(err.is_fatal());
        assert_eq!(err.reply().code, ErrorCode::BadRequest);
    }

    #[test]
    fn oversize_is_refused_from_the_prefix_alone() {
        let mut buf = BytesMut::new();
        buf.put_u32(1_000_001);
        let err = MessageCodec::new(1_000_000).decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            Error::FrameTooLarge {
                len: 1_000_001,
                max: 1_000_000
            }
        ));
        assert_eq!(err.reply().code, ErrorCode::TooLarge);
        assert_eq!(err.reply().id, crate::CONNECTION_ID);
        // Nothing was reserved for the body.
        assert!(buf.capacity() < 1_000_000);
    }

    #[test]
    fn truncated_frame_at_eof() {
        let whole = encode_frame(&Message::Ping { id: 3 }).unwrap();
        let mut buf = BytesMut::from(&whole[..whole.len() - 2]);
        let err = MessageCodec::default().decode_eof(&mut buf).unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }));
        assert!(err.is_fatal());
        let mut buf = BytesMut::from(&whole[..2]);
        assert!(matches!(
            MessageCodec::default().decode_eof(&mut buf),
            Err(Error::Truncated {
                expected: 4,
                got: 2
            })
        ));
        assert!(MessageCodec::default()
            .decode_eof(&mut BytesMut::new())
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_bad_body_keeps_the_stream() {
        let mut buf = frame(&[0x93, 1, 2, 3]);
        buf.extend_from_slice(&encode_frame(&Message::Ping { id: 9 }).unwrap());
        let mut codec = MessageCodec::default();
        assert!(codec.decode(&mut buf).unwrap().unwrap().is_err());
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().unwrap(),
            Message::Ping { id: 9 }
        );
    }

    #[test]
    fn encoder_refuses_oversize_and_leaves_the_buffer_clean() {
        let big = Tensor::new(DType::U8, vec![2048], Bytes::from(vec![7u8; 2048])).unwrap();
        let msg = Message::Infer(Infer {
            id: 1,
            inputs: [("x".to_owned(), big)].into(),
            ..Infer::default()
        });
        let mut buf = BytesMut::new();
        let mut codec = MessageCodec::new(1024);
        assert!(matches!(
            codec.encode(msg, &mut buf),
            Err(Error::FrameTooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    fn arb_tensor() -> impl Strategy<Value = Tensor> {
        (
            0usize..DType::ALL.len(),
            proptest::collection::vec(0usize..4, 0..4),
        )
            .prop_flat_map(|(d, shape)| {
                let dtype = DType::ALL[d];
                let len = shape.iter().product::<usize>() * dtype.size();
                proptest::collection::vec(any::<u8>(), len).prop_map(move |data| {
                    Tensor::new(dtype, shape.clone(), Bytes::from(data)).unwrap()
                })
            })
    }

    fn arb_tensors() -> impl Strategy<Value = Tensors> {
        proptest::collection::btree_map("[a-z_]{1,8}", arb_tensor(), 0..3)
    }

    pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
        let code = (0usize..ErrorCode::ALL.len()).prop_map(|i| ErrorCode::ALL[i]);
        prop_oneof![
            (
                any::<u64>(),
                arb_tensors(),
                any::<Option<u64>>(),
                any::<Option<String>>(),
                0usize..Priority::ALL.len(),
                proptest::option::of("[^\\p{Cc}]{1,16}")
            )
                .prop_map(|(id, inputs, deadline_ms, client, p, tenant)| {
                    Message::Infer(Infer {
                        id,
                        inputs,
                        deadline_ms,
                        client,
                        priority: Priority::ALL[p],
                        tenant: tenant.map(String::into_boxed_str),
                    })
                }),
            (
                any::<u64>(),
                arb_tensors(),
                any::<Option<u64>>(),
                any::<Option<u32>>(),
                any::<Option<String>>()
            )
                .prop_map(|(id, outputs, queue_us, batch_size, worker)| {
                    Message::Result(InferResult {
                        id,
                        outputs,
                        queue_us,
                        infer_us: queue_us.map(|q| q / 2),
                        batch_size,
                        worker,
                    })
                }),
            (any::<u64>(), code, ".*", any::<Option<u64>>()).prop_map(
                |(id, code, message, retry_after_ms)| {
                    Message::Error(ErrorReply {
                        id,
                        code,
                        message,
                        retry_after_ms,
                    })
                }
            ),
            any::<u64>().prop_map(|id| Message::Cancel { id }),
            any::<u64>().prop_map(|id| Message::Ping { id }),
            any::<u64>().prop_map(Message::pong),
        ]
    }

    proptest! {
        /// Any sequence of messages, cut into arbitrary chunks, decodes back to itself.
        #[test]
        fn stream_round_trip(msgs in proptest::collection::vec(arb_message(), 1..8),
                             cuts in proptest::collection::vec(1usize..64, 1..32)) {
            let mut codec = MessageCodec::default();
            let mut wire = BytesMut::new();
            for m in &msgs {
                codec.encode_ref(m, &mut wire).unwrap();
            }
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut cuts = cuts.into_iter().cycle();
            while !wire.is_empty() {
                let n = cuts.next().unwrap().min(wire.len());
                buf.extend_from_slice(&wire.split_to(n));
                while let Some(frame) = codec.decode(&mut buf).unwrap() {
                    out.push(frame.unwrap());
                }
            }
            prop_assert_eq!(out, msgs);
        }

        /// Arbitrary bytes never panic the decoder; they give frames, errors or a wait.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut codec = MessageCodec::new(1 << 16);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = codec.decode_eof(&mut buf);
        }
    }
}
