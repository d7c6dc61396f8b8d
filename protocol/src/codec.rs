//! Framing: a 4-byte big-endian length, then that many bytes of MessagePack.

use bytes::{Buf, BufMut, BytesMut};
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
        if src.len() < PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len == 0 {
            return Err(Error::EmptyFrame);
        }
        if len > self.max_frame {
            // Refuse before reading (or reserving room for) the body.
            return Err(Error::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if src.len() < PREFIX + len {
            src.reserve(PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(PREFIX);
        let body = src.split_to(len).freeze();
        Ok(Some(Message::decode(&body)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, Error> {
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

/// Encodes one message as a whole frame, prefix included.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, Error> {
    let mut buf = BytesMut::new();
    MessageCodec::new(u32::MAX as usize).encode_ref(msg, &mut buf)?;
    Ok(buf.to_vec())
}
