//! HA: the controller's failure detector and failover.
//!
//! Three independent signals decide that a host failed (as vSphere HA uses network and datastore
//! heartbeats):
//! 1. the host's own reports (and writes of its agent; reads do not count), every
//!    [`timing::RENEW_EVERY`]; silent for [`timing::SILENT_AFTER`]: suspected;
//! 2. its peers' gossip: a host that a responding peer still sees alive (and that renews its
//!    lease) has only lost the controller; a peer's word alone never keeps a host from failing
//!    over, since any host could claim any peer alive (see [`judge`]);
//! 3. its storage lease on each shared datastore (`PATH/.corral-ha/HOST`), which the controller
//!    watches change: a protected VM is restarted elsewhere only once the lease on its datastore
//!    has been seen unchanged for [`timing::LEASE_EXPIRES_AFTER`], by when its host has killed it
//!    (see `corral_agent::ha` and docs/HA.md).
//!
//! Restarts go in priority order (a tier waits until the tier above runs, or for 20 s), a VM
//! waits for the VMs it names in `ha_after`, and each restart is a compare-and-swap of the VM's
//! record from its failed host to a new one, so a host that comes back and claims its VM first
//! wins, and the failover (re-evaluated from the store every tick) happens once even across a
//! controller restart.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use corral_api::host_protocol::{HaReply, HaReport};
use corral_api::{
    keys, timing, Datastore, DatastoreKind, HaPolicy, HaProtection, Host, IsolationResponse,
    PowerState, Vm, VmEvent, VmPhase,
};
use corral_scheduler::Decision;
use corral_store::{list_json, Op, Precondition, StoreError};

use crate::{events, placement, ApiError, Ctx};

/// A lower priority tier is restarted once the tier above runs, or after this long.
const TIER_TIMEOUT: Duration = Duration::from_secs(20);

/// What the failure detector sees of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostHa {
    Live,
    /// Silent to the controller, but a peer sees it alive and it renews a storage lease.
    Partitioned,
    /// Silent, no peer sees it, and it still renews a storage lease: its VMs keep running.
    Isolated,
    /// Silent, no peer sees it, no lease renewed for [`timing::LEASE_STALE_AFTER`].
    Failed,
}

impl HostHa {
    fn describe(self) -> &'static str {
        match self {
            HostHa::Live => "live",
            HostHa::Partitioned => {
                "cut off from the controller; peers see it alive, its VMs keep running"
            }
            HostHa::Isolated => {
                "isolated; it still renews its storage lease, so its VMs keep running"
            }
            HostHa::Failed => {
                "failed; its protected VMs are restarted elsewhere once its storage leases expire"
            }
        }
    }
}

/// What the three signals say of a host: its own reports (or writes), a peer's gossip, its
/// storage lease. A peer's word is never enough to keep a host from being failed: a compromised
/// (or confused) host could claim any peer alive. It only tells a host cut off from the controller
/// (`Partitioned`) from one cut off from everything (`Isolated`) while the lease, which the host
/// writes itself and fences on, still shows it alive.
fn judge(reports: bool, peer_sees: bool, lease: LeaseSeen) -> HostHa {
    match (reports, lease, peer_sees) {
        (true, _, _) => HostHa::Live,
        (false, LeaseSeen::Fresh, true) => HostHa::Partitioned,
        (false, LeaseSeen::Fresh, false) => HostHa::Isolated,
        (false, LeaseSeen::Stale, _) => HostHa::Failed,
        // No lease the controller can read: nothing of it can be restarted anyway (a restart
        // needs the lease seen expired), so the peers' word is all there is to report.
        (false, LeaseSeen::None, true) => HostHa::Partitioned,
        (false, LeaseSeen::None, false) => HostHa::Failed,
    }
}

/// What the controller sees of a host's storage leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaseSeen {
    /// No lease file of the host on any datastore the controller reads.
    None,
    /// One renewed within [`timing::LEASE_STALE_AFTER`].
    Fresh,
    /// Only leases older than that.
    Stale,
}

struct Lease {
    content: Option<Vec<u8>>,
    changed: Instant,
}

#[derive(Default)]
struct Inner {
    /// When each host was last heard from.
    seen: HashMap<String, Instant>,
    /// Each host's last report: when, and the peers it saw alive.
    reports: HashMap<String, (Instant, Vec<String>)>,
    /// The isolation response each host last reported applying.
    applied: HashMap<String, IsolationResponse>,
    /// Datastore -> host -> the lease file as last read, and when it last changed (hosts that
    /// never wrote one there have no entry).
    leases: HashMap<String, HashMap<String, Lease>>,
    /// Shared datastores whose lease directory the controller can read now, and since when.
    observable: HashMap<String, Instant>,
    states: HashMap<String, (HostHa, Instant)>,
    /// Restarts under way: VM uid -> (failed host, when it was declared failed).
    restarting: HashMap<uuid::Uuid, (String, Instant)>,
    /// VMs whose restart could not be placed, reported once.
    blocked: HashSet<uuid::Uuid>,
    /// VMs of failed hosts whose RBD disk was fenced at the storage (its clients blocklisted),
    /// so they may run elsewhere; until they do.
    storage_fenced: HashSet<uuid::Uuid>,
    /// What every report is answered with, as of the last tick: the isolation response and each
    /// host's gossip address (so reports, four a second per host, read nothing from the store).
    isolation_response: IsolationResponse,
    gossip: Vec<(String, std::net::SocketAddr)>,
}

/// What one tick of the detector found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Judged {
    /// Hosts whose state changed (a host first seen live is no news).
    transitions: Vec<(String, HostHa)>,
    /// Hosts not heard from for [`placement::HEARTBEAT_TIMEOUT`] (or not yet).
    quiet: HashSet<String>,
    /// Hosts failed or isolated: their VMs are HA's business.
    failed: HashSet<String>,
}

impl Inner {
    /// Takes in the lease files as read at `now`: a lease changed when its content did (a file
    /// that vanished is a change too). Only files that exist and entries already kept are looked
    /// at, not every host.
    fn observe_leases(&mut self, read: LeaseFiles, now: Instant) {
        let mut observable = HashMap::new();
        for (ds, files) in read {
            let Some(files) = files else { continue };
            let since = self.observable.get(&ds).copied().unwrap_or(now);
            observable.insert(ds.clone(), since);
            let kept = self.leases.entry(ds).or_default();
            let present: HashSet<String> = files.iter().map(|(h, _)| h.clone()).collect();
            for (host, content) in files {
                match kept.get_mut(&host) {
                    Some(l) if l.content.as_ref() == Some(&content) => {}
                    Some(l) => {
                        l.content = Some(content);
                        l.changed = now;
                    }
                    None => {
                        let content = Some(content);
                        kept.insert(
                            host,
                            Lease {
                                content,
                                changed: now,
                            },
                        );
                    }
                }
            }
            for (host, l) in kept.iter_mut() {
                if l.content.is_some() && !present.contains(host) {
                    l.content = None;
                    l.changed = now;
                }
            }
        }
        self.observable = observable;
    }

    /// How the lease of `host` on the datastores the controller reads looks at `now`.
    fn lease_seen(&self, host: &str, now: Instant) -> LeaseSeen {
        let mut lease = LeaseSeen::None;
        for (ds, hosts) in &self.leases {
            let Some(l) = hosts
                .get(host)
                .filter(|l| self.observable.contains_key(ds) && l.content.is_some())
            else {
                continue;
            };
            if now.saturating_duration_since(l.changed) < timing::LEASE_STALE_AFTER {
                return LeaseSeen::Fresh;
            }
            lease = LeaseSeen::Stale;
        }
        lease
    }

    /// Whether `host`'s lease on `datastore` has been seen unchanged for
    /// [`timing::LEASE_EXPIRES_AFTER`] at `now` (by when the host has killed its copies). A host
    /// that never wrote a lease there counts from when the datastore could first be read.
    fn lease_expired(&self, datastore: &str, host: &str, now: Instant) -> bool {
        let Some(since) = self.observable.get(datastore) else {
            return false;
        };
        let changed = self
            .leases
            .get(datastore)
            .and_then(|hosts| hosts.get(host))
            .map_or(*since, |l| l.changed);
        now.saturating_duration_since(changed) >= timing::LEASE_EXPIRES_AFTER
    }

    /// Judges every host in `hosts` at `now` (the detector started at `started`: a host never
    /// heard from counts as silent from then) and keeps each one's state.
    fn judge(&mut self, hosts: &[std::sync::Arc<Host>], started: Instant, now: Instant) -> Judged {
        let silent = |inner: &Inner, h: &str| {
            let at = inner.seen.get(h).copied().unwrap_or(started);
            now.saturating_duration_since(at) > timing::SILENT_AFTER
        };
        // The hosts a responding peer sees alive, gathered once: asking every report about every
        // host would cost hosts x reports (10^8 at 10,000 hosts) four times a second, with the
        // reports' lock held.
        let seen_by_peers: HashSet<String> = self
            .reports
            .iter()
            .filter(|(p, (at, _))| {
                !silent(self, p) && now.saturating_duration_since(*at) < timing::SILENT_AFTER
            })
            .flat_map(|(p, (_, alive))| alive.iter().filter(move |a| *a != p))
            .cloned()
            .collect();
        let mut judged = Judged::default();
        for h in hosts {
            let name = h.name.as_str();
            let heard = self
                .seen
                .get(name)
                .map(|at| now.saturating_duration_since(*at));
            if heard.is_none_or(|e| e > placement::HEARTBEAT_TIMEOUT) {
                judged.quiet.insert(name.to_string());
            }
            let state = judge(
                !silent(self, name),
                seen_by_peers.contains(name),
                self.lease_seen(name, now),
            );
            // Only a change costs an allocation (this runs four times a second for every host).
            let previous = self.states.get(name).map(|(s, _)| *s);
            if previous != Some(state) {
                self.states.insert(name.to_string(), (state, now));
                if previous.is_some() || state != HostHa::Live {
                    judged.transitions.push((name.to_string(), state));
                }
            }
        }
        // A removed host (or one in standby) is judged no more: its last state, failed perhaps,
        // must not keep HA looking for VMs to restart. Every host above has a state, so more
        // states than hosts means some are stale.
        if self.states.len() > hosts.len() {
            let names: HashSet<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            self.states.retain(|h, _| names.contains(h.as_str()));
        }
        judged.failed = self
            .states
            .iter()
            .filter(|(_, (s, _))| matches!(s, HostHa::Failed | HostHa::Isolated))
            .map(|(h, _)| h.clone())
            .collect();
        judged
    }
}

/// The controller's failure detector: in memory, rebuilt from scratch after a restart (it then
/// waits a full lease period before it declares anything failed).
pub struct Monitor {
    started: Instant,
    inner: Mutex<Inner>,
    /// Hosts not heard from for [`placement::HEARTBEAT_TIMEOUT`] (or not yet), as of the last
    /// tick: placement asks this (usually empty) set, not the reports, about every host.
    /// None until the first tick.
    quiet: Mutex<Option<std::sync::Arc<HashSet<String>>>>,
}

impl Default for Monitor {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            inner: Mutex::default(),
            quiet: Mutex::default(),
        }
    }
}

impl Monitor {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A write from the host's agent arrived: a host that writes is alive.
    pub(crate) fn seen(&self, host: &str) {
        mark(&mut self.lock().seen, host, Instant::now());
    }

    /// The hosts not heard from lately (see [`Monitor::quiet`]); none before the first tick.
    pub(crate) fn quiet(&self) -> Option<std::sync::Arc<HashSet<String>>> {
        self.quiet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the host's agent was heard from lately, as of the last tick.
    pub(crate) fn heard(&self, host: &str) -> bool {
        self.quiet().is_some_and(|q| !q.contains(host))
    }

    /// When the host's agent was last heard from (a report or a write), if since this controller
    /// started.
    pub(crate) fn last_seen(&self, host: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let at = *self.lock().seen.get(host)?;
        Some(chrono::Utc::now() - chrono::Duration::from_std(at.elapsed()).ok()?)
    }

    /// The isolation response the host last reported applying.
    pub(crate) fn applied_response(&self, host: &str) -> Option<IsolationResponse> {
        self.lock().applied.get(host).copied()
    }

    /// How HA sees the host, for `corral host show`.
    pub(crate) fn describe(&self, host: &str) -> Option<String> {
        self.lock().states.get(host).map(|(s, since)| {
            if *s == HostHa::Live {
                s.describe().to_string()
            } else {
                format!(
                    "{} (for {:.1} s)",
                    s.describe(),
                    since.elapsed().as_secs_f64()
                )
            }
        })
    }
}

/// Sets `host`'s entry, allocating a key only for a host not seen before (reports come four times
/// a second from every host).
fn mark<V>(map: &mut HashMap<String, V>, host: &str, value: V) {
    match map.get_mut(host) {
        Some(v) => *v = value,
        None => {
            map.insert(host.to_string(), value);
        }
    }
}

/// Records a host's report and answers with what it needs: the isolation response and its peers.
pub fn report(ctx: &Ctx, host: &str, r: HaReport) -> HaReply {
    let mut inner = ctx.ha.lock();
    let now = Instant::now();
    mark(&mut inner.seen, host, now);
    mark(&mut inner.reports, host, (now, r.peers_alive));
    if let Some(applied) = r.isolation_response {
        mark(&mut inner.applied, host, applied);
    }
    HaReply {
        isolation_response: inner.isolation_response,
        peers: inner
            .gossip
            .iter()
            .filter(|(name, _)| name != host)
            .cloned()
            .collect(),
    }
}

/// Whether HA protects `vm`, and why not when it does not.
pub fn protection(vm: &Vm, datastores: &[Datastore]) -> HaProtection {
    let no = |reason: String| HaProtection {
        protected: false,
        reason,
    };
    if vm.spec.ha == HaPolicy::Off {
        return no("HA is off for this VM: create it with ha: restart to protect it".into());
    }
    if !vm.spec.wants_ha_restart() {
        return no(format!(
            "its disk is on its host's local datastore, which no other host can reach: move it to a shared one (POST .../vms/{}/move-storage)",
            vm.meta.name
        ));
    }
    match datastores.iter().find(|d| d.name == vm.spec.datastore) {
        Some(d) if d.shared => {}
        _ => {
            return no(format!(
                "datastore {} is not shared, so no other host can reach the disk: use a shared datastore",
                vm.spec.datastore
            ))
        }
    }
    if let Some(pin) = &vm.spec.host {
        return no(format!(
            "it is pinned to host {pin}, so it cannot run anywhere else"
        ));
    }
    if vm.spec.power == PowerState::Stopped {
        return no("it is stopped: HA restarts VMs that should run".into());
    }
    HaProtection {
        protected: true,
        reason: format!(
            "if its host fails it runs again on another host ({:?} priority)",
            vm.spec.ha_priority
        )
        .to_lowercase(),
    }
}

/// Each datastore's lease files as (host, content), or None where the controller cannot read them.
type LeaseFiles = Vec<(String, Option<Vec<(String, Vec<u8>)>>)>;

/// Reads the lease files of every shared datastore.
fn read_leases(datastores: Vec<(String, PathBuf)>) -> LeaseFiles {
    datastores
        .into_iter()
        .map(|(name, path)| {
            let dir = corral_api::layout::lease_dir(&path);
            let files = match std::fs::read_dir(&dir) {
                Ok(entries) => Some(
                    entries
                        .flatten()
                        .filter_map(|e| {
                            let host = e.file_name().to_string_lossy().into_owned();
                            if host.starts_with('.') {
                                return None;
                            }
                            std::fs::read(e.path()).ok().map(|c| (host, c))
                        })
                        .collect(),
                ),
                // Nobody renewed there yet: an empty directory, as far as leases go.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_dir() => {
                    Some(Vec::new())
                }
                Err(_) => None,
            };
            (name, files)
        })
        .collect()
}

/// Watches the cluster until the task is dropped.
pub(crate) fn spawn(ctx: Ctx) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(timing::RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tick.tick().await;
            if let Err(e) = watch(&ctx, n).await {
                tracing::warn!(error = %e, "HA check failed");
            }
            n += 1;
            if n.is_multiple_of(240) {
                if let Err(e) = events::prune(&*ctx.store).await {
                    tracing::warn!(error = %e, "pruning events failed");
                }
            }
        }
    });
}

/// One tick: reads leases and hosts, judges every host ([`Inner::observe_leases`],
/// [`Inner::judge`]), reports what changed, and, when a host failed or restarts are under way,
/// reads the VMs (once) to restart what needs it.
async fn watch(ctx: &Ctx, tick: u64) -> Result<(), ApiError> {
    let (datastores, _) = list_json::<Datastore>(&*ctx.store, keys::DATASTORES).await?;
    let shared: Vec<(String, PathBuf)> = datastores
        .iter()
        .filter_map(|d| Some((d.name.clone(), d.lease_directory()?.to_path_buf())))
        .collect();
    let read = tokio::task::spawn_blocking(move || read_leases(shared))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    // A host DPM put in standby is silent on purpose (it has no VMs left to restart).
    let hosts: Vec<std::sync::Arc<Host>> = {
        let o = ctx.cache.read(&*ctx.store).await?;
        o.hosts
            .values()
            .filter(|e| !e.value.status.standby)
            .map(|e| e.value.clone())
            .collect()
    };
    let isolation_response = placement::settings(ctx).await?.ha_isolation_response;
    let Judged {
        transitions,
        quiet,
        failed,
    } = {
        let mut inner = ctx.ha.lock();
        inner.isolation_response = isolation_response;
        inner.gossip = hosts
            .iter()
            .filter_map(|h| h.status.gossip.map(|g| (h.name.clone(), g)))
            .collect();
        let now = Instant::now();
        inner.observe_leases(read, now);
        inner.judge(&hosts, ctx.ha.started, now)
    };
    *ctx.ha
        .quiet
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::sync::Arc::new(quiet));
    for (host, state) in transitions {
        let reason = match state {
            HostHa::Live => "HostBack",
            HostHa::Partitioned => "HostPartitioned",
            HostHa::Isolated => "HostIsolated",
            HostHa::Failed => "HostFailed",
        };
        events::record(
            &*ctx.store,
            reason,
            &format!("host/{host}"),
            &format!("host {host}: {}", state.describe()),
        )
        .await;
    }
    // Restarts decided before a controller restart are not in memory: every 5 s, look anyway.
    let restarting = !ctx.ha.lock().restarting.is_empty();
    if failed.is_empty() && !restarting && !tick.is_multiple_of(20) {
        return Ok(());
    }
    // Only the VMs HA has business with: on a failed host, or restarted after a failure.
    let vms: Vec<(String, u64, Vm)> = {
        let o = ctx.cache.read(&*ctx.store).await?;
        o.vms
            .iter()
            .filter(|(_, e)| {
                let host = e.value.status.host.as_deref().unwrap_or_default();
                failed.contains(host) || restarted_at(&e.value).is_some()
            })
            .map(|(k, e)| (k.clone(), e.revision, (*e.value).clone()))
            .collect()
    };
    follow_restarts(ctx, &vms).await?;
    if !failed.is_empty() {
        fail_over(ctx, &failed, &datastores, &vms).await?;
    }
    Ok(())
}

/// Reports restarted VMs once they run on their new host: the VM's last event says it was
/// restarted elsewhere and it runs now. The report is recorded in the VM's events too (a
/// compare-and-swap, tried again next tick if it loses), so it is made once, also across a
/// controller restart.
async fn follow_restarts(ctx: &Ctx, vms: &[(String, u64, Vm)]) -> Result<(), ApiError> {
    for (key, rev, vm) in vms {
        let Some(restarted) = vm.status.events.last().filter(|e| e.reason == RESTARTED) else {
            continue;
        };
        if vm.status.phase != VmPhase::Running {
            continue;
        }
        let since_decision = (chrono::Utc::now() - restarted.at)
            .to_std()
            .unwrap_or_default();
        let declared = ctx
            .ha
            .lock()
            .restarting
            .get(&vm.meta.uid)
            .map(|(failed, at)| {
                format!(
                    ", {:.1} s after {failed} was declared failed",
                    at.elapsed().as_secs_f64()
                )
            })
            .unwrap_or_default();
        let msg = format!(
            "{} runs again on {}, {:.1} s after its restart was decided{declared}",
            vm.meta.name,
            vm.status.host.as_deref().unwrap_or("?"),
            since_decision.as_secs_f64()
        );
        let mut vm = vm.clone();
        vm.status
            .push_event(VmEvent::new("RunningAgain", msg.clone()));
        let subject = format!("vm/{}/{}", vm.meta.project, vm.meta.name);
        // The VM's event and the cluster's in one transaction: a controller stopped between
        // the two would otherwise lose the cluster's for good (the VM's says it was made).
        let ops = vec![
            Op::Put {
                key: key.clone(),
                value: serde_json::to_vec(&vm).map_err(StoreError::from)?,
                when: Precondition::ModRevision(*rev),
                lease: None,
            },
            events::op("VmRestarted", &subject, &msg)?,
        ];
        match ctx.store.txn(ops).await {
            Ok(_) => {
                ctx.ha.lock().restarting.remove(&vm.meta.uid);
                events::log("VmRestarted", &subject, &msg);
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// When the VM was last restarted after a failure (it is in flight until it runs).
fn restarted_at(vm: &Vm) -> Option<chrono::DateTime<chrono::Utc>> {
    vm.status
        .events
        .iter()
        .rev()
        .find(|e| e.reason == RESTARTED)
        .map(|e| e.at)
}

const RESTARTED: &str = "RestartedElsewhere";

/// The VMs to restart now, in order: the highest priority tier among those waiting (or still
/// starting after a restart, for up to [`TIER_TIMEOUT`]), less those that wait for another VM
/// that is waiting or starting. Dependencies that form a cycle are ignored rather than left to
/// block for ever.
pub(crate) fn restart_order<'a>(candidates: &[&'a Vm], in_flight: &[&Vm]) -> Vec<&'a Vm> {
    let Some(top) = candidates
        .iter()
        .chain(in_flight.iter())
        .map(|v| v.spec.ha_priority)
        .min()
    else {
        return Vec::new();
    };
    let waiting: HashSet<(String, String)> = candidates
        .iter()
        .chain(in_flight.iter())
        .map(|v| (v.meta.project.clone(), v.meta.name.clone()))
        .collect();
    let mut tier: Vec<&Vm> = candidates
        .iter()
        .copied()
        .filter(|v| v.spec.ha_priority == top)
        .collect();
    tier.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    let free: Vec<&Vm> = tier
        .iter()
        .copied()
        .filter(|v| {
            !v.spec
                .ha_after
                .iter()
                .any(|d| waiting.contains(&(v.meta.project.clone(), d.clone())))
        })
        .collect();
    if free.is_empty() && in_flight.iter().all(|v| v.spec.ha_priority != top) {
        return tier;
    }
    free
}

/// Where a restart can go: the cluster's placement view in the controller, a fixed answer in
/// tests.
pub(crate) trait RestartPlacement {
    /// A host other than its own that `vm` can run on, with that host's revision as read (to
    /// guard the restart), or the reason there is none.
    fn place(&self, vm: &Vm) -> Result<(String, u64), String>;
    /// Counts `vm` where it is placed now, for the decisions that follow.
    fn placed(&mut self, vm: Vm);
}

impl RestartPlacement for placement::ClusterView {
    fn place(&self, vm: &Vm) -> Result<(String, u64), String> {
        match self.decide_migration(vm, None) {
            Decision::Place { host } => {
                let revision = self.host_revision(&host);
                Ok((host, revision))
            }
            Decision::Pending { reason } => Err(reason),
        }
    }

    fn placed(&mut self, vm: Vm) {
        self.record(vm);
    }
}

/// One thing the failover does.
#[derive(Debug)]
pub(crate) enum Restart {
    /// Move the VM at `key` (as read at `revision`) to `target` (as read at `target_revision`),
    /// recording `vm` as its new record and `event` in the cluster's events.
    Move {
        key: String,
        revision: u64,
        vm: Box<Vm>,
        from: String,
        target: String,
        target_revision: u64,
        event: String,
    },
    /// No host can take the VM now: said once, tried again next tick.
    Blocked {
        uid: uuid::Uuid,
        subject: String,
        message: String,
    },
}

/// The restarts to make now, in order: the protected VMs of `failed` hosts whose storage lease
/// `expired`, in [`restart_order`], each placed on a host that takes it (and counted there for
/// the ones after it). `now` is the wall clock, for the tier timeout.
pub(crate) fn plan_restarts(
    failed: &HashSet<String>,
    datastores: &[Datastore],
    vms: &[(String, u64, Vm)],
    expired: impl Fn(&Vm, &str) -> bool,
    place: &mut dyn RestartPlacement,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<Restart> {
    let candidates: Vec<&Vm> = vms
        .iter()
        .map(|(_, _, v)| v)
        .filter(|v| {
            let host = v.status.host.as_deref().unwrap_or_default();
            failed.contains(host)
                && v.meta.deletion_requested_at.is_none()
                && protection(v, datastores).protected
                && expired(v, host)
        })
        .collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    let in_flight: Vec<&Vm> = vms
        .iter()
        .map(|(_, _, v)| v)
        .filter(|v| {
            v.status.phase != VmPhase::Running
                && !failed.contains(v.status.host.as_deref().unwrap_or_default())
                && restarted_at(v)
                    .is_some_and(|at| (now - at).to_std().unwrap_or_default() < TIER_TIMEOUT)
        })
        .collect();
    let order: Vec<uuid::Uuid> = restart_order(&candidates, &in_flight)
        .iter()
        .map(|v| v.meta.uid)
        .collect();
    let mut restarts = Vec::new();
    for uid in order {
        let Some((key, rev, vm)) = vms.iter().find(|(_, _, v)| v.meta.uid == uid) else {
            continue;
        };
        let from = vm.status.host.clone().unwrap_or_default();
        let (target, target_revision) = match place.place(vm) {
            Ok(to) => to,
            Err(reason) => {
                let message = format!("{} cannot run again yet: {reason}", vm.meta.name);
                let subject = format!("vm/{}/{}", vm.meta.project, vm.meta.name);
                restarts.push(Restart::Blocked {
                    uid,
                    subject,
                    message,
                });
                continue;
            }
        };
        let mut v = vm.clone();
        let msg = format!("{from} failed; restarted on {target}");
        v.status.host = Some(target.clone());
        v.status.phase = VmPhase::Pending;
        v.status.pid = None;
        v.status.run_dir = None;
        v.status.started_at = None;
        v.status.set_condition(
            corral_api::ConditionType::Running,
            false,
            "HostFailed",
            &format!("{from} failed"),
        );
        v.status.set_condition(
            corral_api::ConditionType::Scheduled,
            true,
            "FailedOver",
            &msg,
        );
        v.status.push_event(VmEvent::new(RESTARTED, msg.clone()));
        let event = format!(
            "{}: {msg} ({:?} priority, storage lease expired)",
            vm.meta.name, vm.spec.ha_priority
        )
        .to_lowercase();
        place.placed(v.clone());
        restarts.push(Restart::Move {
            key: key.clone(),
            revision: *rev,
            vm: Box::new(v),
            from,
            target,
            target_revision,
            event,
        });
    }
    restarts
}

/// RBD datastores have no lease files: before a protected VM of a failed host runs elsewhere, its
/// disk is fenced at the storage instead, once: every client that has the image open or holds
/// its lock is cut off the Ceph cluster, so the old copy, dead or merely cut off, can never write
/// to it again (see docs/HA.md). A fence that fails is tried again on the next tick; the VM waits.
async fn fence_at_storage(
    ctx: &Ctx,
    failed: &HashSet<String>,
    datastores: &[Datastore],
    vms: &[(String, u64, Vm)],
) {
    for (_, _, vm) in vms {
        let host = vm.status.host.as_deref().unwrap_or_default();
        let Some(ds) = datastores
            .iter()
            .find(|d| d.name == vm.spec.datastore && d.kind == DatastoreKind::Rbd)
        else {
            continue;
        };
        if !failed.contains(host)
            || vm.meta.deletion_requested_at.is_some()
            || !protection(vm, datastores).protected
            || ctx.ha.lock().storage_fenced.contains(&vm.meta.uid)
        {
            continue;
        }
        let subject = format!("vm/{}/{}", vm.meta.project, vm.meta.name);
        match crate::datastores::fence_disk(ctx, ds, vm.meta.uid).await {
            Ok(cut) => {
                ctx.ha.lock().storage_fenced.insert(vm.meta.uid);
                let clients = if cut.is_empty() {
                    "no client had it open".to_string()
                } else {
                    format!("clients {} cut off the Ceph cluster", cut.join(", "))
                };
                let msg = format!(
                    "{}'s disk on RBD datastore {} fenced before it runs away from failed host {host}: {clients}",
                    vm.meta.name, ds.name
                );
                events::record(&*ctx.store, "StorageFenced", &subject, &msg).await;
            }
            Err(e) => {
                tracing::warn!(vm = %subject, error = %e, "could not fence the VM's RBD disk; its restart waits")
            }
        }
    }
}

/// Makes the restarts [`plan_restarts`] decides, each a compare-and-swap of the VM from its failed
/// host to the new one, with its event, in one transaction.
async fn fail_over(
    ctx: &Ctx,
    failed: &HashSet<String>,
    datastores: &[Datastore],
    vms: &[(String, u64, Vm)],
) -> Result<(), ApiError> {
    fence_at_storage(ctx, failed, datastores, vms).await;
    let _one_at_a_time = ctx.placement.lock().await;
    let mut view = placement::view(ctx).await?;
    view.down = failed.clone();
    let restarts = {
        let on_rbd = |vm: &Vm| {
            datastores
                .iter()
                .any(|d| d.name == vm.spec.datastore && d.kind == DatastoreKind::Rbd)
        };
        let expired = |vm: &Vm, host: &str| {
            let inner = ctx.ha.lock();
            if on_rbd(vm) {
                inner.storage_fenced.contains(&vm.meta.uid)
            } else {
                inner.lease_expired(&vm.spec.datastore, host, Instant::now())
            }
        };
        plan_restarts(
            failed,
            datastores,
            vms,
            expired,
            &mut view,
            chrono::Utc::now(),
        )
    };
    for restart in restarts {
        let Restart::Move {
            key,
            revision,
            vm,
            from,
            target,
            target_revision,
            event,
        } = restart
        else {
            if let Restart::Blocked {
                uid,
                subject,
                message,
            } = restart
            {
                // Said once, until the VM is restarted.
                if ctx.ha.lock().blocked.insert(uid) {
                    events::record(&*ctx.store, "RestartBlocked", &subject, &message).await;
                }
            }
            continue;
        };
        let subject = format!("vm/{}/{}", vm.meta.project, vm.meta.name);
        let ops = vec![
            Op::Check {
                key: keys::host(&target),
                when: Precondition::ModRevision(target_revision),
            },
            Op::Put {
                key,
                value: serde_json::to_vec(&*vm).map_err(StoreError::from)?,
                when: Precondition::ModRevision(revision),
                lease: None,
            },
            events::op("VmRestarting", &subject, &event)?,
        ];
        match ctx.store.txn(ops).await {
            Ok(_) => {
                {
                    let mut inner = ctx.ha.lock();
                    let declared = inner
                        .states
                        .get(&from)
                        .map_or_else(Instant::now, |(_, since)| *since);
                    inner.blocked.remove(&vm.meta.uid);
                    inner.storage_fenced.remove(&vm.meta.uid);
                    inner.restarting.insert(vm.meta.uid, (from, declared));
                }
                events::log("VmRestarting", &subject, &event);
            }
            // The VM or the target changed since they were read (the failed host may have come
            // back and claimed it): judged again on the next tick.
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// HA admission control: with `ha_host_failures_to_tolerate` = N, the protected VMs (with `extra`,
/// a VM about to be created or protected) must fit in what is left after the N largest hosts
/// fail. Returns the sentence saying why not.
pub(crate) fn admission(
    view: &placement::ClusterView,
    datastores: &[Datastore],
    extra: Option<&Vm>,
) -> Result<(), ApiError> {
    let n = view.settings.ha_host_failures_to_tolerate as usize;
    if n == 0 {
        return Ok(());
    }
    let covered = |v: &Vm| {
        let mut running = v.clone();
        running.spec.power = PowerState::Running;
        running.spec.host = None;
        protection(&running, datastores).protected
    };
    let (mut cpus, mut memory) = (0f64, 0f64);
    for v in view
        .vms
        .iter()
        .map(|v| &**v)
        .filter(|v| extra.is_none_or(|e| e.meta.uid != v.meta.uid))
        .filter(|v| protection(v, datastores).protected)
        .chain(extra.filter(|e| covered(e)))
    {
        cpus += f64::from(v.spec.cpus);
        memory += v.spec.memory_bytes as f64;
    }
    let mut hosts: Vec<(f64, f64)> = view
        .hosts
        .iter()
        .map(|h| {
            let h = &h.value;
            (
                f64::from(h.status.cpus) * view.settings.cpu_overcommit,
                h.status.memory_bytes as f64 * view.settings.memory_overcommit,
            )
        })
        .collect();
    hosts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let left = hosts.get(n..).unwrap_or_default();
    let (free_cpus, free_memory) = left
        .iter()
        .fold((0f64, 0f64), |(c, m), h| (c + h.0, m + h.1));
    if cpus <= free_cpus && memory <= free_memory {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "HA admission control: protected VMs would need {cpus} vCPUs and {} of memory after {n} host failure(s), but the {} remaining host(s) offer {free_cpus:.0} vCPUs and {}: add hosts, protect fewer VMs, or lower the cluster's ha_host_failures_to_tolerate",
        corral_api::format_bytes(memory as u64),
        left.len(),
        corral_api::format_bytes(free_memory as u64)
    )))
}

#[cfg(test)]
mod tests;
