use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_name, ValidationError};

/// The datastore every host has: a directory in its own data dir.
pub const LOCAL_DATASTORE: &str = "local";

/// What a datastore is made of.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// A directory on each host, or a path mounted on every host (NFS, CephFS...): disks are
    /// qcow2 files.
    #[default]
    Dir,
    /// A Ceph RBD pool: disks are RBD images that QEMU opens through librbd, reachable from every
    /// host that reaches the cluster's monitors.
    Rbd,
}

/// Where VM disks live: a directory on each host, a path mounted on every host, or a Ceph RBD pool.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Datastore {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: DatastoreKind,
    /// Absolute path of the directory on the hosts (`dir` datastores).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Whether every host reaches the same disks there (a shared mount, or RBD), so a VM's disk
    /// is reachable from any host.
    pub shared: bool,
    /// The Ceph pool and how to reach it (`rbd` datastores); the key is a secret kept apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdSettings>,
    pub created_at: DateTime<Utc>,
    /// Set while it is being removed: no new VM may use it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

impl Datastore {
    /// The directory of a `dir` datastore, checked again (hosts derive disk paths from it).
    pub fn directory(&self) -> Result<&Path, ValidationError> {
        if self.kind != DatastoreKind::Dir {
            return Err(ValidationError::new(format!(
                "datastore {} is an RBD pool, not a directory",
                self.name
            )));
        }
        validate_datastore_path(&self.path)?;
        Ok(Path::new(&self.path))
    }

    /// The directory every host sees, where hosts renew their HA storage leases: shared `dir`
    /// datastores only (RBD pools have no lease files).
    pub fn lease_directory(&self) -> Option<&Path> {
        (self.shared && self.kind == DatastoreKind::Dir).then(|| Path::new(&self.path))
    }
}

/// How to reach a Ceph RBD pool. Every field reaches a Ceph configuration file and QEMU's
/// command line, so each is checked ([`RbdSettings::validate`]) where it is written and where a
/// host reads it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RbdSettings {
    /// The RBD pool (it must exist, initialized with `rbd pool init`).
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
    )]
    pub pool: String,
    /// The cluster's monitors, 1 to 8, `HOST:PORT` each: a host name or IPv4 address, or
    /// `[IPv6]:PORT` (e.g. `10.0.0.1:3300`).
    #[schema(min_items = 1, max_items = 8)]
    pub monitors: Vec<String>,
    /// The Ceph user, without `client.` (e.g. `corral`, with caps `profile rbd` on the pool).
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
    )]
    pub user: String,
}

impl RbdSettings {
    /// Checks every field: they reach a Ceph configuration file (one `key = value` per line) and
    /// QEMU's `-drive` options (comma-separated), so none may carry a line break, a comma, a
    /// colon outside a monitor's port, or an '='.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let ceph_name = |what: &str, v: &str| {
            let ok = !v.is_empty()
                && v.len() <= 63
                && !v.starts_with(['.', '-'])
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if ok {
                Ok(())
            } else {
                Err(ValidationError::new(format!(
                    "invalid Ceph {what} {v:?}: use 1 to 63 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
                )))
            }
        };
        ceph_name("pool", &self.pool)?;
        ceph_name("user", &self.user)?;
        if self.user.starts_with("client.") {
            return Err(ValidationError::unprocessable(format!(
                "give the Ceph user without 'client.' (e.g. {:?})",
                &self.user["client.".len()..]
            )));
        }
        if self.monitors.is_empty() || self.monitors.len() > 8 {
            return Err(ValidationError::new(
                "give 1 to 8 monitors, HOST:PORT each (e.g. 10.0.0.1:3300)",
            ));
        }
        for m in &self.monitors {
            validate_monitor(m)?;
        }
        Ok(())
    }
}

fn validate_monitor(m: &str) -> Result<(), ValidationError> {
    let bad = || {
        ValidationError::unprocessable(format!(
            "invalid monitor {m:?}: give HOST:PORT, e.g. 10.0.0.1:3300, ceph-mon-1:6789 or [fd00::1]:3300"
        ))
    };
    let (host, port) = m.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            (2..=45).contains(&v6.len())
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => {
            (1..=253).contains(&host.len())
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    let port_ok = (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
    if !host_ok || !port_ok {
        return Err(bad());
    }
    match port.parse::<u32>() {
        Ok(1..=65535) => Ok(()),
        _ => Err(ValidationError::unprocessable(format!(
            "monitor {m:?} has port {port}: a port is 1 to 65535 (Ceph monitors listen on 3300 and 6789)"
        ))),
    }
}

/// The Ceph key of an RBD datastore's user: a secret, stored apart from the datastore, that the
/// API never returns and hosts read to open the pool.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct DatastoreSecret {
    pub key: String,
}

impl std::fmt::Debug for DatastoreSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatastoreSecret { key: <redacted> }")
    }
}

/// A Ceph key: base64 (the `key = ...` of a keyring), so it cannot break the keyring file it is
/// written into.
pub fn validate_key(key: &str) -> Result<(), ValidationError> {
    let body = key.trim_end_matches('=');
    let ok = (16..=128).contains(&body.len())
        && key.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "the Ceph key is not a key: give the base64 text after 'key =' in the user's keyring (e.g. AQBx...==)",
        ))
    }
}

/// The RBD part of `POST /api/v1/datastores` with `type: rbd`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateRbdRequest {
    #[serde(flatten)]
    pub settings: RbdSettings,
    /// The user's Ceph key (base64, the `key = ...` of its keyring). Stored as a secret: never
    /// returned or logged.
    #[schema(
        min_length = 16,
        max_length = 130,
        pattern = "^[A-Za-z0-9+/]{16,128}={0,2}$"
    )]
    pub key: String,
}

impl std::fmt::Debug for CreateRbdRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateRbdRequest")
            .field("settings", &self.settings)
            .field("key", &"<redacted>")
            .finish()
    }
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
    /// `dir` (the default) or `rbd`.
    #[serde(rename = "type", default)]
    pub kind: DatastoreKind,
    /// `dir` only: an absolute path, the same on every host for a shared datastore, without '.'
    /// or '..' components, commas or control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^/[^,\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `dir` only: whether every host sees the same files at the path.
    #[serde(default)]
    pub shared: bool,
    /// `rbd` only: the pool, its monitors, and the user and key to open it with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<CreateRbdRequest>,
}

impl CreateDatastoreRequest {
    /// Checks the name and what the type needs: a path reaches QEMU's command line and the hosts'
    /// file systems, RBD settings a Ceph configuration file and QEMU's command line.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("datastore", &self.name)?;
        if self.name == LOCAL_DATASTORE {
            return Err(ValidationError::unprocessable(
                "the datastore name local is built in (each host's data dir): pick another name",
            ));
        }
        match (self.kind, &self.path, &self.rbd) {
            (DatastoreKind::Dir, Some(path), None) => validate_datastore_path(path),
            (DatastoreKind::Dir, None, _) => Err(ValidationError::unprocessable(
                "a dir datastore needs a path: give the directory's absolute path (e.g. /srv/corral), or type rbd with its rbd settings",
            )),
            (DatastoreKind::Dir, Some(_), Some(_)) => Err(ValidationError::unprocessable(
                "rbd settings are for type rbd: leave them out of a dir datastore, or give type rbd and no path",
            )),
            (DatastoreKind::Rbd, None, Some(rbd)) if !self.shared => {
                rbd.settings.validate()?;
                validate_key(&rbd.key)
            }
            (DatastoreKind::Rbd, None, None) => Err(ValidationError::unprocessable(
                "an rbd datastore needs its rbd settings: pool, monitors, user and key",
            )),
            (DatastoreKind::Rbd, _, _) => Err(ValidationError::unprocessable(
                "path and shared are for dir datastores: an rbd datastore is reached through its monitors from every host",
            )),
        }
    }
}

/// A datastore path reaches QEMU's command line and the hosts' file systems, so it must be
/// absolute, plain and free of characters QEMU options cannot carry. Hosts check it again before
/// they derive a disk path from it.
pub fn validate_datastore_path(p: &str) -> Result<(), ValidationError> {
    let e = || {
        format!(
            "datastore path {p:?} is not usable: give an absolute path without '.', '..', commas or control characters (e.g. /srv/corral)"
        )
    };
    // What the document's pattern states...
    if !p.starts_with('/')
        || p.chars().count() > 200
        || p.contains(',')
        || p.chars().any(char::is_control)
    {
        return Err(ValidationError::new(e()));
    }
    // ...and what it cannot.
    if p.split('/').any(|c| c == ".." || c == ".") {
        return Err(ValidationError::unprocessable(e()));
    }
    Ok(())
}

/// Space on a datastore, as its storage reports it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DatastoreUsage {
    /// Bytes it can hold: what is used plus what is still free.
    pub capacity_bytes: u64,
    /// Bytes written to it.
    pub used_bytes: u64,
    /// The sum of the sizes of the disks on it (they are thin: they take space as guests write).
    pub provisioned_bytes: u64,
    /// Provisioned over capacity (above 1: guests may fill it before their disks are full).
    pub overcommit: f64,
}

/// Body of `GET /api/v1/datastores/{name}`: the datastore, and its space now.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DatastoreDetail {
    #[serde(flatten)]
    pub datastore: Datastore,
    /// Space as the storage reports it (RBD datastores), absent where it was not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<DatastoreUsage>,
    /// Why the usage could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, path: &str) -> CreateDatastoreRequest {
        CreateDatastoreRequest {
            name: name.into(),
            kind: DatastoreKind::Dir,
            path: Some(path.into()),
            shared: true,
            rbd: None,
        }
    }

    fn rbd(pool: &str, monitors: &[&str], user: &str, key: &str) -> CreateDatastoreRequest {
        CreateDatastoreRequest {
            name: "ceph".into(),
            kind: DatastoreKind::Rbd,
            path: None,
            shared: false,
            rbd: Some(CreateRbdRequest {
                settings: RbdSettings {
                    pool: pool.into(),
                    monitors: monitors.iter().map(|m| m.to_string()).collect(),
                    user: user.into(),
                },
                key: key.into(),
            }),
        }
    }

    const KEY: &str = "AQBkq1ZnAAAAABAAm5yJ3f1dd6Dp0V2uF2H6qQ==";

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

    #[test]
    fn rbd_settings_cannot_break_a_config_file_or_a_qemu_option() {
        let good = ["10.0.0.1:3300", "ceph-mon-1:6789", "[fd00::1]:3300"];
        assert!(rbd("corral", &good, "corral", KEY).validate().is_ok());
        for (pool, mon, user, key, says) in [
            ("a,b", "h:1", "u", KEY, "invalid Ceph pool"),
            ("p\nmon_host", "h:1", "u", KEY, "invalid Ceph pool"),
            ("p", "h:1", "u=x", KEY, "invalid Ceph user"),
            ("p", "h:1", "client.u", KEY, "without 'client.'"),
            ("p", "h", "u", KEY, "invalid monitor"),
            ("p", "h:1,x:2", "u", KEY, "invalid monitor"),
            ("p", "h:1\nkeyring = /etc/x", "u", KEY, "invalid monitor"),
            ("p", "h:70000", "u", KEY, "is 1 to 65535"),
            ("p", "h:1", "u", "short", "not a key"),
            (
                "p",
                "h:1",
                "u",
                "AQB\n[client.admin]\nkey = AQB==",
                "not a key",
            ),
        ] {
            let err = rbd(pool, &[mon], user, key).validate().unwrap_err();
            assert!(err.0.contains(says), "{pool:?} {mon:?} {user:?}: {err}");
        }
        let none = rbd("p", &[], "u", KEY).validate().unwrap_err();
        assert!(none.0.contains("1 to 8 monitors"), "{none}");
    }

    #[test]
    fn a_type_takes_its_own_fields_only() {
        let mut no_path = req("nfs", "/x");
        no_path.path = None;
        assert!(no_path.validate().unwrap_err().0.contains("needs a path"));
        let mut both = rbd("p", &["h:1"], "u", KEY);
        both.path = Some("/x".into());
        assert!(both
            .validate()
            .unwrap_err()
            .0
            .contains("for dir datastores"));
        let mut no_settings = rbd("p", &["h:1"], "u", KEY);
        no_settings.rbd = None;
        assert!(no_settings
            .validate()
            .unwrap_err()
            .0
            .contains("needs its rbd settings"));
    }

    #[test]
    fn secrets_are_never_in_debug_output() {
        let r = rbd("p", &["h:1"], "u", KEY);
        assert!(!format!("{r:?}").contains(KEY));
        let s = DatastoreSecret { key: KEY.into() };
        assert!(!format!("{s:?}").contains(KEY));
    }
}
