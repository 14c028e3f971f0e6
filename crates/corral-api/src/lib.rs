//! Corral's API types: the objects users create (VMs, images), the objects the system reports
//! (tasks, hosts), the request bodies of the REST API, and their validation.
//!
//! This crate does no I/O. The controller validates every request with the functions here before it
//! writes anything, so a bad request changes nothing; the OpenAPI document is generated from these
//! types, so the document and the wire format cannot disagree.

mod datastore;
mod drs;
mod error;
mod group;
mod ha;
mod host;
pub mod host_protocol;
mod image;
pub mod layout;
mod meta;
mod migration;
mod network;
mod size;
mod task;
mod vm;

pub use datastore::{
    validate_datastore_path, validate_key, CreateDatastoreRequest, CreateRbdRequest, Datastore,
    DatastoreDetail, DatastoreKind, DatastoreSecret, DatastoreUsage, RbdSettings, LOCAL_DATASTORE,
};
pub use drs::{
    drs_threshold, ApplyDrsRequest, ApplyDrsResponse, DrsMode, DrsMove, DrsPlan, HostLoad,
    PowerAction, PowerManagement, VmUsage, DPM_MAX_LOAD, DPM_WAKE_LOAD, DRS_HOLD_SECS,
    DRS_PERIOD_SECS,
};
pub use error::{ApiErrorBody, Refusal, ValidationError};
pub use group::{CreateGroupRequest, GroupRule, GroupStrength, VmGroup};
pub use ha::{timing, ClusterEvent, HaPolicy, HaPriority, HaProtection, IsolationResponse};
pub use host::{
    check_fabric_address, check_own_address, Accel, Capacity, ClusterSettings, Host, HostInfo,
    HostState, HostStatus, MaintenanceResponse, PlacementPolicy,
};
pub use image::{DirectBoot, DiskFormat, Image, ImagePhase, ImageSource, ImageSpec, ImageStatus};
pub use meta::{validate_name, ObjectMeta, DEFAULT_PROJECT};
pub use migration::{
    MigrateVmRequest, Migration, MigrationEndpoints, MigrationPhase, MigrationProgress,
    MigrationResult, VmEvent,
};
pub use network::{
    generated_mac, parse_mac, parse_peer, AttachedNic, Cidr, CreateNetworkRequest,
    CreateProjectRequest, CreateSecurityGroupRequest, Direction, Network, NetworkSpec, Nic,
    NicRequest, PortRange, Protocol, SecurityGroup, SecurityRule, Segment, SetRulesRequest,
    DEFAULT_SECURITY_GROUP, OVERLAY_MTU,
};
pub use size::{format_bytes, parse_size};
pub use task::{Task, TaskGoal, TaskState};
pub use vm::{
    Condition, ConditionType, CreateVmRequest, DiskStatus, MoveStorageRequest, PowerState,
    StopVmRequest, Vm, VmPhase, VmSpec, VmStatus, MIN_MEMORY_BYTES,
};

/// Body of `GET /api/v1/health`, the one endpoint that needs no token.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always "ok" when the API answers.
    pub status: String,
    /// Corral's version.
    pub version: String,
}

/// Body of `POST /api/v1/projects/{project}/images:build-jeos`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BuildJeosRequest {
    /// Name of the image to create; "jeos" when absent.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: Option<String>,
    /// Rebuild from the Debian packages even if the image already exists and is ready.
    #[serde(default)]
    pub rebuild: bool,
}

/// A page of the serial console log of a VM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ConsoleChunk {
    /// Byte offset in the console log where `data` starts.
    pub offset: u64,
    /// Byte offset to ask for next to continue reading.
    pub next_offset: u64,
    /// Console output, decoded as UTF-8 with invalid bytes replaced.
    pub data: String,
}

/// Where each kind of object lives in the store. One place, so every crate agrees.
pub mod keys {
    use uuid::Uuid;

    pub const VMS: &str = "/corral/vms/";
    pub const HOSTS: &str = "/corral/hosts/";
    pub const TASKS: &str = "/corral/tasks/";
    pub const IMAGES: &str = "/corral/images/";
    pub const ADMIN_TOKEN: &str = "/corral/auth/admin-token-sha256";
    pub const CLUSTER: &str = "/corral/cluster";
    pub const GROUPS: &str = "/corral/groups/";
    pub const DATASTORES: &str = "/corral/datastores/";
    /// The Ceph keys of RBD datastores: hosts read them, the API never returns them.
    pub const DATASTORE_SECRETS: &str = "/corral/datastore-secrets/";
    pub const MIGRATIONS: &str = "/corral/migrations/";
    pub const EVENTS: &str = "/corral/events/";
    pub const PROJECTS: &str = "/corral/projects/";
    pub const NETWORKS: &str = "/corral/networks/";
    pub const SECURITY_GROUPS: &str = "/corral/security-groups/";
    /// Addresses handed out: `/corral/ips/PROJECT/NETWORK/IP`, holding the VM's uid.
    pub const IPS: &str = "/corral/ips/";
    /// Segment ids in use: `/corral/segments/vni-N` and `/corral/segments/vlan-N`.
    pub const SEGMENTS: &str = "/corral/segments/";
    /// Rewritten by every network create: creates that read the networks at the same time
    /// conflict on it, so overlap checks and VXLAN ids are decided on what is really there.
    pub const NETWORKS_CHANGED: &str = "/corral/networks-changed";

    pub fn project(name: &str) -> String {
        format!("{PROJECTS}{name}")
    }
    pub fn networks(project: &str) -> String {
        format!("{NETWORKS}{project}/")
    }
    pub fn network(project: &str, name: &str) -> String {
        format!("{NETWORKS}{project}/{name}")
    }
    pub fn ips(project: &str, network: &str) -> String {
        format!("{IPS}{project}/{network}/")
    }
    pub fn ip(project: &str, network: &str, ip: &str) -> String {
        format!("{IPS}{project}/{network}/{ip}")
    }
    pub fn segment(segment: &crate::Segment) -> String {
        match segment {
            crate::Segment::Vxlan { vni } => format!("{SEGMENTS}vni-{vni}"),
            crate::Segment::Vlan { id } => format!("{SEGMENTS}vlan-{id}"),
        }
    }
    pub fn security_groups(project: &str) -> String {
        format!("{SECURITY_GROUPS}{project}/")
    }
    pub fn security_group(project: &str, name: &str) -> String {
        format!("{SECURITY_GROUPS}{project}/{name}")
    }
    pub fn vms(project: &str) -> String {
        format!("{VMS}{project}/")
    }
    pub fn vm(project: &str, name: &str) -> String {
        format!("{VMS}{project}/{name}")
    }
    pub fn images(project: &str) -> String {
        format!("{IMAGES}{project}/")
    }
    pub fn image(project: &str, name: &str) -> String {
        format!("{IMAGES}{project}/{name}")
    }
    pub fn groups(project: &str) -> String {
        format!("{GROUPS}{project}/")
    }
    pub fn group(project: &str, name: &str) -> String {
        format!("{GROUPS}{project}/{name}")
    }
    pub fn migration(project: &str, vm: &str) -> String {
        format!("{MIGRATIONS}{project}/{vm}")
    }
    /// The VM a migration record belongs to, and back.
    pub fn vm_of_migration(key: &str) -> Option<String> {
        key.strip_prefix(MIGRATIONS)
            .map(|rest| format!("{VMS}{rest}"))
    }
    pub fn migration_of_vm(key: &str) -> Option<String> {
        key.strip_prefix(VMS)
            .map(|rest| format!("{MIGRATIONS}{rest}"))
    }
    pub fn datastore(name: &str) -> String {
        format!("{DATASTORES}{name}")
    }
    pub fn datastore_secret(name: &str) -> String {
        format!("{DATASTORE_SECRETS}{name}")
    }
    pub fn event(id: &str) -> String {
        format!("{EVENTS}{id}")
    }
    pub fn host(name: &str) -> String {
        format!("{HOSTS}{name}")
    }
    pub fn task(id: Uuid) -> String {
        format!("{TASKS}{id}")
    }
}
