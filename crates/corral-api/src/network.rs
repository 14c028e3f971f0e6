//! Networks (a distributed virtual switch: one definition for the whole cluster, a VXLAN segment or a
//! VLAN on every host that runs a VM on it), VM NICs with their addresses, and security groups.
//!
//! Address management is pure and lives here, so the controller that hands out addresses and the
//! tests that check them agree on what a network's usable addresses are.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_name, ObjectMeta, ValidationError};

/// Bytes VXLAN adds to every frame (outer Ethernet, IPv4, UDP and VXLAN headers): guests on an
/// overlay get this much less than the fabric's 1500.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The MTU a guest NIC gets on an overlay network (handed out by DHCP).
pub const OVERLAY_MTU: u32 = 1500 - VXLAN_OVERHEAD;
/// Most NICs a VM may have (host tap names carry the index as one digit).
pub const MAX_NICS: usize = 8;
/// The security group every project has; VMs created without `--security-group` are in it.
pub const DEFAULT_SECURITY_GROUP: &str = "default";

/// An IPv4 network in CIDR notation, with its host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses "10.10.0.0/24". Networks Corral manages are /8 to /29: smaller ones leave no room.
    pub fn parse(s: &str) -> Result<Cidr, ValidationError> {
        let bad = || {
            ValidationError::new(format!(
                "{s:?} is not a network Corral can manage: give an IPv4 network in CIDR notation from /8 to /29 with its host bits zero, e.g. 10.10.0.0/24"
            ))
        };
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let base: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        // Digits only, no leading zero: the string is stored and handed to dnsmasq and nft.
        let canonical = !prefix.is_empty()
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && !(prefix.len() > 1 && prefix.starts_with('0'));
        if !canonical {
            return Err(bad());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=29).contains(&prefix) {
            return Err(bad());
        }
        let cidr = Cidr { base, prefix };
        if u32::from(base) & !cidr.mask() != 0 {
            return Err(ValidationError::unprocessable(format!(
                "{s:?} has host bits set: the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(base) & cidr.mask())
            )));
        }
        Ok(cidr)
    }

    pub fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.base) & mask == u32::from(other.base) & mask
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.base)
    }

    /// The first host address: the hosts' side of the network (DHCP server and, when enabled,
    /// the NAT gateway). Never given to a VM.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) | !self.mask())
    }

    /// Whether a VM may have this address: inside, and neither the network, the broadcast nor the
    /// gateway address.
    pub fn check_vm_address(&self, ip: Ipv4Addr) -> Result<(), ValidationError> {
        if !self.contains(ip) {
            return Err(ValidationError::new(format!(
                "address {ip} is not in network {self}: pick one inside it, or leave out ip= to get one"
            )));
        }
        if ip == self.base || ip == self.broadcast() || ip == self.gateway() {
            return Err(ValidationError::new(format!(
                "address {ip} is reserved in {self} (network, broadcast or the hosts' gateway {}): pick another",
                self.gateway()
            )));
        }
        Ok(())
    }

    /// The addresses VMs may get, lowest first.
    pub fn vm_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.gateway()) + 1;
        let last = u32::from(self.broadcast());
        (first..last).map(Ipv4Addr::from)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// How a network's frames travel between hosts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Segment {
    /// A VXLAN overlay on the host fabric, forwarding entries kept by the control plane.
    Vxlan { vni: u32 },
    /// An 802.1Q VLAN on each host's fabric interface (the physical switches carry it).
    Vlan { id: u16 },
}

/// The desired state of a network.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NetworkSpec {
    /// IPv4 network, e.g. "10.10.0.0/24".
    pub cidr: String,
    /// Route and NAT (masquerade) the network's outbound traffic through each host's own uplink.
    pub gateway: bool,
    pub segment: Segment,
}

/// A network: defined once for the cluster, present on every host that runs a VM on it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Network {
    pub meta: ObjectMeta,
    pub spec: NetworkSpec,
    /// VMs attached (filled in by the API when it answers; never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<Vec<AttachedNic>>,
}

impl Network {
    /// The network's CIDR (validated when the network was created).
    pub fn cidr(&self) -> Cidr {
        Cidr::parse(&self.spec.cidr).unwrap_or(Cidr {
            base: Ipv4Addr::UNSPECIFIED,
            prefix: 32,
        })
    }

    /// The MTU guests get: the fabric's less the overlay's headers.
    pub fn mtu(&self) -> u32 {
        match self.spec.segment {
            Segment::Vxlan { .. } => OVERLAY_MTU,
            Segment::Vlan { .. } => 1500,
        }
    }
}

/// A VM NIC on a network, as `network show` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AttachedNic {
    pub vm: String,
    pub mac: String,
    pub ip: String,
}

/// Body of `POST /api/v1/projects/{project}/networks`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateNetworkRequest {
    /// A DNS label: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    /// IPv4 network, e.g. "10.10.0.0/24", /8 to /29 with its host bits zero; its first address
    /// is the hosts' gateway.
    #[schema(
        pattern = "^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])/([89]|[12][0-9])$"
    )]
    pub cidr: String,
    /// NAT the network's outbound traffic through the host it leaves from.
    #[serde(default)]
    pub gateway: bool,
    /// Carry the network on this VLAN of the hosts' fabric instead of a VXLAN overlay.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 4094)]
    pub vlan: Option<u16>,
}

impl CreateNetworkRequest {
    pub fn validate(&self) -> Result<Cidr, ValidationError> {
        validate_name("network", &self.name)?;
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(ValidationError::new(format!(
                    "VLAN {v} does not exist: give an id from 1 to 4094"
                )));
            }
        }
        Cidr::parse(&self.cidr)
    }
}

/// A VM's NIC: stable for the VM's life, so it keeps MAC and address wherever it runs.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Nic {
    pub network: String,
    /// e.g. "52:54:00:12:34:56".
    pub mac: String,
    pub ip: String,
}

/// A NIC as asked for in `CreateVmRequest`: the address and MAC are chosen when absent.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NicRequest {
    pub network: String,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
}

impl NicRequest {
    /// Parses the CLI's `NETWORK[,ip=A.B.C.D][,mac=XX:..]`.
    pub fn parse(s: &str) -> Result<NicRequest, ValidationError> {
        let mut parts = s.split(',');
        let network = parts.next().unwrap_or_default().to_string();
        let mut nic = NicRequest {
            network,
            ip: None,
            mac: None,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("ip", v)) => nic.ip = Some(v.to_string()),
                Some(("mac", v)) => nic.mac = Some(v.to_string()),
                _ => {
                    return Err(ValidationError::new(format!(
                        "NIC {s:?}: {p:?} is not understood; write NETWORK[,ip=A.B.C.D][,mac=52:54:00:..]"
                    )))
                }
            }
        }
        nic.validate()?;
        Ok(nic)
    }

    /// Checks the parts that do not depend on the network.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("network", &self.network)?;
        if let Some(ip) = &self.ip {
            ip.parse::<Ipv4Addr>().map_err(|_| {
                ValidationError::new(format!(
                    "{ip:?} is not an IPv4 address: write e.g. ip=10.10.0.5"
                ))
            })?;
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac)?;
        }
        Ok(())
    }
}

/// Parses a rule's peer: an address ("192.0.2.7") or a network ("10.0.0.0/8", "0.0.0.0/0"),
/// returning it in CIDR form.
pub fn parse_peer(s: &str) -> Result<String, ValidationError> {
    let bad = || {
        ValidationError::new(format!(
            "{s:?} is not an address or network: write e.g. 192.0.2.7, 10.0.0.0/8 or 0.0.0.0/0"
        ))
    };
    let (ip, prefix) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    // Digits only: Rust's parser also takes "+8".
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    if u32::from(ip) & !mask != 0 {
        return Err(ValidationError::unprocessable(format!(
            "{s:?} has host bits set: the network is {}/{prefix}",
            Ipv4Addr::from(u32::from(ip) & mask)
        )));
    }
    Ok(format!("{ip}/{prefix}"))
}

/// Parses a unicast MAC address "52:54:00:12:34:56" (lower case on the way out).
pub fn parse_mac(s: &str) -> Result<String, ValidationError> {
    let bad = || {
        ValidationError::new(format!(
            "{s:?} is not a unicast MAC address: write six hex pairs with colons, first octet even, e.g. 52:54:00:12:34:56"
        ))
    };
    let octets: Vec<u8> = s
        .split(':')
        .map(|o| {
            if o.len() == 2 {
                u8::from_str_radix(o, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    if octets.len() != 6 || octets[0] & 1 == 1 || octets.iter().all(|o| *o == 0) {
        return Err(bad());
    }
    if octets[0] == 0x02 && matches!(octets[1], 0xc0 | 0xc1) {
        return Err(ValidationError::new(format!(
            "{s:?} is in the range 02:c0/02:c1 Corral gives the hosts' gateways: pick another MAC"
        )));
    }
    Ok(s.to_ascii_lowercase())
}

/// The MAC Corral gives NIC `index` of the VM with `uid` (QEMU's 52:54:00 prefix), `attempt`
/// varying it when it collides with another NIC on the network.
pub fn generated_mac(uid: uuid::Uuid, index: usize, attempt: u32) -> String {
    let b = uid.as_bytes();
    let x = u32::from_be_bytes([0, b[13], b[14], b[15]])
        .wrapping_add(index as u32 * 0x010101)
        .wrapping_add(attempt.wrapping_mul(0x9e3779))
        & 0xff_ffff;
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        x >> 16,
        (x >> 8) & 0xff,
        x & 0xff
    )
}

/// Which way a security rule looks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic to the VM.
    In,
    /// Traffic from the VM.
    Out,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// A range of TCP or UDP ports, both ends included.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PortRange {
    #[schema(minimum = 1, maximum = 65535)]
    pub first: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub last: u16,
}

/// One allow rule of a security group. Whatever no rule allows is dropped; replies to allowed
/// traffic always pass (the firewall is stateful).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SecurityRule {
    pub direction: Direction,
    pub protocol: Protocol,
    /// Port range (TCP and UDP only); all ports when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// The other side as an IPv4 address or network ("0.0.0.0/0" for anywhere)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = "^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(/0*([0-9]|[12][0-9]|3[0-2]))?$"
    )]
    pub cidr: Option<String>,
    /// ...or as the VMs of another security group of the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub group: Option<String>,
}

impl SecurityRule {
    /// Parses the CLI's form: `in|out PROTO [PORT[-PORT]] from|to CIDR|group:NAME`, e.g.
    /// "in tcp 8080 from 0.0.0.0/0", "in icmp from group:web", "out any to 0.0.0.0/0".
    pub fn parse(s: &str) -> Result<SecurityRule, ValidationError> {
        let bad = |why: &str| {
            ValidationError::new(format!(
                "rule {s:?}: {why}; write `in|out tcp|udp|icmp|any [PORT[-PORT]] from|to CIDR|group:NAME`, e.g. \"in tcp 8080 from 0.0.0.0/0\""
            ))
        };
        let words: Vec<&str> = s.split_whitespace().collect();
        let mut w = words.iter().copied();
        let direction = match w.next() {
            Some("in") => Direction::In,
            Some("out") => Direction::Out,
            _ => return Err(bad("it starts with in or out")),
        };
        let protocol = match w.next() {
            Some("any") => Protocol::Any,
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some("icmp") => Protocol::Icmp,
            _ => return Err(bad("the protocol is tcp, udp, icmp or any")),
        };
        let mut next = w.next();
        let mut ports = None;
        if let Some(p) = next.filter(|p| p.starts_with(|c: char| c.is_ascii_digit())) {
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) else {
                return Err(bad("ports are numbers from 1 to 65535"));
            };
            ports = Some(PortRange { first: a, last: b });
            next = w.next();
        }
        let want = if direction == Direction::In {
            "from"
        } else {
            "to"
        };
        if next != Some(want) {
            return Err(bad(&format!("an {} rule names its peer after {want}", {
                if direction == Direction::In {
                    "in"
                } else {
                    "out"
                }
            })));
        }
        let peer = w.next().ok_or_else(|| bad("the peer is missing"))?;
        if w.next().is_some() {
            return Err(bad("there is more after the peer"));
        }
        let (cidr, group) = match peer.strip_prefix("group:") {
            Some(g) => (None, Some(g.to_string())),
            None => (Some(parse_peer(peer)?), None),
        };
        let rule = SecurityRule {
            direction,
            protocol,
            ports,
            cidr,
            group,
        };
        rule.validate()?;
        Ok(rule)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        self.normalized().map(drop)
    }

    /// The rule as it is stored and applied: checked, with its CIDR in canonical form
    /// ("10.0.0.0/08" and "10.0.0.0/+8" become "10.0.0.0/8", which nftables takes).
    pub fn normalized(&self) -> Result<SecurityRule, ValidationError> {
        if let Some(PortRange { first: a, last: b }) = self.ports {
            if a == 0 || a > b {
                return Err(ValidationError::unprocessable(format!(
                    "port range {a}-{b} is empty: give ports from 1 to 65535, the lower first"
                )));
            }
            if !matches!(self.protocol, Protocol::Tcp | Protocol::Udp) {
                return Err(ValidationError::unprocessable(
                    "ports apply to tcp and udp only: leave them out for icmp and any",
                ));
            }
        }
        let cidr = match (&self.cidr, &self.group) {
            (Some(c), None) => Some(parse_peer(c)?),
            (None, Some(g)) => {
                validate_name("security group", g)?;
                None
            }
            _ => {
                return Err(ValidationError::unprocessable(
                    "a rule names its peer as either a CIDR or a group",
                ))
            }
        };
        Ok(SecurityRule {
            cidr,
            ..self.clone()
        })
    }
}

impl std::fmt::Display for SecurityRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = match self.direction {
            Direction::In => "in",
            Direction::Out => "out",
        };
        let proto = match self.protocol {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        };
        write!(f, "{dir} {proto}")?;
        if let Some(PortRange { first: a, last: b }) = self.ports {
            if a == b {
                write!(f, " {a}")?;
            } else {
                write!(f, " {a}-{b}")?;
            }
        }
        let word = if self.direction == Direction::In {
            "from"
        } else {
            "to"
        };
        match (&self.cidr, &self.group) {
            (Some(c), _) => write!(f, " {word} {c}"),
            (_, Some(g)) => write!(f, " {word} group:{g}"),
            _ => Ok(()),
        }
    }
}

/// A set of allow rules applied to the NICs of the VMs in it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SecurityGroup {
    pub meta: ObjectMeta,
    pub rules: Vec<SecurityRule>,
}

impl SecurityGroup {
    /// What a new group allows: everything outbound, and anything from VMs of the same group.
    pub fn new_rules(name: &str) -> Vec<SecurityRule> {
        vec![
            SecurityRule {
                direction: Direction::Out,
                protocol: Protocol::Any,
                ports: None,
                cidr: Some("0.0.0.0/0".into()),
                group: None,
            },
            SecurityRule {
                direction: Direction::In,
                protocol: Protocol::Any,
                ports: None,
                cidr: None,
                group: Some(name.to_string()),
            },
        ]
    }

    /// The project's `default` group as it is before anyone changes it (it is stored only then).
    pub fn builtin_default(project: &str) -> SecurityGroup {
        let mut meta = ObjectMeta::new(project, DEFAULT_SECURITY_GROUP);
        meta.uid = uuid::Uuid::nil();
        SecurityGroup {
            meta,
            rules: Self::new_rules(DEFAULT_SECURITY_GROUP),
        }
    }
}

/// Body of `POST /api/v1/projects/{project}/security-groups`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateSecurityGroupRequest {
    /// A DNS label: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    /// Rules besides the two every new group has (all outbound; anything from the same group).
    #[serde(default)]
    pub rules: Vec<SecurityRule>,
}

/// Body of `PUT /api/v1/projects/{project}/security-groups/{name}`: the group's rules, all of them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SetRulesRequest {
    pub rules: Vec<SecurityRule>,
    /// The generation the rules were read at: the change is refused if the group changed since.
    #[serde(default)]
    pub generation: Option<u64>,
}

/// Body of `POST /api/v1/projects`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateProjectRequest {
    /// A DNS label: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_say_what_is_wrong() {
        let c = Cidr::parse("10.10.0.0/24").unwrap();
        assert!(c.overlaps(&Cidr::parse("10.10.0.0/16").unwrap()));
        assert!(!c.overlaps(&Cidr::parse("10.11.0.0/24").unwrap()));
        assert_eq!(parse_peer("192.0.2.7").unwrap(), "192.0.2.7/32");
        assert_eq!(parse_peer("10.0.0.0/08").unwrap(), "10.0.0.0/8");
        for bad in ["10.0.0.0/+8", "10.0.0.0/-8", "10.0.0.0/", "10.0.0.0/33"] {
            assert!(parse_peer(bad).is_err(), "{bad}");
        }
        let rule = SecurityRule::parse("in tcp 8080 from 10.0.0.0/08").unwrap();
        assert_eq!(rule.cidr.as_deref(), Some("10.0.0.0/8"));
        let sent = SecurityRule {
            cidr: Some("10.0.0.0/008".into()),
            ..rule
        };
        assert_eq!(
            sent.normalized().unwrap().cidr.as_deref(),
            Some("10.0.0.0/8"),
            "what the API stores, whatever a client sent"
        );
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 10, 0, 1));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.vm_addresses().count(), 253);
        assert_eq!(c.vm_addresses().next(), Some(Ipv4Addr::new(10, 10, 0, 2)));
        assert!(Cidr::parse("10.10.0.5/24")
            .unwrap_err()
            .0
            .contains("10.10.0.0/24"));
        for bad in [
            "10.10.0.0",
            "10.10.0.0/30",
            "10.10.0.0/7",
            "x/24",
            "10.10.0.0/abc",
            "10.10.0.0/+24",
            "10.10.0.0/024",
            "10.10.0.0/",
        ] {
            assert!(Cidr::parse(bad).unwrap_err().0.contains("CIDR"), "{bad}");
        }
        assert!(c
            .check_vm_address("10.10.0.1".parse().unwrap())
            .unwrap_err()
            .0
            .contains("reserved"));
        assert!(c.check_vm_address("10.10.0.255".parse().unwrap()).is_err());
        assert!(c
            .check_vm_address("10.10.1.3".parse().unwrap())
            .unwrap_err()
            .0
            .contains("not in"));
        assert!(c.check_vm_address("10.10.0.254".parse().unwrap()).is_ok());
    }

    #[test]
    fn nics_and_macs_parse() {
        let n = NicRequest::parse("net-a,ip=10.10.0.7,mac=52:54:00:AA:bb:01").unwrap();
        assert_eq!(n.network, "net-a");
        assert_eq!(n.ip.as_deref(), Some("10.10.0.7"));
        assert!(NicRequest::parse("net-a,foo=1")
            .unwrap_err()
            .0
            .contains("foo=1"));
        assert!(NicRequest::parse("net-a,ip=10.10.0")
            .unwrap_err()
            .0
            .contains("IPv4"));
        for bad in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "52:54:00:aa:bb",
            "zz:54:00:aa:bb:cc",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let uid = uuid::Uuid::new_v4();
        let a = generated_mac(uid, 0, 0);
        assert!(parse_mac(&a).is_ok());
        assert_ne!(a, generated_mac(uid, 1, 0));
        assert_ne!(a, generated_mac(uid, 0, 1));
        assert_eq!(a, generated_mac(uid, 0, 0), "stable");
    }

    #[test]
    fn rules_round_trip_and_refuse_nonsense() {
        for text in [
            "in tcp 8080 from 0.0.0.0/0",
            "in udp 5000-5010 from 10.0.0.0/8",
            "in icmp from group:web",
            "out any to 0.0.0.0/0",
            "in tcp 22 from 192.0.2.7/32",
        ] {
            let r = SecurityRule::parse(text).unwrap();
            assert_eq!(r.to_string(), text);
        }
        for (bad, why) in [
            ("sideways tcp from 0.0.0.0/0", "in or out"),
            ("in tcp 0 from 0.0.0.0/0", "empty"),
            ("in tcp 9-8 from 0.0.0.0/0", "empty"),
            ("in icmp 22 from 0.0.0.0/0", "tcp and udp only"),
            ("in tcp 22 to 0.0.0.0/0", "after from"),
            ("in tcp 22 from 10.0.0.1/24", "host bits"),
            ("in tcp 22 from 10.0.0.300", "not an address"),
            ("in tcp 22 from group:Bad", "invalid security group name"),
            ("in tcp 70000 from 0.0.0.0/0", "numbers"),
        ] {
            let err = SecurityRule::parse(bad).unwrap_err();
            assert!(err.0.contains(why), "{bad}: {err}");
        }
    }
}
