//! Placement: builds the scheduler's view of the cluster from the store, asks `corral-scheduler`
//! where a VM goes, and records the answer in the VM's status: the host, or why it waits.
//!
//! Decisions are made one at a time (a lock in the controller), so two concurrent creates cannot
//! both take the last free memory of a host; the write is guarded by the host's revision, so a host
//! that changed or vanished between plan and apply makes the controller plan again. A background
//! placer retries pending VMs as hosts come, go or free up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use corral_api::{
    keys, ClusterSettings, GroupRule, GroupStrength, Host, HostInfo, HostState, Migration,
    PlacementPolicy, Vm, VmGroup, VmPhase,
};
use corral_scheduler as sched;
use corral_store::{get_json, Op, Precondition, StoreError};

use crate::cache::{Alloc, HostEntry, Objects};
use crate::{ApiError, Ctx};

/// A host not heard from for this long is not responding. Its agent reports to the failure
/// detector every [`corral_api::timing::RENEW_EVERY`] and rewrites its host record every 30 s; a
/// controller that just started, and has no reports yet, goes by the record.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything placement looks at, read from the controller's cache.
pub struct ClusterView {
    pub settings: ClusterSettings,
    /// Hosts as the cache holds them: record, revision read, name, what is placed there.
    pub hosts: Vec<HostEntry>,
    /// Every VM, shared with the cache (a view of 100,000 VMs copies no VM); none in a
    /// [`placement_view`], which places a new VM and needs no other.
    pub vms: Vec<Arc<Vm>>,
    pub groups: Vec<VmGroup>,
    /// Migrations under way: their VMs take room on the target too until they end.
    pub migrations: Vec<Migration>,
    /// Hosts HA has found failed: nothing is placed there.
    pub down: HashSet<String>,
    /// The hosts the failure detector has not heard from lately (none known before its first tick).
    pub quiet: Option<Arc<HashSet<String>>>,
    /// Per host, the VMs affinity rules must know there by name ("project/name"): group members
    /// placed there and VMs migrating there.
    named: HashMap<String, Vec<String>>,
    /// Per host, what VMs migrating there will take.
    incoming: HashMap<String, Alloc>,
}

/// Whether a stopped VM may start, decided at power-on against what is free at that moment.
#[derive(Debug, PartialEq)]
pub enum StartAdmission {
    /// On its host (or, not placed yet, wherever the placer finds room).
    Here,
    /// Its host cannot run it now, but its disk is on a datastore every host reaches and `host`
    /// (as read at `revision`) has room: it starts there.
    Move { host: String, revision: u64 },
    /// Nowhere now: the sentence says why and what would make room.
    Refused(String),
}

/// The host's state, from its record and whether the failure detector heard its agent lately.
pub fn host_state(h: &Host, now: DateTime<Utc>, heard: bool) -> (HostState, Option<DateTime<Utc>>) {
    // Asked to go to standby, or still there while it wakes: silent on purpose.
    if h.standby || h.status.standby {
        return (HostState::Standby, None);
    }
    // Joined, but its agent has not registered it yet: neither its capacity nor that its agent
    // runs is known (HA's reports alone, which may come first, do not make it usable).
    if !h.status.registered() {
        return (HostState::NotResponding, None);
    }
    let last = h.status.last_heartbeat;
    let silent = !heard && (now - last).to_std().unwrap_or_default() > HEARTBEAT_TIMEOUT;
    if silent {
        (HostState::NotResponding, Some(last))
    } else if h.maintenance {
        (HostState::Maintenance, None)
    } else {
        (HostState::Connected, None)
    }
}

pub async fn settings(ctx: &Ctx) -> Result<ClusterSettings, ApiError> {
    Ok(get_json::<ClusterSettings>(&*ctx.store, keys::CLUSTER)
        .await?
        .map(|v| v.value)
        .unwrap_or_default())
}

/// The cluster as it is now (every earlier write included), from the controller's cache.
pub async fn view(ctx: &Ctx) -> Result<ClusterView, ApiError> {
    let o = ctx.cache.read(&*ctx.store).await?;
    let mut view = ClusterView::new(&o, ctx);
    view.vms = o.vms.values().map(|e| e.value.clone()).collect();
    Ok(view)
}

/// [`view`] without the VMs: enough to place a new VM, and at 100,000 VMs far cheaper.
pub async fn placement_view(ctx: &Ctx) -> Result<ClusterView, ApiError> {
    let o = ctx.cache.read(&*ctx.store).await?;
    Ok(ClusterView::new(&o, ctx))
}

pub fn qualified(project: &str, name: &str) -> String {
    format!("{project}/{name}")
}

impl ClusterView {
    /// Everything but the VMs, from the cache. Costs a pass over the hosts, the group members and
    /// the migrations, none over the VMs.
    pub fn new(o: &Objects, ctx: &Ctx) -> ClusterView {
        let migrations: Vec<Migration> = o
            .migrations
            .values()
            .filter(|m| !m.value.phase.is_finished())
            .map(|m| (*m.value).clone())
            .collect();
        let mut named: HashMap<String, Vec<String>> = HashMap::new();
        let members: HashSet<(&str, &str)> = o
            .groups
            .values()
            .flat_map(|g| {
                let project = g.value.meta.project.as_str();
                g.value.members.iter().map(move |m| (project, m.as_str()))
            })
            .collect();
        for (project, name) in members {
            if let Some(host) = o
                .vms
                .get(&keys::vm(project, name))
                .and_then(|e| e.value.status.host.clone())
            {
                named
                    .entry(host)
                    .or_default()
                    .push(qualified(project, name));
            }
        }
        let mut incoming: HashMap<String, Alloc> = HashMap::new();
        for m in &migrations {
            let Some(vm) = o
                .vms
                .get(&keys::vm(&m.project, &m.vm))
                .filter(|e| e.value.meta.uid == m.vm_uid)
            else {
                continue;
            };
            incoming
                .entry(m.target.clone())
                .or_default()
                .add(&vm.value, 1);
            named
                .entry(m.target.clone())
                .or_default()
                .push(qualified(&m.project, &m.vm));
        }
        ClusterView {
            settings: o.settings.clone().unwrap_or_default(),
            hosts: o.hosts.values().cloned().collect(),
            vms: Vec::new(),
            groups: o.groups.values().map(|e| (*e.value).clone()).collect(),
            migrations,
            down: HashSet::new(),
            quiet: ctx.ha.quiet(),
            named,
            incoming,
        }
    }

    /// The hosts `select` takes (at most `limit`, in name order), each with the VMs placed or
    /// arriving there, from the cache's per-host index (`o`, the copy this view was made from): a
    /// page of hosts costs its own VMs, not a pass over every VM. Only takes shares of the VMs, so
    /// the copy's lock is held briefly; [`ClusterView::host_infos`] does the rest without it.
    pub fn hosts_with_vms(
        &self,
        o: &Objects,
        select: impl Fn(&str) -> bool,
        limit: usize,
    ) -> Vec<(HostEntry, Vec<Arc<Vm>>)> {
        let mut chosen: Vec<(HostEntry, Vec<Arc<Vm>>)> = self
            .hosts
            .iter()
            .filter(|h| select(&h.name))
            .take(limit)
            .map(|h| {
                (
                    h.clone(),
                    o.placed_on(&h.name).map(|e| e.value.clone()).collect(),
                )
            })
            .collect();
        // A VM migrating to a host shows there too.
        for m in &self.migrations {
            let Some((_, on)) = chosen.iter_mut().find(|(h, _)| *h.name == m.target) else {
                continue;
            };
            if let Some(v) = o
                .vms
                .get(&keys::vm(&m.project, &m.vm))
                .filter(|e| e.value.meta.uid == m.vm_uid)
            {
                on.push(v.value.clone());
            }
        }
        chosen
    }

    /// The API's view of hosts taken with [`ClusterView::hosts_with_vms`]: state, allocation, VMs;
    /// `last_seen` says when a host's agent was last heard from (the failure detector knows).
    pub fn host_infos(
        &self,
        chosen: Vec<(HostEntry, Vec<Arc<Vm>>)>,
        last_seen: impl Fn(&str) -> Option<DateTime<Utc>>,
    ) -> Vec<HostInfo> {
        let now = Utc::now();
        chosen
            .into_iter()
            .map(|(e, placed)| {
                let h = &*e.value;
                let (state, since) = self.state_of(h, now);
                // The last time the host was heard from, by report or by record (none before its
                // agent has registered it).
                let mut host = h.clone();
                if let Some(seen) = Some(h)
                    .filter(|h| h.status.registered())
                    .and_then(|h| last_seen(&h.name))
                {
                    host.status.last_heartbeat = host.status.last_heartbeat.max(seen);
                }
                HostInfo {
                    host,
                    state,
                    not_responding_since: since,
                    allocated_cpus: placed
                        .iter()
                        .filter(|v| v.holds_capacity())
                        .map(|v| v.spec.cpus)
                        .sum(),
                    allocated_memory_bytes: placed
                        .iter()
                        .filter(|v| v.holds_capacity())
                        .map(|v| v.spec.memory_bytes)
                        .sum(),
                    used_cpus: placed
                        .iter()
                        .filter(|v| v.status.phase == VmPhase::Running)
                        .map(|v| v.spec.cpus)
                        .sum(),
                    used_memory_bytes: placed
                        .iter()
                        .filter(|v| v.status.phase == VmPhase::Running)
                        .map(|v| v.spec.memory_bytes)
                        .sum(),
                    vms: placed
                        .iter()
                        .map(|v| qualified(&v.meta.project, &v.meta.name))
                        .collect(),
                    ha: None,
                    isolation_response: None,
                }
            })
            .collect()
    }

    /// Admits the start of `vm`, as stored before it is asked to run. `shared`: whether every
    /// host reaches its disk. A VM that already holds its room starts where it is.
    pub fn admit_start(&self, vm: &Vm, shared: bool) -> StartAdmission {
        let Some(host) = vm.status.host.as_deref() else {
            return StartAdmission::Here;
        };
        if vm.holds_capacity() {
            return StartAdmission::Here;
        }
        let policy = self.policy();
        let Some(h) = self.sched_hosts().into_iter().find(|h| &*h.name == host) else {
            // Its host's record is gone: nothing to admit against (the host is being removed).
            return StartAdmission::Here;
        };
        let (cpus, memory) = sched::free(&policy, &h);
        let short = if h.state != sched::HostState::Connected {
            format!("host {host} is {}", state_words(h.state))
        } else if u64::from(vm.spec.cpus) > cpus || vm.spec.memory_bytes > memory {
            format!(
                "host {host} has {cpus} vCPUs and {} free (after overcommit) and the VM needs {} vCPUs and {}",
                corral_api::format_bytes(memory),
                vm.spec.cpus,
                corral_api::format_bytes(vm.spec.memory_bytes)
            )
        } else {
            return StartAdmission::Here;
        };
        if let Some(pin) = &vm.spec.host {
            return StartAdmission::Refused(format!(
                "{short}, and the VM is pinned to {pin}: stop a VM there to make room, or unpin it"
            ));
        }
        if !shared {
            return StartAdmission::Refused(format!(
                "{short}, and its disk is on datastore {}, which only {host} reaches: stop a VM on {host} to make room, or move the disk to a shared datastore (POST .../vms/{}/move-storage) so that another host can start it",
                vm.spec.datastore, vm.meta.name
            ));
        }
        let mut running = vm.clone();
        running.spec.power = corral_api::PowerState::Running;
        match self.decide_with(&running, Some(host), None) {
            sched::Decision::Place { host } => StartAdmission::Move {
                revision: self.host_revision(&host),
                host,
            },
            sched::Decision::Pending { reason } => StartAdmission::Refused(format!(
                "{short}, and no other host can take it ({reason}): stop a VM to make room"
            )),
        }
    }

    /// Asks the scheduler where `vm` goes.
    pub fn decide(&self, vm: &Vm) -> sched::Decision {
        self.decide_with(vm, None, vm.spec.host.clone())
    }

    /// Asks the scheduler where a running `vm` can move: any host but its own (or `to`).
    pub fn decide_migration(&self, vm: &Vm, to: Option<&str>) -> sched::Decision {
        self.decide_with(vm, vm.status.host.as_deref(), to.map(str::to_string))
    }

    /// The chosen host's revision as read, to guard the write that acts on a decision.
    pub fn host_revision(&self, host: &str) -> u64 {
        self.hosts
            .iter()
            .find(|h| &*h.name == host)
            .map_or(0, |h| h.revision)
    }

    /// The cluster's placement settings as the scheduler takes them.
    pub fn policy(&self) -> sched::Policy {
        sched::Policy {
            placement: match self.settings.placement {
                PlacementPolicy::Spread => sched::Placement::Spread,
                PlacementPolicy::Pack => sched::Placement::Pack,
            },
            cpu_overcommit: self.settings.cpu_overcommit,
            memory_overcommit: self.settings.memory_overcommit,
        }
    }

    /// Takes in a VM as just written (placed, or moved to another host), so the decisions that
    /// follow in the same round count it where it is now. Needs the VMs ([`view`]): a
    /// [`placement_view`] places one VM and is thrown away.
    pub fn record(&mut self, vm: Vm) {
        let Some(v) = self.vms.iter_mut().find(|v| v.meta.uid == vm.meta.uid) else {
            return;
        };
        let me = qualified(&vm.meta.project, &vm.meta.name);
        let member = self
            .groups
            .iter()
            .any(|g| g.meta.project == vm.meta.project && g.members.contains(&vm.meta.name));
        // The old share comes off as it was (the spec may have changed), the new one goes on.
        let old = v.clone();
        for (was, sign) in [(&*old, -1), (&vm, 1)] {
            let Some(host) = was.status.host.as_deref() else {
                continue;
            };
            if let Some(h) = self.hosts.iter_mut().find(|h| &*h.name == host) {
                h.alloc.add(was, sign);
            }
            if member {
                let names = self.named.entry(host.to_string()).or_default();
                names.retain(|n| *n != me);
                if sign > 0 {
                    names.push(me.clone());
                }
            }
        }
        *v = Arc::new(vm);
    }

    /// A host's state as placement takes it.
    fn state_of(&self, h: &Host, now: DateTime<Utc>) -> (HostState, Option<DateTime<Utc>>) {
        let heard = self
            .quiet
            .as_ref()
            .is_some_and(|q| q.is_empty() || !q.contains(&h.name));
        let (state, since) = host_state(h, now, heard);
        if self.down.contains(&h.name) {
            return (HostState::NotResponding, since);
        }
        (state, since)
    }

    /// Every host as the scheduler sees it: capacity, what is placed there (and what migrates
    /// there), and the group members on it. Costs a few nanoseconds per host: no lookup by name
    /// unless groups or migrations make one needed, no copy of a name.
    pub fn sched_hosts(&self) -> Vec<sched::HostView> {
        let now = Utc::now();
        self.hosts
            .iter()
            .map(|h| {
                let arriving = match self.incoming.is_empty() {
                    true => Alloc::default(),
                    false => self.incoming.get(&*h.name).copied().unwrap_or_default(),
                };
                let vms = match self.named.is_empty() {
                    true => Vec::new(),
                    false => self.named.get(&*h.name).cloned().unwrap_or_default(),
                };
                sched::HostView {
                    name: h.name.clone(),
                    state: match self.state_of(&h.value, now).0 {
                        HostState::Connected => sched::HostState::Connected,
                        HostState::NotResponding => sched::HostState::NotResponding,
                        HostState::Maintenance => sched::HostState::Maintenance,
                        HostState::Standby => sched::HostState::Standby,
                    },
                    cpus: h.value.status.cpus,
                    memory_bytes: h.value.status.memory_bytes,
                    allocated_cpus: u32::try_from(h.alloc.cpus + arriving.cpus).unwrap_or(u32::MAX),
                    allocated_memory: h.alloc.memory + arriving.memory,
                    stopped_cpus: u32::try_from(h.alloc.stopped_cpus).unwrap_or(u32::MAX),
                    stopped_memory: h.alloc.stopped_memory,
                    vms,
                }
            })
            .collect()
    }

    /// Every VM group as the scheduler sees it.
    pub fn sched_groups(&self) -> Vec<sched::Group> {
        self.groups
            .iter()
            .map(|g| sched::Group {
                name: g.meta.name.clone(),
                rule: match g.rule {
                    GroupRule::Affinity => sched::Rule::Affinity,
                    GroupRule::AntiAffinity => sched::Rule::AntiAffinity,
                },
                strength: match g.strength {
                    GroupStrength::Must => sched::Strength::Must,
                    GroupStrength::Should => sched::Strength::Should,
                },
                members: g
                    .members
                    .iter()
                    .map(|m| qualified(&g.meta.project, m))
                    .collect(),
            })
            .collect()
    }

    /// The scheduler's decision for `vm`, with `leaving` (the host it runs on, when it moves) out of
    /// the candidates and the VM's own share taken off it.
    fn decide_with(&self, vm: &Vm, leaving: Option<&str>, pin: Option<String>) -> sched::Decision {
        let me = qualified(&vm.meta.project, &vm.meta.name);
        let mut hosts = self.sched_hosts();
        if let Some(h) = hosts.iter_mut().find(|h| leaving == Some(&*h.name)) {
            h.state = sched::HostState::Maintenance;
            h.vms.retain(|v| *v != me);
            let (cpus, memory) = match vm.holds_capacity() {
                true => (&mut h.allocated_cpus, &mut h.allocated_memory),
                false => (&mut h.stopped_cpus, &mut h.stopped_memory),
            };
            *cpus = cpus.saturating_sub(vm.spec.cpus);
            *memory = memory.saturating_sub(vm.spec.memory_bytes);
        }
        let req = sched::Request {
            vm: me,
            cpus: vm.spec.cpus,
            memory_bytes: vm.spec.memory_bytes,
            host: pin,
            reserve: vm.holds_capacity(),
        };
        sched::place(&self.policy(), &hosts, &self.sched_groups(), &req)
    }

    /// Records the decision in `vm` and returns the guard for the write: the chosen host's key must
    /// still be at the revision it was read at.
    pub fn apply(&self, vm: &mut Vm) -> Option<Op> {
        match self.decide(vm) {
            sched::Decision::Place { host } => {
                let rev = self.host_revision(&host);
                vm.status.set_condition(
                    corral_api::ConditionType::Scheduled,
                    true,
                    "Placed",
                    &format!("placed on {host} ({:?} policy)", self.settings.placement)
                        .to_lowercase(),
                );
                vm.status.host = Some(host.clone());
                Some(Op::Check {
                    key: keys::host(&host),
                    when: Precondition::ModRevision(rev),
                })
            }
            sched::Decision::Pending { reason } => {
                vm.status.phase = VmPhase::Pending;
                vm.status.set_condition(
                    corral_api::ConditionType::Scheduled,
                    false,
                    "Unschedulable",
                    &reason,
                );
                None
            }
        }
    }
}

/// A host state as a sentence says it.
fn state_words(state: sched::HostState) -> &'static str {
    match state {
        sched::HostState::Connected => "connected",
        sched::HostState::NotResponding => "not responding",
        sched::HostState::Maintenance => "in maintenance",
        sched::HostState::Standby => "in standby",
    }
}

pub(crate) async fn place_pending(ctx: &Ctx) -> Result<(), ApiError> {
    let unplaced: Vec<(String, u64, Vm)> = {
        let o = ctx.cache.read(&*ctx.store).await?;
        o.vms
            .iter()
            .filter(|(_, e)| e.value.status.host.is_none())
            .map(|(k, e)| (k.clone(), e.revision, (*e.value).clone()))
            .collect()
    };
    let mut waiting = Vec::new();
    for (key, rev, vm) in unplaced {
        if vm.meta.deletion_requested_at.is_some() {
            // Never placed: nothing runs anywhere, so there is nothing to clean up.
            match ctx.store.delete(&key, Precondition::ModRevision(rev)).await {
                Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        waiting.push((key, rev, vm));
    }
    if waiting.is_empty() {
        return Ok(());
    }
    // One view for the round, kept current as VMs are placed; a write that lost a race (the VM or
    // the chosen host changed since it was read) is planned again next round.
    let _one_at_a_time = ctx.placement.lock().await;
    let mut view = view(ctx).await?;
    for (key, rev, mut vm) in waiting {
        let before = vm.status.clone();
        let guard = view.apply(&mut vm);
        if vm.status == before {
            continue;
        }
        let mut ops: Vec<Op> = guard.into_iter().collect();
        ops.push(Op::Put {
            key,
            value: serde_json::to_vec(&vm).map_err(StoreError::from)?,
            when: Precondition::ModRevision(rev),
            lease: None,
        });
        match ctx.store.txn(ops).await {
            Ok(_) => {
                view.record(vm);
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
