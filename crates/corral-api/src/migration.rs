//! Live migration: the record both hosts of a move work from.
//!
//! The controller creates a [`Migration`] when a user (or host evacuation) asks for a move. The
//! target host's agent prepares a paused QEMU that waits for the VM's state and records where it
//! listens; the source host's agent copies the disk (when the hosts share no storage) and the memory,
//! and hands the VM over to the target in the same store transaction that marks the migration
//! completed. Until then the VM belongs to its source, so any failure leaves it running there.

use std::net::SocketAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Where a migration is in its life.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The target host prepares a QEMU that waits for the VM.
    Preparing,
    /// The target waits on `target_port` (and serves the disk on `disk_port`) of its fabric address.
    TargetReady,
    /// The source copies the disk, then memory and device state.
    Transferring,
    /// The VM runs on the target; the source copy is gone.
    Completed,
    /// The VM stayed on the source; see `error`.
    Failed,
    /// Cancelled on request; the VM stayed on the source.
    Cancelled,
}

impl MigrationPhase {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }
}

/// How far the copy has come, as the source's QEMU reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct MigrationProgress {
    /// "disk", "memory" or "switchover".
    pub stage: String,
    /// 0 to 100, over the current stage.
    pub percent: u8,
    /// Bytes of the disk copied so far and in all (shared-nothing migrations only).
    pub disk_copied_bytes: u64,
    pub disk_total_bytes: u64,
    /// Bytes of memory and device state sent so far.
    pub memory_sent_bytes: u64,
    pub memory_total_bytes: u64,
    pub memory_remaining_bytes: u64,
    /// How fast the guest dirties memory, bytes per second.
    pub dirty_rate_bytes: u64,
    /// Link throughput in megabits per second.
    pub mbps: f64,
    /// How long the remainder should take at the current rate, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_remaining_ms: Option<u64>,
}

/// What a finished migration measured.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct MigrationResult {
    /// How long the guest was paused at the switchover, as QEMU measured it.
    pub downtime_ms: u64,
    /// From the request to the VM running on the target.
    pub total_ms: u64,
    /// Memory and device state sent.
    pub memory_bytes: u64,
    /// Disk copied (shared-nothing migrations).
    pub disk_bytes: u64,
    /// When the source saw the copy complete (the guest paused); the target resumes it after the
    /// handover, at the `Running` condition's transition time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
}

/// One move of a running VM from `source` to `target`. Stored at `keys::migration(project, vm)`;
/// the next migration of the VM replaces it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Migration {
    pub id: Uuid,
    pub project: String,
    pub vm: String,
    pub vm_uid: Uuid,
    pub source: String,
    pub target: String,
    /// The disk is on a datastore both hosts mount: only memory and device state move.
    pub shared_storage: bool,
    /// Why it was started, e.g. "requested" or "evacuating host-1 for maintenance".
    pub reason: String,
    pub phase: MigrationPhase,
    /// Someone asked to stop it; the source cancels at its next step.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The TCP port on the target's registered fabric address where its QEMU waits for the
    /// migration stream. Only a port: the source builds the address from the target's host record
    /// (see [`Migration::stream_to`]), so a target cannot point the source anywhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub target_port: Option<u16>,
    /// The TCP port on the target's fabric address where it serves the VM's new disk over NBD
    /// (shared-nothing migrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub disk_port: Option<u16>,
    /// The target's QEMU, its run directory and the VM's disk there, once prepared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_run_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_disk: Option<String>,
    #[serde(default)]
    pub progress: MigrationProgress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<MigrationResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where a migration's streams go, built from the target's record, never from a string a host wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationEndpoints {
    /// Memory and device state.
    pub stream: SocketAddr,
    /// The NBD export of the new disk (shared-nothing moves).
    pub disk: Option<SocketAddr>,
}

impl Migration {
    /// A new migration of the VM `vm` (uid `vm_uid`) in `project` from `source` to `target`,
    /// waiting for the target to prepare.
    pub fn new(
        project: &str,
        vm: &str,
        vm_uid: Uuid,
        (source, target): (&str, &str),
        shared_storage: bool,
        reason: &str,
    ) -> Migration {
        let now = Utc::now();
        Migration {
            id: Uuid::new_v4(),
            project: project.to_string(),
            vm: vm.to_string(),
            vm_uid,
            source: source.to_string(),
            target: target.to_string(),
            shared_storage,
            reason: reason.to_string(),
            phase: MigrationPhase::Preparing,
            cancel_requested: false,
            target_port: None,
            disk_port: None,
            target_pid: None,
            target_run_dir: None,
            target_disk: None,
            progress: MigrationProgress::default(),
            result: None,
            error: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Where the source sends this migration: the target's registered fabric address with the
    /// ports the target recorded. Refused (with a sentence) when the target has no usable address
    /// or did not record what this kind of move needs.
    pub fn stream_to(
        &self,
        target: &crate::Host,
    ) -> Result<MigrationEndpoints, crate::ValidationError> {
        if target.name != self.target {
            return Err(crate::ValidationError::new(format!(
                "host {} is not the target of this migration ({} is)",
                target.name, self.target
            )));
        }
        let ip = target.status.address.ok_or_else(|| {
            crate::ValidationError::new(format!(
                "host {} has registered no fabric address to migrate to",
                self.target
            ))
        })?;
        crate::check_fabric_address(ip)
            .map_err(|e| crate::ValidationError::new(format!("host {}: {e}", self.target)))?;
        let port = |p: Option<u16>, what: &str| match p {
            Some(p) if p > 0 => Ok(SocketAddr::new(ip, p)),
            _ => Err(crate::ValidationError::new(format!(
                "host {} recorded no port for the {what}",
                self.target
            ))),
        };
        let stream = port(self.target_port, "migration stream")?;
        let disk = match (self.shared_storage, self.disk_port) {
            (true, None) => None,
            (true, Some(_)) => {
                return Err(crate::ValidationError::new(format!(
                    "host {} exported a disk for a move on shared storage",
                    self.target
                )))
            }
            (false, p) => Some(port(p, "disk export")?),
        };
        Ok(MigrationEndpoints { stream, disk })
    }

    /// The fields only the controller sets; hosts may change everything else.
    pub fn identity(
        &self,
    ) -> (
        Uuid,
        &str,
        &str,
        Uuid,
        &str,
        &str,
        bool,
        &str,
        DateTime<Utc>,
    ) {
        (
            self.id,
            &self.project,
            &self.vm,
            self.vm_uid,
            &self.source,
            &self.target,
            self.shared_storage,
            &self.reason,
            self.created_at,
        )
    }

    /// One line for people: "host-1 -> host-2: sending memory, 45% ...".
    pub fn summary(&self) -> String {
        let p = &self.progress;
        let route = format!("{} -> {}", self.source, self.target);
        match self.phase {
            MigrationPhase::Preparing => format!("{route}: preparing the target"),
            MigrationPhase::TargetReady => format!("{route}: target ready"),
            MigrationPhase::Transferring if p.stage == "disk" => format!(
                "{route}: copying the disk, {}% ({} of {})",
                p.percent,
                crate::format_bytes(p.disk_copied_bytes),
                crate::format_bytes(p.disk_total_bytes)
            ),
            MigrationPhase::Transferring => {
                let left = p
                    .expected_remaining_ms
                    .map(|ms| format!(", ~{:.1} s left", ms as f64 / 1000.0))
                    .unwrap_or_default();
                format!(
                    "{route}: sending memory, {}% ({} sent, {} remaining, {:.0} Mbit/s, dirtied {}/s{left})",
                    p.percent,
                    crate::format_bytes(p.memory_sent_bytes),
                    crate::format_bytes(p.memory_remaining_bytes),
                    p.mbps,
                    crate::format_bytes(p.dirty_rate_bytes),
                )
            }
            MigrationPhase::Completed => match &self.result {
                Some(r) => format!(
                    "{route} in {:.2} s, downtime {} ms, {} of memory{}",
                    r.total_ms as f64 / 1000.0,
                    r.downtime_ms,
                    crate::format_bytes(r.memory_bytes),
                    if r.disk_bytes > 0 {
                        format!(" and {} of disk", crate::format_bytes(r.disk_bytes))
                    } else {
                        String::new()
                    }
                ),
                None => format!("{route}: completed"),
            },
            MigrationPhase::Failed => format!(
                "{route} failed: {}",
                self.error.as_deref().unwrap_or("unknown error")
            ),
            MigrationPhase::Cancelled => {
                format!("{route}: cancelled; the VM stays on {}", self.source)
            }
        }
    }
}

/// Body of `POST /api/v1/projects/{project}/vms/{name}/migrate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct MigrateVmRequest {
    /// The host to move to; the scheduler picks one when absent.
    #[serde(default)]
    pub to: Option<String>,
}

/// Something that happened to a VM, kept in its status (the last [`VmEvent::KEEP`]).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VmEvent {
    pub at: DateTime<Utc>,
    /// E.g. "Migrated", "MigrationFailed".
    pub reason: String,
    pub message: String,
}

impl VmEvent {
    pub const KEEP: usize = 20;

    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self {
            at: Utc::now(),
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Host, HostStatus};

    fn migration(shared_storage: bool) -> Migration {
        let m = Migration::new(
            "default",
            "web",
            Uuid::new_v4(),
            ("h1", "h2"),
            shared_storage,
            "requested",
        );
        Migration {
            phase: MigrationPhase::TargetReady,
            target_port: Some(49152),
            disk_port: (!shared_storage).then_some(49153),
            ..m
        }
    }

    fn host(name: &str, address: Option<&str>) -> Host {
        Host {
            name: name.into(),
            maintenance: false,
            standby: false,
            approved: None,
            status: HostStatus {
                address: address.map(|a| a.parse().expect("ip")),
                ..HostStatus::unregistered()
            },
        }
    }

    #[test]
    fn streams_go_to_the_targets_registered_address_only() {
        let shared = migration(true);
        let to = shared
            .stream_to(&host("h2", Some("10.0.0.12")))
            .expect("endpoints");
        assert_eq!(to.stream, "10.0.0.12:49152".parse().expect("addr"));
        assert_eq!(to.disk, None);
        let unshared = migration(false)
            .stream_to(&host("h2", Some("fd00::12")))
            .expect("endpoints");
        assert_eq!(
            unshared.disk,
            Some("[fd00::12]:49153".parse().expect("addr"))
        );

        let refused = |m: &Migration, h: &Host, says: &str| {
            let err = m.stream_to(h).expect_err(says);
            assert!(err.0.contains(says), "{err}");
        };
        refused(&shared, &host("h3", Some("10.0.0.13")), "not the target");
        refused(&shared, &host("h2", None), "no fabric address");
        refused(&shared, &host("h2", Some("0.0.0.0")), "not an address");
        refused(&shared, &host("h2", Some("239.1.1.1")), "not an address");
        let mut no_port = shared.clone();
        no_port.target_port = None;
        refused(&no_port, &host("h2", Some("10.0.0.12")), "no port");
        let mut zero = shared.clone();
        zero.target_port = Some(0);
        refused(&zero, &host("h2", Some("10.0.0.12")), "no port");
        let mut exported = shared.clone();
        exported.disk_port = Some(1);
        refused(&exported, &host("h2", Some("10.0.0.12")), "shared storage");
        let mut no_disk = migration(false);
        no_disk.disk_port = None;
        refused(&no_disk, &host("h2", Some("10.0.0.12")), "disk export");

        // A target that names another host's address is not believed.
        let hosts = [host("h1", Some("10.0.0.11")), host("h2", Some("10.0.0.11"))];
        let err = crate::check_own_address(&hosts[1], &hosts).expect_err("h1's address");
        assert!(err.0.contains("host h1 has registered too"), "{err}");
        let hosts = [host("h1", Some("127.0.0.1")), host("h2", Some("127.0.0.1"))];
        assert!(
            crate::check_own_address(&hosts[1], &hosts).is_ok(),
            "one machine"
        );
        let hosts = [host("h1", Some("10.0.0.11")), host("h2", Some("10.0.0.12"))];
        assert!(crate::check_own_address(&hosts[1], &hosts).is_ok());
    }
}
