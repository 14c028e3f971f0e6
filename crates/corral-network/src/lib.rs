//! Host networking for Corral's distributed virtual switch.
//!
//! A network is defined once for the cluster; each host makes it real only while it runs (or
//! receives) a VM on it: a Linux bridge per network, an uplink to the other hosts (a VXLAN device
//! with forwarding entries written from the control plane's knowledge of where every VM runs, no
//! multicast and no learning; or a VLAN on the fabric interface), a tap per VM NIC, a DHCP server
//! (dnsmasq) that hands each VM the address the controller chose, and an nftables ruleset with
//! the VMs' security groups.
//!
//! [`plan`] is pure: from the cluster's objects it computes everything this host should have
//! ([`HostPlan`]). A [`NetDriver`] makes a host look like a plan, idempotently; [`LinuxNet`] is the
//! real one (iproute2, nftables, dnsmasq). The agent re-plans on every change of VMs, migrations,
//! networks, groups or hosts and hands the plan to the driver.
//!
//! Every host's bridge for a network carries the network's first address with the same MAC (an
//! anycast gateway): DHCP and the optional NAT gateway are always local to the host a VM runs on,
//! and never cross the overlay, so a migrated VM finds the same gateway on its new host.

mod linux;
mod nft;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use corral_api::{
    Host, Migration, Network, PowerState, SecurityGroup, Segment, Vm, VmPhase,
    DEFAULT_SECURITY_GROUP,
};

pub use linux::LinuxNet;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what} failed: {message}")]
    Command { what: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}: {message}")]
    Io { what: String, message: String },
}

impl NetError {
    pub fn io(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        NetError::Io {
            what: what.into(),
            message: e.to_string(),
        }
    }
}

/// Makes a host's networking look like a plan.
#[async_trait]
pub trait NetDriver: Send + Sync + std::fmt::Debug {
    /// Creates, changes and removes what differs from the plan; what already matches is left
    /// alone, so applying one plan twice does nothing the second time.
    async fn apply(&self, plan: &HostPlan) -> Result<(), NetError>;
    /// Creates the taps of a VM about to start (and their bridges), links down: a NIC's link
    /// comes up only when [`NetDriver::apply`] has put its firewall in place.
    async fn prepare_ports(&self, ports: &[PortPlan]) -> Result<(), NetError>;
}

/// How a network leaves the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uplink {
    /// A VXLAN device (UDP 4789 from the host's fabric address).
    Vxlan { dev: String, vni: u32 },
    /// A VLAN on the interface that holds the host's fabric address.
    Vlan { dev: String, id: u16 },
}

/// A VM seen by the DHCP server of a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub name: String,
}

/// One network as it should be on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPlan {
    /// `project/name`, for messages.
    pub name: String,
    pub bridge: String,
    pub uplink: Uplink,
    pub cidr: String,
    pub prefix: u8,
    /// The network's first address, on the bridge.
    pub gateway: Ipv4Addr,
    /// The bridge's MAC: the same on every host.
    pub gateway_mac: String,
    pub mtu: u32,
    /// Route and masquerade the network's outbound traffic.
    pub nat: bool,
    /// Other hosts (fabric addresses) that take broadcasts and unknown destinations (VXLAN only).
    pub flood: BTreeSet<IpAddr>,
    /// Where each remote VM's MAC lives (VXLAN only). A VM that is migrating has no entry: its
    /// frames flood to both ends, so the switch-over needs no update in the data path.
    pub macs: BTreeMap<String, IpAddr>,
    pub dhcp: Vec<DhcpHost>,
}

/// One VM NIC on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPlan {
    pub tap: String,
    pub bridge: String,
    /// The bridge's way out (made with the tap, so a host that cannot make it fails the VM's
    /// start with the reason).
    pub uplink: Uplink,
    pub mtu: u32,
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// Everything this host's networking should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostPlan {
    pub networks: Vec<NetPlan>,
    pub ports: Vec<PortPlan>,
    /// The nftables ruleset (empty when the host carries no network).
    pub ruleset: String,
    /// IPv4 forwarding is needed (a network with a gateway).
    pub forwarding: bool,
}

impl HostPlan {
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.ports.is_empty()
    }
}

/// What the planner reads: the cluster as the store has it.
pub struct Cluster<'a> {
    pub host: &'a str,
    pub vms: &'a [Vm],
    pub migrations: &'a [Migration],
    pub networks: &'a [Network],
    pub groups: &'a [SecurityGroup],
    pub hosts: &'a [Host],
}

/// The tap of NIC `index` of the VM with `uid`: 13 characters, the same on every host.
pub fn tap_name(uid: uuid::Uuid, index: usize) -> String {
    format!("ct{}{}", &uid.simple().to_string()[..10], index)
}

/// The bridge of a network: the same on every host.
pub fn bridge_name(segment: &Segment) -> String {
    match segment {
        Segment::Vxlan { vni } => format!("crbx{vni}"),
        Segment::Vlan { id } => format!("crbv{id}"),
    }
}

fn uplink(segment: &Segment) -> Uplink {
    match *segment {
        Segment::Vxlan { vni } => Uplink::Vxlan {
            dev: format!("cvx{vni}"),
            vni,
        },
        Segment::Vlan { id } => Uplink::Vlan {
            dev: format!("cvl{id}"),
            id,
        },
    }
}

/// The MAC of a network's bridge (locally administered, from the segment id).
fn gateway_mac(segment: &Segment) -> String {
    let (kind, id) = match *segment {
        Segment::Vxlan { vni } => (0xc0u8, vni),
        Segment::Vlan { id } => (0xc1u8, u32::from(id)),
    };
    format!(
        "02:{kind:02x}:00:{:02x}:{:02x}:{:02x}",
        (id >> 16) & 0xff,
        (id >> 8) & 0xff,
        id & 0xff
    )
}

/// The ports of one VM on this host (its NICs), as `prepare_ports` wants them.
pub fn ports_of(vm: &Vm, networks: &[Network]) -> Vec<PortPlan> {
    vm.spec
        .nics
        .iter()
        .enumerate()
        .filter_map(|(i, nic)| {
            let net = networks
                .iter()
                .find(|n| n.meta.project == vm.meta.project && n.meta.name == nic.network)?;
            Some(PortPlan {
                tap: tap_name(vm.meta.uid, i),
                bridge: bridge_name(&net.spec.segment),
                uplink: uplink(&net.spec.segment),
                mtu: net.mtu(),
                mac: nic.mac.clone(),
                ip: nic.ip.parse().ok()?,
            })
        })
        .collect()
}

/// Computes what this host's networking should be.
pub fn plan(c: &Cluster) -> HostPlan {
    let moving: HashMap<uuid::Uuid, &Migration> = c
        .migrations
        .iter()
        .filter(|m| !m.phase.is_finished())
        .map(|m| (m.vm_uid, m))
        .collect();
    let arriving = |vm: &Vm| moving.get(&vm.meta.uid).is_some_and(|m| m.target == c.host);
    let arriving_anywhere = |vm: &Vm| moving.contains_key(&vm.meta.uid);
    // A VM that neither runs nor should run here needs no port (a stopped VM keeps its address,
    // and gets its port back when it starts).
    let live = |v: &Vm| {
        v.spec.power == PowerState::Running
            || matches!(v.status.phase, VmPhase::Running | VmPhase::Stopping)
    };
    let local: Vec<&Vm> = c
        .vms
        .iter()
        .filter(|v| !v.spec.nics.is_empty())
        .filter(|v| (v.status.host.as_deref() == Some(c.host) && live(v)) || arriving(v))
        .collect();
    let address: HashMap<&str, IpAddr> = c
        .hosts
        .iter()
        .filter_map(|h| Some((h.name.as_str(), h.status.address?)))
        .collect();
    let mut ports: Vec<PortPlan> = local.iter().flat_map(|v| ports_of(v, c.networks)).collect();
    ports.sort_by(|a, b| a.tap.cmp(&b.tap));
    let mut networks = Vec::new();
    for net in c.networks {
        let on = |v: &Vm| {
            v.meta.project == net.meta.project
                && v.spec.nics.iter().any(|n| n.network == net.meta.name)
        };
        if !local.iter().any(|v| on(v)) {
            continue;
        }
        let cidr = net.cidr();
        let mut flood = BTreeSet::new();
        let mut macs = BTreeMap::new();
        let mut dhcp = Vec::new();
        for vm in c.vms.iter().filter(|v| on(v)) {
            let nics = vm.spec.nics.iter().filter(|n| n.network == net.meta.name);
            for nic in nics.clone() {
                if let Ok(ip) = nic.ip.parse() {
                    dhcp.push(DhcpHost {
                        mac: nic.mac.clone(),
                        ip,
                        name: vm.meta.name.clone(),
                    });
                }
            }
            // Only where a VM runs (or should) do its frames go: a host with only stopped VMs of
            // the network carries nothing for it.
            if !matches!(net.spec.segment, Segment::Vxlan { .. })
                || !(live(vm) || arriving_anywhere(vm))
            {
                continue;
            }
            let migration = moving.get(&vm.meta.uid);
            let ends = vm
                .status
                .host
                .iter()
                .map(String::as_str)
                .chain(migration.map(|m| m.target.as_str()));
            for h in ends.filter(|h| *h != c.host) {
                if let Some(a) = address.get(h) {
                    flood.insert(*a);
                }
            }
            let running_elsewhere = vm.status.host.as_deref().filter(|h| *h != c.host);
            if let (None, Some(a)) = (migration, running_elsewhere.and_then(|h| address.get(h))) {
                for nic in nics {
                    macs.insert(nic.mac.clone(), *a);
                }
            }
        }
        dhcp.sort_by_key(|h| h.ip);
        networks.push(NetPlan {
            name: format!("{}/{}", net.meta.project, net.meta.name),
            bridge: bridge_name(&net.spec.segment),
            uplink: uplink(&net.spec.segment),
            cidr: net.spec.cidr.clone(),
            prefix: cidr.prefix,
            gateway: cidr.gateway(),
            gateway_mac: gateway_mac(&net.spec.segment),
            mtu: net.mtu(),
            nat: net.spec.gateway,
            flood,
            macs,
            dhcp,
        });
    }
    networks.sort_by(|a, b| a.bridge.cmp(&b.bridge));
    let ruleset = if networks.is_empty() {
        String::new()
    } else {
        let mut fabric: Vec<IpAddr> = address.values().copied().collect();
        fabric.sort();
        fabric.dedup();
        nft::ruleset(&networks, &ports, &firewall(c, &local), &fabric)
    };
    HostPlan {
        forwarding: networks.iter().any(|n| n.nat),
        networks,
        ports,
        ruleset,
    }
}

/// An allow rule rendered for one NIC: who the peer is, already resolved to addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Allow {
    pub inbound: bool,
    pub protocol: corral_api::Protocol,
    pub ports: Option<corral_api::PortRange>,
    /// `None`: any address.
    pub peers: Option<Vec<String>>,
}

/// The allow rules of each local tap, from the security groups of its VM.
fn firewall(c: &Cluster, local: &[&Vm]) -> HashMap<String, Vec<Allow>> {
    let group = |project: &str, name: &str| -> Option<SecurityGroup> {
        c.groups
            .iter()
            .find(|g| g.meta.project == project && g.meta.name == name)
            .cloned()
            .or_else(|| {
                (name == DEFAULT_SECURITY_GROUP).then(|| SecurityGroup::builtin_default(project))
            })
    };
    let members = |project: &str, name: &str| -> Vec<String> {
        let mut ips: Vec<String> = c
            .vms
            .iter()
            .filter(|v| {
                v.meta.project == project && v.spec.security_groups.iter().any(|g| g == name)
            })
            .flat_map(|v| v.spec.nics.iter().map(|n| n.ip.clone()))
            .collect();
        ips.sort();
        ips.dedup();
        ips
    };
    let mut out = HashMap::new();
    for vm in local {
        let project = vm.meta.project.as_str();
        let mut allows = Vec::new();
        for g in vm
            .spec
            .security_groups
            .iter()
            .filter_map(|g| group(project, g))
        {
            for r in &g.rules {
                let peers = match (&r.cidr, &r.group) {
                    (Some(cidr), _) if cidr == "0.0.0.0/0" => None,
                    (Some(cidr), _) => Some(vec![cidr.clone()]),
                    (None, Some(g)) => Some(members(project, g)),
                    (None, None) => continue,
                };
                // A group without members allows nothing.
                if peers.as_ref().is_some_and(Vec::is_empty) {
                    continue;
                }
                allows.push(Allow {
                    inbound: r.direction == corral_api::Direction::In,
                    protocol: r.protocol,
                    ports: r.ports,
                    peers,
                });
            }
        }
        for i in 0..vm.spec.nics.len() {
            out.insert(tap_name(vm.meta.uid, i), allows.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests;
