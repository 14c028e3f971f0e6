use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_name, ValidationError};

/// The datastore every host has: a directory in its own data dir.
pub const LOCAL_DATASTORE: &str = "local";

/// Where VM disks live: a directory on each host, or a path mounted on every host (NFS, CephFS...).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Datastore {
    pub name: String,
    /// Absolute path of the directory on the hosts.
    pub path: String,
    /// Whether every host sees the same files there (a shared mount), so a VM's disk is reachable
    /// from any host.
    pub shared: bool,
    pub created_at: DateTime<Utc>,
    /// Set while it is being removed: no new VM may use it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// Body of `POST /api/v1/datastores`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateDatastoreRequest {
    /// A DNS label: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    /// An absolute path, the same on every host for a shared datastore, without '.' or '..'
    /// components, commas or control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^/[^,\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub path: String,
    #[serde(default)]
    pub shared: bool,
}

impl CreateDatastoreRequest {
    /// Checks the name and the path: the path reaches QEMU's command line and the hosts' file
    /// systems, so it must be absolute, plain and free of characters QEMU options cannot carry.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("datastore", &self.name)?;
        if self.name == LOCAL_DATASTORE {
            return Err(ValidationError::new(
                "the datastore name local is built in (each host's data dir): pick another name",
            ));
        }
        validate_datastore_path(&self.path)
    }
}

/// A datastore path reaches QEMU's command line and the hosts' file systems, so it must be
/// absolute, plain and free of characters QEMU options cannot carry. Hosts check it again before
/// they derive a disk path from it.
pub fn validate_datastore_path(p: &str) -> Result<(), ValidationError> {
    let plain = p.starts_with('/')
        && p.len() <= 200
        && !p.contains(',')
        && !p.chars().any(char::is_control)
        && !p.split('/').any(|c| c == ".." || c == ".");
    if !plain {
        return Err(ValidationError::new(format!(
            "datastore path {p:?} is not usable: give an absolute path without '.', '..', commas or control characters (e.g. /srv/corral)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, path: &str) -> CreateDatastoreRequest {
        CreateDatastoreRequest {
            name: name.into(),
            path: path.into(),
            shared: true,
        }
    }

    #[test]
    fn paths_must_be_absolute_and_plain() {
        assert!(req("nfs", "/mnt/nfs/corral").validate().is_ok());
        for bad in ["relative/dir", "/mnt/../etc", "/a,b", "/a/./b", "/a\nb", ""] {
            let err = req("nfs", bad).validate().unwrap_err();
            assert!(err.0.contains("is not usable"), "{bad}: {err}");
        }
        assert!(req("local", "/x")
            .validate()
            .unwrap_err()
            .0
            .contains("built in"));
        assert!(req("Bad", "/x")
            .validate()
            .unwrap_err()
            .0
            .contains("invalid datastore name"));
    }
}
