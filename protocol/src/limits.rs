//! [`Limits`]: how deep, long and wide a frame body may be, one set for every receiver.
//!
//! A balancer forwards what its [`raw`](crate::raw) scanner accepts and a worker decodes it in
//! full with [`Message::decode`](crate::Message::decode). If the two had different limits, a
//! body that one passes and the other refuses would be refused *behind* the balancer, on a
//! connection that carries other clients' requests. So both check a body against the same
//! [`Limits`] before anything else, with the same walk ([`Limits::check`]), and refuse it as a
//! `bad_request` under the request's own id.
//!
//! The walk is iterative (an explicit stack bounded by `max_depth`), so a body of thousands of
//! nested arrays costs a few microseconds and no recursion, and it steps over `bin` and `str`
//! payloads without reading them: tensor data is never touched.

use crate::error::Error;
use crate::message::RequestId;

/// The decoder's limits on one frame body. Every tidepool receiver uses [`Limits::PROTOCOL`];
/// PROTOCOL.md ("Decoder limits") lists them for implementers in other languages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of arrays and maps, the body's own map counting as 1. A protocol
    /// message needs 4 (message, `inputs`, tensor, `shape`); the rest is room for the values
    /// of keys that later versions may add.
    pub max_depth: usize,
    /// Most items in one array, or entries in one map (the `inputs` map included).
    pub max_container_len: usize,
    /// Longest string (keys included), in bytes.
    pub max_str_len: usize,
    /// Most dimensions in one tensor's `shape` (NumPy's own maximum is 64).
    pub max_dims: usize,
}

impl Limits {
    /// The protocol's limits, the same for every receiver.
    pub const PROTOCOL: Limits = Limits {
        max_depth: 32,
        max_container_len: 65_536,
        max_str_len: 65_536,
        max_dims: 64,
    };

    /// Walks one MessagePack value at the start of `body` and fails on the first limit it goes
    /// beyond. A body that is not valid MessagePack (truncated, a reserved marker) passes as
    /// far as limits go: the decoder that runs next says what is wrong with it.
    pub fn check(&self, body: &[u8]) -> Result<(), LimitExceeded> {
        let mut at = 0usize;
        // Items left to read in each enclosing container; its length is the current depth.
        let mut open = Stack::default();
        // Items left at the current level: the one top-level value.
        let mut left = 1usize;
        loop {
            if left == 0 {
                match open.pop() {
                    Some(outer) => {
                        left = outer;
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            left -= 1;
            let Some(&marker) = body.get(at) else {
                return Ok(());
            };
            at += 1;
            let mut be = |n: usize| -> Option<usize> {
                let bytes = body.get(at..at.checked_add(n)?)?;
                at += n;
                Some(
                    bytes
                        .iter()
                        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
                )
            };
            // (payload bytes to step over, items of a container opened here)
            let (skip, items) = match marker {
                0x80..=0x8f => (0, Some(2 * usize::from(marker & 0x0f))),
                0x90..=0x9f => (0, Some(usize::from(marker & 0x0f))),
                0xde => (0, be(2).map(|n| 2 * n)),
                0xdf => (0, be(4).map(|n| 2 * n)),
                0xdc => (0, be(2)),
                0xdd => (0, be(4)),
                0xa0..=0xbf => (usize::from(marker & 0x1f), None),
                0xd9 | 0xc4 => (be(1).unwrap_or(usize::MAX), None),
                0xda | 0xc5 => (be(2).unwrap_or(usize::MAX), None),
                0xdb | 0xc6 => (be(4).unwrap_or(usize::MAX), None),
                // ext 8/16/32: a length, a type byte, the payload.
                0xc7 => (be(1).map_or(usize::MAX, |n| n + 1), None),
                0xc8 => (be(2).map_or(usize::MAX, |n| n + 1), None),
                0xc9 => (be(4).map_or(usize::MAX, |n| n + 1), None),
                // fixext 1/2/4/8/16: a type byte and the payload.
                0xd4 => (2, None),
                0xd5 => (3, None),
                0xd6 => (5, None),
                0xd7 => (9, None),
                0xd8 => (17, None),
                0xca | 0xce | 0xd2 => (4, None),
                0xcb | 0xcf | 0xd3 => (8, None),
                0xcc | 0xd0 => (1, None),
                0xcd | 0xd1 => (2, None),
                // fixints, nil, booleans, and 0xc1 (never used: the decoder refuses it).
                _ => (0, None),
            };
            if skip == usize::MAX {
                return Ok(()); // a truncated length: the decoder says so
            }
            if matches!(marker, 0xa0..=0xbf | 0xd9..=0xdb) && skip > self.max_str_len {
                return Err(LimitExceeded::StrLen(self.max_str_len));
            }
            if let Some(items) = items {
                let is_map = matches!(marker, 0x80..=0x8f | 0xde | 0xdf);
                let len = if is_map { items / 2 } else { items };
                if len > self.max_container_len {
                    return Err(LimitExceeded::ContainerLen(self.max_container_len));
                }
                if open.len() >= self.max_depth {
                    return Err(LimitExceeded::Depth(self.max_depth));
                }
                open.push(left);
                left = items;
            }
            match at.checked_add(skip) {
                Some(end) if end <= body.len() => at = end,
                _ => return Ok(()),
            }
        }
    }

    /// Checks the number of dimensions of one tensor's shape.
    pub fn check_dims(&self, dims: usize) -> Result<(), LimitExceeded> {
        if dims > self.max_dims {
            return Err(LimitExceeded::Dims(self.max_dims));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::PROTOCOL
    }
}

/// Levels kept without allocating: [`Limits::PROTOCOL`]'s `max_depth`.
const INLINE_DEPTH: usize = 32;

/// The walk's stack: on the stack itself up to [`INLINE_DEPTH`] levels (every body within the
/// protocol's limits), so that checking a frame allocates nothing; on the heap beyond.
struct Stack {
    inline: [usize; INLINE_DEPTH],
    len: usize,
    spill: Vec<usize>,
}

impl Default for Stack {
    fn default() -> Stack {
        Stack {
            inline: [0; INLINE_DEPTH],
            len: 0,
            spill: Vec::new(),
        }
    }
}

impl Stack {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, items: usize) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = items,
            None => self.spill.push(items),
        }
        self.len += 1;
    }

    fn pop(&mut self) -> Option<usize> {
        self.len = self.len.checked_sub(1)?;
        match self.inline.get(self.len) {
            Some(&items) => Some(items),
            None => self.spill.pop(),
        }
    }
}

/// Which of the [`Limits`] a body goes beyond, with that limit's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitExceeded {
    /// Arrays and maps nested deeper than this.
    Depth(usize),
    /// An array or map with more items than this.
    ContainerLen(usize),
    /// A string longer than this many bytes.
    StrLen(usize),
    /// A tensor shape with more dimensions than this.
    Dims(usize),
}

impl LimitExceeded {
    /// What the limit is about, for error messages.
    pub fn what(self) -> &'static str {
        match self {
            LimitExceeded::Depth(_) => "nesting of arrays and maps",
            LimitExceeded::ContainerLen(_) => "items in one array or map",
            LimitExceeded::StrLen(_) => "bytes in one string",
            LimitExceeded::Dims(_) => "dimensions in one tensor shape",
        }
    }

    /// The limit's value.
    pub fn max(self) -> usize {
        match self {
            LimitExceeded::Depth(n)
            | LimitExceeded::ContainerLen(n)
            | LimitExceeded::StrLen(n)
            | LimitExceeded::Dims(n) => n,
        }
    }

    /// The error a receiver answers, under `id` when the body had a readable one.
    pub fn into_error(self, id: Option<RequestId>) -> Error {
        Error::LimitExceeded {
            id,
            what: self.what(),
            max: self.max(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `depth` one-element arrays around a nil.
    pub(crate) fn nested_arrays(depth: usize) -> Vec<u8> {
        let mut out = vec![0x91; depth];
        out.push(0xc0);
        out
    }

    #[test]
    fn depth_counts_the_outer_container_as_one() {
        let small = Limits {
            max_depth: 3,
            ..Limits::PROTOCOL
        };
        assert_eq!(small.check(&nested_arrays(3)), Ok(()));
        assert_eq!(small.check(&nested_arrays(4)), Err(LimitExceeded::Depth(3)));
        // Maps count as arrays do: {"a": [[nil]]} is 3 deep.
        assert_eq!(small.check(b"\x81\xa1a\x91\x91\xc0"), Ok(()));
        assert_eq!(
            small.check(b"\x81\xa1a\x91\x91\x91\xc0"),
            Err(LimitExceeded::Depth(3))
        );
        // Siblings do not add up: [[nil], [nil], [nil]] is 2 deep.
        assert_eq!(small.check(b"\x93\x91\xc0\x91\xc0\x91\xc0"), Ok(()));
    }

    #[test]
    fn the_poison_frame_is_cheap_to_refuse() {
        // 5,000 nested arrays: far beyond the limit, refused after 33 bytes of the walk.
        assert_eq!(
            Limits::PROTOCOL.check(&nested_arrays(5_000)),
            Err(LimitExceeded::Depth(32))
        );
    }

    #[test]
    fn lengths_are_checked_from_the_header_alone() {
        let l = Limits::PROTOCOL;
        // An array announcing 65,537 items, with none of them present.
        assert_eq!(
            l.check(&[0xdd, 0, 1, 0, 1]),
            Err(LimitExceeded::ContainerLen(65_536))
        );
        assert_eq!(
            l.check(&[0xdf, 0, 1, 0, 1]),
            Err(LimitExceeded::ContainerLen(65_536))
        );
        assert_eq!(
            l.check(&[0xdb, 0, 1, 0, 1]),
            Err(LimitExceeded::StrLen(65_536))
        );
        // A long bin is tensor data: no limit but the frame's.
        let mut bin = vec![0xc6, 0, 2, 0, 0];
        bin.resize(5 + (2 << 16), 7);
        assert_eq!(l.check(&bin), Ok(()));
        assert_eq!(l.check_dims(64), Ok(()));
        assert_eq!(l.check_dims(65), Err(LimitExceeded::Dims(64)));
    }

    #[test]
    fn broken_bodies_are_left_to_the_decoder() {
        let l = Limits::PROTOCOL;
        for body in [
            &[][..],
            &[0x92, 0x01][..],
            &[0xdb, 0, 0][..],
            &[0xc1][..],
            &[0xc7][..],
        ] {
            assert_eq!(l.check(body), Ok(()), "{body:?}");
        }
    }

    #[test]
    fn every_marker_is_stepped_over() {
        // [ext8, fixext16, f64, i16, str8, bin8, true] inside a map: nothing hides the
        // nested array after them.
        let mut body = vec![0x82, 0xa1, b'a', 0x97];
        body.extend_from_slice(&[0xc7, 2, 5, 0, 0]);
        body.push(0xd8);
        body.extend_from_slice(&[0; 17]);
        body.push(0xcb);
        body.extend_from_slice(&[0; 8]);
        body.extend_from_slice(&[0xd1, 0, 0]);
        body.extend_from_slice(&[0xd9, 2, b'h', b'i']);
        body.extend_from_slice(&[0xc4, 1, 9]);
        body.push(0xc3);
        body.extend_from_slice(&[0xa1, b'b', 0x91, 0x91, 0xc0]);
        let limits = Limits {
            max_depth: 2,
            ..Limits::PROTOCOL
        };
        assert_eq!(limits.check(&body), Err(LimitExceeded::Depth(2)));
        let limits = Limits {
            max_depth: 3,
            ..Limits::PROTOCOL
        };
        assert_eq!(limits.check(&body), Ok(()));
    }

    use crate::message::{Infer, Message};
    use crate::raw::{decode_body_with, Frame, RawMessage};
    use crate::tensor::Tensor;
    use bytes::Bytes;
    use proptest::prelude::*;

    /// An infer with one tensor of `dims` dimensions and one unknown key holding `extra`.
    fn infer_with(id: u64, dims: usize, extra: &[u8]) -> Bytes {
        let msg = Message::Infer(Infer {
            id,
            inputs: [(
                "x".to_owned(),
                Tensor::from_vec(vec![1; dims], vec![0.5f32]).unwrap(),
            )]
            .into(),
            ..Infer::default()
        });
        let mut body = msg.to_msgpack().unwrap();
        assert!(
            matches!(body[0], 0x80..=0x8e),
            "a fixmap with room for one more"
        );
        body[0] += 1;
        body.extend_from_slice(b"\xa6future");
        body.extend_from_slice(extra);
        Bytes::from(body)
    }

    #[test]
    fn the_poison_frame_is_refused_alike_under_its_own_id() {
        let poison = infer_with(42, 1, &nested_arrays(5_000));
        assert!(RawMessage::scan(poison.clone()).is_none());
        let via_raw = decode_body_with(poison.clone(), &Limits::PROTOCOL).unwrap_err();
        let via_decoder = Message::decode(&poison).unwrap_err();
        for err in [via_raw, via_decoder] {
            assert!(
                matches!(err, Error::LimitExceeded { id: Some(42), .. }),
                "{err:?}"
            );
            assert!(!err.is_fatal());
            let reply = err.reply();
            assert_eq!(reply.id, 42);
            assert_eq!(reply.code, crate::ErrorCode::BadRequest);
            assert!(reply.message.contains("limit of 32"), "{}", reply.message);
        }
        // Within the limit, the same frame passes both ways.
        let fine = infer_with(43, 1, &nested_arrays(28));
        assert!(RawMessage::scan(fine.clone()).is_some());
        assert!(Message::decode(&fine).is_ok());
    }

    /// A MessagePack value of nested arrays, maps and strings.
    #[derive(Clone, Debug)]
    enum Value {
        Nil,
        Str(usize),
        Array(Vec<Value>),
        Map(Vec<(usize, Value)>),
    }

    impl Value {
        fn encode(&self, out: &mut Vec<u8>) {
            let str = |out: &mut Vec<u8>, len: usize| {
                out.push(0xd9);
                out.push(len as u8);
                out.extend(std::iter::repeat_n(b'k', len));
            };
            match self {
                Value::Nil => out.push(0xc0),
                Value::Str(len) => str(out, *len),
                Value::Array(items) => {
                    out.push(0xdc);
                    out.extend_from_slice(&(items.len() as u16).to_be_bytes());
                    items.iter().for_each(|v| v.encode(out));
                }
                Value::Map(entries) => {
                    out.push(0xde);
                    out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
                    for (key, value) in entries {
                        str(out, *key);
                        value.encode(out);
                    }
                }
            }
        }
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![Just(Value::Nil), (0usize..12).prop_map(Value::Str)];
        leaf.prop_recursive(12, 64, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((0usize..12, inner), 0..6).prop_map(Value::Map),
            ]
        })
    }

    fn arb_limits() -> impl Strategy<Value = Limits> {
        (2usize..9, 1usize..6, 1usize..12, 1usize..6).prop_map(
            |(max_depth, max_container_len, max_str_len, max_dims)| Limits {
                max_depth,
                max_container_len,
                max_str_len,
                max_dims,
            },
        )
    }

    proptest! {
        /// Whatever the raw scanner passes (what a balancer forwards), the full decoder (what a
        /// worker runs) accepts under the same limits; and the two refuse the same bodies,
        /// under the same id.
        #[test]
        fn raw_and_decoder_agree_on_limits(limits in arb_limits(),
                                           extra in arb_value(),
                                           dims in 0usize..8,
                                           id in 1u64..1000) {
            let mut value = Vec::new();
            extra.encode(&mut value);
            let body = infer_with(id, dims, &value);
            let decoded = Message::decode_with(&body, &limits);
            if RawMessage::scan_with(body.clone(), &limits).is_some() {
                prop_assert!(decoded.is_ok(), "raw passed what the decoder refuses: {decoded:?}");
            }
            match (decode_body_with(body.clone(), &limits), decoded) {
                (Ok(Frame::Raw(raw)), Ok(msg)) => prop_assert_eq!(raw.to_message(), msg),
                (Ok(Frame::Message(a)), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => {
                    prop_assert_eq!(a.reply(), b.reply());
                    prop_assert_eq!(a.reply().id, id);
                }
                (a, b) => prop_assert!(false, "decode_body {a:?} but decode {b:?}"),
            }
            // The walk refuses exactly what is beyond the limits.
            let beyond = limits.check(&body).is_err() || dims > limits.max_dims;
            prop_assert_eq!(beyond, Message::decode_with(&body, &limits).is_err());
        }
    }
}
