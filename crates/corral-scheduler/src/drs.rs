//! DRS planning: which running VMs to move so host loads even out. Pure and deterministic, like
//! placement.
//!
//! A host's load is its VMs' measured demand over its capacity, per resource (CPU cores used,
//! memory touched), the larger of the two. The cluster's imbalance is the standard deviation of the
//! loads of the hosts that take VMs. While the imbalance is above the threshold the aggressiveness
//! allows, the planner picks the single move with the best ratio of imbalance removed to memory
//! copied, applies it to its picture of the cluster, and goes on. A move must lower the imbalance,
//! leave its target no busier than its source, and narrow the gap between the two by
//! [`MIN_PAIR_GAIN`] and [`PAIR_SHARE`] of the gap (hysteresis: swapping loads or small
//! differences are not worth a migration, and noise in the measurements does not make VMs
//! wander), may not
//! break a host's capacity (allocations, with overcommit, as placement counts them) or a hard
//! affinity rule, and at most [`MOVES_PER_HOST`] moves touch one host per plan (migration
//! concurrency). VMs that are pinned, not running, migrating or moved within the hold time are not
//! candidates: the caller leaves them out of `movable`.

use std::collections::HashMap;

use corral_api::{format_bytes, DrsMove, HostLoad, PowerAction};

use crate::{free, Group, HostState, HostView, Policy, Rule, Strength};

/// A move must narrow the gap between its two hosts' loads by at least this much...
pub const MIN_PAIR_GAIN: f64 = 0.05;
/// ...and by at least this share of the gap: a move that only swaps two hosts' loads, or changes
/// little, is not worth its migration, and noise in the measurements does not make VMs wander.
pub const PAIR_SHARE: f64 = 0.25;
/// Moves per plan that may start or end on one host.
pub const MOVES_PER_HOST: usize = 2;
/// Moves per plan.
pub const MAX_MOVES: usize = 8;
/// How much a GiB to copy weighs against imbalance removed (a move of 1 GiB must remove twice
/// the imbalance of a move of nothing to rank the same).
const COPY_WEIGHT_PER_GIB: f64 = 1.0;

/// A running VM as DRS sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DrsVm {
    /// "project/name", as in `HostView::vms` and group members.
    pub name: String,
    pub host: String,
    /// Allocation (what placement reserves).
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Measured demand: cores busy and memory touched (the allocation when not measured yet).
    pub cpu_demand: f64,
    pub memory_demand: u64,
    /// May be moved now.
    pub movable: bool,
}

/// What the planner returns (the controller adds an id and a time).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub moves: Vec<DrsMove>,
    pub before: Vec<HostLoad>,
    pub after: Vec<HostLoad>,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub threshold: f64,
    pub note: String,
}

/// The cluster as the planner changes it move by move.
struct State<'a> {
    policy: &'a Policy,
    hosts: Vec<HostView>,
    /// Demand per host: (cores, bytes).
    demand: Vec<(f64, u64)>,
    /// Index of each VM's host.
    at: HashMap<&'a str, usize>,
}

impl<'a> State<'a> {
    fn new(policy: &'a Policy, hosts: &[HostView], vms: &'a [DrsVm]) -> State<'a> {
        let index: HashMap<&str, usize> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (&*h.name, i))
            .collect();
        let mut demand = vec![(0.0, 0u64); hosts.len()];
        let mut at = HashMap::new();
        for vm in vms {
            if let Some(&i) = index.get(vm.host.as_str()) {
                demand[i].0 += vm.cpu_demand;
                demand[i].1 += vm.memory_demand;
                at.insert(vm.name.as_str(), i);
            }
        }
        State {
            policy,
            hosts: hosts.to_vec(),
            demand,
            at,
        }
    }

    /// Moves `vm` to host `t` in this picture of the cluster.
    fn relocate(&mut self, vm: &'a DrsVm, t: usize) {
        let Some(&src) = self.at.get(vm.name.as_str()) else {
            return;
        };
        self.demand[src].0 -= vm.cpu_demand;
        self.demand[src].1 -= vm.memory_demand;
        self.demand[t].0 += vm.cpu_demand;
        self.demand[t].1 += vm.memory_demand;
        let h = &mut self.hosts[src];
        h.allocated_cpus = h.allocated_cpus.saturating_sub(vm.cpus);
        h.allocated_memory = h.allocated_memory.saturating_sub(vm.memory_bytes);
        self.hosts[t].allocated_cpus += vm.cpus;
        self.hosts[t].allocated_memory += vm.memory_bytes;
        self.at.insert(vm.name.as_str(), t);
    }

    fn load(&self, i: usize) -> HostLoad {
        let h = &self.hosts[i];
        let (c, m) = self.demand[i];
        let cpu = c / f64::from(h.cpus.max(1));
        let memory = m as f64 / h.memory_bytes.max(1) as f64;
        HostLoad {
            host: h.name.to_string(),
            cpu,
            memory,
            load: cpu.max(memory),
        }
    }

    fn active(&self, i: usize) -> bool {
        self.hosts[i].state == HostState::Connected
    }

    /// Sum and sum of squares of the active hosts' loads, and how many there are.
    fn moments(&self) -> (f64, f64, f64) {
        (0..self.hosts.len())
            .filter(|i| self.active(*i))
            .map(|i| self.load(i).load)
            .fold((0.0, 0.0, 0.0), |(s, q, n), l| (s + l, q + l * l, n + 1.0))
    }

    fn load_with(&self, i: usize, cores: f64, bytes: i128) -> f64 {
        let h = &self.hosts[i];
        let (c, m) = self.demand[i];
        let cpu = (c + cores).max(0.0) / f64::from(h.cpus.max(1));
        let mem = (m as i128 + bytes).max(0) as f64 / h.memory_bytes.max(1) as f64;
        cpu.max(mem)
    }

    /// Whether `vm` may go to host `t`: room for its allocation, and no hard rule broken.
    fn fits(&self, vm: &DrsVm, t: usize, groups: &[Group]) -> bool {
        let h = &self.hosts[t];
        let (cpus, mem) = free(self.policy, h);
        if u64::from(vm.cpus) > cpus || vm.memory_bytes > mem {
            return false;
        }
        groups
            .iter()
            .filter(|g| g.strength == Strength::Must && g.members.contains(&vm.name))
            .all(|g| {
                let others = g.members.iter().filter(|m| **m != vm.name);
                let mut hosts_of_others = others.filter_map(|m| self.at.get(m.as_str()).copied());
                match g.rule {
                    Rule::AntiAffinity => hosts_of_others.all(|i| i != t),
                    Rule::Affinity => hosts_of_others.all(|i| i == t),
                }
            })
    }
}

/// Standard deviation from the sum and sum of squares of `n` values.
fn std_dev(sum: f64, squares: f64, n: f64) -> f64 {
    if n == 0.0 {
        return 0.0;
    }
    let mean = sum / n;
    (squares / n - mean * mean).max(0.0).sqrt()
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// Plans moves for `vms` across `hosts` (whose allocations include those VMs).
pub fn plan(
    policy: &Policy,
    hosts: &[HostView],
    groups: &[Group],
    vms: &[DrsVm],
    threshold: f64,
) -> Plan {
    let mut s = State::new(policy, hosts, vms);
    let loads = |s: &State| (0..s.hosts.len()).map(|i| s.load(i)).collect::<Vec<_>>();
    let before = loads(&s);
    let (sum, squares, n) = s.moments();
    let imbalance_before = std_dev(sum, squares, n);
    let mut imbalance = imbalance_before;
    let mut moves: Vec<DrsMove> = Vec::new();
    let mut touched = vec![0usize; hosts.len()];
    let mut moved: Vec<&str> = Vec::new();
    let mut note = String::new();
    if s.hosts
        .iter()
        .filter(|h| h.state == HostState::Connected)
        .count()
        < 2
    {
        note = "fewer than two hosts take VMs: nothing to balance".into();
    } else if imbalance <= threshold {
        note = format!(
            "imbalance {imbalance:.3} is within the threshold {threshold:.3}: nothing worth moving"
        );
    }
    while note.is_empty() && moves.len() < MAX_MOVES && imbalance > threshold {
        // (score, gain, vm, target, new imbalance)
        let mut best: Option<(f64, f64, &DrsVm, usize, f64)> = None;
        let (sum, squares, n) = s.moments();
        for vm in vms
            .iter()
            .filter(|v| v.movable && !moved.contains(&v.name.as_str()))
        {
            let Some(&src) = s.at.get(vm.name.as_str()) else {
                continue;
            };
            if !s.active(src) || touched[src] >= MOVES_PER_HOST {
                continue;
            }
            let src_now = s.load(src).load;
            let src_load = s.load_with(src, -vm.cpu_demand, -(vm.memory_demand as i128));
            for t in (0..s.hosts.len()).filter(|t| *t != src && s.active(*t)) {
                if touched[t] >= MOVES_PER_HOST || !s.fits(vm, t, groups) {
                    continue;
                }
                let t_now = s.load(t).load;
                let t_load = s.load_with(t, vm.cpu_demand, vm.memory_demand as i128);
                // The target must end no busier than the source: a move that turns the pair
                // around is a swap, which noise would undo next time.
                let gap = src_now - t_now;
                let narrowed = gap - (src_load - t_load);
                if t_load > src_load || narrowed < MIN_PAIR_GAIN.max(gap * PAIR_SHARE) {
                    continue;
                }
                let after = std_dev(
                    sum - src_now - t_now + src_load + t_load,
                    squares - src_now * src_now - t_now * t_now
                        + src_load * src_load
                        + t_load * t_load,
                    n,
                );
                let gain = imbalance - after;
                if gain <= 1e-9 {
                    continue;
                }
                let gib = vm.memory_demand as f64 / (1u64 << 30) as f64;
                let score = gain / (1.0 + gib * COPY_WEIGHT_PER_GIB);
                let better = best.as_ref().is_none_or(|(bs, _, bvm, bt, _)| {
                    score > *bs
                        || (score == *bs
                            && (vm.name.as_str(), &s.hosts[t].name)
                                < (bvm.name.as_str(), &s.hosts[*bt].name))
                });
                if better {
                    best = Some((score, gain, vm, t, after));
                }
            }
        }
        let Some((_, gain, vm, t, after)) = best else {
            note = format!(
                "no move narrows the gap between two hosts enough (by {MIN_PAIR_GAIN} and a quarter of it, without turning them around) within capacity, rules and the limit of {MOVES_PER_HOST} moves per host"
            );
            break;
        };
        let src = s.at[vm.name.as_str()];
        let (src_before, t_before) = (s.load(src).load, s.load(t).load);
        s.relocate(vm, t);
        touched[src] += 1;
        touched[t] += 1;
        moved.push(vm.name.as_str());
        let (from, to) = (s.hosts[src].name.to_string(), s.hosts[t].name.to_string());
        moves.push(DrsMove {
            vm: vm.name.clone(),
            from: from.clone(),
            to: to.clone(),
            gain,
            copy_bytes: vm.memory_demand,
            reason: format!(
                "{from} {} -> {}, {to} {} -> {}: imbalance {imbalance:.3} -> {after:.3} for {} to copy",
                pct(src_before),
                pct(s.load(src).load),
                pct(t_before),
                pct(s.load(t).load),
                format_bytes(vm.memory_demand)
            ),
        });
        imbalance = after;
    }
    if note.is_empty() && moves.len() == MAX_MOVES && imbalance > threshold {
        note = format!("stopped at {MAX_MOVES} moves: plan again once they are done");
    }
    Plan {
        moves,
        after: loads(&s),
        before,
        imbalance_before,
        imbalance_after: imbalance,
        threshold,
        note,
    }
}

/// DPM: hosts that could go to standby once their VMs move to the others, after `moves` (a DRS
/// plan) are made. Emptiest hosts first; a host qualifies when every VM on it is movable and fits
/// elsewhere (capacity, hard rules) without taking any host above `max_load`; at least `keep_on`
/// hosts stay on.
pub fn standby(
    policy: &Policy,
    hosts: &[HostView],
    groups: &[Group],
    vms: &[DrsVm],
    moves: &[DrsMove],
    keep_on: usize,
    max_load: f64,
) -> Vec<PowerAction> {
    let mut s = State::new(policy, hosts, vms);
    for m in moves {
        let (Some(vm), Some(t)) = (
            vms.iter().find(|v| v.name == m.vm),
            s.hosts.iter().position(|h| *h.name == *m.to),
        ) else {
            continue;
        };
        s.relocate(vm, t);
    }
    let mut on: Vec<usize> = (0..s.hosts.len()).filter(|i| s.active(*i)).collect();
    let mut by_load = on.clone();
    by_load.sort_by(|a, b| {
        s.load(*a)
            .load
            .total_cmp(&s.load(*b).load)
            .then_with(|| s.hosts[*a].name.cmp(&s.hosts[*b].name))
    });
    let mut rank = vec![0usize; s.hosts.len()];
    for (r, i) in by_load.iter().enumerate() {
        rank[*i] = r;
    }
    let mut actions = Vec::new();
    for h in by_load {
        if on.len() <= keep_on {
            break;
        }
        let mut guests: Vec<&DrsVm> = vms
            .iter()
            .filter(|v| s.at.get(v.name.as_str()) == Some(&h))
            .collect();
        if guests.iter().any(|v| !v.movable) {
            continue;
        }
        guests.sort_by(|a, b| {
            b.cpu_demand
                .total_cmp(&a.cpu_demand)
                .then(a.name.cmp(&b.name))
        });
        // Try on a copy: all the host's VMs find room, or nothing changes.
        let mut trial = State::new(policy, &s.hosts, vms);
        trial.at.clone_from(&s.at);
        trial.demand.clone_from(&s.demand);
        let mut planned = Vec::new();
        for vm in &guests {
            // The fullest host that stays under the cap (packing, so the rest can sleep too); among
            // equals, the one latest in the order hosts are emptied, so no VM moves twice.
            let target = on
                .iter()
                .copied()
                .filter(|t| *t != h && trial.fits(vm, *t, groups))
                .map(|t| {
                    (
                        t,
                        trial.load_with(t, vm.cpu_demand, vm.memory_demand as i128),
                    )
                })
                .filter(|(_, l)| *l <= max_load)
                .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| rank[a.0].cmp(&rank[b.0])));
            let Some((t, _)) = target else {
                planned.clear();
                break;
            };
            trial.relocate(vm, t);
            planned.push(DrsMove {
                vm: vm.name.clone(),
                from: s.hosts[h].name.to_string(),
                to: trial.hosts[t].name.to_string(),
                gain: 0.0,
                copy_bytes: vm.memory_demand,
                reason: format!("empties {} for standby", s.hosts[h].name),
            });
        }
        if planned.len() != guests.len() {
            continue;
        }
        let name = s.hosts[h].name.to_string();
        let reason = if planned.is_empty() {
            format!("{name} runs nothing: it could go to standby")
        } else {
            format!(
                "{name} could go to standby once its {} VM(s) move; no host would pass {:.0}% load",
                planned.len(),
                max_load * 100.0
            )
        };
        s = trial;
        on.retain(|i| *i != h);
        actions.push(PowerAction {
            host: name,
            action: "standby".into(),
            moves: planned,
            reason,
        });
    }
    actions
}

#[cfg(test)]
#[path = "drs_tests.rs"]
mod tests;
