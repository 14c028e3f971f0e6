//! Simulated hosts: many fake hypervisor hosts in one process, for scale tests, DRS and DPM.
//!
//! A simulated host speaks the agent protocol a real host speaks: it registers and heartbeats its
//! host record, reports to the HA failure detector, takes the VMs the scheduler placed on it
//! through the same phases (with the same compare-and-swap writes), reports each running VM's
//! usage, and carries out both sides of a live migration, including the handover transaction. Over
//! the agent endpoint each host has its own certificate, so the controller authorizes it as it
//! would a real one. What it does not have is QEMU: a guest "boots" in [`SimSpec::boot`], its load
//! follows a [`Curve`], and a migration copies at [`SimSpec::link_bytes_per_sec`].
//!
//! Unlike a real agent, which runs one worker per VM and lists every VM on each pass of its
//! usage and network loops, the fleet shares one watch of the VMs and the migrations among all
//! its hosts and keeps the VMs of its hosts in memory: a thousand simulated hosts cost about what
//! one real host costs the controller, apart from their own heartbeats and reports.
//!
//! Faults can be injected: starts and migrations fail with a given probability, and a host can be
//! killed (it stops heartbeating, reporting and acting, as a dead machine would) and healed.
//! With DPM, a simulated host whose record asks for standby powers down once it has no VMs, and
//! wakes when the record no longer asks for it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use corral_api::{
    keys, timing, Accel, Host, HostStatus, Migration, MigrationPhase, MigrationResult, PowerState,
    Vm, VmPhase, VmUsage,
};
use corral_store::{get_json, update_json, EventKind, Precondition, Store, StoreError, Versioned};

use crate::ha::HaLink;
use crate::AgentError;
use corral_api::host_protocol::HaReport;

/// What the hypervisor field of a simulated host says.
pub const HYPERVISOR: &str = "corral-sim (simulated host)";
/// The port a simulated migration target "listens" on (and the next one for its disk export).
const SIM_MIGRATION_PORT: u16 = 49152;

/// How a VM's CPU demand moves over time, as a fraction of its vCPUs.
#[derive(Clone, Debug, PartialEq)]
pub enum Curve {
    Constant(f64),
    /// Between `low` and `high` and back every `period_s` seconds; each VM at its own phase.
    Sine {
        low: f64,
        high: f64,
        period_s: f64,
    },
}

impl Curve {
    /// The demand at `t` seconds for a VM whose phase is `phase` (0 to 1).
    pub fn at(&self, t: f64, phase: f64) -> f64 {
        match *self {
            Curve::Constant(f) => f,
            Curve::Sine {
                low,
                high,
                period_s,
            } => {
                let x = (t / period_s + phase) * std::f64::consts::TAU;
                low + (high - low) * (1.0 - x.cos()) / 2.0
            }
        }
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{s:?} is not a fraction from 0 to 1"))
}

impl FromStr for Curve {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!("bad load curve {s:?}: {why}; write a fraction of the vCPUs (\"0.8\") or \"sine:LOW-HIGH/SECONDS\" (\"sine:0.1-0.9/600\")")
        };
        let Some(sine) = s.strip_prefix("sine:") else {
            return fraction(s).map(Curve::Constant).map_err(bad);
        };
        let (range, period) = sine
            .split_once('/')
            .ok_or_else(|| bad("no period".into()))?;
        let (low, high) = range
            .split_once('-')
            .ok_or_else(|| bad("no range".into()))?;
        let period_s = period
            .parse::<f64>()
            .ok()
            .filter(|p| *p > 0.0)
            .ok_or_else(|| bad(format!("period {period:?} is not a positive number")))?;
        let (low, high) = (fraction(low).map_err(bad)?, fraction(high).map_err(bad)?);
        if low > high {
            return Err(bad("LOW is above HIGH".into()));
        }
        Ok(Curve::Sine {
            low,
            high,
            period_s,
        })
    }
}

/// Load curves by VM name prefix, the first that matches wins: `hot-=0.9,=sine:0.1-0.5/300`.
/// A VM no prefix matches idles at 5%; `none` turns usage reports off (DRS then counts what each
/// VM was given).
#[derive(Clone, Debug, PartialEq)]
pub struct Loads(Option<Vec<(String, Curve)>>);

impl Default for Loads {
    fn default() -> Self {
        Loads(Some(Vec::new()))
    }
}

impl FromStr for Loads {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(Loads(None));
        }
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (prefix, curve) = p.split_once('=').ok_or_else(|| {
                    format!("bad load {p:?}: write NAME-PREFIX=CURVE, e.g. \"web-=0.7\" (an empty prefix matches every VM)")
                })?;
                Ok((prefix.to_string(), curve.parse()?))
            })
            .collect::<Result<Vec<_>, String>>()
            .map(|v| Loads(Some(v)))
    }
}

impl Loads {
    fn of(&self, name: &str) -> Option<Curve> {
        let curves = self.0.as_ref()?;
        Some(
            curves
                .iter()
                .find(|(p, _)| name.starts_with(p.as_str()))
                .map_or(Curve::Constant(0.05), |(_, c)| c.clone()),
        )
    }
}

/// What every host of a fleet is like.
#[derive(Clone, Debug)]
pub struct SimSpec {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Where the hosts say they receive migrations.
    pub address: IpAddr,
    /// How long a guest takes to start, and a host to wake from standby.
    pub boot: Duration,
    /// The chance that a VM start fails, and that a migration fails.
    pub fail_starts: f64,
    pub fail_migrations: f64,
    pub loads: Loads,
    /// The share of its memory a guest touches.
    pub memory_use: f64,
    /// How fast a migration copies memory.
    pub link_bytes_per_sec: u64,
    /// How often each host rewrites its record (it reports to the failure detector besides).
    pub heartbeat: Duration,
}

impl Default for SimSpec {
    fn default() -> Self {
        Self {
            cpus: 32,
            memory_bytes: 256 << 30,
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            boot: Duration::from_millis(500),
            fail_starts: 0.0,
            fail_migrations: 0.0,
            loads: Loads::default(),
            memory_use: 0.5,
            link_bytes_per_sec: 1_250_000_000,
            heartbeat: crate::reconcile::HEARTBEAT_WITH_REPORTS,
        }
    }
}

/// One simulated host: its name, the store as it reaches it (its own authenticated client over
/// the agent endpoint, or the embedded store), and its link to the failure detector.
pub struct SimHost {
    pub name: String,
    pub store: Arc<dyn Store>,
    pub ha: Option<Arc<dyn HaLink>>,
}

#[derive(Default)]
struct Inner {
    /// The VMs placed on the fleet's hosts, by key, as last seen.
    vms: HashMap<String, Vm>,
    /// Unfinished migrations from or to the fleet's hosts, by key.
    migrations: HashMap<String, Migration>,
    /// Hosts killed by fault injection, and hosts in standby.
    dead: HashSet<String>,
    standby: HashSet<String>,
    /// Keys being reconciled, and keys that changed meanwhile.
    busy: HashSet<String>,
    dirty: HashSet<String>,
}

/// Many simulated hosts sharing one watch.
pub struct Fleet {
    spec: SimSpec,
    hosts: HashMap<String, SimHost>,
    /// Where the fleet reads and watches (any host's store: reads are open to every host).
    reader: Arc<dyn Store>,
    inner: Mutex<Inner>,
    started: std::time::Instant,
    dice: AtomicU64,
}

/// What a reconcile step asks for next.
enum Next {
    Done,
    Again(Duration),
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A number from 0 to 1 that is the same for the same seed (splitmix64).
fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as f64 / u64::MAX as f64
}

impl Fleet {
    /// A fleet of `hosts` (at least one), all like `spec`.
    pub fn new(spec: SimSpec, hosts: Vec<SimHost>) -> Arc<Self> {
        // The first host's certificate reads for all (tests/sim.rs kills that host to check that
        // reads do not keep a dead host alive).
        let reader = hosts
            .first()
            .map(|h| h.store.clone())
            .expect("a fleet has at least one host");
        Arc::new(Self {
            spec,
            hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
            reader,
            inner: Mutex::default(),
            started: std::time::Instant::now(),
            dice: AtomicU64::new(Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64),
        })
    }

    /// Runs the hosts until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        for name in self.hosts.keys() {
            tokio::spawn(self.clone().host_loop(name.clone()));
        }
        tokio::spawn(self.clone().usage_loop());
        tokio::spawn(self.clone().follow(keys::MIGRATIONS));
        self.follow(keys::VMS).await;
    }

    /// Kills a host (it goes silent and does nothing, as a dead machine), or brings it back.
    pub fn set_dead(&self, host: &str, dead: bool) {
        let mut inner = lock(&self.inner);
        if dead {
            inner.dead.insert(host.to_string());
        } else {
            inner.dead.remove(host);
        }
    }

    /// Keeps the dead hosts what `file` lists (one name per line), read every half second, so
    /// another process (`corral lab fault`) can kill and heal simulated hosts.
    pub async fn follow_faults(self: Arc<Self>, file: PathBuf) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let listed: HashSet<String> = std::fs::read_to_string(&file)
                .unwrap_or_default()
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| self.hosts.contains_key(l))
                .collect();
            let mut inner = lock(&self.inner);
            for h in inner.dead.difference(&listed) {
                tracing::info!(host = %h, "simulated host healed");
            }
            for h in listed.difference(&inner.dead) {
                tracing::warn!(host = %h, "simulated host killed (fault injection)");
            }
            inner.dead = listed;
        }
    }

    fn roll(&self, chance: f64) -> bool {
        chance > 0.0 && unit(self.dice.fetch_add(1, Ordering::Relaxed)) < chance
    }

    /// The host is one of ours and acts: neither dead nor in standby.
    fn acts(&self, host: Option<&str>) -> Option<&SimHost> {
        let h = self.hosts.get(host?)?;
        let inner = lock(&self.inner);
        (!inner.dead.contains(&h.name) && !inner.standby.contains(&h.name)).then_some(h)
    }

    fn usage(&self, vm: &Vm) -> Option<VmUsage> {
        let curve = self.spec.loads.of(&vm.meta.name)?;
        let phase = unit(vm.meta.uid.as_u64_pair().0);
        let t = self.started.elapsed().as_secs_f64();
        Some(VmUsage {
            cpu_cores: curve.at(t, phase) * f64::from(vm.spec.cpus),
            memory_bytes: (vm.spec.memory_bytes as f64 * self.spec.memory_use) as u64,
            measured_at: Utc::now(),
        })
    }

    fn status(&self, standby: bool) -> HostStatus {
        HostStatus {
            cpus: self.spec.cpus,
            memory_bytes: self.spec.memory_bytes,
            accel: Accel::Kvm,
            hypervisor: HYPERVISOR.into(),
            last_heartbeat: Utc::now(),
            gossip: None,
            address: Some(self.spec.address),
            power_control: true,
            standby,
            capacity_refused: None,
        }
    }

    /// Whether nothing runs on or moves to or from the host.
    fn empty(&self, host: &str) -> bool {
        let inner = lock(&self.inner);
        !inner
            .vms
            .values()
            .any(|v| v.status.host.as_deref() == Some(host))
            && !inner
                .migrations
                .values()
                .any(|m| m.source == host || m.target == host)
    }

    /// One host's life: HA reports every [`timing::RENEW_EVERY`], heartbeats, and standby.
    async fn host_loop(self: Arc<Self>, name: String) {
        let host = &self.hosts[&name];
        let beat_every = (self.spec.heartbeat.as_millis() / timing::RENEW_EVERY.as_millis()).max(1);
        // Heartbeats spread over the period rather than all at once.
        let seed = name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        let mut n = (unit(seed) * beat_every as f64) as u128;
        let mut tick = tokio::time::interval(timing::RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tick.tick().await;
            n += 1;
            let (dead, standby) = {
                let inner = lock(&self.inner);
                (inner.dead.contains(&name), inner.standby.contains(&name))
            };
            if dead {
                continue;
            }
            if standby {
                if n.is_multiple_of(4) {
                    self.maybe_wake(host).await;
                }
                continue;
            }
            if let Some(link) = &host.ha {
                let report = HaReport {
                    peers_alive: Vec::new(),
                    gossip: None,
                };
                if let Err(e) = link.report(report).await {
                    tracing::debug!(host = %name, error = %e, "HA report failed");
                }
            }
            if !first && !n.is_multiple_of(beat_every) {
                continue;
            }
            first = false;
            match crate::reconcile::write_heartbeat(&*host.store, &name, self.status(false)).await {
                Ok(record) if record.standby && self.empty(&name) => {
                    self.go_standby(host).await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(host = %name, error = %e, "heartbeat failed"),
            }
        }
    }

    /// Powers the host down: it says so in its record, then falls silent.
    async fn go_standby(&self, host: &SimHost) {
        match crate::reconcile::write_heartbeat(&*host.store, &host.name, self.status(true)).await {
            Ok(_) => {
                tracing::info!(host = %host.name, "simulated host in standby");
                lock(&self.inner).standby.insert(host.name.clone());
            }
            Err(e) => tracing::warn!(host = %host.name, error = %e, "could not enter standby"),
        }
    }

    /// Wakes the host when its record no longer asks for standby (as Wake-on-LAN would).
    async fn maybe_wake(&self, host: &SimHost) {
        let asked = get_json::<Host>(&*host.store, &keys::host(&host.name)).await;
        let Ok(Some(Versioned { value: record, .. })) = asked else {
            return;
        };
        if record.standby {
            return;
        }
        tokio::time::sleep(self.spec.boot).await;
        match crate::reconcile::write_heartbeat(&*host.store, &host.name, self.status(false)).await
        {
            Ok(_) => {
                tracing::info!(host = %host.name, "simulated host woke from standby");
                lock(&self.inner).standby.remove(&host.name);
            }
            Err(e) => tracing::warn!(host = %host.name, error = %e, "could not wake"),
        }
    }

    /// Lists, then watches, `prefix` (VMs or migrations), keeping the fleet's share in memory and
    /// reconciling what changed; lists again when the watch ends.
    async fn follow(self: Arc<Self>, prefix: &'static str) {
        loop {
            if let Err(e) = self.follow_once(prefix).await {
                tracing::info!(error = %e, "the fleet's watch ended; listing again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn follow_once(self: &Arc<Self>, prefix: &str) -> Result<(), AgentError> {
        let (kvs, rev) = self.reader.list(prefix).await?;
        let listed: HashSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        {
            let mut inner = lock(&self.inner);
            if prefix == keys::VMS {
                inner.vms.retain(|k, _| listed.contains(k.as_str()));
            } else {
                inner.migrations.retain(|k, _| listed.contains(k.as_str()));
            }
        }
        for kv in &kvs {
            self.observe(&kv.key, Some(&kv.value));
        }
        let mut watch = self.reader.watch(prefix, rev + 1).await?;
        while let Some(ev) = watch.recv().await {
            let ev = ev?;
            let value = (ev.kind == EventKind::Put).then_some(ev.kv.value.as_slice());
            self.observe(&ev.kv.key, value);
        }
        Ok(())
    }

    /// Records a change of a VM or migration and reconciles it if it is the fleet's business.
    fn observe(self: &Arc<Self>, key: &str, value: Option<&[u8]>) {
        let ours = {
            let mut inner = lock(&self.inner);
            if key.starts_with(keys::MIGRATIONS) {
                let m = value
                    .and_then(|v| serde_json::from_slice::<Migration>(v).ok())
                    .filter(|m| {
                        self.hosts.contains_key(&m.source) || self.hosts.contains_key(&m.target)
                    });
                match m {
                    Some(m) if !m.phase.is_finished() => {
                        inner.migrations.insert(key.to_string(), m);
                        true
                    }
                    // Ended (by the other side or the controller): the source notes it once.
                    _ => inner.migrations.remove(key).is_some(),
                }
            } else {
                let vm = value
                    .and_then(|v| serde_json::from_slice::<Vm>(v).ok())
                    .filter(|v| {
                        v.status
                            .host
                            .as_deref()
                            .is_some_and(|h| self.hosts.contains_key(h))
                    });
                match vm {
                    Some(vm) => {
                        inner.vms.insert(key.to_string(), vm);
                        true
                    }
                    None => {
                        inner.vms.remove(key);
                        false
                    }
                }
            }
        };
        if ours {
            self.kick(key);
        }
    }

    /// Reconciles `key` now, or once the reconcile under way ends; never two at once for a key.
    fn kick(self: &Arc<Self>, key: &str) {
        {
            let mut inner = lock(&self.inner);
            if inner.busy.contains(key) {
                inner.dirty.insert(key.to_string());
                return;
            }
            inner.busy.insert(key.to_string());
        }
        let me = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            loop {
                let step = if key.starts_with(keys::MIGRATIONS) {
                    me.step_migration(&key).await
                } else {
                    me.step_vm(&key).await
                };
                let wait = match step {
                    Ok(Next::Done) => None,
                    Ok(Next::Again(d)) => Some(d),
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "simulated reconcile failed; retrying");
                        Some(Duration::from_secs(2))
                    }
                };
                if let Some(d) = wait {
                    tokio::time::sleep(d).await;
                    continue;
                }
                let mut inner = lock(&me.inner);
                if !inner.dirty.remove(&key) {
                    inner.busy.remove(&key);
                    return;
                }
            }
        });
    }

    /// Writes `vm` if it changed, guarded by the revision it was read at.
    async fn write(
        host: &SimHost,
        key: &str,
        rev: u64,
        before: &Vm,
        vm: &Vm,
    ) -> Result<Next, AgentError> {
        if vm == before {
            return Ok(Next::Done);
        }
        let bytes = serde_json::to_vec(vm).map_err(StoreError::from)?;
        match host
            .store
            .put(key, bytes, Precondition::ModRevision(rev))
            .await
        {
            Ok(_) => Ok(Next::Done),
            Err(StoreError::Conflict { .. }) => Ok(Next::Again(Duration::ZERO)),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves a VM on one of the fleet's hosts one step toward its spec (as `reconcile` does).
    async fn step_vm(&self, key: &str) -> Result<Next, AgentError> {
        let Some(Versioned {
            value: mut vm,
            revision,
        }) = get_json::<Vm>(&*self.reader, key).await?
        else {
            return Ok(Next::Done);
        };
        let Some(host) = self.acts(vm.status.host.as_deref()) else {
            return Ok(Next::Done);
        };
        let leaving = lock(&self.inner)
            .migrations
            .values()
            .any(|m| m.vm_uid == vm.meta.uid && m.source == host.name);
        if leaving {
            return Ok(Next::Done);
        }
        let before = vm.clone();
        if vm.meta.deletion_requested_at.is_some() {
            let mut rev = revision;
            if vm.status.phase != VmPhase::Deleting {
                vm.status.phase = VmPhase::Deleting;
                let bytes = serde_json::to_vec(&vm).map_err(StoreError::from)?;
                match host
                    .store
                    .put(key, bytes, Precondition::ModRevision(rev))
                    .await
                {
                    Ok(r) => rev = r,
                    Err(StoreError::Conflict { .. }) => return Ok(Next::Again(Duration::ZERO)),
                    Err(e) => return Err(e.into()),
                }
            }
            return match host.store.delete(key, Precondition::ModRevision(rev)).await {
                Ok(_) | Err(StoreError::NotFound { .. }) => Ok(Next::Done),
                Err(StoreError::Conflict { .. }) => Ok(Next::Again(Duration::ZERO)),
                Err(e) => Err(e.into()),
            };
        }
        // The disk first, as a real agent makes its linked clone before anything else (a create
        // without a start waits for exactly this).
        if !vm
            .status
            .condition(corral_api::ConditionType::DiskReady)
            .is_some_and(|c| c.status)
        {
            let msg = format!("linked clone of image {} (simulated)", vm.spec.image);
            vm.status
                .set_condition(corral_api::ConditionType::DiskReady, true, "Cloned", &msg);
        }
        let resuming = vm
            .status
            .condition(corral_api::ConditionType::Running)
            .filter(|c| c.reason == corral_api::host_protocol::RESUMING)
            .map(|c| c.message.clone());
        match (vm.spec.power, vm.status.phase) {
            (PowerState::Running, VmPhase::Running) => {
                if let Some(msg) = resuming {
                    vm.status.set_condition(
                        corral_api::ConditionType::Running,
                        true,
                        "Migrated",
                        &msg,
                    );
                } else if vm.spec.reboots > vm.status.reboots {
                    vm.status.reboots = vm.spec.reboots;
                    vm.status.started_at = Some(Utc::now());
                    vm.status.set_condition(
                        corral_api::ConditionType::Running,
                        true,
                        "Rebooted",
                        "reset by request",
                    );
                }
            }
            (PowerState::Running, _) => {
                let failed_already = vm.status.phase == VmPhase::Failed
                    && vm.status.observed_generation == vm.meta.generation;
                if failed_already
                    && before
                        .status
                        .condition(corral_api::ConditionType::Running)
                        .is_some_and(|c| (Utc::now() - c.last_transition).num_seconds() < 10)
                {
                    // Back off as a real agent does before trying again.
                    return Ok(Next::Again(Duration::from_secs(10)));
                }
                // The guest boots; the VM is looked at again afterwards (it may have changed).
                tokio::time::sleep(self.spec.boot).await;
                let Some(now) = get_json::<Vm>(&*self.reader, key).await? else {
                    return Ok(Next::Done);
                };
                if now.revision != revision {
                    return Ok(Next::Again(Duration::ZERO));
                }
                if self.roll(self.spec.fail_starts) {
                    vm.status.phase = VmPhase::Failed;
                    vm.status.set_condition(
                        corral_api::ConditionType::Running,
                        false,
                        "StartFailed",
                        "simulated start failure (fault injection)",
                    );
                } else {
                    vm.status.phase = VmPhase::Running;
                    vm.status.started_at = Some(Utc::now());
                    vm.status.reboots = vm.spec.reboots;
                    vm.status.usage = self.usage(&vm);
                    vm.status.set_condition(
                        corral_api::ConditionType::Running,
                        true,
                        "Started",
                        "",
                    );
                }
            }
            (PowerState::Stopped, VmPhase::Stopped) => {}
            (PowerState::Stopped, _) => {
                vm.status.phase = VmPhase::Stopped;
                vm.status.started_at = None;
                vm.status.usage = None;
                vm.status
                    .set_condition(corral_api::ConditionType::Running, false, "Stopped", "");
            }
        }
        vm.status.observed_generation = vm.meta.generation;
        Self::write(host, key, revision, &before, &vm).await
    }

    /// Carries out this fleet's side (or both sides) of a live migration.
    async fn step_migration(&self, key: &str) -> Result<Next, AgentError> {
        let Some(Versioned {
            value: mut m,
            revision,
        }) = get_json::<Migration>(&*self.reader, key).await?
        else {
            return Ok(Next::Done);
        };
        let vm_key = keys::vm(&m.project, &m.vm);
        let (source, target) = (self.acts(Some(&m.source)), self.acts(Some(&m.target)));
        if m.phase.is_finished() {
            if let Some(source) = source.filter(|_| m.phase != MigrationPhase::Completed) {
                crate::migrate::note_end(&*source.store, &vm_key, &m).await?;
            }
            return Ok(Next::Done);
        }
        match (m.phase, source, target) {
            (MigrationPhase::Preparing, _, Some(target)) => {
                if self.roll(self.spec.fail_migrations) {
                    let why = format!(
                        "host {} could not prepare: simulated failure (fault injection)",
                        target.name
                    );
                    let phase = MigrationPhase::Failed;
                    crate::migrate::end(&*target.store, key, &vm_key, &target.name, phase, &why)
                        .await?;
                    return Ok(Next::Done);
                }
                m.phase = MigrationPhase::TargetReady;
                // Simulated hosts listen nowhere: ports, as a real target records them.
                m.target_port = Some(SIM_MIGRATION_PORT);
                m.disk_port = (!m.shared_storage).then_some(SIM_MIGRATION_PORT + 1);
                m.updated_at = Utc::now();
                let bytes = serde_json::to_vec(&m).map_err(StoreError::from)?;
                match target
                    .store
                    .put(key, bytes, Precondition::ModRevision(revision))
                    .await
                {
                    Ok(_) | Err(StoreError::Conflict { .. }) => Ok(Next::Done),
                    Err(e) => Err(e.into()),
                }
            }
            (MigrationPhase::TargetReady | MigrationPhase::Transferring, Some(source), _) => {
                self.transfer(source, key, &vm_key, m, revision).await
            }
            _ => Ok(Next::Done),
        }
    }

    /// The source's side: copies (for as long as the memory takes over the link), then hands the
    /// VM over, or fails or cancels the migration; the VM stays on the source unless handed over.
    async fn transfer(
        &self,
        source: &SimHost,
        key: &str,
        vm_key: &str,
        mut m: Migration,
        revision: u64,
    ) -> Result<Next, AgentError> {
        let end = |phase: MigrationPhase, why: String| async move {
            crate::migrate::end(&*source.store, key, vm_key, &source.name, phase, &why).await?;
            Ok::<_, AgentError>(Next::Done)
        };
        if m.cancel_requested {
            return end(MigrationPhase::Cancelled, "cancelled".into()).await;
        }
        let Some(Versioned { value: vm, .. }) = get_json::<Vm>(&*self.reader, vm_key).await? else {
            return end(MigrationPhase::Failed, "the VM was deleted".into()).await;
        };
        let memory = (vm.spec.memory_bytes as f64 * self.spec.memory_use) as u64;
        if m.phase == MigrationPhase::TargetReady {
            m.phase = MigrationPhase::Transferring;
            m.progress.stage = "memory".into();
            m.progress.memory_total_bytes = memory;
            m.progress.memory_remaining_bytes = memory;
            m.updated_at = Utc::now();
            let bytes = serde_json::to_vec(&m).map_err(StoreError::from)?;
            match source
                .store
                .put(key, bytes, Precondition::ModRevision(revision))
                .await
            {
                Ok(_) => {}
                Err(StoreError::Conflict { .. }) => return Ok(Next::Again(Duration::ZERO)),
                Err(e) => return Err(e.into()),
            }
        }
        let copy = Duration::from_secs_f64(memory as f64 / self.spec.link_bytes_per_sec as f64);
        tokio::time::sleep(copy).await;
        if self.roll(self.spec.fail_migrations) {
            let why = "the copy failed: simulated failure (fault injection)".to_string();
            return end(MigrationPhase::Failed, why).await;
        }
        let (Some(vm), Some(mig)) = (
            get_json::<Vm>(&*self.reader, vm_key).await?,
            get_json::<Migration>(&*self.reader, key).await?,
        ) else {
            return end(MigrationPhase::Failed, "the VM vanished".into()).await;
        };
        let (mut v, mut m) = (vm.value, mig.value);
        if m.phase != MigrationPhase::Transferring {
            return Ok(Next::Done);
        }
        if m.cancel_requested {
            return end(MigrationPhase::Cancelled, "cancelled".into()).await;
        }
        let result = MigrationResult {
            downtime_ms: 1,
            total_ms: (Utc::now() - m.created_at).num_milliseconds().max(0) as u64,
            memory_bytes: memory,
            disk_bytes: 0,
            completed_at: Some(Utc::now()),
        };
        let ops = crate::migrate::handover_ops(
            vm_key,
            &mut v,
            vm.revision,
            key,
            &mut m,
            mig.revision,
            result,
        )?;
        match source.store.txn(ops).await {
            Ok(_) => Ok(Next::Done),
            Err(StoreError::Conflict { .. }) => Ok(Next::Again(Duration::ZERO)),
            Err(e) => Err(e.into()),
        }
    }

    /// Reports each running VM's demand every [`crate::usage::PERIOD`], when it changed enough.
    async fn usage_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(crate::usage::PERIOD);
        loop {
            tick.tick().await;
            let due: Vec<(String, VmUsage, String)> = {
                let inner = lock(&self.inner);
                inner
                    .vms
                    .iter()
                    .filter(|(_, v)| v.status.phase == VmPhase::Running)
                    .filter_map(|(k, v)| {
                        let host = v.status.host.clone()?;
                        let new = self.usage(v)?;
                        crate::usage::changed(v.status.usage.as_ref(), &new)
                            .then(|| (k.clone(), new, host))
                    })
                    .collect()
            };
            for (key, usage, host) in due {
                let Some(h) = self.acts(Some(&host)) else {
                    continue;
                };
                let written = update_json::<Vm, AgentError>(&*h.store, &key, |v| {
                    if v.status.host.as_deref() != Some(host.as_str())
                        || v.status.phase != VmPhase::Running
                    {
                        return Ok(false);
                    }
                    v.status.usage = Some(usage.clone());
                    Ok(true)
                })
                .await;
                if let Err(e) = written {
                    tracing::debug!(vm = %key, error = %e, "could not report usage");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_and_loads_parse_and_refuse_nonsense() {
        assert_eq!("0.8".parse::<Curve>(), Ok(Curve::Constant(0.8)));
        let sine: Curve = "sine:0.1-0.9/600".parse().unwrap();
        assert!((sine.at(0.0, 0.0) - 0.1).abs() < 1e-9);
        assert!((sine.at(300.0, 0.0) - 0.9).abs() < 1e-9);
        for bad in [
            "1.5",
            "x",
            "sine:0.9-0.1/60",
            "sine:0.1-0.9",
            "sine:0.1-0.9/0",
        ] {
            let e = bad.parse::<Curve>().unwrap_err();
            assert!(e.contains("sine:LOW-HIGH/SECONDS"), "{bad}: {e}");
        }
        let loads: Loads = "hot-=1,=0.2".parse().unwrap();
        assert_eq!(loads.of("hot-1"), Some(Curve::Constant(1.0)));
        assert_eq!(loads.of("web"), Some(Curve::Constant(0.2)));
        assert_eq!(Loads::default().of("web"), Some(Curve::Constant(0.05)));
        assert_eq!("none".parse::<Loads>().unwrap().of("web"), None);
        assert!("hot"
            .parse::<Loads>()
            .unwrap_err()
            .contains("NAME-PREFIX=CURVE"));
    }
}
