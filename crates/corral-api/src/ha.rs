//! High availability: what a VM asks for when its host fails, the cluster's HA settings, the
//! timing every host and the controller agree on, and the cluster's event log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What happens to a VM when its host fails.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HaPolicy {
    /// Run it again on another host (its disk must be on a shared datastore).
    Restart,
    /// Leave it down until someone starts it.
    #[default]
    Off,
}

/// Which VMs of a failed host run again first.
#[derive(
    Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum HaPriority {
    High,
    #[default]
    Medium,
    Low,
}

/// What a host cut off from the controller and from every peer does with its protected VMs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationResponse {
    /// Power them off and give up their storage leases, so they run again on connected hosts.
    #[default]
    PowerOff,
    /// Keep them running and keep their leases: nothing restarts them elsewhere.
    LeaveRunning,
}

/// Whether a VM is protected by HA, and why not when it is not (`corral vm show`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HaProtection {
    pub protected: bool,
    /// Why it is (not) protected, as a sentence.
    pub reason: String,
}

/// The timing of failure detection and fencing. Every agent and the controller use these figures;
/// docs/HA.md argues why they can never let a VM run twice.
pub mod timing {
    use std::time::Duration;

    /// How often an agent renews its storage leases and reports to the controller.
    pub const RENEW_EVERY: Duration = Duration::from_millis(250);
    /// A host that has not renewed its storage lease for this long kills its protected VMs.
    pub const FENCE_AFTER: Duration = Duration::from_millis(2000);
    /// The controller takes a lease as expired when it has seen it unchanged for this long. It
    /// exceeds [`FENCE_AFTER`] by a margin for clock-rate drift and for the kill itself.
    pub const LEASE_EXPIRES_AFTER: Duration = Duration::from_millis(3000);
    /// A silent host that no peer sees and whose lease has not changed for this long (four
    /// renewals missed) is declared failed. Its VMs are still restarted only once the lease has
    /// expired ([`LEASE_EXPIRES_AFTER`]).
    pub const LEASE_STALE_AFTER: Duration = Duration::from_millis(1000);
    /// The controller hears nothing from a host for this long: the host is suspected.
    pub const SILENT_AFTER: Duration = Duration::from_millis(1500);
    /// A host that has heard neither the controller nor any peer for this long is isolated.
    pub const ISOLATED_AFTER: Duration = Duration::from_millis(3000);
}

/// Something that happened in the cluster (`corral events`): a host failing or coming back, a
/// failover decision, a VM restarted elsewhere.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ClusterEvent {
    /// Orders events: later events have larger ids.
    pub id: String,
    pub at: DateTime<Utc>,
    /// E.g. "HostFailed", "HostIsolated", "FailoverStarted", "VmRestarting", "VmRestarted".
    pub reason: String,
    /// What it is about: "host/NAME" or "vm/PROJECT/NAME".
    pub subject: String,
    pub message: String,
}
