//! The host protocol: what a host's agent and the controller's agent endpoint send each other,
//! besides the store's own types for reading (`corral_store::{KeyValue, WatchPage}`). Both sides
//! link this crate, so neither has to link the other. A host reads; it writes only the
//! [`HostWrite`]s, through a [`HostLink`]: the agent endpoint over mutually authenticated TLS, or
//! the controller's own decision when host and controller share a process.

use serde::{Deserialize, Serialize};

/// Body of `POST /agent/v1/join`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub host: String,
}

/// What a joining host gets: its certificate and key, and the CA to trust.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// Body of `POST /agent/v1/ha`: a host's report to the failure detector, every
/// [`crate::timing::RENEW_EVERY`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaReport {
    /// Peers this host's gossip sees alive.
    pub peers_alive: Vec<String>,
    /// Where the host's gossip listens.
    pub gossip: Option<std::net::SocketAddr>,
    /// The isolation response this host applies now: the one in the controller's last answer
    /// (none before the first), so an operator (and a test) sees when a change has reached it.
    #[serde(default)]
    pub isolation_response: Option<crate::IsolationResponse>,
}

/// The controller's answer to an [`HaReport`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaReply {
    pub isolation_response: crate::IsolationResponse,
    /// Every other host and where its gossip listens.
    pub peers: Vec<(String, std::net::SocketAddr)>,
}

/// The reason of a VM's `Running` condition between a migration's handover and the target
/// resuming the guest: the controller's task follower waits past it.
pub const RESUMING: &str = "Resuming";

/// A VM as a host names the VM a write is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    pub project: String,
    pub name: String,
}

impl VmRef {
    pub fn of(vm: &crate::Vm) -> VmRef {
        VmRef {
            project: vm.meta.project.clone(),
            name: vm.meta.name.clone(),
        }
    }
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.project, self.name)
    }
}

/// Body of `POST /agent/v1/write`: everything a host may ask the controller to record. There is
/// no other way for a host to change the store; the controller decides each one from the stored
/// objects and the host's certificate alone. `revision` is the revision the host read the object
/// at: a write on a changed object is answered [`Written::Stale`] and changes nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostWrite {
    /// The host's own status: what it has, where it listens. The heartbeat time is the
    /// controller's clock, and capacity beyond what an operator approved is not believed.
    Heartbeat { status: crate::HostStatus },
    /// What the host observes of a VM placed on it (its phase, process, disk, conditions,
    /// events, usage).
    VmStatus {
        vm: VmRef,
        revision: u64,
        status: crate::VmStatus,
    },
    /// The guest powered itself off: the VM's desired power becomes stopped, with its status.
    GuestPoweredOff {
        vm: VmRef,
        revision: u64,
        status: crate::VmStatus,
    },
    /// A VM whose deletion was asked for is gone from the host: its record goes.
    VmReleased { vm: VmRef, revision: u64 },
    /// A step of the migration of `vm` by its source or its target; `revision` is the
    /// migration record's.
    Migration {
        vm: VmRef,
        revision: u64,
        step: MigrationStep,
    },
    /// The source's last step: the guest's state is on the target, so the VM becomes the
    /// target's copy (as the target recorded it) and the migration completes, in one transaction.
    Handover {
        vm: VmRef,
        vm_revision: u64,
        migration_revision: u64,
        result: crate::MigrationResult,
    },
}

/// One side's step of a migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum MigrationStep {
    /// The target waits: its QEMU listens on `target_port` (and serves the new disk on
    /// `disk_port` when the storage is not shared) at its registered fabric address. Only ports:
    /// the source builds the addresses itself.
    TargetReady {
        target_port: u16,
        disk_port: Option<u16>,
        target_pid: u32,
        target_run_dir: String,
        target_disk: String,
    },
    /// The source sends: how far it got.
    Transferring { progress: crate::MigrationProgress },
    /// Either side gives up.
    Failed { error: String },
    /// The source stopped it (asked to, or the VM is being stopped or deleted).
    Cancelled { error: String },
}

/// The answer to a [`HostWrite`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Written {
    /// Recorded at this revision.
    Applied { revision: u64 },
    /// The object changed since the host read it (or is gone): read again and decide again.
    Stale,
}

/// Where a host's writes go. The controller decides each from the stored objects and the host's
/// identity alone.
#[async_trait::async_trait]
pub trait HostLink: Send + Sync {
    async fn write(&self, write: HostWrite) -> Result<Written, LinkError>;
}

/// Why a [`HostWrite`] was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The controller will not record it for this host; the sentence says why.
    #[error("the controller refused: {0}")]
    Refused(String),
    /// The controller could not be reached or could not commit it.
    #[error("the controller could not record it: {0}")]
    Unavailable(String),
}
