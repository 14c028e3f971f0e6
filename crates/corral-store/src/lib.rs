//! The store every piece of Corral keeps its state in.
//!
//! The [`Store`] trait is shaped like etcd's model on purpose, so the embedded backend used by
//! `corral up` and the etcd backend of a highly available control plane are interchangeable:
//! keys under prefixes, values versioned by a store-wide revision that grows by one per transaction,
//! compare-and-swap on a key's modification revision, watches that replay history from a revision and
//! then follow live changes, and leases whose keys vanish when the lease is not kept alive.
//!
//! [`contract`] holds the behaviour every backend must show; each backend runs it in its tests.
//! The store knows nothing of VMs or images: it stores bytes.

pub mod contract;
mod json;
mod redb_store;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use json::{get_json, list_json, update_json, Versioned};
pub use redb_store::RedbStore;

/// A store-wide logical clock: every committed transaction gets the next revision.
pub type Revision = u64;
/// Identifies a lease.
pub type LeaseId = u64;

/// A key, its value and its version history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key.
    pub create_revision: Revision,
    /// Revision of the transaction that last changed the key.
    pub mod_revision: Revision,
    /// Number of writes since the key was created (1 after creation).
    pub version: u64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// What must hold for a write to happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Precondition {
    /// Write unconditionally.
    Any,
    /// The key must not exist (create).
    Absent,
    /// The key must exist with exactly this modification revision (compare-and-swap).
    ModRevision(Revision),
}

/// One write in a transaction.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        when: Precondition,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
        when: Precondition,
    },
    /// Writes nothing; the transaction fails unless `when` holds for `key` (etcd's compare).
    Check {
        key: String,
        when: Precondition,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change seen by a watcher. For a delete, `kv.value` is empty and `kv.mod_revision` is the
/// revision of the deletion.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The last event of its revision under the watched prefix: a reader that stops after one of
    /// these never splits a transaction's events (set by the watch, not stored).
    #[serde(default)]
    pub last_in_revision: bool,
}

/// A page of a watch served remotely as a long poll (the agent endpoint's `GET /agent/v1/watch`):
/// whole revisions only, and where to go on from.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WatchPage {
    pub events: Vec<Event>,
    /// The revision to watch from next.
    pub next: Revision,
}

/// Marks the last event of each revision in a run of events in revision order.
pub fn mark_revision_ends(events: &mut [Event]) {
    for i in 0..events.len() {
        let next = events.get(i + 1).map(|n| n.kv.mod_revision);
        events[i].last_in_revision = next != Some(events[i].kv.mod_revision);
    }
}

/// A stream of events in revision order; it ends (or yields an error) if the watcher falls too far
/// behind, after which the watcher lists again and watches from the listed revision.
pub type WatchStream = mpsc::Receiver<Result<Event, StoreError>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the write to {key:?} lost a race: it was changed by someone else (read it again and retry)")]
    Conflict { key: String },
    #[error("{key:?} does not exist")]
    NotFound { key: String },
    #[error("revision {requested} is no longer kept (oldest kept is {oldest}): list again and watch from the listed revision")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} does not exist or has expired")]
    LeaseNotFound(LeaseId),
    #[error("the watcher fell behind the stream of changes: list again and watch from the listed revision")]
    WatchLagged,
    #[error("the store at {path} could not be used: {message}")]
    Backend { path: String, message: String },
}

/// What reading the store takes: all a host's agent gets (it writes through the controller's
/// typed host protocol, never raw keys).
#[async_trait]
pub trait ReadStore: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// All keys under `prefix`, sorted by key, with the revision the listing was taken at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Events for keys under `prefix` with a revision >= `from`, then live ones.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;
    async fn current_revision(&self) -> Result<Revision, StoreError>;
}

/// The contract every store backend fulfils; see the crate docs.
#[async_trait]
pub trait Store: ReadStore {
    /// Applies all operations or none; returns the revision of the commit.
    /// A failed precondition yields `Conflict` (or `NotFound` for a delete of a missing key).
    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        when: Precondition,
    ) -> Result<Revision, StoreError> {
        self.txn(vec![Op::Put {
            key: key.into(),
            value,
            when,
            lease: None,
        }])
        .await
    }

    async fn delete(&self, key: &str, when: Precondition) -> Result<Revision, StoreError> {
        self.txn(vec![Op::Delete {
            key: key.into(),
            when,
        }])
        .await
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Backend {
            path: "(value)".into(),
            message: format!("stored value is not valid: {e}"),
        }
    }
}
