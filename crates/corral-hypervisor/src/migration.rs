//! What the drivers report and take for live migration; the orchestration lives in the agent.

/// A paused VM waiting on the target host for the state of its running copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub pid: u32,
    /// The TCP port on the listening address where the migration stream goes.
    pub port: u16,
    /// The TCP port where the VM's new disk is served over NBD for the source to mirror into
    /// (shared-nothing moves).
    pub disk_port: Option<u16>,
}

/// How memory is sent: QEMU's defaults (32 MiB/s before 7.2's 128 MiB/s cap, 300 ms downtime) are
/// tuned for a WAN, not a datacenter link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub max_bandwidth_bytes: u64,
    /// The longest pause QEMU may plan for the switchover.
    pub downtime_limit_ms: u64,
    /// Slow the guest's vCPUs down when it dirties memory faster than the link sends it.
    pub auto_converge: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            // 10 GiB/s: in practice the link (or, under TCG, the CPU) is the limit.
            max_bandwidth_bytes: 10 << 30,
            downtime_limit_ms: 50,
            auto_converge: true,
        }
    }
}

/// Where the outgoing migration stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferStatus {
    /// No migration was started (or QEMU forgot it, e.g. after a restart).
    None,
    Active,
    Completed,
    Failed(String),
    Cancelled,
}

/// The outgoing copy of a VM: the disk mirror and the memory stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Transfer {
    pub status: TransferStatus,
    pub memory_total: u64,
    pub memory_sent: u64,
    pub memory_remaining: u64,
    pub dirty_rate_bytes: u64,
    pub mbps: f64,
    /// Known once completed.
    pub downtime_ms: Option<u64>,
    /// The disk mirror, when one runs.
    pub disk: Option<DiskCopy>,
}

impl Default for Transfer {
    fn default() -> Self {
        Self {
            status: TransferStatus::None,
            memory_total: 0,
            memory_sent: 0,
            memory_remaining: 0,
            dirty_rate_bytes: 0,
            mbps: 0.0,
            downtime_ms: None,
            disk: None,
        }
    }
}

/// A disk mirror job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskCopy {
    pub copied: u64,
    pub total: u64,
    /// Source and target are in sync; from now on writes go to both.
    pub ready: bool,
    /// Set when the job failed.
    pub error: Option<String>,
}
