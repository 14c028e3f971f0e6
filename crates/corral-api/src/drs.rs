//! DRS: balancing measured load across hosts by live migration. The settings live with the
//! cluster's; a plan is what `corral drs plan` shows and `corral drs apply` carries out.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How DRS acts.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DrsMode {
    /// No plans are applied (`corral drs plan` still shows what DRS would do).
    #[default]
    Off,
    /// Plans are applied when an operator says so (`corral drs apply`).
    Manual,
    /// The controller plans and applies by itself, every [`DRS_PERIOD_SECS`].
    Auto,
}

/// How often automatic DRS plans.
pub const DRS_PERIOD_SECS: u64 = 30;
/// A VM moved by DRS (or anyone) stays where it is for this long: no ping-pong.
pub const DRS_HOLD_SECS: i64 = 300;

/// How much imbalance (the standard deviation of host loads, 0 to 1) each aggressiveness level
/// tolerates: 1 moves only for gross imbalance, 5 for small differences.
pub fn drs_threshold(aggressiveness: u8) -> f64 {
    match aggressiveness {
        1 => 0.20,
        2 => 0.15,
        3 => 0.10,
        4 => 0.05,
        _ => 0.02,
    }
}

/// What a VM uses, as its host measures it (QEMU's CPU time and resident memory).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VmUsage {
    /// CPU used over the last interval, in cores (1.0: one host CPU busy all the time).
    pub cpu_cores: f64,
    /// Memory the guest has touched (the QEMU process's resident memory).
    pub memory_bytes: u64,
    pub measured_at: DateTime<Utc>,
}

/// A host's load as DRS sees it: demand over capacity, per resource and the larger of the two.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostLoad {
    pub host: String,
    pub cpu: f64,
    pub memory: f64,
    pub load: f64,
}

/// One recommended live migration.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DrsMove {
    /// "project/name".
    pub vm: String,
    pub from: String,
    pub to: String,
    /// How much the imbalance drops with this move.
    pub gain: f64,
    /// Memory the migration copies (what the guest has touched).
    pub copy_bytes: u64,
    /// Why it pays for itself, in words.
    pub reason: String,
}

/// A power recommendation of DPM: a host that could go to standby, and the moves that empty it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PowerAction {
    pub host: String,
    /// "standby".
    pub action: String,
    pub moves: Vec<DrsMove>,
    pub reason: String,
}

/// How DPM acts.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PowerManagement {
    #[default]
    Off,
    /// DRS plans say which hosts could go to standby; with DRS in `auto`, hosts that can be
    /// powered (simulated hosts; real hosts have no IPMI or Wake-on-LAN support yet, so for them
    /// this reports what would be done) are emptied and put in standby, and woken when capacity is
    /// needed.
    Auto,
}

/// DPM packs hosts up to this load.
pub const DPM_MAX_LOAD: f64 = 0.8;
/// DPM wakes a standby host when any host is loaded above this, or a VM waits for room (above
/// [`DPM_MAX_LOAD`], so that a host put in standby is not woken by the load it left behind).
pub const DPM_WAKE_LOAD: f64 = 0.9;

/// A DRS plan: moves in order, and every host's load before and after them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DrsPlan {
    pub id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
    pub moves: Vec<DrsMove>,
    pub before: Vec<HostLoad>,
    pub after: Vec<HostLoad>,
    /// Standard deviation of the host loads before and after the moves.
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// The imbalance the cluster's aggressiveness tolerates.
    pub threshold: f64,
    /// Why there are no moves (or fewer than the imbalance asks for).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// DPM (with `power_management: auto`): hosts that could go to standby after the moves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub power: Vec<PowerAction>,
}

/// Body of `POST /api/v1/drs/apply`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ApplyDrsRequest {
    /// The plan to carry out (from `GET /api/v1/drs/plan`); a fresh plan when absent.
    #[serde(default)]
    #[schema(
        pattern = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32})$"
    )]
    pub plan: Option<uuid::Uuid>,
}

/// Answer of `POST /api/v1/drs/apply`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ApplyDrsResponse {
    pub plan: DrsPlan,
    /// The migrations started, one task each.
    pub tasks: Vec<crate::Task>,
    /// Moves not started, with the reason.
    pub skipped: Vec<String>,
}
