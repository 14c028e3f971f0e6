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
pub struct ValidationError(pub String);

impl ValidationError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}
