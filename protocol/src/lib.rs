//! # tidepool-protocol
//!
//! The wire format that tidepool's clients, balancer and workers speak, and an async
//! client for it. PROTOCOL.md at the repository root is the full specification; in brief:
//!
//! - A **frame** is a 4-byte unsigned big-endian length `L`, then `L` bytes holding one
//!   MessagePack map with string keys. `L = 0` or `L` above the receiver's maximum
//!   (64 MiB by default) is answered with an `error` frame and the connection closes.
//! - Every map has `type` and `id`. Requests (`infer`, `cancel`, `ping`, `metadata`) carry
//!   the id the client chose; answers (`result`, `error`, `pong`, `metadata_result`) carry
//!   the id of the request they
//!   answer, in any order. Unknown keys are ignored.
//! - A **tensor** is a map `{dtype, shape, data}` whose `data` is MessagePack `bin` of
//!   little-endian row-major elements. One `infer` is one item: shapes exclude the batch
//!   dimension.
//!
//! ## Modules
//! - [`message`]: the message types and their MessagePack mapping.
//! - [`metadata`]: [`ModelMetadata`], the answer to `metadata`: the model's inputs and
//!   outputs (per-item shapes, dynamic dimensions and their names) and batching rules,
//!   after KServe v2's model metadata.
//! - [`tensor`]: [`Tensor`] and [`DType`]; tensors hold [`bytes::Bytes`] cut from the
//!   read buffer, so forwarding one never copies its elements.
//! - [`codec`]: [`MessageCodec`], the tokio-util `Decoder`/`Encoder` for frames.
//! - [`raw`]: [`RawMessage`], `infer` and `result` bodies forwarded without decoding
//!   their tensors: the id (and a balancer's `deadline_ms` and `client`) rewritten by
//!   splicing byte ranges; [`FrameCodec`] yields the undecoded bodies.
//! - [`priority`]: [`Priority`], an `infer`'s class; [`tenant`]: the check on an `infer`'s
//!   `tenant`, the key of a worker's fair sharing between tenants.
//! - [`limits`]: [`Limits`], how deep, long and wide a body may be: one set, checked alike
//!   by the full decoder and the `raw` scanner, so whatever a balancer forwards a worker
//!   accepts.
//! - [`budget`]: [`FrameBudget`], a byte budget for frames being read or held, with a
//!   ceiling per connection.
//! - [`reader`]: [`FrameReader`], frames read within a budget (backpressure instead of
//!   allocation) and a frame timeout.
//! - [`client`]: [`Client`], pipelined calls over one connection with deadlines and
//!   cancel-on-drop.
//! - [`pool`]: [`Pool`], connections spread over one or more balancers, used least-busy
//!   first; a call whose connection drops is sent again to another balancer within its
//!   deadline, and lost balancers are reconnected with backoff.
//! - [`tls`]: rustls for clients and servers: PEM files, reloadable configurations, handshakes
//!   bounded by a timeout, and [`tls::Stream`], a connection with or without TLS.
//! - `result_wire`: a `result`'s bytes written straight, byte for byte serde's (one per
//!   item a worker answers).
//! - [`error`]: [`Error`], the crate's one error type.

#![forbid(unsafe_code)]

pub mod budget;
pub mod client;
pub mod codec;
pub mod error;
pub mod limits;
pub mod message;
pub mod metadata;
pub mod pool;
pub mod priority;
pub mod raw;
pub mod reader;
mod result_wire;
pub mod tenant;
pub mod tensor;
pub mod tls;

pub use budget::{ConnectionBudget, FrameBudget, FramePermit};

pub use client::{CallOptions, Client, ClientOptions};
pub use codec::{encode_frame, FrameCodec, Inbound, MessageCodec, DEFAULT_MAX_FRAME};
pub use error::Error;
pub use limits::{LimitExceeded, Limits};
pub use message::{
    late_retry_ms, BatchTimes, ErrorCode, ErrorReply, Infer, InferResult, Load, Message,
    MetadataResult, RequestId, Tensors, CONNECTION_ID,
};
pub use metadata::{ModelMetadata, PaddingMetadata, TensorMetadata};
pub use pool::Pool;
pub use priority::Priority;
pub use raw::{Frame, RawKind, RawMessage, Rewrite};
pub use reader::FrameReader;
pub use tensor::{DType, Element, Tensor};
