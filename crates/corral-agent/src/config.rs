//! How a host agent runs: its name, data directory, hypervisor, fabric address, and the drivers
//! and HA state its loops share.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_api::Accel;

/// How often an agent that reports to the failure detector rewrites its host record.
pub const HEARTBEAT_WITH_REPORTS: Duration = Duration::from_secs(30);

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This host's name in the cluster.
    pub host: String,
    pub data_dir: PathBuf,
    pub accel: Accel,
    /// What the hypervisor reports of its version.
    pub hypervisor: String,
    /// How long a guest gets to shut down after the ACPI power button before it is powered off.
    pub stop_timeout: Duration,
    /// How often every VM is reconciled even when nothing changed (catches crashed guests).
    pub resync: Duration,
    /// Where VMs migrating to this host are received: this host's address on the fabric.
    pub address: std::net::IpAddr,
    /// What the HA loops share with the VM workers (storage lease, fencing).
    pub ha: Arc<crate::ha::HaState>,
    /// Makes this host's bridges, tunnels, taps, DHCP and firewall what the networks ask for.
    pub network: Arc<dyn corral_network::NetDriver>,
}
