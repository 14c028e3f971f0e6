use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{parse_size, validate_name, ObjectMeta, ValidationError};

/// Smallest memory a VM may have: below this no Linux guest boots.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;
/// Most vCPUs one VM may have (QEMU's `pc` machine limit).
const MAX_CPUS: u32 = 255;
/// Largest disk Corral creates (qcow2 itself stops near 64 TiB with default clusters).
const MAX_DISK_BYTES: u64 = 16 << 40;

/// Whether the user wants the VM to run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    Running,
    Stopped,
}

/// The desired state of a VM, written by the API and read by the host agent.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VmSpec {
    /// Name of the image (in the same project) the disk is cloned from.
    pub image: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Size of the VM's disk as the guest sees it.
    pub disk_bytes: u64,
    pub power: PowerState,
    /// When stopping: skip the ACPI shutdown and power off at once.
    #[serde(default)]
    pub force_stop: bool,
    /// Incremented by each reboot request; the agent resets the VM until it has seen this many.
    #[serde(default)]
    pub reboots: u64,
    /// Pinned by the user to this host; otherwise the scheduler picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The datastore the VM's disk lives on.
    #[serde(default = "local")]
    pub datastore: String,
    /// Run it again on another host when its host fails.
    #[serde(default)]
    pub ha: crate::HaPolicy,
    /// Among the VMs of a failed host, higher priorities run again first.
    #[serde(default)]
    pub ha_priority: crate::HaPriority,
    /// VMs (of the same project) that must run before this one is restarted after a failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ha_after: Vec<String>,
    /// Network interfaces, in the order the guest sees them (eth0 first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::Nic>,
    /// Security groups whose rules apply to every NIC of the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
}

fn local() -> String {
    crate::LOCAL_DATASTORE.to_string()
}

impl VmSpec {
    /// The VM asks HA to restart it elsewhere and its disk is not on a host's local datastore.
    /// Hosts fence such VMs; the controller restarts them if, besides, the datastore is shared, the
    /// VM is not pinned and should run (`HaProtection`).
    pub fn wants_ha_restart(&self) -> bool {
        self.ha == crate::HaPolicy::Restart && self.datastore != crate::LOCAL_DATASTORE
    }
}

/// Where a VM is in its life, as observed by its host agent.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmPhase {
    /// Accepted; not placed on a host yet, or the host has not acted on it yet.
    Pending,
    Stopped,
    Running,
    Stopping,
    Deleting,
    /// The last attempt to reach the desired state failed; see the conditions.
    Failed,
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// What a condition is about.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub enum ConditionType {
    /// Placement: the host the VM is placed on, or why no host can take it.
    Scheduled,
    /// The VM's disk exists on its host.
    DiskReady,
    /// The guest runs (or why it does not).
    Running,
    /// The last storage move of the VM's disk, and how it ended.
    StorageMoved,
}

/// One observed fact about a VM, with the reason it holds.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionType,
    pub status: bool,
    /// CamelCase reason, e.g. "Started", "GuestPoweredOff", "QemuFailed".
    pub reason: String,
    pub message: String,
    pub last_transition: DateTime<Utc>,
}

/// The VM's disk as it exists on the host.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DiskStatus {
    pub path: String,
    /// The image file the disk is a linked clone of.
    pub backing: String,
    /// The datastore the disk is on (empty in records written before storage moves existed: the
    /// spec's datastore then).
    #[serde(default)]
    pub datastore: String,
}

/// Body of `POST /api/v1/projects/{project}/vms/{name}/move-storage`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MoveStorageRequest {
    /// The datastore to move the VM's disk to.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub datastore: String,
}

/// The observed state of a VM, written only by its host agent.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VmStatus {
    pub phase: VmPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The spec generation the agent last acted on.
    pub observed_generation: u64,
    /// Reboots performed (compare with `spec.reboots`).
    #[serde(default)]
    pub reboots: u64,
    /// Process id of QEMU on the host while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStatus>,
    /// Where the hypervisor keeps the VM's control sockets and console log on its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// What happened to the VM (migrations so far), newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<crate::VmEvent>,
    /// What the VM uses, measured by its host while it runs (DRS balances on this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::VmUsage>,
}

impl Default for VmStatus {
    fn default() -> Self {
        Self {
            phase: VmPhase::Pending,
            host: None,
            observed_generation: 0,
            reboots: 0,
            pid: None,
            started_at: None,
            disk: None,
            run_dir: None,
            conditions: Vec::new(),
            events: Vec::new(),
            usage: None,
        }
    }
}

impl VmStatus {
    /// Sets a condition, keeping its transition time when its status did not change.
    pub fn set_condition(
        &mut self,
        kind: ConditionType,
        status: bool,
        reason: &str,
        message: &str,
    ) {
        let now = Utc::now();
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(c) => {
                if c.status != status {
                    c.last_transition = now;
                }
                c.status = status;
                c.reason = reason.to_string();
                c.message = message.to_string();
            }
            None => self.conditions.push(Condition {
                kind,
                status,
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition: now,
            }),
        }
    }

    /// Records an event, keeping the last [`crate::VmEvent::KEEP`].
    pub fn push_event(&mut self, event: crate::VmEvent) {
        self.events.push(event);
        let extra = self.events.len().saturating_sub(crate::VmEvent::KEEP);
        self.events.drain(..extra);
    }

    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

/// A virtual machine.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Vm {
    pub meta: ObjectMeta,
    pub spec: VmSpec,
    pub status: VmStatus,
    /// Whether HA protects the VM now, and why not (filled in by the API when it answers; never
    /// stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<crate::HaProtection>,
}

impl Vm {
    /// Whether the VM holds CPU and memory on its host: it should run (started, starting, failed
    /// but to be started again, migrating) or its guest still runs (being stopped). A stopped VM
    /// holds only its disk; starting it is admitted against its host's free capacity then.
    pub fn holds_capacity(&self) -> bool {
        self.spec.power == PowerState::Running
            || matches!(self.status.phase, VmPhase::Running | VmPhase::Stopping)
    }
}

/// Body of `POST /api/v1/projects/{project}/vms`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateVmRequest {
    /// A DNS label: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    /// The image to clone the VM's disk from.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub image: String,
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 255)]
    pub cpus: u32,
    /// Memory with a unit, e.g. "256M" or "1G".
    #[schema(pattern = "^ *[0-9]+(\\.[0-9]+)? *([KMGTkmgt]([Ii]?[Bb])?|[Bb])? *$")]
    pub memory: String,
    /// Disk size with a unit; the image's size when absent.
    #[serde(default)]
    #[schema(pattern = "^ *[0-9]+(\\.[0-9]+)? *([KMGTkmgt]([Ii]?[Bb])?|[Bb])? *$")]
    pub disk: Option<String>,
    /// Start the VM once it is created.
    #[serde(default)]
    pub start: bool,
    /// Run on this host instead of where the scheduler would place it.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub host: Option<String>,
    /// Datastore for the VM's disk; `local` (each host's data dir) when absent.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub datastore: Option<String>,
    /// `restart`: run the VM again on another host when its host fails (needs a shared datastore).
    #[serde(default)]
    pub ha: crate::HaPolicy,
    /// Restart priority after a host failure: high, medium (default) or low.
    #[serde(default)]
    pub ha_priority: crate::HaPriority,
    /// VMs that must run before this one is restarted after a host failure.
    #[serde(default)]
    #[schema(schema_with = crate::meta::names_schema)]
    pub ha_after: Vec<String>,
    /// NICs on networks of the project; address and MAC are chosen when not given.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub nics: Vec<crate::NicRequest>,
    /// Security groups for the VM's NICs; `default` when none is named.
    #[serde(default)]
    #[schema(schema_with = crate::meta::names_schema)]
    pub security_groups: Vec<String>,
}

fn one() -> u32 {
    1
}

impl CreateVmRequest {
    /// Checks everything that does not depend on the state of the cluster, and returns the spec.
    /// `disk_bytes` is 0 when the request leaves the disk size to the image.
    pub fn to_spec(&self) -> Result<VmSpec, ValidationError> {
        validate_name("VM", &self.name)?;
        validate_name("image", &self.image)?;
        if let Some(h) = &self.host {
            validate_name("host", h)?;
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ValidationError::new(format!(
                "a VM needs 1 to {MAX_CPUS} CPUs, not {}",
                self.cpus
            )));
        }
        let memory_bytes = parse_size("memory", &self.memory)?;
        if memory_bytes < MIN_MEMORY_BYTES || memory_bytes % (1 << 20) != 0 {
            return Err(ValidationError::unprocessable(format!(
                "memory {:?} is not usable: give a whole number of MiB, at least 64M (e.g. 256M)",
                self.memory
            )));
        }
        let disk_bytes = match &self.disk {
            Some(d) => {
                let b = parse_size("disk size", d)?;
                if b == 0 || b % 512 != 0 || b > MAX_DISK_BYTES {
                    return Err(ValidationError::unprocessable(format!(
                        "disk size {d:?} is not usable: give a multiple of 512 bytes up to 16T, e.g. 1G"
                    )));
                }
                b
            }
            None => 0,
        };
        Ok(VmSpec {
            image: self.image.clone(),
            cpus: self.cpus,
            memory_bytes,
            disk_bytes,
            power: if self.start {
                PowerState::Running
            } else {
                PowerState::Stopped
            },
            force_stop: false,
            reboots: 0,
            host: self.host.clone(),
            datastore: match &self.datastore {
                Some(d) => {
                    validate_name("datastore", d)?;
                    d.clone()
                }
                None => local(),
            },
            ha: self.ha,
            ha_priority: self.ha_priority,
            ha_after: {
                for n in &self.ha_after {
                    validate_name("VM (in ha_after)", n)?;
                    if *n == self.name {
                        return Err(ValidationError::unprocessable(format!(
                            "VM {n} cannot wait for itself: name other VMs in ha_after"
                        )));
                    }
                }
                self.ha_after.clone()
            },
            // Filled in by the controller, which hands out addresses and MACs.
            nics: Vec::new(),
            security_groups: {
                if self.nics.len() > crate::network::MAX_NICS {
                    return Err(ValidationError::new(format!(
                        "a VM may have {} NICs at most, not {}",
                        crate::network::MAX_NICS,
                        self.nics.len()
                    )));
                }
                for nic in &self.nics {
                    nic.validate()?;
                }
                for g in &self.security_groups {
                    validate_name("security group", g)?;
                }
                if self.nics.is_empty() && !self.security_groups.is_empty() {
                    return Err(ValidationError::unprocessable(
                        "security groups apply to NICs: give the VM a NIC, or no security groups",
                    ));
                }
                match (self.nics.is_empty(), self.security_groups.is_empty()) {
                    (false, true) => vec![crate::DEFAULT_SECURITY_GROUP.to_string()],
                    _ => self.security_groups.clone(),
                }
            },
        })
    }
}

/// Body of `POST /api/v1/projects/{project}/vms/{name}/stop`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct StopVmRequest {
    /// Power off at once instead of asking the guest to shut down (ACPI) first.
    #[serde(default)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> CreateVmRequest {
        CreateVmRequest {
            name: "web-1".into(),
            image: "jeos".into(),
            cpus: 1,
            memory: "256M".into(),
            disk: Some("1G".into()),
            start: true,
            host: None,
            datastore: None,
            ha: Default::default(),
            ha_priority: Default::default(),
            ha_after: Vec::new(),
            nics: Vec::new(),
            security_groups: Vec::new(),
        }
    }

    #[test]
    fn valid_request_becomes_spec() {
        let spec = req().to_spec().unwrap();
        assert_eq!(spec.memory_bytes, 256 << 20);
        assert_eq!(spec.disk_bytes, 1 << 30);
        assert_eq!(spec.power, PowerState::Running);
    }

    #[test]
    fn bad_requests_say_what_to_fix() {
        let cases: Vec<(CreateVmRequest, &str)> = vec![
            (
                CreateVmRequest {
                    memory: "12XB".into(),
                    ..req()
                },
                "malformed memory",
            ),
            (
                CreateVmRequest {
                    memory: "16M".into(),
                    ..req()
                },
                "at least 64M",
            ),
            (CreateVmRequest { cpus: 0, ..req() }, "1 to 255 CPUs"),
            (
                CreateVmRequest {
                    name: "Bad_Name".into(),
                    ..req()
                },
                "invalid VM name",
            ),
            (
                CreateVmRequest {
                    image: "../etc".into(),
                    ..req()
                },
                "invalid image name",
            ),
            (
                CreateVmRequest {
                    disk: Some("100".into()),
                    ..req()
                },
                "multiple of 512",
            ),
            (
                CreateVmRequest {
                    disk: Some("100000T".into()),
                    ..req()
                },
                "up to 16T",
            ),
        ];
        for (r, want) in cases {
            let err = r.to_spec().unwrap_err();
            assert!(err.0.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn conditions_keep_transition_time_when_unchanged() {
        let mut s = VmStatus::default();
        s.set_condition(ConditionType::Running, true, "Started", "");
        let t = s.condition(ConditionType::Running).unwrap().last_transition;
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.set_condition(ConditionType::Running, true, "Adopted", "");
        assert_eq!(
            s.condition(ConditionType::Running).unwrap().last_transition,
            t
        );
        assert_eq!(
            s.condition(ConditionType::Running).unwrap().reason,
            "Adopted"
        );
        s.set_condition(ConditionType::Running, false, "Stopped", "");
        assert!(
            s.condition(ConditionType::Running).unwrap().last_transition > t,
            "a flip moves the time"
        );
    }
}
