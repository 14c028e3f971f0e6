use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::ValidationError;

/// The project every installation starts with.
pub const DEFAULT_PROJECT: &str = "default";

/// Identity and bookkeeping shared by every stored object.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ObjectMeta {
    /// Unique for all time; never reused, also after the object is deleted.
    pub uid: Uuid,
    /// Unique within the project and kind.
    pub name: String,
    /// The project (tenant) the object belongs to.
    pub project: String,
    /// Incremented on every change of the desired state (spec).
    pub generation: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set when deletion was requested; the object disappears once cleanup is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_requested_at: Option<DateTime<Utc>>,
}

impl ObjectMeta {
    pub fn new(project: &str, name: &str) -> Self {
        let now = Utc::now();
        Self {
            uid: Uuid::new_v4(),
            name: name.to_string(),
            project: project.to_string(),
            generation: 1,
            created_at: now,
            updated_at: now,
            deletion_requested_at: None,
        }
    }

    /// Records a change of the desired state.
    pub fn bump(&mut self) {
        self.generation += 1;
        self.updated_at = Utc::now();
    }
}

/// The schema of a list of names (each as [`validate_name`] takes it), for `schema_with`.
pub(crate) fn names_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let name = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(63))
        .pattern(Some(NAME_PATTERN));
    ArrayBuilder::new().items(name).build()
}

/// What [`validate_name`] takes, as a regular expression.
pub(crate) const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// Names of projects and objects are DNS labels: they show up in host names, paths and QEMU's
/// `-name`, so they are kept to characters that are safe everywhere.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ValidationError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 63
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(ValidationError::new(format!(
            "invalid {kind} name {name:?}: use 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit (e.g. \"web-1\")"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "0db", &"x".repeat(63)] {
            assert!(validate_name("vm", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "a b",
            "../x",
            &"x".repeat(64),
        ] {
            let err = validate_name("vm", bad).unwrap_err();
            assert!(err.0.contains("invalid vm name"), "{err}");
        }
    }
}
