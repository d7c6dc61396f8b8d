//! Forwarding frames without decoding them: [`RawMessage`] scans an `infer` or `result`
//! body for its top-level keys and writes it again with a new `id` (and, for a balancer, a
//! new `deadline_ms` and `client`) by splicing byte ranges, never decoding a tensor.
//!
//! A proxy reads each frame body with [`decode_body`]: the common case comes back as
//! [`Frame::Raw`], anything else as a fully decoded [`Frame::Message`] (or the error the
//! full decoder gives). The scan is *conservative*: it accepts a body only when
//! [`Message::decode`] would accept it too, with the same content: every tensor is checked
//! (`dtype` known, `shape` unsigned, `data` a `bin` of exactly `product(shape) × size(dtype)`
//! bytes), every known field has its type, no known key appears twice, and the map ends
//! exactly at the end of the body; and first of all, the body is within the same
//! [`Limits`] the full decoder checks. Whatever it does not recognise as plainly valid (an
//! unusual encoding, a broken message) goes to the full decoder, whose answer, error
//! messages included, is the reference.
//!
//! Splicing keeps every other key and value byte for byte, in the sender's order,
//! unknown keys included: a balancer passes on fields that a later protocol version adds.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::Error;
use crate::limits::Limits;
use crate::message::{key, Infer, InferResult, Message, RequestId, Tensors};
use crate::priority::Priority;
use crate::tenant;
use crate::tensor::{DType, Tensor};

/// The kinds of message a [`RawMessage`] holds: the two that carry tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// An `infer` request.
    Infer,
    /// A `result` answer.
    Result,
}

/// A frame body as read: either scanned for splicing, or decoded in full.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// An `infer` or `result` that can be forwarded without decoding its tensors.
    Raw(RawMessage),
    /// Any other message, decoded.
    Message(Message),
}

/// Reads one frame body (without its length prefix) within [`Limits::PROTOCOL`]: a
/// [`Frame::Raw`] when the scan accepts it, else the full decoder's message or error.
pub fn decode_body(body: Bytes) -> Result<Frame, Error> {
    decode_body_with(body, &Limits::PROTOCOL)
}

/// [`decode_body`] within `limits`. A body beyond them is never [`Frame::Raw`]: it is the
/// full decoder's [`Error::LimitExceeded`], under the request's id when it has one.
pub fn decode_body_with(body: Bytes, limits: &Limits) -> Result<Frame, Error> {
    match RawMessage::scan_with(body.clone(), limits) {
        Some(raw) => Ok(Frame::Raw(raw)),
        None => Message::decode_with(&body, limits).map(Frame::Message),
    }
}

/// What to change when writing a [`RawMessage`] again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite<'a> {
    /// The id to write in place of the message's own.
    pub id: RequestId,
    /// When `Some`, the `deadline_ms` to write (added if absent); `None` keeps the
    /// message's own, if any.
    pub deadline_ms: Option<u64>,
    /// When `Some`, the `client` to write, replacing any the message had; `None` keeps the
    /// message's own, if any.
    pub client: Option<&'a str>,
}

impl Rewrite<'_> {
    /// `msg` changed as this rewrite says: what a receiver decodes from the frame that
    /// [`RawMessage::write_frame`] writes (a `result` keeps no deadline or client).
    pub fn applied_to(&self, msg: &Message) -> Message {
        let mut msg = msg.clone();
        msg.set_id(self.id);
        if let Message::Infer(infer) = &mut msg {
            if self.deadline_ms.is_some() {
                infer.deadline_ms = self.deadline_ms;
            }
            if let Some(client) = self.client {
                infer.client = Some(client.to_owned());
            }
        }
        msg
    }
}

/// An `infer` or `result` body whose top-level keys were located, valid as far as
/// [`Message::decode`] is concerned.
///
/// Invariant: `Message::decode(body)` succeeds and gives a message of `kind` with `id` and
/// `deadline_ms` as held here. Ranges are byte offsets into `body`, each one whole map
/// entry (key and value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMessage {
    body: Bytes,
    kind: RawKind,
    id: RequestId,
    deadline_ms: Option<u64>,
    /// The `priority` (absent or nil: normal).
    priority: Priority,
    /// Top-level entries.
    entries: u32,
    id_entry: Span,
    deadline_entry: Option<Span>,
    client_entry: Option<Span>,
    /// Where the first entry starts (after the map header).
    first_entry: u32,
}

/// A byte range of a body in 32 bits: a frame's length prefix is a `u32`, so no frame is
/// longer. Half the size of a `Range<usize>`, it keeps a [`RawMessage`] (which a balancer
/// moves through futures and channels several times per request) small enough to move
/// with a few register stores rather than a `memcpy` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `range` when both ends fit 32 bits (the caller checked the body's length).
    fn new(range: Range<usize>) -> Option<Span> {
        Some(Span {
            start: u32::try_from(range.start).ok()?,
            end: u32::try_from(range.end).ok()?,
        })
    }

    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl RawMessage {
    /// Scans a body within [`Limits::PROTOCOL`]; `None` when it is not an `infer` or
    /// `result` that the scan can vouch for (decode such a body with [`Message::decode`]).
    pub fn scan(body: Bytes) -> Option<RawMessage> {
        RawMessage::scan_with(body, &Limits::PROTOCOL)
    }

    /// Scans a body within `limits` (the full decoder's: [`Message::decode_with`]).
    pub fn scan_with(body: Bytes, limits: &Limits) -> Option<RawMessage> {
        let s = scan(&body, limits)?;
        // `scan` read every known field itself, all within the body, at most
        // `KNOWN_DEPTH` levels deep, with the tensors' dimensions checked. No string or
        // container of a body shorter than the longest allowed can then be too long, and
        // none too deep, unless a value was stepped over unread: only then, or for a long
        // body, is the whole walk needed (it was a tenth of the balancer's instructions).
        let small = body.len() <= limits.max_str_len.min(limits.max_container_len);
        if s.skipped || !small || limits.max_depth < KNOWN_DEPTH {
            limits.check(&body).ok()?;
        }
        // Every offset is at most the body's length; a body longer than any frame (4 GiB)
        // is refused by `Span::new`.
        let span = |r: Option<Range<usize>>| match r {
            Some(r) => Span::new(r).map(Some),
            None => Some(None),
        };
        Some(RawMessage {
            kind: s.kind,
            id: s.id,
            deadline_ms: s.deadline_ms,
            priority: s.priority,
            entries: s.entries,
            id_entry: Span::new(s.id_entry)?,
            deadline_entry: span(s.deadline_entry)?,
            client_entry: span(s.client_entry)?,
            first_entry: u32::try_from(s.first_entry).ok()?,
            body,
        })
    }

    /// `infer` or `result`.
    pub fn kind(&self) -> RawKind {
        self.kind
    }

    /// The message's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The `deadline_ms` field (absent or nil: `None`).
    pub fn deadline_ms(&self) -> Option<u64> {
        self.deadline_ms
    }

    /// The `priority` field (absent or nil: normal); forwarded byte for byte.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// A `result`'s `batch_size` (absent or nil: `None`). Read again from the body's
    /// top-level entries rather than kept by the scan, so that a balancer, which never asks,
    /// does not move it with every frame; stepping over a tensor's data costs nothing.
    pub fn batch_size(&self) -> Option<u32> {
        let mut c = Cursor::new(&self.body);
        c.pos = self.first_entry as usize;
        for _ in 0..self.entries {
            if c.str_bytes()? == key::BATCH_SIZE.as_bytes() {
                // The scan checked that it is a `u32` (RawMessage invariant).
                return u32::try_from(c.opt(Cursor::uint)??).ok();
            }
            c.skip()?;
        }
        None
    }

    /// The body as received.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Decodes the body in full (tensor data stays a slice of it): the message
    /// [`Message::decode`] gives, built from the scanned body without checking again what
    /// the scan checked (the limits, the types, the tensors' lengths) and without serde. A
    /// worker reads every `infer` this way; the fuzz target holds it to the full decoder.
    pub fn to_message(&self) -> Message {
        self.build().unwrap_or_else(|| {
            Message::decode(&self.body).expect("a scanned body decodes (RawMessage invariant)")
        })
    }

    /// The message, read from the top-level entries the scan vouched for; `None` only if
    /// the body is not what the scan found (never, by the invariant).
    fn build(&self) -> Option<Message> {
        let mut c = Cursor::new(&self.body);
        c.pos = self.first_entry as usize;
        let (tensors_key, mut tensors) = match self.kind {
            RawKind::Infer => (key::INPUTS, None),
            RawKind::Result => (key::OUTPUTS, None),
        };
        let (mut client, mut tenant, mut worker) = (None, None, None);
        let (mut queue_us, mut infer_us, mut batch_size) = (None, None, None);
        for _ in 0..self.entries {
            let name = c.str_bytes()?;
            match (self.kind, name) {
                (_, name) if name == tensors_key.as_bytes() => {
                    tensors = Some(read_tensors(&mut c, &self.body)?);
                }
                (RawKind::Infer, b"client") => client = c.opt(Cursor::str)?.map(str::to_owned),
                // The scan checked it against the tenant rules already.
                (RawKind::Infer, b"tenant") => tenant = c.opt(Cursor::str)?.map(Box::from),
                (RawKind::Result, b"worker") => worker = c.opt(Cursor::str)?.map(str::to_owned),
                (RawKind::Result, b"queue_us") => queue_us = c.opt(Cursor::uint)?,
                (RawKind::Result, b"infer_us") => infer_us = c.opt(Cursor::uint)?,
                (RawKind::Result, b"batch_size") => {
                    batch_size = c.opt(Cursor::uint)?.map(u32::try_from).transpose().ok()?;
                }
                // The type, id, deadline and priority the scan kept, and what this kind of
                // message does not read.
                _ => c.skip()?,
            }
        }
        let tensors = tensors?;
        Some(match self.kind {
            RawKind::Infer => Message::Infer(Infer {
                id: self.id,
                inputs: tensors,
                deadline_ms: self.deadline_ms,
                client,
                priority: self.priority,
                tenant,
            }),
            RawKind::Result => Message::Result(InferResult {
                id: self.id,
                outputs: tensors,
                queue_us,
                infer_us,
                batch_size,
                worker,
            }),
        })
    }

    /// Appends the message as one frame (length prefix included) to `dst`, changed as
    /// `rewrite` says. Refuses, leaving `dst` as it was, when the new body would be longer
    /// than `max_frame`.
    pub fn write_frame(
        &self,
        rewrite: &Rewrite<'_>,
        dst: &mut BytesMut,
        max_frame: usize,
    ) -> Result<(), Error> {
        // The id alone (every answer a balancer writes back): one cut, no sorting.
        if rewrite.deadline_ms.is_none() && rewrite.client.is_none() {
            return self.write_with_id(rewrite.id, dst, max_frame);
        }
        // The entries to leave out or replace, in body order.
        let id_entry = self.id_entry.range();
        let deadline_entry = self.deadline_entry.map(Span::range);
        let mut cut: [Option<Range<usize>>; 3] = [
            Some(id_entry.clone()),
            rewrite.deadline_ms.and(deadline_entry.clone()),
            rewrite.client.and(self.client_entry.map(Span::range)),
        ];
        cut.sort_by_key(|r| r.as_ref().map_or(usize::MAX, |r| r.start));

        let mut entries = self.entries;
        let added_deadline = rewrite.deadline_ms.is_some() && self.deadline_entry.is_none();
        let added_client = rewrite.client.is_some() && self.client_entry.is_none();
        entries += u32::from(added_deadline) + u32::from(added_client);

        let start = dst.len();
        dst.put_u32(0);
        put_map_len(dst, entries);
        let mut at = self.first_entry as usize;
        for range in cut.iter().flatten() {
            dst.extend_from_slice(&self.body[at..range.start]);
            if *range == id_entry {
                put_uint_entry(dst, key::ID, rewrite.id);
            } else if Some(range) == deadline_entry.as_ref() {
                if let Some(deadline) = rewrite.deadline_ms {
                    put_uint_entry(dst, key::DEADLINE_MS, deadline);
                }
            } else if let Some(client) = rewrite.client {
                put_str_entry(dst, key::CLIENT, client);
            }
            at = range.end;
        }
        dst.extend_from_slice(&self.body[at..]);
        if let (true, Some(deadline)) = (added_deadline, rewrite.deadline_ms) {
            put_uint_entry(dst, key::DEADLINE_MS, deadline);
        }
        if let (true, Some(client)) = (added_client, rewrite.client) {
            put_str_entry(dst, key::CLIENT, client);
        }
        finish_frame(dst, start, max_frame)
    }

    /// [`write_frame`](RawMessage::write_frame) with only the id replaced.
    fn write_with_id(
        &self,
        id: RequestId,
        dst: &mut BytesMut,
        max_frame: usize,
    ) -> Result<(), Error> {
        let id_entry = self.id_entry.range();
        let start = dst.len();
        dst.put_u32(0);
        put_map_len(dst, self.entries);
        dst.extend_from_slice(&self.body[self.first_entry as usize..id_entry.start]);
        put_uint_entry(dst, key::ID, id);
        dst.extend_from_slice(&self.body[id_entry.end..]);
        finish_frame(dst, start, max_frame)
    }
}

/// Fills in the length prefix of the frame written into `dst` from `start`, or takes the
/// frame back out when its body is longer than `max_frame`.
fn finish_frame(dst: &mut BytesMut, start: usize, max_frame: usize) -> Result<(), Error> {
    let len = dst.len() - start - 4;
    if len > max_frame {
        dst.truncate(start);
        return Err(Error::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

// The few MessagePack markers a rewrite writes, put straight into the buffer in the
// smallest form, as rmp's encoder chooses it: through rmp's `io::Write` adapter each string
// or number cost several calls and error paths that a `BytesMut` never takes (about 500
// instructions per forwarded frame).

fn put_uint_entry(dst: &mut BytesMut, key: &str, value: u64) {
    put_str(dst, key);
    put_uint(dst, value);
}

fn put_str_entry(dst: &mut BytesMut, key: &str, value: &str) {
    put_str(dst, key);
    put_str(dst, value);
}

/// A map header of `len` entries.
fn put_map_len(dst: &mut BytesMut, len: u32) {
    match len {
        0..=15 => dst.put_u8(0x80 | len as u8),
        _ => put_sized(dst, u64::from(len), &[(0xde, 2), (0xdf, 4)]),
    }
}

/// A string. Longer than 4 GiB cannot happen here: it is a key or a client's address.
fn put_str(dst: &mut BytesMut, value: &str) {
    match value.len() {
        len @ 0..=31 => dst.put_u8(0xa0 | len as u8),
        len => put_sized(dst, len as u64, &[(0xd9, 1), (0xda, 2), (0xdb, 4)]),
    }
    dst.put_slice(value.as_bytes());
}

/// An unsigned integer, marker and value in one copy. An id or a deadline is written on
/// every forwarded frame (two per request), so the widths are arms of their own rather
/// than [`put_sized`]'s walk (about 80 instructions per integer).
fn put_uint(dst: &mut BytesMut, value: u64) {
    let mut out = [0u8; 9];
    let len = match value {
        0..=0x7f => {
            out[0] = value as u8;
            1
        }
        0x80..=0xff => {
            out[..2].copy_from_slice(&[0xcc, value as u8]);
            2
        }
        0x100..=0xffff => {
            out[0] = 0xcd;
            out[1..3].copy_from_slice(&(value as u16).to_be_bytes());
            3
        }
        0x1_0000..=0xffff_ffff => {
            out[0] = 0xce;
            out[1..5].copy_from_slice(&(value as u32).to_be_bytes());
            5
        }
        _ => {
            out[0] = 0xcf;
            out[1..].copy_from_slice(&value.to_be_bytes());
            9
        }
    };
    dst.extend_from_slice(&out[..len]);
}

/// `value` big-endian behind the marker of the narrowest of `widths` (marker, bytes) that
/// holds it (the widest if none does).
fn put_sized(dst: &mut BytesMut, value: u64, widths: &[(u8, usize)]) {
    let fits = |&&(_, bytes): &&(u8, usize)| bytes >= 8 || value >> (8 * bytes) == 0;
    if let Some(&(marker, bytes)) = widths.iter().find(fits).or(widths.last()) {
        dst.put_u8(marker);
        dst.put_uint(value, bytes);
    }
}

/// What [`scan`] found.
struct Scanned {
    kind: RawKind,
    id: RequestId,
    deadline_ms: Option<u64>,
    priority: Priority,
    entries: u32,
    id_entry: Range<usize>,
    deadline_entry: Option<Range<usize>>,
    client_entry: Option<Range<usize>>,
    first_entry: usize,
    /// A value was stepped over ([`Cursor::skip`]) rather than read.
    skipped: bool,
}

/// The top-level keys the decoder knows (`key::ALL`, in its order): what [`scan`] matches
/// on, once per entry, as a small integer rather than a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    Type,
    Id,
    Inputs,
    DeadlineMs,
    Client,
    Outputs,
    QueueUs,
    InferUs,
    BatchSize,
    Worker,
    Code,
    Message,
    RetryAfterMs,
    Busy,
    Model,
    Priority,
    Tenant,
    BatchOneUs,
    BatchFullUs,
    MaxBatch,
    Instances,
}

impl Known {
    /// The known key `name` is, if any. Dispatched on the length first, so that only the
    /// keys of that length are compared, each against a constant of known size (a load or
    /// two): the walk over `key::ALL` and the second match on the name it found cost about
    /// 25 instructions a key.
    fn of(name: &[u8]) -> Option<Known> {
        let is = |k: &str| name == k.as_bytes();
        Some(match name.len() {
            2 if is(key::ID) => Known::Id,
            4 if is(key::TYPE) => Known::Type,
            4 if is(key::CODE) => Known::Code,
            4 if is(key::BUSY) => Known::Busy,
            5 if is(key::MODEL) => Known::Model,
            6 if is(key::INPUTS) => Known::Inputs,
            6 if is(key::CLIENT) => Known::Client,
            6 if is(key::WORKER) => Known::Worker,
            6 if is(key::TENANT) => Known::Tenant,
            7 if is(key::OUTPUTS) => Known::Outputs,
            7 if is(key::MESSAGE) => Known::Message,
            8 if is(key::QUEUE_US) => Known::QueueUs,
            8 if is(key::INFER_US) => Known::InferUs,
            8 if is(key::PRIORITY) => Known::Priority,
            9 if is(key::MAX_BATCH) => Known::MaxBatch,
            9 if is(key::INSTANCES) => Known::Instances,
            10 if is(key::BATCH_SIZE) => Known::BatchSize,
            11 if is(key::DEADLINE_MS) => Known::DeadlineMs,
            12 if is(key::BATCH_ONE_US) => Known::BatchOneUs,
            13 if is(key::BATCH_FULL_US) => Known::BatchFullUs,
            14 if is(key::RETRY_AFTER_MS) => Known::RetryAfterMs,
            _ => return None,
        })
    }
}

/// How deep `scan` reads: the message, `inputs` or `outputs`, a tensor, its `shape`.
const KNOWN_DEPTH: usize = 4;

fn scan(body: &[u8], limits: &Limits) -> Option<Scanned> {
    let mut c = Cursor::new(body);
    let entries = c.map_len()?;
    let first_entry = c.pos;
    // The known keys seen so far (`key::ALL`, the names the encoder writes): each is
    // allowed once.
    let mut seen = [false; key::ALL.len()];
    let mut kind = None;
    let mut id = None;
    let mut has_tensors = [false; 2];
    let mut deadline_ms = None;
    let mut deadline_entry = None;
    let mut client_entry = None;
    let mut priority = Priority::Normal;
    for _ in 0..entries {
        let entry_start = c.pos;
        // Keys are compared as bytes: a known key is ASCII, so only an unknown one needs
        // the UTF-8 check (the check per string was a tenth of the balancer's instructions).
        let name = c.str_bytes()?;
        let Some(k) = Known::of(name) else {
            utf8(name)?;
            c.skip()?;
            continue;
        };
        if std::mem::replace(&mut seen[k as usize], true) {
            return None; // the full decoder refuses a duplicate field
        }
        // The entries a rewrite replaces end where their value does.
        match k {
            Known::Type => {
                kind = Some(match c.str_bytes()? {
                    b"infer" => RawKind::Infer,
                    b"result" => RawKind::Result,
                    _ => return None,
                });
            }
            Known::Id => {
                id = Some((c.uint()?, entry_start..c.pos));
            }
            Known::Inputs => {
                tensors(&mut c, limits)?;
                has_tensors[0] = true;
            }
            Known::Outputs => {
                tensors(&mut c, limits)?;
                has_tensors[1] = true;
            }
            Known::DeadlineMs => {
                deadline_ms = c.opt(Cursor::uint)?;
                deadline_entry = Some(entry_start..c.pos);
            }
            Known::Client => {
                c.opt(Cursor::text)?;
                client_entry = Some(entry_start..c.pos);
            }
            Known::BatchSize | Known::MaxBatch | Known::Instances => {
                if c.opt(Cursor::uint)?
                    .is_some_and(|n| n > u64::from(u32::MAX))
                {
                    return None;
                }
            }
            Known::QueueUs
            | Known::InferUs
            | Known::RetryAfterMs
            | Known::BatchOneUs
            | Known::BatchFullUs => {
                c.opt(Cursor::uint)?;
            }
            Known::Model => {
                // Only a `metadata_result` carries it, and that is never forwarded raw.
                return None;
            }
            Known::Priority => {
                // Anything but a known class (or nil) is the full decoder's to refuse.
                if let Some(value) = c.opt(Cursor::str_bytes)? {
                    priority = Priority::from_wire(value)?;
                }
            }
            Known::Tenant => {
                // Forwarded byte for byte, so only a name the full decoder accepts.
                if let Some(value) = c.opt(Cursor::str_bytes)? {
                    tenant::check(value).ok()?;
                }
            }
            Known::Worker | Known::Code | Known::Message | Known::Busy => {
                // Every other known key: read as a string.
                c.opt(Cursor::text)?;
            }
        }
    }
    if c.pos != body.len() {
        return None;
    }
    let kind = kind?;
    let (id, id_entry) = id?;
    let required = match kind {
        RawKind::Infer => has_tensors[0],
        RawKind::Result => has_tensors[1],
    };
    if !required {
        return None;
    }
    Some(Scanned {
        kind,
        id,
        deadline_ms,
        priority,
        entries: u32::try_from(entries).ok()?,
        id_entry,
        deadline_entry,
        client_entry,
        first_entry,
        skipped: c.skipped,
    })
}

/// A map of name → tensor that [`tensors`] accepted, read as the full decoder reads it: a
/// name given twice keeps its last tensor, and each tensor's data is a slice of `body`.
fn read_tensors(c: &mut Cursor<'_>, body: &Bytes) -> Option<Tensors> {
    let mut out = Tensors::new();
    for _ in 0..c.map_len()? {
        let name = c.str()?.to_owned();
        let (mut dtype, mut shape, mut data) = (None, None, None);
        for _ in 0..c.map_len()? {
            match c.str_bytes()? {
                b"dtype" => dtype = Some(c.str()?.parse::<DType>().ok()?),
                b"shape" => {
                    let dims = c.array_len()?;
                    let mut dims_read = Vec::with_capacity(dims);
                    for _ in 0..dims {
                        dims_read.push(usize::try_from(c.uint()?).unwrap_or(usize::MAX));
                    }
                    shape = Some(dims_read);
                }
                b"data" => data = Some(body.slice_ref(c.bin()?)),
                _ => c.skip()?,
            }
        }
        out.insert(name, Tensor::new(dtype?, shape?, data?).ok()?);
    }
    Some(out)
}

/// A map of name → tensor, each checked as the full decoder does.
fn tensors(c: &mut Cursor<'_>, limits: &Limits) -> Option<()> {
    for _ in 0..c.map_len()? {
        c.text()?;
        tensor(c, limits)?;
    }
    Some(())
}

fn tensor(c: &mut Cursor<'_>, limits: &Limits) -> Option<()> {
    let mut dtype: Option<DType> = None;
    // The data's length the shape gives: folded from the element size as the full
    // decoder's product is (same overflow, same answer), so read where the dtype is known,
    // at the shape when the dtype came first (as every encoder writes it), else again at
    // the end from where the shape starts.
    let mut expected: Option<Option<usize>> = None;
    let mut shape_at: Option<usize> = None;
    let mut data: Option<usize> = None;
    for _ in 0..c.map_len()? {
        match c.str_bytes()? {
            b"dtype" if dtype.is_none() => {
                // Compared as bytes: every dtype's name is ASCII, and anything else is
                // refused either way.
                let name = c.str_bytes()?;
                dtype = Some(
                    DType::ALL
                        .into_iter()
                        .find(|d| d.as_str().as_bytes() == name)?,
                );
            }
            b"shape" if shape_at.is_none() => {
                shape_at = Some(c.pos);
                let dims = c.array_len()?;
                limits.check_dims(dims).ok()?;
                match dtype {
                    Some(dtype) => expected = Some(c.product(dims, dtype)?),
                    None => {
                        for _ in 0..dims {
                            c.uint()?;
                        }
                    }
                }
            }
            b"data" if data.is_none() => data = Some(c.bin()?.len()),
            b"dtype" | b"shape" | b"data" => return None,
            other => {
                utf8(other)?;
                c.skip()?;
            }
        }
    }
    let expected = match expected {
        Some(expected) => expected,
        None => {
            let mut shape = Cursor::new(c.buf);
            shape.pos = shape_at?;
            let dims = shape.array_len()?;
            shape.product(dims, dtype?)?
        }
    };
    (expected == Some(data?)).then_some(())
}

/// Whether `bytes` are UTF-8, as the full decoder requires of every string. ASCII first:
/// names, dtypes and addresses nearly always are, and `is_ascii` inlines to a few
/// instructions a word where `from_utf8` is a call of a few dozen for a short string.
fn utf8(bytes: &[u8]) -> Option<()> {
    (bytes.is_ascii() || std::str::from_utf8(bytes).is_ok()).then_some(())
}

/// A read position in a body. Every method returns `None` on anything it does not
/// accept, truncation included.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Set once [`skip`](Cursor::skip) stepped over a value.
    skipped: bool,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor {
            buf,
            pos: 0,
            skipped: false,
        }
    }

    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let slice = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(slice)
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    pub(crate) fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x80..=0x8f => Some(usize::from(b & 0x0f)),
            0xde => Some(self.be(2)? as usize),
            0xdf => Some(self.be(4)? as usize),
            _ => None,
        }
    }

    fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x90..=0x9f => Some(usize::from(b & 0x0f)),
            0xdc => Some(self.be(2)? as usize),
            0xdd => Some(self.be(4)? as usize),
            _ => None,
        }
    }

    pub(crate) fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.str_bytes()?).ok()
    }

    /// A string checked to be UTF-8 whose text is not needed.
    fn text(&mut self) -> Option<()> {
        utf8(self.str_bytes()?)
    }

    /// A string's bytes, not yet checked to be UTF-8: enough to compare with a known key
    /// (all ASCII). Whatever is not compared must still go through `from_utf8`, as the full
    /// decoder reads every string as text.
    fn str_bytes(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return None,
        };
        self.take(len)
    }

    fn bin(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            0xc4 => self.be(1)? as usize,
            0xc5 => self.be(2)? as usize,
            0xc6 => self.be(4)? as usize,
            _ => return None,
        };
        self.take(len)
    }

    pub(crate) fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    /// Reads `dims` unsigned dimensions: the bytes of a tensor of `dtype` with that shape,
    /// `Some(None)` when the product overflows (as the full decoder folds it).
    fn product(&mut self, dims: usize, dtype: DType) -> Option<Option<usize>> {
        let mut expected = Some(dtype.size());
        for _ in 0..dims {
            let dim = usize::try_from(self.uint()?).unwrap_or(usize::MAX);
            expected = expected.and_then(|e| e.checked_mul(dim));
        }
        Some(expected)
    }

    /// `nil` as `Some(None)`, else what `read` gives.
    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.buf.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            return Some(None);
        }
        read(self).map(Some)
    }

    /// Steps over one value of any of MessagePack's plain types; `None` on extension
    /// types, the reserved marker and strings that are not UTF-8.
    pub(crate) fn skip(&mut self) -> Option<()> {
        self.skipped = true;
        // Values still to step over; arrays and maps add their items. Each value takes at
        // least one byte, so a lying length runs out of body rather than looping on.
        let mut left: usize = 1;
        while left > 0 {
            left -= 1;
            let b = self.byte()?;
            let extra: usize = match b {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                0x80..=0x8f => {
                    left = left.checked_add(2 * usize::from(b & 0x0f))?;
                    0
                }
                0x90..=0x9f => {
                    left = left.checked_add(usize::from(b & 0x0f))?;
                    0
                }
                0xa0..=0xbf | 0xd9..=0xdb => {
                    self.pos -= 1;
                    self.str()?;
                    0
                }
                0xc4 => self.be(1)? as usize,
                0xc5 => self.be(2)? as usize,
                0xc6 => self.be(4)? as usize,
                0xca => 4,
                0xcb => 8,
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 => 2,
                0xce | 0xd2 => 4,
                0xcf | 0xd3 => 8,
                0xdc => {
                    left = left.checked_add(self.be(2)? as usize)?;
                    0
                }
                0xdd => {
                    left = left.checked_add(self.be(4)? as usize)?;
                    0
                }
                0xde => {
                    left = left.checked_add(2 * self.be(2)? as usize)?;
                    0
                }
                0xdf => {
                    left = left.checked_add(2 * self.be(4)? as usize)?;
                    0
                }
                // 0xc1 (never used) and the extension types.
                _ => return None,
            };
            self.take(extra)?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::arb_message;
    use crate::message::tests::every_message;
    use bytes::Buf;
    use proptest::prelude::*;
    use serde::Serialize;

    fn body(msg: &Message) -> Bytes {
        Bytes::from(msg.to_msgpack().unwrap())
    }

    /// What a receiver decodes from a spliced frame.
    fn expected(msg: &Message, rewrite: &Rewrite<'_>) -> Message {
        rewrite.applied_to(msg)
    }

    /// Writes the frame, checks its prefix, and decodes its body in full.
    fn splice(raw: &RawMessage, rewrite: &Rewrite<'_>) -> Message {
        let mut buf = BytesMut::from(&b"before"[..]);
        raw.write_frame(rewrite, &mut buf, usize::MAX).unwrap();
        assert_eq!(&buf[..6], b"before");
        buf.advance(6);
        let len = buf.get_u32() as usize;
        assert_eq!(len, buf.len());
        Message::decode(&buf.freeze()).unwrap()
    }

    /// The scan's promise: whatever it accepts, the full decoder accepts with the same
    /// kind, id and deadline.
    fn check_conservative(body: &Bytes) {
        if let Some(raw) = RawMessage::scan(body.clone()) {
            let msg = Message::decode(body).expect("scan accepted what decode refuses");
            assert_eq!(msg.id(), raw.id());
            match (&msg, raw.kind()) {
                (Message::Infer(infer), RawKind::Infer) => {
                    assert_eq!(infer.deadline_ms, raw.deadline_ms())
                }
                (Message::Result(result), RawKind::Result) => {
                    assert_eq!(result.batch_size, raw.batch_size())
                }
                (msg, kind) => panic!("scanned as {kind:?}, decoded as {msg:?}"),
            }
        }
    }

    #[test]
    fn known_keys_are_the_decoders_in_order() {
        for (at, name) in key::ALL.iter().enumerate() {
            assert_eq!(
                Known::of(name.as_bytes()).map(|k| k as usize),
                Some(at),
                "{name}"
            );
        }
        for other in [
            "", "i", "ID", "idx", "typ", "types", "input", "inputs_", "Client",
        ] {
            assert_eq!(Known::of(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn tensor_messages_scan_and_others_decode() {
        for msg in every_message() {
            let frame = decode_body(body(&msg)).unwrap();
            match (&msg, &frame) {
                (Message::Infer(_) | Message::Result(_), Frame::Raw(raw)) => {
                    assert_eq!(raw.to_message(), msg);
                    assert_eq!(raw.id(), msg.id());
                    let batch_size = match &msg {
                        Message::Result(result) => result.batch_size,
                        _ => None,
                    };
                    assert_eq!(raw.batch_size(), batch_size, "{msg:?}");
                }
                (_, Frame::Message(decoded)) => assert_eq!(decoded, &msg),
                _ => panic!("{msg:?} read as {frame:?}"),
            }
        }
    }

    /// Bodies the encoder never writes but the scan accepts: `to_message` builds from them
    /// what the full decoder reads, field for field.
    #[test]
    fn unusual_bodies_build_the_message_the_decoder_reads() {
        use rmp::encode as w;
        fn tensor(out: &mut Vec<u8>, value: f32, extra: bool) {
            w::write_map_len(out, 3 + u32::from(extra)).unwrap();
            if extra {
                w::write_str(out, "layout").unwrap();
                w::write_array_len(out, 1).unwrap();
                w::write_uint(out, 7).unwrap();
            }
            w::write_str(out, "data").unwrap();
            w::write_bin(out, &value.to_le_bytes()).unwrap();
            w::write_str(out, "shape").unwrap();
            w::write_array_len(out, 1).unwrap();
            w::write_uint(out, 1).unwrap();
            w::write_str(out, "dtype").unwrap();
            w::write_str(out, "f32").unwrap();
        }
        for kind in ["infer", "result"] {
            let (mine, other) = if kind == "infer" {
                ("inputs", "outputs")
            } else {
                ("outputs", "inputs")
            };
            let mut out = Vec::new();
            w::write_map_len(&mut out, 13).unwrap();
            w::write_str(&mut out, "future").unwrap();
            w::write_map_len(&mut out, 1).unwrap();
            w::write_str(&mut out, "k").unwrap();
            w::write_array_len(&mut out, 2).unwrap();
            w::write_nil(&mut out).unwrap();
            w::write_f64(&mut out, 1.5).unwrap();
            w::write_str(&mut out, mine).unwrap();
            // The same name twice: the decoder keeps the last.
            w::write_map_len(&mut out, 3).unwrap();
            for (name, value, extra) in [("b", 1.0, true), ("a", 2.0, false), ("b", 3.0, false)] {
                w::write_str(&mut out, name).unwrap();
                tensor(&mut out, value, extra);
            }
            w::write_str(&mut out, other).unwrap();
            w::write_map_len(&mut out, 1).unwrap();
            w::write_str(&mut out, "z").unwrap();
            tensor(&mut out, 9.0, false);
            w::write_str(&mut out, "id").unwrap();
            w::write_uint(&mut out, 1 << 40).unwrap();
            w::write_str(&mut out, "deadline_ms").unwrap();
            w::write_nil(&mut out).unwrap();
            w::write_str(&mut out, "client").unwrap();
            w::write_str(&mut out, "10.0.0.1:9").unwrap();
            w::write_str(&mut out, "worker").unwrap();
            w::write_nil(&mut out).unwrap();
            w::write_str(&mut out, "queue_us").unwrap();
            w::write_uint(&mut out, 12).unwrap();
            w::write_str(&mut out, "infer_us").unwrap();
            w::write_nil(&mut out).unwrap();
            w::write_str(&mut out, "batch_size").unwrap();
            w::write_uint(&mut out, 3).unwrap();
            w::write_str(&mut out, "priority").unwrap();
            w::write_str(&mut out, "low").unwrap();
            w::write_str(&mut out, "code").unwrap();
            w::write_nil(&mut out).unwrap();
            w::write_str(&mut out, "type").unwrap();
            w::write_str(&mut out, kind).unwrap();
            let body = Bytes::from(out);
            let raw = RawMessage::scan(body.clone()).expect("the scan accepts it");
            let decoded = Message::decode(&body).unwrap();
            assert_eq!(raw.build().as_ref(), Some(&decoded), "{kind}");
            assert_eq!(raw.to_message(), decoded);
            let tensors = match &decoded {
                Message::Infer(infer) => &infer.inputs,
                Message::Result(result) => &result.outputs,
                other => panic!("{other:?}"),
            };
            assert_eq!(tensors["b"].to_vec::<f32>().unwrap(), [3.0]);
            assert_eq!(tensors.len(), 2);
        }
    }

    #[test]
    fn the_protocol_example_is_spliced() {
        // PROTOCOL.md section 5: the infer frame, prefix dropped.
        let hex = "84a474797065a5696e666572a2696401a6696e7075747381a17883a5647479706\
                   5a3663332a57368617065920203a464617461c418000000\
                   3f0000803f0000c03f00000040000020400000404\
                   0ab646561646c696e655f6d7364";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let raw = RawMessage::scan(Bytes::from(bytes)).unwrap();
        assert_eq!(
            (raw.kind(), raw.id(), raw.deadline_ms()),
            (RawKind::Infer, 1, Some(100))
        );
        let rewrite = Rewrite {
            id: 1 << 40,
            deadline_ms: Some(97),
            client: Some("10.1.2.3:4567"),
        };
        assert_eq!(
            splice(&raw, &rewrite),
            expected(&raw.to_message(), &rewrite)
        );
    }

    /// An `infer` body with `priority` set to `value` (any MessagePack value).
    fn with_priority<T: Serialize>(value: T) -> Bytes {
        with_entry("priority", value)
    }

    /// An `infer` body with id 41 and one more entry, `key` set to `value`.
    fn with_entry<T: Serialize>(key: &str, value: T) -> Bytes {
        struct Extended<'a, T>(&'a str, T);
        impl<T: Serialize> Serialize for Extended<'_, T> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let x = Tensor::from_vec(vec![1], vec![1.0f32]).unwrap();
                let inputs: std::collections::BTreeMap<&str, Tensor> = [("x", x)].into();
                let mut map = s.serialize_map(Some(4))?;
                map.serialize_entry("type", "infer")?;
                map.serialize_entry("id", &41u64)?;
                map.serialize_entry("inputs", &inputs)?;
                map.serialize_entry(self.0, &self.1)?;
                map.end()
            }
        }
        Bytes::from(rmp_serde::to_vec_named(&Extended(key, value)).unwrap())
    }

    #[test]
    fn a_valid_tenant_is_vouched_for_and_forwarded_byte_for_byte() {
        let raw = RawMessage::scan(with_entry("tenant", "acme")).unwrap();
        let rewrite = Rewrite {
            id: 9,
            client: Some("10.1.2.3:4567"),
            ..Rewrite::default()
        };
        let Message::Infer(spliced) = splice(&raw, &rewrite) else {
            panic!("an infer");
        };
        assert_eq!(spliced.tenant.as_deref(), Some("acme"));
        assert_eq!(spliced.client.as_deref(), Some("10.1.2.3:4567"));
    }

    #[test]
    fn a_bad_tenant_is_a_bad_request_under_its_id() {
        let long = "x".repeat(65);
        let bodies = [
            (with_entry("tenant", ""), "is empty"),
            (with_entry("tenant", long.as_str()), "longer than 64 bytes"),
            (with_entry("tenant", "a\u{7}b"), "control character"),
            (with_entry("tenant", 7u8), "not a string"),
            (
                with_entry("tenant", serde_bytes::Bytes::new(b"\xff")),
                "not a string",
            ),
        ];
        for (body, why) in bodies {
            assert_eq!(RawMessage::scan(body.clone()), None, "{why}");
            let err = decode_body(body).unwrap_err();
            assert_eq!(err.request_id(), Some(41), "{why}");
            assert_eq!(err.code(), crate::ErrorCode::BadRequest, "{why}");
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn a_known_priority_is_vouched_for_and_forwarded_byte_for_byte() {
        for p in Priority::ALL {
            let raw = RawMessage::scan(with_priority(p.as_str())).unwrap();
            assert_eq!(raw.priority(), p);
            let Message::Infer(decoded) = raw.to_message() else {
                panic!("an infer");
            };
            assert_eq!(decoded.priority, p);
            let spliced = splice(
                &raw,
                &Rewrite {
                    id: 9,
                    ..Rewrite::default()
                },
            );
            assert!(matches!(spliced, Message::Infer(i) if i.priority == p && i.id == 9));
        }
        let nil = RawMessage::scan(with_priority(None::<&str>)).unwrap();
        assert_eq!(nil.priority(), Priority::Normal, "nil is the default");
    }

    #[test]
    fn an_unknown_priority_is_a_bad_request_under_its_id() {
        for body in [with_priority("urgent"), with_priority(3u8)] {
            assert_eq!(
                RawMessage::scan(body.clone()),
                None,
                "left to the full decoder"
            );
            let err = decode_body(body).unwrap_err();
            assert_eq!(err.request_id(), Some(41));
            assert_eq!(err.code(), crate::ErrorCode::BadRequest);
        }
        let err = decode_body(with_priority("urgent")).unwrap_err();
        assert!(
            err.to_string().contains("expected low, normal or high"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_nil_options_pass_through() {
        #[derive(Serialize)]
        struct Later<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            id: u64,
            ranking: Vec<Option<u8>>,
            inputs: std::collections::BTreeMap<&'a str, Tensor>,
            deadline_ms: Option<u64>,
            client: Option<&'a str>,
            trace: std::collections::BTreeMap<&'a str, f64>,
        }
        let x = Tensor::from_vec(vec![2], vec![1.5f32, -2.0]).unwrap();
        let mut out = Vec::new();
        Later {
            kind: "infer",
            id: 300,
            ranking: vec![Some(1), None],
            inputs: [("x", x.clone())].into(),
            deadline_ms: None,
            client: None,
            trace: [("span", 0.25)].into(),
        }
        .serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
        .unwrap();
        let raw = RawMessage::scan(Bytes::from(out)).unwrap();
        assert_eq!(raw.deadline_ms(), None);
        let rewrite = Rewrite {
            id: 5,
            deadline_ms: Some(10),
            client: Some("c"),
        };
        let spliced = splice(&raw, &rewrite);
        assert_eq!(
            spliced,
            Message::Infer(Infer {
                id: 5,
                inputs: [("x".to_owned(), x)].into(),
                deadline_ms: Some(10),
                client: Some("c".to_owned()),
                priority: Priority::Normal,
                tenant: None,
            })
        );
        // The unknown keys are still there, unchanged.
        let mut buf = BytesMut::new();
        raw.write_frame(&rewrite, &mut buf, usize::MAX).unwrap();
        let window = |b: &[u8], needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        assert!(window(&buf, b"\xa7ranking\x92\x01\xc0"));
        assert!(window(&buf, b"\xa5trace\x81\xa4span"));
    }

    #[test]
    fn what_the_full_decoder_refuses_is_left_to_it() {
        #[derive(Serialize)]
        struct T<'a> {
            dtype: &'a str,
            shape: Vec<u64>,
            #[serde(with = "serde_bytes")]
            data: Vec<u8>,
        }
        #[derive(Serialize)]
        struct I<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            id: u64,
            inputs: std::collections::BTreeMap<&'a str, T<'a>>,
        }
        let encode = |dtype: &'static str, shape: Vec<u64>, data: usize| {
            let mut out = Vec::new();
            I {
                kind: "infer",
                id: 4,
                inputs: [(
                    "x",
                    T {
                        dtype,
                        shape,
                        data: vec![0; data],
                    },
                )]
                .into(),
            }
            .serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
            .unwrap();
            Bytes::from(out)
        };
        assert!(RawMessage::scan(encode("f32", vec![3], 12)).is_some());
        for bad in [
            encode("f32", vec![3], 11),
            encode("c64", vec![1], 8),
            // 8 × 2^62 overflows before the 0 is reached: the full decoder refuses it.
            encode("f64", vec![1 << 62, 0], 0),
        ] {
            assert!(RawMessage::scan(bad.clone()).is_none());
            assert!(decode_body(bad).is_err());
        }
        // A duplicate known key, a trailing byte.
        let mut dup = body(&every_message()[0]).to_vec();
        dup[0] += 1;
        dup.extend_from_slice(b"\xa2id\x01");
        assert!(RawMessage::scan(Bytes::from(dup.clone())).is_none());
        assert!(Message::decode(&Bytes::from(dup)).is_err());
        let mut trailing = body(&every_message()[0]).to_vec();
        trailing.push(0xc0);
        assert!(RawMessage::scan(Bytes::from(trailing)).is_none());
    }

    #[test]
    fn strings_are_checked_as_text_past_the_ascii_fast_path() {
        // A tensor name and a client that are UTF-8 but not ASCII take the slow check.
        let mut inputs = crate::Tensors::new();
        inputs.insert(
            "é".to_owned(),
            Tensor::from_vec(vec![1], vec![1.0f32]).unwrap(),
        );
        let msg = Message::Infer(Infer {
            id: 3,
            inputs,
            client: Some("ü:1".to_owned()),
            ..Infer::default()
        });
        let good = body(&msg);
        assert_eq!(RawMessage::scan(good.clone()).unwrap().to_message(), msg);
        // The same bytes with `é` (c3 a9) broken, then `ü` (c3 bc): not text, refused by
        // both.
        for broken in [[0xc3, 0xa9], [0xc3, 0xbc]] {
            let mut bad = good.to_vec();
            let at = bad.windows(2).position(|w| w == broken).unwrap();
            bad[at + 1] = 0xff;
            let bad = Bytes::from(bad);
            assert!(RawMessage::scan(bad.clone()).is_none());
            assert!(Message::decode(&bad).is_err());
        }
    }

    #[test]
    fn markers_are_written_as_rmp_writes_them() {
        for n in [
            0u64,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            1 << 32,
            u64::MAX,
        ] {
            let (mut ours, mut theirs) = (BytesMut::new(), Vec::new());
            put_uint(&mut ours, n);
            rmp::encode::write_uint(&mut theirs, n).unwrap();
            assert_eq!(&ours[..], &theirs[..], "uint {n}");
        }
        for len in [0u32, 15, 16, 0xffff, 0x1_0000] {
            let (mut ours, mut theirs) = (BytesMut::new(), Vec::new());
            put_map_len(&mut ours, len);
            rmp::encode::write_map_len(&mut theirs, len).unwrap();
            assert_eq!(&ours[..], &theirs[..], "map of {len}");
        }
        for len in [0usize, 31, 32, 0xff, 0x100, 0xffff, 0x1_0000] {
            let text = "a".repeat(len);
            let (mut ours, mut theirs) = (BytesMut::new(), Vec::new());
            put_str(&mut ours, &text);
            rmp::encode::write_str(&mut theirs, &text).unwrap();
            assert_eq!(&ours[..], &theirs[..], "string of {len}");
        }
    }

    #[test]
    fn too_large_once_spliced_is_refused_cleanly() {
        let msg = Message::Result(InferResult {
            id: 1,
            ..InferResult::default()
        });
        let raw = RawMessage::scan(body(&msg)).unwrap();
        let mut buf = BytesMut::from(&b"kept"[..]);
        let err = raw
            .write_frame(
                &Rewrite {
                    id: u64::MAX,
                    ..Rewrite::default()
                },
                &mut buf,
                raw.body().len(),
            )
            .unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }));
        assert_eq!(&buf[..], b"kept");
    }

    proptest! {
        /// Every message reads the same through `decode_body` as through the full decoder,
        /// and every `infer` or `result` takes the raw path.
        #[test]
        fn decode_body_agrees_with_decode(msg in arb_message()) {
            let b = body(&msg);
            match decode_body(b).unwrap() {
                Frame::Raw(raw) => {
                    prop_assert!(matches!(msg, Message::Infer(_) | Message::Result(_)));
                    prop_assert_eq!(raw.id(), msg.id());
                    prop_assert_eq!(raw.to_message(), msg);
                }
                Frame::Message(decoded) => {
                    prop_assert!(!matches!(msg, Message::Infer(_) | Message::Result(_)));
                    prop_assert_eq!(decoded, msg);
                }
            }
        }

        /// A spliced frame decodes to the original with the rewrite applied.
        #[test]
        fn splice_round_trip(msg in arb_message(),
                             id in any::<u64>(),
                             deadline_ms in any::<Option<u64>>(),
                             client in proptest::option::of("[0-9.:]{0,40}")) {
            let rewrite = Rewrite { id, deadline_ms, client: client.as_deref() };
            if let Frame::Raw(raw) = decode_body(body(&msg)).unwrap() {
                prop_assert_eq!(splice(&raw, &rewrite), expected(&msg, &rewrite));
            }
        }

        /// Damaged bodies: the scan accepts only what the full decoder accepts.
        #[test]
        fn damaged_bodies_are_never_vouched_for(msg in arb_message(),
                                                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                                                cut in any::<prop::sample::Index>()) {
            let mut b = body(&msg).to_vec();
            for (at, byte) in flips {
                let i = at.index(b.len());
                b[i] = byte;
            }
            check_conservative(&Bytes::from(b.clone()));
            b.truncate(cut.index(b.len() + 1));
            check_conservative(&Bytes::from(b));
        }

        /// Arbitrary bytes never panic the scan, nor fool it.
        #[test]
        fn garbage_is_never_vouched_for(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            check_conservative(&Bytes::from(data));
        }
    }
}
