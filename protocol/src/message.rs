//! The protocol's messages and how each maps to one MessagePack map.
//!
//! Encoding goes through [`WireOut`], a struct serialized with named fields so that the
//! bytes are a plain map any MessagePack library reads. Decoding goes through [`WireIn`],
//! a flat struct of optional fields borrowed from the frame: it accepts unknown keys,
//! recovers the `id` even when the rest is wrong (so a bad request is answered under its
//! own id), and lets tensor data become slices of the frame's [`Bytes`] without a copy.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::limits::Limits;
use crate::metadata::ModelMetadata;
use crate::priority::Priority;
use crate::raw::Cursor;
use crate::tenant;
use crate::tensor::{expected_len, DType, Tensor, WireTensor};

/// A request id, chosen by whoever sends the request.
///
/// Unique among that sender's requests in flight on one connection. Id 0 is reserved
/// for errors about the connection itself (a frame too large to read, a body that is not
/// MessagePack), so clients number their requests from 1.
pub type RequestId = u64;

/// The id used by errors that no request can be tied to.
pub const CONNECTION_ID: RequestId = 0;

/// Named inputs or outputs of one item.
pub type Tensors = BTreeMap<String, Tensor>;

/// One protocol message: the decoded content of one frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Client to server: run the model on one item.
    Infer(Infer),
    /// Server to client: the outputs for one item.
    Result(InferResult),
    /// Server to client: the request failed; exactly one of `result` or `error` answers it.
    Error(ErrorReply),
    /// Client to server: drop the request with this id if it has not run yet.
    Cancel {
        /// The id of the request to cancel.
        id: RequestId,
    },
    /// Liveness probe; answered with `pong` once the server is ready.
    Ping {
        /// The probe's id, echoed in the answer.
        id: RequestId,
    },
    /// The answer to a `ping`.
    Pong {
        /// The id of the `ping` it answers.
        id: RequestId,
        /// How loaded the server is, when it says (a worker does; a balancer and older
        /// workers do not).
        load: Option<Load>,
    },
    /// Client to server: describe the model served (inputs, outputs, batching rules).
    Metadata {
        /// The request id.
        id: RequestId,
    },
    /// Server to client: the answer to `metadata`.
    MetadataResult(MetadataResult),
}

/// A `metadata_result`: the model a server serves.
#[derive(Clone, Debug, PartialEq)]
pub struct MetadataResult {
    /// The id of the `metadata` request it answers.
    pub id: RequestId,
    /// The model.
    pub model: ModelMetadata,
    /// The name of the worker that answered.
    pub worker: Option<String>,
}

/// A worker's load as its `pong` reports it: what an autoscaler needs to size the pool
/// on a signal that grows in step with the offered load (unlike requests in flight,
/// which stay low until a batching worker saturates).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Load {
    /// The fraction of wall time, 0 to 1, the model thread spent running batches over the
    /// last few seconds (wire key `busy`).
    pub busy: f32,
    /// The time items waited in the queue before their batch ran, averaged over the same
    /// recent seconds, in microseconds (wire key `queue_us`).
    pub queue_us: u64,
    /// The batch run times the worker predicts with, when it serves to deadlines and has run
    /// a batch: what a balancer's predicted-finish admission forecasts with.
    pub batches: Option<BatchTimes>,
}

/// A worker's predicted batch run times, as its `pong` reports them (wire keys
/// `batch_one_us`, `batch_full_us`, `max_batch`, all three or none, and `instances`,
/// optional: absent reads as 1).
///
/// Read from a peer, so bounded at decode ([`BatchTimes::checked`]): a report a balancer
/// acts on must not make its arithmetic overflow, and one broken worker's report is dropped
/// rather than trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BatchTimes {
    /// A batch of one item's predicted run time, in microseconds (at most
    /// [`BatchTimes::MAX_US`]).
    pub one_us: u64,
    /// A full batch's predicted run time, in microseconds (at most [`BatchTimes::MAX_US`]).
    pub full_us: u64,
    /// The most items the worker runs in one batch (1 to [`BatchTimes::MAX_BATCH`]).
    pub max_batch: u32,
    /// How many batches the worker runs side by side, each taking those times (its model
    /// instances, `--instances`; 1 to [`BatchTimes::MAX_INSTANCES`]).
    pub instances: u32,
}

impl BatchTimes {
    /// The longest batch time a report may state, an hour: longer reads as an hour.
    pub const MAX_US: u64 = 3_600_000_000;
    /// The largest batch a report may state: larger reads as this.
    pub const MAX_BATCH: u32 = 1 << 20;
    /// The most instances a report may state: more reads as this.
    pub const MAX_INSTANCES: u32 = 1 << 10;

    /// A report from its wire keys: `None` unless the first three are present and the batch
    /// size is at least 1; times, size and instances beyond their bounds read as the bound,
    /// and `instances` absent or 0 as 1 (a worker that runs one batch at a time).
    pub fn checked(
        one_us: Option<u64>,
        full_us: Option<u64>,
        max_batch: Option<u32>,
        instances: Option<u32>,
    ) -> Option<Self> {
        let max_batch = max_batch.filter(|&n| n > 0)?;
        Some(BatchTimes {
            one_us: one_us?.min(Self::MAX_US),
            full_us: full_us?.min(Self::MAX_US),
            max_batch: max_batch.min(Self::MAX_BATCH),
            instances: instances.unwrap_or(1).clamp(1, Self::MAX_INSTANCES),
        })
    }
}

/// An `infer` request: one item, without the batch dimension.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Infer {
    /// The request id.
    pub id: RequestId,
    /// Input name to tensor.
    pub inputs: Tensors,
    /// Budget in milliseconds from the moment the server reads the frame.
    pub deadline_ms: Option<u64>,
    /// The original client's address, added by a balancer (as NLB preserves the client IP).
    pub client: Option<String>,
    /// The priority class; absent on the wire means [`Priority::Normal`], and is written
    /// only when not normal.
    pub priority: Priority,
    /// The tenant the request belongs to, for a worker that shares its queue between
    /// tenants (`--fairness tenant`); checked by [`crate::tenant::check`] when decoded. A
    /// `Box<str>`, not a `String`: a balancer moves requests by value several times, and
    /// the 8 bytes of capacity would take them past what moves without a `memcpy`.
    pub tenant: Option<Box<str>>,
}

/// A `result`: one item's outputs, with where and how it ran.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct InferResult {
    /// The id of the request it answers.
    pub id: RequestId,
    /// Output name to tensor.
    pub outputs: Tensors,
    /// Microseconds the item waited in the worker's queue.
    pub queue_us: Option<u64>,
    /// Microseconds the batch holding the item took to run.
    pub infer_us: Option<u64>,
    /// How many items ran in that batch.
    pub batch_size: Option<u32>,
    /// The name of the worker that ran it.
    pub worker: Option<String>,
}

/// An `error`: why a request got no result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    /// The id of the request it answers, or [`CONNECTION_ID`].
    pub id: RequestId,
    /// What kind of failure, for programs.
    pub code: ErrorCode,
    /// What went wrong and what to do, for people.
    pub message: String,
    /// When to try again, for `overloaded` and `unavailable`.
    pub retry_after_ms: Option<u64>,
}

impl ErrorReply {
    /// An error answer without a retry hint.
    pub fn new(id: RequestId, code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            id,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// Adds a retry hint.
    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

/// The `retry_after_ms` for a request refused because it was predicted to be answered
/// `late_by` after its deadline (by a worker or a balancer): by then the work ahead of it has
/// shrunk by that much. At least 1 ms, at most a minute.
pub fn late_retry_ms(late_by: std::time::Duration) -> u64 {
    u64::try_from(late_by.as_millis().saturating_add(1))
        .unwrap_or(u64::MAX)
        .clamp(1, 60_000)
}

/// The error codes of protocol v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or does not fit the model; fix it before retrying.
    BadRequest,
    /// The frame is above the receiver's maximum size.
    TooLarge,
    /// The server's queue is full; retry after `retry_after_ms`.
    Overloaded,
    /// The item's `deadline_ms` passed before it ran.
    DeadlineExceeded,
    /// No server could take the request (not ready, no healthy target, connection lost).
    Unavailable,
    /// The client cancelled the request before it ran.
    Cancelled,
    /// The server is stopping and did not run the request.
    ShuttingDown,
    /// The server failed while running the request.
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Overloaded,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Unavailable,
        ErrorCode::Cancelled,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];

    /// The wire name (`"bad_request"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }

    /// Parses a wire name. Codes added by later versions read as `internal`, as the
    /// protocol tells receivers to do.
    pub fn from_wire(s: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Internal)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Message {
    /// The message's id.
    pub fn id(&self) -> RequestId {
        match self {
            Message::Infer(m) => m.id,
            Message::Result(m) => m.id,
            Message::Error(m) => m.id,
            Message::MetadataResult(m) => m.id,
            Message::Cancel { id }
            | Message::Ping { id }
            | Message::Pong { id, .. }
            | Message::Metadata { id } => *id,
        }
    }

    /// Replaces the message's id, as a balancer does on the way to a target and back.
    pub fn set_id(&mut self, new: RequestId) {
        match self {
            Message::Infer(m) => m.id = new,
            Message::Result(m) => m.id = new,
            Message::Error(m) => m.id = new,
            Message::MetadataResult(m) => m.id = new,
            Message::Cancel { id }
            | Message::Ping { id }
            | Message::Pong { id, .. }
            | Message::Metadata { id } => *id = new,
        }
    }

    /// A `pong` answering `id`, without a load report.
    pub fn pong(id: RequestId) -> Message {
        Message::Pong { id, load: None }
    }

    /// The `type` string on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Infer(_) => "infer",
            Message::Result(_) => "result",
            Message::Error(_) => "error",
            Message::Cancel { .. } => "cancel",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Metadata { .. } => "metadata",
            Message::MetadataResult(_) => "metadata_result",
        }
    }

    /// Encodes the message as one MessagePack map (the frame body, without its length).
    pub fn to_msgpack(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(64);
        self.write_msgpack(&mut out)?;
        Ok(out)
    }

    /// Appends the MessagePack map to `out`.
    pub fn write_msgpack<W: std::io::Write>(&self, out: &mut W) -> Result<(), Error> {
        match self {
            // One per item answered: written straight, the same bytes as serde's.
            Message::Result(result) => crate::result_wire::write_result(result, out)
                .map_err(|e| Error::Encode(rmp_serde::encode::Error::InvalidValueWrite(e))),
            _ => write_with_serde(self, out),
        }
    }

    /// The MessagePack map as serde writes it: the definition that [`Message::write_msgpack`]'s
    /// hand-written `result` path is held to, byte for byte (unit tests and the `decode` fuzz
    /// target compare the two). Not for the hot path.
    pub fn to_msgpack_via_serde(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(64);
        write_with_serde(self, &mut out)?;
        Ok(out)
    }

    /// Decodes one frame body within [`Limits::PROTOCOL`]. Tensor data in the result are
    /// slices of `body`.
    ///
    /// On failure the error carries the request id when the body had a readable one,
    /// so the request can be answered under its own id.
    pub fn decode(body: &Bytes) -> Result<Message, Error> {
        Message::decode_with(body, &Limits::PROTOCOL)
    }

    /// Decodes one frame body within `limits`: the same walk as the
    /// [`raw`](crate::raw) scanner's comes first, so a body one refuses the other refuses too.
    pub fn decode_with(body: &Bytes, limits: &Limits) -> Result<Message, Error> {
        limits
            .check(body)
            .map_err(|limit| limit.into_error(recover_id(body)))?;
        let mut de = rmp_serde::Deserializer::from_read_ref(&body[..]);
        // The walk above bounds the depth; serde's own guard must never be the tighter one.
        de.set_max_depth(limits.max_depth.saturating_add(8));
        let wire = match WireIn::deserialize(&mut de) {
            Ok(wire) => wire,
            Err(source) => {
                return Err(Error::Malformed {
                    id: recover_id(body),
                    source,
                })
            }
        };
        wire.into_message(body, limits)
    }
}

/// Writes `message` through [`WireOut`] and serde: the definition of every message's bytes,
/// which [`crate::result_wire`] reproduces for `result`.
pub(crate) fn write_with_serde<W: std::io::Write>(
    message: &Message,
    out: &mut W,
) -> Result<(), Error> {
    WireOut::from(message)
        .serialize(&mut rmp_serde::Serializer::new(out).with_struct_map())
        .map_err(Error::Encode)
}

/// Best effort: the `id` of a body whose other fields did not decode. Reads only the top-level
/// keys and steps over their values without recursion, so it finds the id of a body however
/// deeply nested its other values are.
fn recover_id(body: &[u8]) -> Option<RequestId> {
    let mut c = Cursor::new(body);
    for _ in 0..c.map_len()? {
        if c.str()? == "id" {
            return c.uint();
        }
        c.skip()?;
    }
    None
}

/// The wire names of a message's top-level keys: the one place they are spelled. The
/// encoder writes them from here, the raw scanner and splicer ([`crate::raw`]) read and write
/// them from here, and a test holds the decoder's field names (serde attributes, which take
/// only literals) to this list.
pub(crate) mod key {
    /// The message type: `infer`, `result`, `error`, `cancel`, `ping`, `pong`.
    pub(crate) const TYPE: &str = "type";
    /// The request id.
    pub(crate) const ID: &str = "id";
    /// An `infer`'s tensors.
    pub(crate) const INPUTS: &str = "inputs";
    /// An `infer`'s time budget.
    pub(crate) const DEADLINE_MS: &str = "deadline_ms";
    /// The original client's address, added by a balancer.
    pub(crate) const CLIENT: &str = "client";
    /// A `result`'s tensors.
    pub(crate) const OUTPUTS: &str = "outputs";
    /// A `result`'s time queued.
    pub(crate) const QUEUE_US: &str = "queue_us";
    /// A `result`'s batch run time.
    pub(crate) const INFER_US: &str = "infer_us";
    /// A `result`'s batch size.
    pub(crate) const BATCH_SIZE: &str = "batch_size";
    /// A `result`'s worker name.
    pub(crate) const WORKER: &str = "worker";
    /// An `error`'s code.
    pub(crate) const CODE: &str = "code";
    /// An `error`'s message.
    pub(crate) const MESSAGE: &str = "message";
    /// An `error`'s retry hint.
    pub(crate) const RETRY_AFTER_MS: &str = "retry_after_ms";
    /// A `pong`'s busy share.
    pub(crate) const BUSY: &str = "busy";
    /// A `metadata_result`'s model description.
    pub(crate) const MODEL: &str = "model";
    /// An `infer`'s priority class.
    pub(crate) const PRIORITY: &str = "priority";
    /// An `infer`'s tenant.
    pub(crate) const TENANT: &str = "tenant";
    /// A `pong`'s predicted run time of a batch of one.
    pub(crate) const BATCH_ONE_US: &str = "batch_one_us";
    /// A `pong`'s predicted run time of a full batch.
    pub(crate) const BATCH_FULL_US: &str = "batch_full_us";
    /// A `pong`'s most items per batch.
    pub(crate) const MAX_BATCH: &str = "max_batch";
    /// A `pong`'s batches run side by side.
    pub(crate) const INSTANCES: &str = "instances";

    /// Every top-level key the decoder knows, each allowed once in a message.
    pub(crate) const ALL: [&str; 21] = [
        TYPE,
        ID,
        INPUTS,
        DEADLINE_MS,
        CLIENT,
        OUTPUTS,
        QUEUE_US,
        INFER_US,
        BATCH_SIZE,
        WORKER,
        CODE,
        MESSAGE,
        RETRY_AFTER_MS,
        BUSY,
        MODEL,
        PRIORITY,
        TENANT,
        BATCH_ONE_US,
        BATCH_FULL_US,
        MAX_BATCH,
        INSTANCES,
    ];
}

/// A message as written: the key, then each field that is present, in this order.
struct WireOut<'a> {
    kind: &'static str,
    id: RequestId,
    inputs: Option<&'a Tensors>,
    deadline_ms: Option<u64>,
    client: Option<&'a str>,
    outputs: Option<&'a Tensors>,
    queue_us: Option<u64>,
    infer_us: Option<u64>,
    batch_size: Option<u32>,
    worker: Option<&'a str>,
    code: Option<ErrorCode>,
    message: Option<&'a str>,
    retry_after_ms: Option<u64>,
    busy: Option<f32>,
    model: Option<&'a ModelMetadata>,
    priority: Option<Priority>,
    tenant: Option<&'a str>,
    batch_one_us: Option<u64>,
    batch_full_us: Option<u64>,
    max_batch: Option<u32>,
    instances: Option<u32>,
}

impl Serialize for WireOut<'_> {
    /// One map with string keys from [`key`], absent fields left out: the bytes a derived
    /// struct serializer writes in rmp-serde's struct-map mode, with the names in one place.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        fn entry<M: SerializeMap, T: Serialize + ?Sized>(
            map: &mut M,
            key: &'static str,
            value: Option<&T>,
        ) -> Result<(), M::Error> {
            match value {
                Some(value) => map.serialize_entry(key, value),
                None => Ok(()),
            }
        }
        let present = [
            self.inputs.is_some(),
            self.deadline_ms.is_some(),
            self.client.is_some(),
            self.outputs.is_some(),
            self.queue_us.is_some(),
            self.infer_us.is_some(),
            self.batch_size.is_some(),
            self.worker.is_some(),
            self.code.is_some(),
            self.message.is_some(),
            self.retry_after_ms.is_some(),
            self.busy.is_some(),
            self.model.is_some(),
            self.priority.is_some(),
            self.tenant.is_some(),
            self.batch_one_us.is_some(),
            self.batch_full_us.is_some(),
            self.max_batch.is_some(),
            self.instances.is_some(),
        ];
        let len = 2 + present.iter().filter(|p| **p).count();
        let mut map = serializer.serialize_map(Some(len))?;
        map.serialize_entry(key::TYPE, self.kind)?;
        map.serialize_entry(key::ID, &self.id)?;
        entry(&mut map, key::INPUTS, self.inputs)?;
        entry(&mut map, key::DEADLINE_MS, self.deadline_ms.as_ref())?;
        entry(&mut map, key::CLIENT, self.client)?;
        entry(&mut map, key::OUTPUTS, self.outputs)?;
        entry(&mut map, key::QUEUE_US, self.queue_us.as_ref())?;
        entry(&mut map, key::INFER_US, self.infer_us.as_ref())?;
        entry(&mut map, key::BATCH_SIZE, self.batch_size.as_ref())?;
        entry(&mut map, key::WORKER, self.worker)?;
        entry(&mut map, key::CODE, self.code.as_ref())?;
        entry(&mut map, key::MESSAGE, self.message)?;
        entry(&mut map, key::RETRY_AFTER_MS, self.retry_after_ms.as_ref())?;
        entry(&mut map, key::BUSY, self.busy.as_ref())?;
        entry(&mut map, key::MODEL, self.model)?;
        entry(&mut map, key::PRIORITY, self.priority.map(Priority::as_str))?;
        entry(&mut map, key::TENANT, self.tenant)?;
        entry(&mut map, key::BATCH_ONE_US, self.batch_one_us.as_ref())?;
        entry(&mut map, key::BATCH_FULL_US, self.batch_full_us.as_ref())?;
        entry(&mut map, key::MAX_BATCH, self.max_batch.as_ref())?;
        entry(&mut map, key::INSTANCES, self.instances.as_ref())?;
        map.end()
    }
}

impl<'a> WireOut<'a> {
    fn bare(kind: &'static str, id: RequestId) -> Self {
        WireOut {
            kind,
            id,
            inputs: None,
            deadline_ms: None,
            client: None,
            outputs: None,
            queue_us: None,
            infer_us: None,
            batch_size: None,
            worker: None,
            code: None,
            message: None,
            retry_after_ms: None,
            busy: None,
            model: None,
            priority: None,
            tenant: None,
            batch_one_us: None,
            batch_full_us: None,
            max_batch: None,
            instances: None,
        }
    }
}

impl<'a> From<&'a Message> for WireOut<'a> {
    fn from(m: &'a Message) -> Self {
        let mut w = WireOut::bare(m.kind(), m.id());
        match m {
            Message::Infer(i) => {
                w.inputs = Some(&i.inputs);
                w.deadline_ms = i.deadline_ms;
                w.client = i.client.as_deref();
                // Normal is the default: left out, so that the bytes are what they were.
                w.priority = (i.priority != Priority::Normal).then_some(i.priority);
                w.tenant = i.tenant.as_deref();
            }
            Message::Result(r) => {
                w.outputs = Some(&r.outputs);
                w.queue_us = r.queue_us;
                w.infer_us = r.infer_us;
                w.batch_size = r.batch_size;
                w.worker = r.worker.as_deref();
            }
            Message::Error(e) => {
                w.code = Some(e.code);
                w.message = Some(&e.message);
                w.retry_after_ms = e.retry_after_ms;
            }
            Message::Pong {
                load: Some(load), ..
            } => {
                w.busy = Some(load.busy);
                w.queue_us = Some(load.queue_us);
                if let Some(times) = load.batches {
                    w.batch_one_us = Some(times.one_us);
                    w.batch_full_us = Some(times.full_us);
                    w.max_batch = Some(times.max_batch);
                    // One is the default: left out, so that the bytes are what they were.
                    w.instances = (times.instances != 1).then_some(times.instances);
                }
            }
            Message::MetadataResult(m) => {
                w.model = Some(&m.model);
                w.worker = m.worker.as_deref();
            }
            Message::Cancel { .. }
            | Message::Ping { .. }
            | Message::Pong { .. }
            | Message::Metadata { .. } => {}
        }
        w
    }
}

/// Every field any message may carry; unknown keys are skipped by serde. The field names are
/// the wire's ([`key::ALL`]; serde's attributes take only literals, so a test holds them to
/// that list).
#[derive(Deserialize)]
struct WireIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    id: RequestId,
    #[serde(borrow, default)]
    inputs: Option<BTreeMap<String, WireTensor<'a>>>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    #[serde(default)]
    client: Option<String>,
    #[serde(borrow, default)]
    outputs: Option<BTreeMap<String, WireTensor<'a>>>,
    #[serde(default)]
    queue_us: Option<u64>,
    #[serde(default)]
    infer_us: Option<u64>,
    #[serde(default)]
    batch_size: Option<u32>,
    #[serde(default)]
    worker: Option<String>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
    #[serde(default)]
    busy: Option<f32>,
    model: Option<ModelMetadata>,
    #[serde(borrow, default)]
    priority: Option<WireText<'a>>,
    #[serde(borrow, default)]
    tenant: Option<WireText<'a>>,
    #[serde(default)]
    batch_one_us: Option<u64>,
    #[serde(default)]
    batch_full_us: Option<u64>,
    #[serde(default)]
    max_batch: Option<u32>,
    #[serde(default)]
    instances: Option<u32>,
}

/// A `priority` or `tenant` value as read: a string, or anything else (kept only to say it
/// is wrong; a `str` that is not UTF-8 comes as bytes, so it is this too). Only an `infer`
/// reads them; on other messages they are as unknown as any later key, so any value is
/// skipped rather than refused.
enum WireText<'a> {
    Text(Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for WireText<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyText)
    }
}

/// Reads any value as a [`WireText`].
struct AnyText;

impl<'de> serde::de::Visitor<'de> for AnyText {
    type Value = WireText<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(WireText::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(WireText::Text(Cow::Owned(v.to_owned())))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(WireText::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(WireText::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(WireText::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(WireText::Other)
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(WireText::Other)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(WireText::Other)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(WireText::Other)
    }
}

impl WireIn<'_> {
    fn into_message(self, body: &Bytes, limits: &Limits) -> Result<Message, Error> {
        let id = self.id;
        let missing = |field: &'static str| Error::MissingField {
            id,
            kind: self.kind.to_string(),
            field,
        };
        Ok(match &*self.kind {
            "infer" => Message::Infer(Infer {
                id,
                inputs: tensors(
                    id,
                    self.inputs.ok_or_else(|| missing("inputs"))?,
                    body,
                    limits,
                )?,
                deadline_ms: self.deadline_ms,
                client: self.client,
                priority: match self.priority {
                    None => Priority::Normal,
                    Some(WireText::Text(p)) => {
                        Priority::from_wire(p.as_bytes()).ok_or_else(|| Error::UnknownPriority {
                            id,
                            value: p.chars().take(64).collect(),
                        })?
                    }
                    Some(WireText::Other) => {
                        return Err(Error::UnknownPriority {
                            id,
                            value: "a value that is not a string".to_owned(),
                        })
                    }
                },
                tenant: match self.tenant {
                    None => None,
                    Some(WireText::Text(t)) => Some(
                        tenant::check(t.as_bytes())
                            .map_err(|why| Error::InvalidTenant { id, why })?
                            .into(),
                    ),
                    Some(WireText::Other) => {
                        return Err(Error::InvalidTenant {
                            id,
                            why: "is not a string",
                        })
                    }
                },
            }),
            "result" => Message::Result(InferResult {
                id,
                outputs: tensors(
                    id,
                    self.outputs.ok_or_else(|| missing("outputs"))?,
                    body,
                    limits,
                )?,
                queue_us: self.queue_us,
                infer_us: self.infer_us,
                batch_size: self.batch_size,
                worker: self.worker,
            }),
            "error" => Message::Error(ErrorReply {
                id,
                code: ErrorCode::from_wire(&self.code.ok_or_else(|| missing("code"))?),
                message: self.message.unwrap_or_default(),
                retry_after_ms: self.retry_after_ms,
            }),
            "cancel" => Message::Cancel { id },
            "ping" => Message::Ping { id },
            // A load report needs its busy share; a bare `queue_us` is ignored, and so is a
            // share that is no fraction (NaN, infinite): the autoscaler sums these, and one
            // worker's broken report must not make the pool's total meaningless. Batch times
            // come with a load report or not at all, bounded ([`BatchTimes::checked`]).
            "pong" => Message::Pong {
                id,
                load: self.busy.filter(|b| b.is_finite()).map(|busy| Load {
                    busy: busy.clamp(0.0, 1.0),
                    queue_us: self.queue_us.unwrap_or(0),
                    batches: BatchTimes::checked(
                        self.batch_one_us,
                        self.batch_full_us,
                        self.max_batch,
                        self.instances,
                    ),
                }),
            },
            "metadata" => Message::Metadata { id },
            "metadata_result" => Message::MetadataResult(MetadataResult {
                id,
                model: self.model.ok_or_else(|| missing("model"))?,
                worker: self.worker,
            }),
            other => {
                return Err(Error::UnknownType {
                    id,
                    kind: other.to_owned(),
                })
            }
        })
    }
}

fn tensors(
    id: RequestId,
    wire: BTreeMap<String, WireTensor<'_>>,
    body: &Bytes,
    limits: &Limits,
) -> Result<Tensors, Error> {
    wire.into_iter()
        .map(|(name, t)| {
            limits
                .check_dims(t.shape.len())
                .map_err(|limit| limit.into_error(Some(id)))?;
            let dtype: DType = t.dtype.parse().map_err(|_| Error::UnknownDType {
                id: Some(id),
                dtype: t.dtype.to_string(),
            })?;
            let shape: Vec<usize> = t
                .shape
                .iter()
                .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
                .collect();
            let expected = expected_len(dtype, &shape);
            if expected != Some(t.data.len()) {
                return Err(Error::TensorLength {
                    id: Some(id),
                    name: Some(name),
                    dtype,
                    shape,
                    expected,
                    actual: t.data.len(),
                });
            }
            let data = match t.data {
                // The common case: a view into the frame, no copy.
                Cow::Borrowed(slice) => body.slice_ref(slice),
                Cow::Owned(vec) => Bytes::from(vec),
            };
            Ok((name, Tensor::new(dtype, shape, data)?))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::Serialize;

    fn tensor() -> Tensor {
        Tensor::from_vec(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap()
    }

    /// The field names serde derived for `WireIn`, as its `Deserialize` hands them to a
    /// deserializer.
    fn wire_in_fields() -> &'static [&'static str] {
        use serde::de::{value::Error as DeError, Error as _, Visitor};
        struct Recorder(std::cell::Cell<&'static [&'static str]>);
        impl<'de> serde::Deserializer<'de> for &Recorder {
            type Error = DeError;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, DeError> {
                Err(DeError::custom("recorder"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _name: &'static str,
                fields: &'static [&'static str],
                _visitor: V,
            ) -> Result<V::Value, DeError> {
                self.0.set(fields);
                Err(DeError::custom("recorder"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let recorder = Recorder(std::cell::Cell::new(&[]));
        assert!(WireIn::deserialize(&recorder).is_err());
        recorder.0.get()
    }

    #[test]
    fn the_decoder_and_the_encoder_use_the_key_list() {
        assert_eq!(
            wire_in_fields(),
            key::ALL,
            "WireIn's field names drifted from key::ALL"
        );
        // Every key any message encodes is a known one, and between them they use them all.
        let mut used = std::collections::BTreeSet::new();
        for msg in every_message() {
            let map: BTreeMap<String, serde::de::IgnoredAny> =
                rmp_serde::from_slice(&msg.to_msgpack().unwrap()).unwrap();
            used.extend(map.into_keys());
        }
        let all: std::collections::BTreeSet<String> =
            key::ALL.iter().map(|k| (*k).to_owned()).collect();
        assert_eq!(used, all);
    }

    pub(crate) fn every_message() -> Vec<Message> {
        let tensors: Tensors = [("x".to_owned(), tensor())].into();
        vec![
            Message::Infer(Infer {
                id: 7,
                inputs: tensors.clone(),
                deadline_ms: Some(250),
                client: Some("10.0.0.9:5000".to_owned()),
                priority: Priority::High,
                tenant: Some("acme".into()),
            }),
            Message::Infer(Infer {
                id: 8,
                inputs: Tensors::new(),
                deadline_ms: None,
                client: None,
                priority: Priority::Normal,
                tenant: None,
            }),
            Message::Result(InferResult {
                id: 7,
                outputs: tensors,
                queue_us: Some(120),
                infer_us: Some(4500),
                batch_size: Some(32),
                worker: Some("w1".to_owned()),
            }),
            Message::Error(ErrorReply::new(9, ErrorCode::Overloaded, "queue full").retry_after(50)),
            Message::Cancel { id: u64::MAX },
            Message::Ping { id: 1 },
            Message::pong(1),
            Message::Pong {
                id: 2,
                load: Some(Load {
                    busy: 0.625,
                    queue_us: 1800,
                    batches: None,
                }),
            },
            Message::Pong {
                id: 3,
                load: Some(Load {
                    busy: 0.5,
                    queue_us: 900,
                    batches: Some(BatchTimes {
                        one_us: 11_000,
                        full_us: 18_000,
                        max_batch: 8,
                        instances: 1,
                    }),
                }),
            },
            Message::Pong {
                id: 4,
                load: Some(Load {
                    busy: 0.75,
                    queue_us: 400,
                    batches: Some(BatchTimes {
                        one_us: 21_000,
                        full_us: 35_000,
                        max_batch: 16,
                        instances: 2,
                    }),
                }),
            },
            Message::Metadata { id: 2 },
            Message::MetadataResult(MetadataResult {
                id: 2,
                model: crate::metadata::tests::encoder(),
                worker: Some("w1".to_owned()),
            }),
        ]
    }

    /// What the fuzzer found: a NaN float survives a round trip as the same bytes (while
    /// `==` calls it unequal to itself), and a `pong` whose busy share is no fraction is
    /// read as no load report, one out of range as its nearest bound.
    #[test]
    fn non_finite_floats_are_kept_or_refused_never_trusted() {
        let mut model = crate::metadata::tests::encoder();
        let padding = model.padding.as_mut().expect("the encoder pads");
        padding.values.insert("input_ids".to_owned(), f64::NAN);
        let msg = Message::MetadataResult(MetadataResult {
            id: 6,
            model,
            worker: None,
        });
        let body = msg.to_msgpack().unwrap();
        let back = Message::decode(&Bytes::from(body.clone())).unwrap();
        assert_eq!(back.to_msgpack().unwrap(), body);

        let pong = |busy: f32| {
            let msg = Message::Pong {
                id: 4,
                load: Some(Load {
                    busy,
                    queue_us: 9,
                    batches: None,
                }),
            };
            match Message::decode(&Bytes::from(msg.to_msgpack().unwrap())).unwrap() {
                Message::Pong { load, .. } => load.map(|l| l.busy),
                other => panic!("a pong decodes as a pong, got {other:?}"),
            }
        };
        assert_eq!(pong(f32::NAN), None);
        assert_eq!(pong(f32::INFINITY), None);
        assert_eq!(pong(7.5), Some(1.0));
        assert_eq!(pong(-0.5), Some(0.0));
        assert_eq!(pong(0.25), Some(0.25));
    }

    /// A worker's batch times are taken only whole and within bounds: a report a balancer
    /// forecasts with cannot make it overflow or divide by zero.
    #[test]
    fn batch_times_are_whole_and_bounded_or_dropped() {
        #[derive(Serialize)]
        struct Pong {
            #[serde(rename = "type")]
            kind: &'static str,
            id: u64,
            busy: f32,
            #[serde(skip_serializing_if = "Option::is_none")]
            batch_one_us: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            batch_full_us: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            max_batch: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            instances: Option<u32>,
        }
        let reported = |one, full, max, instances| {
            let body = encode(&Pong {
                kind: "pong",
                id: 5,
                busy: 0.5,
                batch_one_us: one,
                batch_full_us: full,
                max_batch: max,
                instances,
            });
            match Message::decode(&body).unwrap() {
                Message::Pong { load, .. } => load.expect("busy makes a load report").batches,
                other => panic!("a pong decodes as a pong, got {other:?}"),
            }
        };
        let times = |one, full, max| reported(one, full, max, None);
        let whole = BatchTimes {
            one_us: 10,
            full_us: 20,
            max_batch: 4,
            instances: 1,
        };
        assert_eq!(times(Some(10), Some(20), Some(4)), Some(whole));
        assert_eq!(times(None, Some(20), Some(4)), None, "a key missing");
        assert_eq!(times(Some(10), None, Some(4)), None);
        assert_eq!(times(Some(10), Some(20), None), None);
        assert_eq!(times(Some(10), Some(20), Some(0)), None, "no batch of 0");
        assert_eq!(
            times(Some(u64::MAX), Some(u64::MAX), Some(u32::MAX)),
            Some(BatchTimes {
                one_us: BatchTimes::MAX_US,
                full_us: BatchTimes::MAX_US,
                max_batch: BatchTimes::MAX_BATCH,
                instances: 1,
            })
        );
        // Instances: optional (older workers run one batch at a time), at least 1, bounded.
        let with = |n| reported(Some(10), Some(20), Some(4), Some(n)).map(|t| t.instances);
        assert_eq!(with(3), Some(3));
        assert_eq!(with(0), Some(1), "no worker runs 0 batches at once");
        assert_eq!(with(u32::MAX), Some(BatchTimes::MAX_INSTANCES));
        assert_eq!(
            reported(None, Some(20), Some(4), Some(2)),
            None,
            "instances alone are no report"
        );
    }

    #[test]
    fn a_late_request_is_told_to_retry_once_it_would_be_in_time() {
        assert_eq!(late_retry_ms(std::time::Duration::from_millis(7)), 8);
        assert_eq!(late_retry_ms(std::time::Duration::ZERO), 1);
        assert_eq!(late_retry_ms(std::time::Duration::from_secs(3600)), 60_000);
    }

    #[test]
    fn every_message_round_trips() {
        for msg in every_message() {
            let body = Bytes::from(msg.to_msgpack().unwrap());
            assert_eq!(Message::decode(&body).unwrap(), msg);
        }
        for code in ErrorCode::ALL {
            let msg = Message::Error(ErrorReply::new(3, code, "m"));
            let body = Bytes::from(msg.to_msgpack().unwrap());
            assert_eq!(Message::decode(&body).unwrap(), msg);
        }
    }

    #[test]
    fn tensor_data_is_a_slice_of_the_frame() {
        let msg = &every_message()[0];
        let body = Bytes::from(msg.to_msgpack().unwrap());
        let Message::Infer(infer) = Message::decode(&body).unwrap() else {
            panic!("not an infer")
        };
        let data = infer.inputs["x"].data();
        let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        assert!(
            range.contains(&(data.as_ptr() as usize)),
            "tensor data was copied"
        );
    }

    fn encode<T: Serialize>(value: &T) -> Bytes {
        let mut out = Vec::new();
        value
            .serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
            .unwrap();
        Bytes::from(out)
    }

    #[derive(Serialize)]
    struct Loose<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        future_field: Option<&'a str>,
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let body = encode(&Loose {
            kind: "ping",
            id: 4,
            future_field: Some("v2"),
        });
        assert_eq!(Message::decode(&body).unwrap(), Message::Ping { id: 4 });
    }

    #[test]
    fn unknown_type_keeps_the_id() {
        let body = encode(&Loose {
            kind: "explode",
            id: 11,
            future_field: None,
        });
        let err = Message::decode(&body).unwrap_err();
        assert!(matches!(err, Error::UnknownType { id: 11, .. }), "{err:?}");
        assert_eq!(err.reply().id, 11);
        assert_eq!(err.reply().code, ErrorCode::BadRequest);
    }

    #[test]
    fn missing_inputs_is_a_bad_request() {
        let body = encode(&Loose {
            kind: "infer",
            id: 12,
            future_field: None,
        });
        let err = Message::decode(&body).unwrap_err();
        assert!(matches!(
            err,
            Error::MissingField {
                id: 12,
                field: "inputs",
                ..
            }
        ));
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn wrong_key_types_are_bad_requests_with_the_id_when_readable() {
        #[derive(Serialize)]
        struct BadInputs {
            #[serde(rename = "type")]
            kind: &'static str,
            id: u64,
            inputs: Vec<u32>,
        }
        let err = Message::decode(&encode(&BadInputs {
            kind: "infer",
            id: 21,
            inputs: vec![1, 2],
        }))
        .unwrap_err();
        assert!(
            matches!(err, Error::Malformed { id: Some(21), .. }),
            "{err:?}"
        );
        assert_eq!(err.reply().id, 21);

        #[derive(Serialize)]
        struct StringId {
            #[serde(rename = "type")]
            kind: &'static str,
            id: &'static str,
        }
        let err = Message::decode(&encode(&StringId {
            kind: "ping",
            id: "one",
        }))
        .unwrap_err();
        assert!(matches!(err, Error::Malformed { id: None, .. }));
        assert_eq!(err.reply().id, CONNECTION_ID);
        assert_eq!(err.code(), ErrorCode::BadRequest);

        // Not a map at all.
        let err = Message::decode(&Bytes::from_static(&[0xc0])).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn bad_tensor_length_and_dtype_are_bad_requests() {
        #[derive(Serialize)]
        struct T {
            dtype: &'static str,
            shape: Vec<u64>,
            #[serde(with = "serde_bytes")]
            data: Vec<u8>,
        }
        #[derive(Serialize)]
        struct I {
            #[serde(rename = "type")]
            kind: &'static str,
            id: u64,
            inputs: BTreeMap<&'static str, T>,
        }
        let short = I {
            kind: "infer",
            id: 5,
            inputs: [(
                "x",
                T {
                    dtype: "f32",
                    shape: vec![3],
                    data: vec![0; 11],
                },
            )]
            .into(),
        };
        let err = Message::decode(&encode(&short)).unwrap_err();
        assert!(matches!(
            err,
            Error::TensorLength {
                id: Some(5),
                actual: 11,
                expected: Some(12),
                ..
            }
        ));
        assert!(err.to_string().contains("tensor x has 11 bytes"), "{err}");

        let odd = I {
            kind: "infer",
            id: 6,
            inputs: [(
                "x",
                T {
                    dtype: "c64",
                    shape: vec![1],
                    data: vec![0; 8],
                },
            )]
            .into(),
        };
        let err = Message::decode(&encode(&odd)).unwrap_err();
        assert!(matches!(err, Error::UnknownDType { id: Some(6), .. }));
        assert_eq!(err.reply().code, ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_error_codes_read_as_internal() {
        assert_eq!(ErrorCode::from_wire("quota_exceeded"), ErrorCode::Internal);
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), code);
        }
    }
}
