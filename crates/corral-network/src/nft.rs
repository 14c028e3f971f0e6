//! The nftables ruleset of a host, as text for `nft -f`.
//!
//! Two tables, both replaced whole in one `nft` transaction:
//! - `bridge corral` sees each bridge port: a VM NIC may send only from its own MAC and address
//!   (DHCP requests from 0.0.0.0 aside), frames of taps without rules go nowhere, and DHCP and the
//!   hosts' gateway MAC never cross an uplink.
//! - `inet corral` is stateful (conntrack; bridged IPv4 reaches it through br_netfilter, with the
//!   bridge as the interface): each NIC's security-group rules, keyed by bridge and address (both
//!   trustworthy after the anti-spoofing above), isolation between networks, what guests may ask
//!   of the host itself (DHCP, ping), and the NAT of networks with a gateway.

use std::collections::HashMap;
use std::fmt::Write;

use corral_api::Protocol;

use crate::{Allow, NetPlan, PortPlan};

/// The table name in both families.
pub const TABLE: &str = "corral";

fn rule_text(a: &Allow, verdict: &str) -> String {
    let mut s = String::new();
    if let Some(peers) = &a.peers {
        let dir = if a.inbound { "saddr" } else { "daddr" };
        let _ = write!(s, "ip {dir} {{ {} }} ", peers.join(", "));
    }
    let range = a.ports.map(|p| {
        if p.first == p.last {
            p.first.to_string()
        } else {
            format!("{}-{}", p.first, p.last)
        }
    });
    match (a.protocol, range) {
        (Protocol::Tcp, Some(r)) => {
            let _ = write!(s, "tcp dport {r} ");
        }
        (Protocol::Udp, Some(r)) => {
            let _ = write!(s, "udp dport {r} ");
        }
        (Protocol::Tcp, None) => s.push_str("meta l4proto tcp "),
        (Protocol::Udp, None) => s.push_str("meta l4proto udp "),
        (Protocol::Icmp, _) => s.push_str("meta l4proto icmp "),
        (Protocol::Any, _) => {}
    }
    s.push_str(verdict);
    s
}

pub(crate) fn ruleset(
    networks: &[NetPlan],
    ports: &[PortPlan],
    allows: &HashMap<String, Vec<Allow>>,
    fabric: &[std::net::IpAddr],
) -> String {
    let mut b = String::new();
    let w = &mut b;
    // Declaring the tables first makes the deletes valid on a host that has none yet.
    let _ = writeln!(w, "table bridge {TABLE}\ndelete table bridge {TABLE}");
    let _ = writeln!(w, "table inet {TABLE}\ndelete table inet {TABLE}");

    let _ = writeln!(w, "table bridge {TABLE} {{");
    let _ = writeln!(
        w,
        "  chain prerouting {{\n    type filter hook prerouting priority filter; policy accept;"
    );
    for p in ports {
        let _ = writeln!(w, "    iifname \"{}\" jump port_{}", p.tap, p.tap);
    }
    let _ = writeln!(w, "    iifname \"ct*\" drop");
    for n in networks {
        let dev = uplink_dev(n);
        let _ = writeln!(w, "    iifname \"{dev}\" udp dport {{ 67, 68 }} drop");
        let _ = writeln!(
            w,
            "    iifname \"{dev}\" ether saddr {} drop",
            n.gateway_mac
        );
    }
    let _ = writeln!(w, "  }}");
    let _ = writeln!(
        w,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
    );
    for n in networks {
        let _ = writeln!(
            w,
            "    oifname \"{}\" udp dport {{ 67, 68 }} drop",
            uplink_dev(n)
        );
    }
    for p in ports {
        let _ = writeln!(w, "    oifname \"{}\" accept", p.tap);
    }
    let _ = writeln!(w, "    oifname \"ct*\" drop\n  }}");
    let _ = writeln!(
        w,
        "  chain output {{\n    type filter hook output priority filter; policy accept;"
    );
    for n in networks {
        let _ = writeln!(
            w,
            "    oifname \"{}\" ether saddr {} drop",
            uplink_dev(n),
            n.gateway_mac
        );
    }
    let _ = writeln!(w, "  }}");
    for p in ports {
        let _ = writeln!(
            w,
            "  chain port_{tap} {{\n    ether saddr != {mac} drop\n    udp sport 67 drop\n    ether type arp arp saddr ether != {mac} drop\n    ether type arp arp saddr ip {{ {ip}, 0.0.0.0 }} accept\n    ether type arp drop\n    ip saddr 0.0.0.0 udp dport 67 accept\n    ip saddr {ip} accept\n    drop\n  }}",
            tap = p.tap,
            mac = p.mac,
            ip = p.ip
        );
    }
    let _ = writeln!(w, "}}");

    let _ = writeln!(w, "table inet {TABLE} {{");
    let _ = writeln!(
        w,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    ct state established,related accept"
    );
    // Guests never reach the hosts' fabric (APIs, migration streams) nor speak VXLAN, which a
    // host would take from any peer address and deliver into any segment.
    if !fabric.is_empty() {
        let list: Vec<String> = fabric.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            w,
            "    iifname \"crb*\" ip daddr {{ {} }} drop",
            list.join(", ")
        );
    }
    let _ = writeln!(w, "    iifname \"crb*\" udp dport 4789 drop");
    // Broadcasts and multicasts between guests would pass no VM's inbound rules.
    let _ = writeln!(w, "    oifname \"crb*\" meta pkttype != unicast drop");
    for n in networks {
        let br = &n.bridge;
        // Isolation next: bridged traffic has the bridge as both interfaces, anything else was
        // routed, and nothing is routed into a network or between networks.
        let _ = writeln!(w, "    oifname \"{br}\" iifname != \"{br}\" drop");
        if n.nat {
            let _ = writeln!(
                w,
                "    iifname \"{br}\" oifname \"crb*\" oifname != \"{br}\" drop"
            );
        } else {
            let _ = writeln!(w, "    iifname \"{br}\" oifname != \"{br}\" drop");
        }
    }
    // Every sender's outbound rules before any receiver's inbound ones: an inbound accept ends
    // the evaluation.
    for p in ports {
        let _ = writeln!(
            w,
            "    iifname \"{}\" ip saddr {} jump out_{}",
            p.bridge, p.ip, p.tap
        );
    }
    for p in ports {
        let _ = writeln!(
            w,
            "    oifname \"{}\" ip daddr {} jump in_{}",
            p.bridge, p.ip, p.tap
        );
    }
    let _ = writeln!(w, "  }}");
    // Guests may ask their host for DHCP, and ping the gateway of a network that has one (its
    // addresses are unique in the cluster, so the reply cannot leave by another network).
    let _ = writeln!(
        w,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    iifname \"crb*\" ct state established,related accept\n    iifname \"crb*\" udp dport 67 accept"
    );
    for n in networks.iter().filter(|n| n.nat) {
        let _ = writeln!(
            w,
            "    iifname \"{}\" icmp type echo-request accept",
            n.bridge
        );
    }
    let _ = writeln!(w, "    iifname \"crb*\" drop\n  }}");
    let _ = writeln!(
        w,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
    );
    for n in networks.iter().filter(|n| n.nat) {
        let _ = writeln!(w, "    ip saddr {} oifname != \"crb*\" masquerade", n.cidr);
    }
    let _ = writeln!(w, "  }}");
    for p in ports {
        let rules = allows.get(&p.tap).map(Vec::as_slice).unwrap_or_default();
        let _ = writeln!(w, "  chain in_{} {{", p.tap);
        for a in rules.iter().filter(|a| a.inbound) {
            let _ = writeln!(w, "    {}", rule_text(a, "accept"));
        }
        let _ = writeln!(w, "    drop\n  }}");
        let _ = writeln!(w, "  chain out_{} {{", p.tap);
        for a in rules.iter().filter(|a| !a.inbound) {
            let _ = writeln!(w, "    {}", rule_text(a, "return"));
        }
        let _ = writeln!(w, "    drop\n  }}");
    }
    let _ = writeln!(w, "}}");
    b
}

fn uplink_dev(n: &NetPlan) -> &str {
    match &n.uplink {
        crate::Uplink::Vxlan { dev, .. } | crate::Uplink::Vlan { dev, .. } => dev,
    }
}
