//! `corral network` and `corral security-group`: the distributed virtual switch and its firewall.

use anyhow::Result;
use clap::Subcommand;

use super::Cx;
use crate::output;
use corral_api::{
    CreateNetworkRequest, CreateSecurityGroupRequest, Network, SecurityGroup, SecurityRule,
    SetRulesRequest,
};

#[derive(Subcommand, Debug)]
pub(crate) enum NetworkCmd {
    /// Create a network; its first address is the hosts' side (DHCP server, gateway).
    Create {
        name: String,
        /// IPv4 network, e.g. 10.10.0.0/24.
        #[arg(long)]
        cidr: String,
        /// Route the network's outbound traffic out of each host, with NAT.
        #[arg(long)]
        gateway: bool,
        /// Carry it on this VLAN of the hosts' fabric instead of a VXLAN overlay.
        #[arg(long)]
        vlan: Option<u16>,
    },
    List,
    /// Show a network and the VM NICs on it.
    Show {
        name: String,
    },
    /// Delete a network no VM is attached to.
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SecurityGroupCmd {
    /// Create a group. It allows all outbound traffic and anything from its own members, plus
    /// the rules given here.
    Create {
        name: String,
        /// An allow rule, e.g. "in tcp 22 from 0.0.0.0/0" or "in icmp from group:web"; repeatable.
        #[arg(long = "rule", value_parser = parse_rule)]
        rules: Vec<SecurityRule>,
    },
    List,
    Show {
        name: String,
    },
    /// Add an allow rule: `in|out tcp|udp|icmp|any [PORT[-PORT]] from|to CIDR|group:NAME`.
    AddRule {
        name: String,
        #[arg(value_parser = parse_rule)]
        rule: SecurityRule,
    },
    /// Remove a rule by its number in `security-group show` (1 is the first).
    RemoveRule {
        name: String,
        number: usize,
    },
    /// Delete a group no VM is in.
    Delete {
        name: String,
    },
}

fn parse_rule(s: &str) -> Result<SecurityRule, String> {
    SecurityRule::parse(s).map_err(|e| e.0)
}

pub(crate) fn run(cx: &Cx, cmd: NetworkCmd) -> Result<()> {
    let (c, p, fmt) = (cx.client, &cx.project, cx.fmt);
    match cmd {
        NetworkCmd::Create {
            name,
            cidr,
            gateway,
            vlan,
        } => {
            let n: Network = c.post(
                &format!("{p}/networks"),
                &CreateNetworkRequest {
                    name,
                    cidr,
                    gateway,
                    vlan,
                },
            )?;
            output::networks(fmt, &[n], true)
        }
        NetworkCmd::List => output::networks(
            fmt,
            &c.get::<Vec<Network>>(&format!("{p}/networks"))?,
            false,
        ),
        NetworkCmd::Show { name } => output::networks(
            fmt,
            &[c.get::<Network>(&format!("{p}/networks/{name}"))?],
            true,
        ),
        NetworkCmd::Delete { name } => super::delete(
            cx,
            &format!("{p}/networks/{name}"),
            &format!("network {name}"),
            "deleted",
        ),
    }
}

pub(crate) fn run_security_group(cx: &Cx, cmd: SecurityGroupCmd) -> Result<()> {
    let (c, p, fmt) = (cx.client, &cx.project, cx.fmt);
    let path = |name: &str| format!("{p}/security-groups/{name}");
    match cmd {
        SecurityGroupCmd::Create { name, rules } => {
            let g: SecurityGroup = c.post(
                &format!("{p}/security-groups"),
                &CreateSecurityGroupRequest { name, rules },
            )?;
            output::security_groups(fmt, &[g], true)
        }
        SecurityGroupCmd::List => output::security_groups(
            fmt,
            &c.get::<Vec<SecurityGroup>>(&format!("{p}/security-groups"))?,
            false,
        ),
        SecurityGroupCmd::Show { name } => {
            output::security_groups(fmt, &[c.get::<SecurityGroup>(&path(&name))?], true)
        }
        SecurityGroupCmd::AddRule { name, rule } => {
            let mut g: SecurityGroup = c.get(&path(&name))?;
            g.rules.push(rule);
            let body = SetRulesRequest {
                rules: g.rules,
                generation: Some(g.meta.generation),
            };
            let g: SecurityGroup = c.put_json(&path(&name), &body)?;
            output::security_groups(fmt, &[g], true)
        }
        SecurityGroupCmd::RemoveRule { name, number } => {
            let mut g: SecurityGroup = c.get(&path(&name))?;
            if number == 0 || number > g.rules.len() {
                anyhow::bail!(
                    "group {name} has rules 1 to {}: see `corral security-group show {name}`",
                    g.rules.len()
                );
            }
            g.rules.remove(number - 1);
            let body = SetRulesRequest {
                rules: g.rules,
                generation: Some(g.meta.generation),
            };
            let g: SecurityGroup = c.put_json(&path(&name), &body)?;
            output::security_groups(fmt, &[g], true)
        }
        SecurityGroupCmd::Delete { name } => super::delete(
            cx,
            &path(&name),
            &format!("security group {name}"),
            "deleted",
        ),
    }
}
