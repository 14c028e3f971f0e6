use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a host runs guests.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization (the CPU has vmx/svm and /dev/kvm works).
    Kvm,
    /// QEMU's software emulation: slow, but runs anywhere.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// A hypervisor host as its agent reports it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Host {
    pub name: String,
    /// Logical CPUs of the machine.
    pub cpus: u32,
    /// Physical memory of the machine in bytes.
    pub memory_bytes: u64,
    pub accel: Accel,
    /// What `qemu-system-x86_64 --version` printed.
    pub hypervisor: String,
    pub last_heartbeat: DateTime<Utc>,
}
