//! [`Outcome`]: how one scheduled request ended.

use std::fmt;

use serde::Serialize;
use tidepool_protocol::{Error as CallError, ErrorCode};

/// How one sent request ended: a result, one of the protocol's error codes, a lost
/// connection, or no answer before the drain deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A `result` came back.
    Ok,
    /// `bad_request`: the item does not fit the model (check `--input`).
    BadRequest,
    /// `too_large`: the frame is above the server's maximum.
    TooLarge,
    /// `overloaded`: the server's queue was full.
    Overloaded,
    /// `deadline_exceeded`: the server said so, or `--deadline` passed here first.
    DeadlineExceeded,
    /// `unavailable`: no target could take it.
    Unavailable,
    /// `cancelled`.
    Cancelled,
    /// `shutting_down`: the server was draining.
    ShuttingDown,
    /// `internal`, or an answer this client could not read.
    Internal,
    /// The connection closed before the answer came.
    ConnectionLost,
    /// Still in flight when `--drain` ran out; abandoned (and cancelled on the wire).
    Unanswered,
}

impl Outcome {
    /// Every outcome, in report order.
    pub const ALL: [Outcome; 11] = [
        Outcome::Ok,
        Outcome::BadRequest,
        Outcome::TooLarge,
        Outcome::Overloaded,
        Outcome::DeadlineExceeded,
        Outcome::Unavailable,
        Outcome::Cancelled,
        Outcome::ShuttingDown,
        Outcome::Internal,
        Outcome::ConnectionLost,
        Outcome::Unanswered,
    ];

    /// The outcomes in which a server refused or dropped a request without a result, each
    /// a reason of its own: the refusals a goodput report lists.
    pub const REFUSALS: [Outcome; 4] = [
        Outcome::Overloaded,
        Outcome::DeadlineExceeded,
        Outcome::Unavailable,
        Outcome::ShuttingDown,
    ];

    /// The name used in reports: the protocol's code for server errors.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::Overloaded => "overloaded",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::Unavailable => "unavailable",
            Outcome::Cancelled => "cancelled",
            Outcome::ShuttingDown => "shutting_down",
            Outcome::Internal => "internal",
            Outcome::ConnectionLost => "connection_lost",
            Outcome::Unanswered => "unanswered",
        }
    }

    /// True for every outcome but [`Outcome::Ok`].
    pub const fn is_error(self) -> bool {
        !matches!(self, Outcome::Ok)
    }

    /// The outcome a failed call stands for. A lost connection is told apart from the
    /// server's `unavailable`, which [`CallError::code`] folds it into.
    pub fn of_error(error: &CallError) -> Outcome {
        match error {
            CallError::ConnectionLost { .. } => Outcome::ConnectionLost,
            other => other.code().into(),
        }
    }
}

impl From<ErrorCode> for Outcome {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::BadRequest => Outcome::BadRequest,
            ErrorCode::TooLarge => Outcome::TooLarge,
            ErrorCode::Overloaded => Outcome::Overloaded,
            ErrorCode::DeadlineExceeded => Outcome::DeadlineExceeded,
            ErrorCode::Unavailable => Outcome::Unavailable,
            ErrorCode::Cancelled => Outcome::Cancelled,
            ErrorCode::ShuttingDown => Outcome::ShuttingDown,
            ErrorCode::Internal => Outcome::Internal,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_outcome_with_the_same_name() {
        for code in ErrorCode::ALL {
            assert_eq!(Outcome::from(code).as_str(), code.as_str());
        }
    }

    #[test]
    fn connection_loss_is_its_own_outcome() {
        let lost = CallError::ConnectionLost {
            peer: "p".into(),
            reason: None,
        };
        assert_eq!(Outcome::of_error(&lost), Outcome::ConnectionLost);
        let busy = CallError::Overloaded {
            message: String::new(),
            retry_after: None,
        };
        assert_eq!(Outcome::of_error(&busy), Outcome::Overloaded);
    }

    #[test]
    fn names_serialize_as_report_keys() {
        for o in Outcome::ALL {
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{o}\""));
        }
    }
}
