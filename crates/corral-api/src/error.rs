use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What every non-2xx response carries: a machine-readable code and a sentence for people.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ApiErrorBody {
    /// Stable code, e.g. "invalid_request", "not_found", "conflict", "unauthorized".
    pub code: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// A request that breaks a rule of the API. The message says what is wrong and how to fix it.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct ValidationError(pub String, pub Refusal);

/// Whether the API document states the rule a request broke.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Refusal {
    /// A field breaks what the document says of it (its pattern, length, range): 400.
    #[default]
    Malformed,
    /// Every field is as the document says, but the request breaks a rule the document cannot
    /// state: a network's host bits, a rule naming both a CIDR and a group, a memory size below
    /// the minimum, a file that is not a disk image: 422.
    Unprocessable,
}

impl ValidationError {
    /// A field that breaks what the document says of it.
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into(), Refusal::Malformed)
    }

    /// Well-formed fields that break a rule the document cannot state.
    pub fn unprocessable(msg: impl Into<String>) -> Self {
        Self(msg.into(), Refusal::Unprocessable)
    }
}
