//! The crate's error type: frame and message problems, and what a client call can meet.

use std::time::Duration;

use crate::message::{ErrorCode, ErrorReply, RequestId, CONNECTION_ID};
use crate::tensor::DType;

/// Everything that can go wrong in tidepool-protocol.
///
/// Two families share this enum. Decoding errors ([`Error::FrameTooLarge`] to
/// [`Error::Misaligned`]) say what was wrong with what a peer sent; a server answers them
/// with [`Error::reply`]. Call errors ([`Error::BadRequest`] to [`Error::ProtocolViolation`])
/// are what a [`Client`](crate::Client) call returns: one variant per server error code,
/// plus the ways a connection can fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame's length prefix is above the receiver's maximum.
    #[error("frame of {len} bytes is above the maximum of {max} bytes; send smaller items or raise the receiver's --max-frame")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The receiver's maximum.
        max: usize,
    },
    /// A TLS alert record arrived where a frame's length prefix was expected: the server
    /// speaks TLS and this connection does not (its alert says it could not read our frame
    /// as a TLS handshake).
    #[error("the server answered with a TLS alert: this port speaks TLS; connect with TLS (--tls-ca with the server's CA)")]
    TlsAlertOnPlainConnection,
    /// A TLS handshake record (a ClientHello) arrived where a frame's length prefix was
    /// expected: a TLS client on a port without TLS.
    #[error("the peer started a TLS handshake, and this port speaks tidepool without TLS; connect without TLS (no --tls-ca), or serve TLS on this port (--tls-cert and --tls-key)")]
    TlsHandshakeOnPlainConnection,
    /// A frame's length prefix is zero.
    #[error("frame of length 0: every frame holds one MessagePack map")]
    EmptyFrame,
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes received)")]
    Truncated {
        /// Bytes the frame should have had, prefix included.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A started frame did not finish arriving within the receiver's frame timeout.
    #[error("frame not complete within {timeout:?} ({got} of {expected} bytes received); send each frame whole and promptly, or raise the receiver's --frame-timeout")]
    FrameTimeout {
        /// The receiver's frame timeout.
        timeout: std::time::Duration,
        /// Bytes of the frame that arrived, prefix included.
        got: usize,
        /// Bytes the frame should have had, prefix included (4 while the prefix is incomplete).
        expected: usize,
    },
    /// The frame body goes beyond one of the decoder's [`Limits`](crate::Limits).
    #[error("message refused: {what} above the protocol's limit of {max} (PROTOCOL.md, \"Decoder limits\")")]
    LimitExceeded {
        /// The request id, when it could be read.
        id: Option<RequestId>,
        /// What the limit is about.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The frame body is not a MessagePack map of the expected shape.
    #[error("frame body is not a valid protocol message: {source}")]
    Malformed {
        /// The request id, when it could be read.
        id: Option<RequestId>,
        /// What the MessagePack decoder found.
        #[source]
        source: rmp_serde::decode::Error,
    },
    /// The `type` field names no message of this protocol version.
    #[error("unknown message type {kind:?}; expected infer, result, error, cancel, ping or pong")]
    UnknownType {
        /// The request id.
        id: RequestId,
        /// The unknown type.
        kind: String,
    },
    /// A field the message type requires is absent.
    #[error("{kind} message without its required field {field:?}")]
    MissingField {
        /// The request id.
        id: RequestId,
        /// The message type.
        kind: String,
        /// The missing field.
        field: &'static str,
    },
    /// An `infer`'s `priority` is not one of the classes.
    #[error(
        "unknown priority {value:?}; expected low, normal or high (or leave it out for normal)"
    )]
    UnknownPriority {
        /// The request id.
        id: RequestId,
        /// The value sent.
        value: String,
    },
    /// An `infer`'s `tenant` is no tenant name ([`crate::tenant::check`]).
    #[error(
        "tenant {why}; send 1 to 64 bytes of UTF-8 without control characters, or leave it out"
    )]
    InvalidTenant {
        /// The request id.
        id: RequestId,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A tensor's `dtype` is not one of the protocol's.
    #[error("unknown dtype {dtype:?}; expected one of f32, f64, f16, bf16, i8, i16, i32, i64, u8, u16, u32, u64, bool")]
    UnknownDType {
        /// The request id, when known.
        id: Option<RequestId>,
        /// The unknown dtype.
        dtype: String,
    },
    /// A tensor's data length does not match its shape and dtype.
    #[error("tensor {} has {actual} bytes of data but {dtype} with shape {shape:?} needs {}",
            name.as_deref().unwrap_or("(unnamed)"),
            expected.map_or_else(|| "more than fits in memory".to_owned(), |e| e.to_string()))]
    TensorLength {
        /// The request id, when known.
        id: Option<RequestId>,
        /// The tensor's name, when known.
        name: Option<String>,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// `product(shape) * size(dtype)`, `None` on overflow.
        expected: Option<usize>,
        /// The data length received.
        actual: usize,
    },
    /// A tensor was read as another element type than it holds.
    #[error("tensor holds {actual}, not {expected}")]
    DTypeMismatch {
        /// The type asked for.
        expected: DType,
        /// The type held.
        actual: DType,
    },
    /// A zero-copy view was asked of bytes not aligned for the element type.
    #[error("tensor data of dtype {dtype} is not aligned for a zero-copy view; use to_array, which copies")]
    Misaligned {
        /// The dtype.
        dtype: DType,
    },
    /// A message could not be encoded.
    #[error("could not encode message: {0}")]
    Encode(#[source] rmp_serde::encode::Error),
    /// Socket I/O failed.
    #[error("connection i/o failed: {0}")]
    Io(#[from] std::io::Error),

    /// The server answered `bad_request`.
    #[error("bad request: {message}")]
    BadRequest {
        /// The server's explanation.
        message: String,
    },
    /// The server answered `too_large`.
    #[error("request too large: {message}")]
    TooLarge {
        /// The server's explanation.
        message: String,
    },
    /// The server answered `overloaded`.
    #[error("server overloaded: {message}")]
    Overloaded {
        /// The server's explanation.
        message: String,
        /// When to retry.
        retry_after: Option<Duration>,
    },
    /// The deadline passed, on the server or while waiting here.
    #[error("deadline exceeded: {message}")]
    DeadlineExceeded {
        /// Who saw it pass.
        message: String,
    },
    /// The server answered `unavailable`.
    #[error("unavailable: {message}")]
    Unavailable {
        /// The server's explanation.
        message: String,
        /// When to retry.
        retry_after: Option<Duration>,
    },
    /// The request was cancelled before it ran.
    #[error("cancelled: {message}")]
    Cancelled {
        /// The server's explanation.
        message: String,
    },
    /// The server is shutting down and did not run the request.
    #[error("server shutting down: {message}")]
    ShuttingDown {
        /// The server's explanation.
        message: String,
    },
    /// The server failed while running the request.
    #[error("server internal error: {message}")]
    Internal {
        /// The server's explanation.
        message: String,
    },
    /// The connection closed before the answer came.
    #[error("connection to {peer} lost before the answer came{}; the request may or may not have run",
            reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    ConnectionLost {
        /// The server's address.
        peer: String,
        /// Why, when known.
        reason: Option<String>,
    },
    /// The server sent something this client cannot accept.
    #[error("protocol violation by {peer}: {detail}")]
    ProtocolViolation {
        /// The server's address.
        peer: String,
        /// What it sent.
        detail: String,
    },

    /// A TLS file could not be read.
    #[error("could not read the TLS {what} {}: {source}; check the path and that this process may read it", path.display())]
    TlsRead {
        /// What the file should hold (`certificate`, `private key`).
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file holds no usable PEM of the kind expected.
    #[error("{} is not a usable PEM {what}: {problem}; scripts/make-certs.sh shows how to make one", path.display())]
    TlsPem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the certificates or keys (a key that is not the certificate's, say).
    #[error("the TLS {what} from {} cannot be used: {source}", path.display())]
    TlsSetup {
        /// What was being set up.
        what: &'static str,
        /// The file at fault.
        path: std::path::PathBuf,
        /// rustls's reason (boxed: it is larger than every other variant).
        #[source]
        source: Box<rustls::Error>,
    },
    /// A TLS server name is neither a DNS name nor an IP address.
    #[error("{name:?} is not a DNS name or IP address a certificate can name")]
    TlsServerName {
        /// The name given.
        name: String,
    },
    /// A TLS handshake failed (untrusted or expired certificate, wrong name, no TLS).
    #[error("TLS handshake with {peer} failed: {source}")]
    TlsHandshake {
        /// The other side.
        peer: String,
        /// rustls's reason, as an I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS handshake was answered with something that is not TLS: most likely a tidepool
    /// port without TLS, which answers a ClientHello with an `error` frame.
    #[error("TLS handshake with {peer} failed: it answered with something that is not TLS, likely a tidepool port without TLS; connect without TLS (no --tls-ca), or serve TLS there (--tls-cert and --tls-key)")]
    TlsPeerNotTls {
        /// The other side.
        peer: String,
    },
    /// A TLS handshake did not finish in time.
    #[error("TLS handshake with {peer} did not finish within {timeout:?}")]
    TlsHandshakeTimeout {
        /// The other side.
        peer: String,
        /// The limit.
        timeout: Duration,
    },
}

impl Error {
    /// The id of the request this error is about, when it is known.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Error::Malformed { id, .. }
            | Error::LimitExceeded { id, .. }
            | Error::UnknownDType { id, .. }
            | Error::TensorLength { id, .. } => *id,
            Error::UnknownType { id, .. }
            | Error::MissingField { id, .. }
            | Error::UnknownPriority { id, .. }
            | Error::InvalidTenant { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// True when the connection cannot go on after this error: the framing is lost.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::FrameTooLarge { .. }
                | Error::TlsAlertOnPlainConnection
                | Error::TlsHandshakeOnPlainConnection
                | Error::EmptyFrame
                | Error::Truncated { .. }
                | Error::FrameTimeout { .. }
                | Error::Io(_)
                | Error::TlsHandshake { .. }
                | Error::TlsPeerNotTls { .. }
                | Error::TlsHandshakeTimeout { .. }
        )
    }

    /// The code a server answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::FrameTooLarge { .. } | Error::TooLarge { .. } => ErrorCode::TooLarge,
            Error::Overloaded { .. } => ErrorCode::Overloaded,
            Error::DeadlineExceeded { .. } => ErrorCode::DeadlineExceeded,
            Error::Unavailable { .. }
            | Error::ConnectionLost { .. }
            | Error::TlsHandshake { .. }
            | Error::TlsPeerNotTls { .. }
            | Error::TlsHandshakeTimeout { .. } => ErrorCode::Unavailable,
            Error::Cancelled { .. } => ErrorCode::Cancelled,
            Error::ShuttingDown { .. } => ErrorCode::ShuttingDown,
            Error::Internal { .. }
            | Error::Encode(_)
            | Error::Io(_)
            | Error::ProtocolViolation { .. } => ErrorCode::Internal,
            _ => ErrorCode::BadRequest,
        }
    }

    /// The `error` frame a server sends for this error: under the request's id when known,
    /// else under [`CONNECTION_ID`].
    pub fn reply(&self) -> ErrorReply {
        ErrorReply::new(
            self.request_id().unwrap_or(CONNECTION_ID),
            self.code(),
            self.to_string(),
        )
    }

    /// The call error a client returns for a server's `error` answer.
    pub fn from_reply(reply: ErrorReply) -> Error {
        let message = reply.message;
        let retry_after = reply.retry_after_ms.map(Duration::from_millis);
        match reply.code {
            ErrorCode::BadRequest => Error::BadRequest { message },
            ErrorCode::TooLarge => Error::TooLarge { message },
            ErrorCode::Overloaded => Error::Overloaded {
                message,
                retry_after,
            },
            ErrorCode::DeadlineExceeded => Error::DeadlineExceeded { message },
            ErrorCode::Unavailable => Error::Unavailable {
                message,
                retry_after,
            },
            ErrorCode::Cancelled => Error::Cancelled { message },
            ErrorCode::ShuttingDown => Error::ShuttingDown { message },
            ErrorCode::Internal => Error::Internal { message },
        }
    }
}
