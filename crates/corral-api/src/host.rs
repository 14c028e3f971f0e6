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

/// A hypervisor host. The operator owns `maintenance`; the host's agent owns `status`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Host {
    pub name: String,
    /// A host in maintenance gets no new VMs.
    #[serde(default)]
    pub maintenance: bool,
    /// DPM asks the host to go to standby (once its VMs have moved away) or, set back to false, to
    /// wake. Only hosts whose agent can power the machine act on it (`status.power_control`).
    #[serde(default)]
    pub standby: bool,
    /// The capacity an operator trusts this host with: what its agent reported when it first
    /// registered, or what `PUT /api/v1/hosts/{name}/capacity` set. A joined host's later reports
    /// beyond it are not believed (see [`HostStatus::capacity_refused`]). `None` until the
    /// host's agent first registers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<Capacity>,
    pub status: HostStatus,
}

impl Host {
    /// The record of a host that joined and whose agent has not registered yet: its first
    /// registration sets the capacity the operator trusts it with.
    pub fn joined(name: &str) -> Host {
        Host {
            name: name.to_string(),
            maintenance: false,
            standby: false,
            approved: None,
            status: HostStatus::unregistered(),
        }
    }
}

/// CPUs and memory of a machine; also the body of `PUT /api/v1/hosts/{name}/capacity`, which
/// approves a host's new capacity (after adding CPUs or memory) so its reports are believed up
/// to it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Capacity {
    #[schema(minimum = 1, maximum = 8192)]
    pub cpus: u32,
    #[schema(minimum = 1048576, maximum = 70368744177664_u64)]
    pub memory_bytes: u64,
}

impl Capacity {
    /// More logical CPUs than any machine has today (the largest have a few thousand).
    pub const MAX_CPUS: u32 = 8192;
    /// 64 TiB: more memory than any machine has today.
    pub const MAX_MEMORY_BYTES: u64 = 64 << 40;

    /// Refuses a capacity no machine has, with a sentence.
    pub fn check(&self) -> Result<(), crate::ValidationError> {
        if self.cpus == 0 || self.cpus > Self::MAX_CPUS {
            return Err(crate::ValidationError::new(format!(
                "{} CPUs is not a machine's capacity: 1 to {} CPUs are accepted",
                self.cpus,
                Self::MAX_CPUS
            )));
        }
        if self.memory_bytes < 1 << 20 || self.memory_bytes > Self::MAX_MEMORY_BYTES {
            return Err(crate::ValidationError::new(format!(
                "{} of memory is not a machine's capacity: 1 MiB to {} are accepted",
                crate::format_bytes(self.memory_bytes),
                crate::format_bytes(Self::MAX_MEMORY_BYTES)
            )));
        }
        Ok(())
    }

    /// Whether `self` claims more of either than `approved`.
    pub fn exceeds(&self, approved: &Capacity) -> bool {
        self.cpus > approved.cpus || self.memory_bytes > approved.memory_bytes
    }
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPUs and {}",
            self.cpus,
            crate::format_bytes(self.memory_bytes)
        )
    }
}

/// Refuses to treat `host`'s address as its own when another of `hosts` registered it too: a
/// compromised host could otherwise name an honest host's address, and a migration to it would
/// stream into that host's waiting QEMU. Loopback is exempt: it is every host's address when they
/// share one machine (tests, simulated hosts), and it reaches only the sender itself.
pub fn check_own_address(host: &Host, hosts: &[Host]) -> Result<(), crate::ValidationError> {
    let Some(ip) = host.status.address.filter(|ip| !ip.is_loopback()) else {
        return Ok(());
    };
    match hosts
        .iter()
        .find(|h| h.name != host.name && h.status.address == Some(ip))
    {
        Some(other) => Err(crate::ValidationError::new(format!(
            "host {} claims the address {ip}, which host {} has registered too: refusing to send a VM there",
            host.name, other.name
        ))),
        None => Ok(()),
    }
}

/// Refuses an address no one host can be reached at (unspecified, multicast, broadcast), with a
/// sentence. Loopback is a host's address when it shares the controller's machine (the lab's
/// simulated hosts, tests).
pub fn check_fabric_address(ip: std::net::IpAddr) -> Result<(), crate::ValidationError> {
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, std::net::IpAddr::V4(a) if a.is_broadcast());
    if bad {
        return Err(crate::ValidationError::new(format!(
            "{ip} is not an address other hosts can reach it at on the fabric"
        )));
    }
    Ok(())
}

/// What a host's agent reports with every heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostStatus {
    /// Logical CPUs of the machine.
    pub cpus: u32,
    /// Physical memory of the machine in bytes.
    pub memory_bytes: u64,
    pub accel: Accel,
    /// What `qemu-system-x86_64 --version` printed.
    pub hypervisor: String,
    /// When the agent last wrote this record; the Unix epoch until its first write (the host has
    /// joined but its agent has not registered it: see [`HostStatus::registered`]).
    pub last_heartbeat: DateTime<Utc>,
    /// Where the host's agent listens for its peers' membership gossip (SWIM, UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10.0.0.11:41234")]
    pub gossip: Option<std::net::SocketAddr>,
    /// The host's address on the fabric: overlay tunnels and migrations arrive there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10.0.0.11")]
    pub address: Option<std::net::IpAddr>,
    /// The agent can put the machine in standby and wake it (simulated hosts can; real hosts
    /// cannot yet, so DPM only reports what it would do with them).
    #[serde(default)]
    pub power_control: bool,
    /// The host went to standby at DPM's request: it is powered down, silent on purpose.
    #[serde(default)]
    pub standby: bool,
    /// Set by the controller when the host's agent reported more CPUs or memory than the
    /// operator approved (`Host::approved`): what it claimed. `cpus` and `memory_bytes` then
    /// hold the approved capacity, so the scheduler never places on the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_refused: Option<String>,
}

impl HostStatus {
    /// What a host that has joined has, until its agent registers it with its first write.
    pub fn unregistered() -> HostStatus {
        HostStatus {
            cpus: 0,
            memory_bytes: 0,
            accel: Accel::Tcg,
            hypervisor: String::new(),
            last_heartbeat: DateTime::<Utc>::UNIX_EPOCH,
            gossip: None,
            address: None,
            power_control: false,
            standby: false,
            capacity_refused: None,
        }
    }

    /// The capacity the host's agent reports.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
        }
    }

    /// Whether the host's agent has written its record (and so its capacity) at least once.
    pub fn registered(&self) -> bool {
        self.last_heartbeat != DateTime::<Utc>::UNIX_EPOCH
    }
}

/// Whether a host takes part in the cluster.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeats arrive; new VMs may land here.
    Connected,
    /// No heartbeat within the timeout; its VMs are left alone.
    NotResponding,
    /// The operator took it out of service: no new VMs.
    Maintenance,
    /// DPM powered it down (or is emptying it to do so): no new VMs; it wakes when capacity is
    /// needed.
    Standby,
}

/// A host as the API shows it: the record, its state, and what is placed on it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostInfo {
    #[serde(flatten)]
    pub host: Host,
    pub state: HostState,
    /// Since when the host has not responded (its last heartbeat), when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_responding_since: Option<DateTime<Utc>>,
    /// vCPUs and memory held on the host by the VMs placed there that run or are to run (a stopped
    /// VM holds none: its start is admitted against what is free then).
    pub allocated_cpus: u32,
    pub allocated_memory_bytes: u64,
    /// vCPUs and memory of the VMs running on the host now.
    pub used_cpus: u32,
    pub used_memory_bytes: u64,
    /// VMs placed on the host, as "project/name".
    pub vms: Vec<String>,
    /// What HA failure detection sees of the host, when the controller watches it: "live",
    /// "isolated from the controller", "failed since ...".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<String>,
    /// The isolation response the host's agent applies, as it last reported it (a change to the
    /// cluster's setting reaches each agent with the answer to its next report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation_response: Option<crate::IsolationResponse>,
}

/// How the cluster places VMs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PlacementPolicy {
    /// Balance load across hosts.
    Spread,
    /// Fill hosts before using new ones.
    Pack,
}

/// Cluster-wide placement settings (`GET`/`PUT /api/v1/cluster`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ClusterSettings {
    pub placement: PlacementPolicy,
    /// vCPUs that may be allocated per host CPU (0.1 to 64).
    #[schema(minimum = 0.1, maximum = 64.0)]
    pub cpu_overcommit: f64,
    /// Memory that may be allocated per byte of host memory (0.1 to 64).
    #[schema(minimum = 0.1, maximum = 64.0)]
    pub memory_overcommit: f64,
    /// Cap on one live migration's stream, bytes per second; none: as fast as the link goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1048576, maximum = 1099511627776_u64)]
    pub migration_bandwidth_bytes: Option<u64>,
    /// The longest pause of a guest at the switchover of a live migration (QEMU's default: 300).
    #[serde(default = "default_downtime_ms")]
    #[schema(minimum = 1, maximum = 60000)]
    pub migration_downtime_limit_ms: u64,
    /// When a guest dirties memory faster than the link sends it, slow its vCPUs down until the copy
    /// converges (QEMU's auto-converge). Off: such a migration fails after its timeout and the guest
    /// stays, at full speed, on its source.
    #[serde(default = "yes")]
    pub migration_auto_converge: bool,
    /// HA admission control: keep enough capacity to restart every protected VM after this many
    /// hosts fail (the largest ones). 0: no reservation.
    #[serde(default)]
    pub ha_host_failures_to_tolerate: u32,
    /// What a host cut off from the controller and from all its peers does with its protected VMs.
    #[serde(default)]
    pub ha_isolation_response: crate::IsolationResponse,
    /// DRS: balance measured load across hosts by live migration (off, manual or auto).
    #[serde(default)]
    pub drs_mode: crate::DrsMode,
    /// 1 (move only for gross imbalance) to 5 (even out small differences).
    #[serde(default = "default_aggressiveness")]
    #[schema(minimum = 1, maximum = 5)]
    pub drs_aggressiveness: u8,
    /// DPM: with auto, DRS plans name the hosts that could go to standby (reported only: Corral
    /// cannot power hosts yet).
    #[serde(default)]
    pub power_management: crate::PowerManagement,
}

fn default_aggressiveness() -> u8 {
    3
}

fn yes() -> bool {
    true
}

fn default_downtime_ms() -> u64 {
    50
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            placement: PlacementPolicy::Spread,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            migration_bandwidth_bytes: None,
            migration_downtime_limit_ms: default_downtime_ms(),
            migration_auto_converge: true,
            ha_host_failures_to_tolerate: 0,
            ha_isolation_response: Default::default(),
            drs_mode: Default::default(),
            drs_aggressiveness: default_aggressiveness(),
            power_management: Default::default(),
        }
    }
}

impl ClusterSettings {
    pub fn validate(&self) -> Result<(), crate::ValidationError> {
        for (what, v) in [
            ("cpu_overcommit", self.cpu_overcommit),
            ("memory_overcommit", self.memory_overcommit),
        ] {
            if !(v.is_finite() && (0.1..=64.0).contains(&v)) {
                return Err(crate::ValidationError::new(format!(
                    "{what} {v} is out of range: use a ratio between 0.1 and 64 (1 means no overcommit)"
                )));
            }
        }
        if self.migration_bandwidth_bytes.is_some_and(|b| b < 1 << 20) {
            return Err(crate::ValidationError::new(
                "migration_bandwidth_bytes below 1 MiB/s would never finish a migration: give at least 1M, or none for no cap",
            ));
        }
        if self.migration_bandwidth_bytes.is_some_and(|b| b > 1 << 40) {
            return Err(crate::ValidationError::new(
                "migration_bandwidth_bytes above 1 TiB/s is no cap at all: give at most 1T, or none for no cap",
            ));
        }
        if !(1..=5).contains(&self.drs_aggressiveness) {
            return Err(crate::ValidationError::new(format!(
                "drs_aggressiveness {} is out of range: use 1 (move only for gross imbalance) to 5 (even out small differences)",
                self.drs_aggressiveness
            )));
        }
        if !(1..=60_000).contains(&self.migration_downtime_limit_ms) {
            return Err(crate::ValidationError::new(format!(
                "migration_downtime_limit_ms {} is out of range: use 1 to 60000 (50 keeps guests responsive)",
                self.migration_downtime_limit_ms
            )));
        }
        Ok(())
    }
}

/// Answer of `PUT /api/v1/hosts/{name}/maintenance`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MaintenanceResponse {
    pub host: HostInfo,
    /// When entering: the evacuation, done once no VM runs on the host any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<crate::Task>,
}
