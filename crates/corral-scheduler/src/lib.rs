//! Where a VM runs. Pure and deterministic: no I/O, no clock, no randomness; the same cluster and
//! request give the same decision, so decisions can be tested exhaustively and replayed.
//!
//! A decision is filters, then scores. Filters remove hosts that must not get the VM (not
//! connected, in maintenance, not enough capacity after overcommit, a hard affinity or anti-affinity
//! rule, a pin to another host); what each filter removed is kept, so a VM that cannot be placed
//! gets a reason a user can act on. Scores order the remaining hosts by the cluster's policy
//! (`spread` or `pack`) and by soft rules; ties go to the host name, for determinism. Beyond
//! [`FULL_SCAN_HOSTS`] hosts only a sample of the hosts that fit is scored ([`SAMPLE_PERCENT`],
//! at least [`FULL_SCAN_HOSTS`]), as kube-scheduler does, so a decision stays fast at 10,000 hosts.

pub mod drs;

use std::collections::HashSet;
use std::sync::Arc;

use corral_api::format_bytes;

/// Whether a host takes new VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostState {
    Connected,
    NotResponding,
    Maintenance,
    /// Powered down by DPM (or being emptied for it).
    Standby,
}

/// What the scheduler knows of a host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostView {
    /// Shared, so that building the views of 10,000 hosts for a decision copies no name.
    pub name: Arc<str>,
    pub state: HostState,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// vCPUs and memory held by the VMs placed on the host that run (or should: see
    /// `corral_api::Vm::holds_capacity`).
    pub allocated_cpus: u32,
    pub allocated_memory: u64,
    /// vCPUs and memory of the stopped VMs placed on the host. They hold none of it; scores count
    /// them as if they ran, so that hosts stay balanced for when they start.
    pub stopped_cpus: u32,
    pub stopped_memory: u64,
    /// Names of the VMs placed on the host.
    pub vms: Vec<String>,
}

/// How VMs are spread over hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Balance load: the host with the most room left after placement.
    Spread,
    /// Fill hosts before using new ones: the fullest host that still fits.
    Pack,
}

/// Per-cluster placement settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub placement: Placement,
    /// vCPUs that may be allocated per physical CPU (1.0: none overcommitted).
    pub cpu_overcommit: f64,
    /// Memory that may be allocated per byte of host memory.
    pub memory_overcommit: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            placement: Placement::Spread,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Members run on the same host.
    Affinity,
    /// Members run on different hosts.
    AntiAffinity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strength {
    /// Hard: never broken; the VM stays pending instead.
    Must,
    /// Soft: followed when possible.
    Should,
}

/// A VM group with a placement rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    pub rule: Rule,
    pub strength: Strength,
    pub members: Vec<String>,
}

/// A VM to place.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub vm: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Pinned by the user to this host.
    pub host: Option<String>,
    /// Whether the VM is to run, so the host must have the room free. A VM created stopped holds
    /// only its disk: any host takes it, and only the score counts its size.
    pub reserve: bool,
}

/// The scheduler's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Place {
        host: String,
    },
    /// No host fits; the reason says why, in words a user can act on.
    Pending {
        reason: String,
    },
}

/// Clusters up to this size have every host scored; larger ones a sample of at least this many.
pub const FULL_SCAN_HOSTS: usize = 100;
/// The share of a large cluster's hosts scored per decision.
pub const SAMPLE_PERCENT: usize = 5;

/// FNV-1a: a stable hash (the standard library's is randomly seeded) of the VM's name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn cap(v: u64, ratio: f64) -> u64 {
    (v as f64 * ratio).floor() as u64
}

/// Free capacity of a host after overcommit: (vCPUs, bytes). Negative room counts as none.
pub fn free(policy: &Policy, h: &HostView) -> (u64, u64) {
    let cpus = cap(h.cpus as u64, policy.cpu_overcommit).saturating_sub(h.allocated_cpus as u64);
    let mem = cap(h.memory_bytes, policy.memory_overcommit).saturating_sub(h.allocated_memory);
    (cpus, mem)
}

/// Names of the hosts running a member (other than the VM itself) of `group`.
fn member_hosts<'a>(hosts: &'a [HostView], group: &Group, vm: &str) -> HashSet<&'a str> {
    let members: HashSet<&str> = group
        .members
        .iter()
        .map(String::as_str)
        .filter(|m| *m != vm)
        .collect();
    hosts
        .iter()
        .filter(|h| h.vms.iter().any(|v| members.contains(v.as_str())))
        .map(|h| &*h.name)
        .collect()
}

/// Picks a host for `req`. `groups` are all groups of the cluster; those without the VM are ignored.
pub fn place(policy: &Policy, hosts: &[HostView], groups: &[Group], req: &Request) -> Decision {
    // The VM's groups, each with the hosts its other members run on: computed once per decision.
    let my_groups: Vec<(&Group, HashSet<&str>)> = groups
        .iter()
        .filter(|g| g.members.contains(&req.vm))
        .map(|g| (g, member_hosts(hosts, g, &req.vm)))
        .collect();
    // One pass: filter, score and keep the best, so a decision costs a few nanoseconds per host.
    // In large clusters, as kube-scheduler does, only a sample of the hosts that fit is scored:
    // the scan starts at a point derived from the VM's name (deterministic, and different VMs
    // look at different hosts) and stops once enough candidates were seen.
    let n = hosts.len();
    let enough = if n <= FULL_SCAN_HOSTS || req.host.is_some() {
        usize::MAX
    } else {
        (n * SAMPLE_PERCENT / 100).max(FULL_SCAN_HOSTS)
    };
    let start = if n == 0 {
        0
    } else {
        (fnv1a(&req.vm) % n as u64) as usize
    };
    let mut seen = 0usize;
    let mut best: Option<((i64, i64), &HostView)> = None;
    let (mut pinned_out, mut not_connected, mut maintenance, mut standby) = (0, 0, 0, 0);
    let (mut no_cpu, mut no_mem) = (0, 0);
    let mut anti: Vec<String> = Vec::new();
    let mut aff: Vec<String> = Vec::new();
    let hard = my_groups.iter().any(|(g, _)| g.strength == Strength::Must);
    let soft = my_groups
        .iter()
        .any(|(g, _)| g.strength == Strength::Should);
    for h in hosts[start..].iter().chain(&hosts[..start]) {
        if seen >= enough {
            break;
        }
        if req.host.as_deref().is_some_and(|p| p != &*h.name) {
            pinned_out += 1;
            continue;
        }
        match h.state {
            HostState::Connected => {}
            HostState::NotResponding => {
                not_connected += 1;
                continue;
            }
            HostState::Maintenance => {
                maintenance += 1;
                continue;
            }
            HostState::Standby => {
                standby += 1;
                continue;
            }
        }
        let cpu_total = cap(h.cpus as u64, policy.cpu_overcommit);
        let mem_total = cap(h.memory_bytes, policy.memory_overcommit);
        let cpus = cpu_total.saturating_sub(h.allocated_cpus as u64);
        let mem = mem_total.saturating_sub(h.allocated_memory);
        if req.reserve && (req.cpus as u64) > cpus {
            no_cpu += 1;
            continue;
        }
        if req.reserve && req.memory_bytes > mem {
            no_mem += 1;
            continue;
        }
        if hard {
            let broken = my_groups
                .iter()
                .filter(|(g, _)| g.strength == Strength::Must)
                .find(|(g, on)| match g.rule {
                    Rule::AntiAffinity => on.contains(&*h.name),
                    Rule::Affinity => !on.is_empty() && !on.contains(&*h.name),
                });
            if let Some((g, _)) = broken {
                match g.rule {
                    Rule::AntiAffinity => anti.push(g.name.clone()),
                    Rule::Affinity => aff.push(g.name.clone()),
                }
                continue;
            }
        }
        // Soft rules first: each satisfied "should" counts, each broken one costs.
        let mut soft_score = 0i64;
        if soft {
            for (g, on) in my_groups
                .iter()
                .filter(|(g, _)| g.strength == Strength::Should)
            {
                let here = on.contains(&*h.name);
                soft_score += match (g.rule, here) {
                    (Rule::Affinity, true) | (Rule::AntiAffinity, false) => 1,
                    (Rule::Affinity, false) if on.is_empty() => 0,
                    _ => -1,
                };
            }
        }
        // Room left after placement, in thousandths of the scarcer resource, with the stopped
        // VMs there counted as running (below zero where they could not all run at once).
        let room = |free: u64, stopped: u64, asked: u64, total: u64| {
            (free as f64 - stopped as f64 - asked as f64) / total.max(1) as f64
        };
        let cpu_left = room(
            cpus,
            u64::from(h.stopped_cpus),
            u64::from(req.cpus),
            cpu_total,
        );
        let mem_left = room(mem, h.stopped_memory, req.memory_bytes, mem_total);
        let left = (cpu_left.min(mem_left) * 1000.0) as i64;
        let fit = match policy.placement {
            Placement::Spread => left,
            Placement::Pack => -left,
        };
        let score = (soft_score, fit);
        seen += 1;
        // Ties go to the first name.
        let better = best
            .as_ref()
            .is_none_or(|(bs, b)| score > *bs || (score == *bs && h.name < b.name));
        if better {
            best = Some((score, h));
        }
    }
    match best {
        Some((_, h)) => Decision::Place {
            host: h.name.to_string(),
        },
        None => Decision::Pending {
            reason: reason(
                policy,
                hosts,
                req,
                [
                    pinned_out,
                    not_connected,
                    maintenance,
                    standby,
                    no_cpu,
                    no_mem,
                ],
                &anti,
                &aff,
            ),
        },
    }
}

fn reason(
    policy: &Policy,
    hosts: &[HostView],
    req: &Request,
    counts: [usize; 6],
    anti: &[String],
    aff: &[String],
) -> String {
    let [pinned_out, not_connected, maintenance, standby, no_cpu, no_mem] = counts;
    if hosts.is_empty() {
        return "no host is connected: start a host agent".into();
    }
    if let Some(p) = &req.host {
        if pinned_out == hosts.len() {
            return format!("the VM is pinned to host {p}, which does not exist");
        }
    }
    let mut parts = Vec::new();
    if no_mem > 0 {
        let largest = hosts
            .iter()
            .filter(|h| h.state == HostState::Connected)
            .map(|h| (free(policy, h).1, &*h.name))
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)));
        let hint = largest
            .map(|(m, n)| format!("; largest free is {} on {n}", format_bytes(m)))
            .unwrap_or_default();
        parts.push(format!(
            "no host has {} of memory free{hint}",
            format_bytes(req.memory_bytes)
        ));
    }
    if no_cpu > 0 {
        let largest = hosts
            .iter()
            .filter(|h| h.state == HostState::Connected)
            .map(|h| free(policy, h).0)
            .max()
            .unwrap_or(0);
        parts.push(format!(
            "no host has {} vCPUs free (most is {largest})",
            req.cpus
        ));
    }
    if !anti.is_empty() {
        parts.push(format!(
            "hard anti-affinity group {} already has a member on every host that could take the VM",
            dedup(anti)
        ));
    }
    if !aff.is_empty() {
        parts.push(format!(
            "affinity group {} runs on a host that cannot take the VM",
            dedup(aff)
        ));
    }
    if maintenance > 0 {
        parts.push(format!("{maintenance} host(s) in maintenance"));
    }
    if standby > 0 {
        parts.push(format!(
            "{standby} host(s) in standby (with power management on, DPM wakes one when a VM waits for room)"
        ));
    }
    if not_connected > 0 {
        parts.push(format!("{not_connected} host(s) not responding"));
    }
    parts.join("; ")
}

fn dedup(names: &[String]) -> String {
    let mut v = names.to_vec();
    v.sort();
    v.dedup();
    v.join(", ")
}

#[cfg(test)]
mod tests;
