//! Simulated hosts: many hypervisor hosts in one process, for scale tests, DRS and DPM.
//!
//! A simulated host is the real host agent ([`corral_agent::Agent`]): the same VM workers, the
//! same reconciler, the same migration source and target, the same writes over the same agent
//! endpoint (each host with its own certificate, authorized as a real one). What is replaced is
//! the machine under it ([`machine`]): the hypervisor is the in-memory fake driver with a guest
//! boot time ([`SimSpec::boot`]), a migration link ([`SimSpec::link_bytes_per_sec`]) and fault
//! injection; disks are placeholder files; there is nothing to plumb on the network; a guest's
//! load follows a [`Curve`]. So whatever a simulated host does, a real one does too, and a
//! difference between them is a bug.
//!
//! What a fleet shares, so that ten thousand hosts cost the controller about what their own
//! heartbeats and reports cost: one watch of the VMs and migrations, whose changes it hands to
//! the agents of the hosts concerned (a real agent watches for itself), and one loop reporting
//! the guests' usage (a real agent measures its QEMUs). A simulated guest never crashes on its
//! own, so the agents are not resynced on a timer as real ones are.
//!
//! Faults can be injected: starts and migrations fail with a given probability, and a host can be
//! killed (its machine goes off: every guest on it is gone, it stops heartbeating, reporting and
//! acting) and healed (it comes back empty, as after a reboot). With DPM, a simulated host whose
//! record asks for standby powers down once it has no VMs, and wakes when the record no longer
//! asks for it.

mod load;
mod machine;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use corral_agent::ha::{HaLink, HaState};
use corral_agent::Controller;
use corral_agent::{Agent, AgentConfig};
use corral_api::host_protocol::HaReport;
use corral_api::{keys, timing, Accel, Host, HostStatus, Migration, Vm, VmPhase, VmUsage};
use corral_hypervisor::fake::FakeDriver;
use corral_store::{get_json, EventKind, StoreError, Versioned};

pub use load::{BadLoad, Curve, Loads};
use machine::{unit, Dice, Power, PoweredStore, SimDriver, SimNet};

/// What the hypervisor field of a simulated host says.
pub const HYPERVISOR: &str = "corral-sim (simulated host)";

/// What every host of a fleet is like.
#[derive(Clone, Debug)]
pub struct SimSpec {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Where the hosts say they receive migrations.
    pub address: IpAddr,
    /// How long a guest takes to start, and a host to wake from standby.
    pub boot: Duration,
    /// The chance that a VM start fails, and that a migration fails (at the target's preparation
    /// and again at the copy).
    pub fail_starts: f64,
    pub fail_migrations: f64,
    pub loads: Loads,
    /// The share of its memory a guest touches (what it reports using, and what a migration
    /// copies).
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
            heartbeat: corral_agent::HEARTBEAT_WITH_REPORTS,
        }
    }
}

/// One simulated host: its name, the controller as it reaches it (its own authenticated client
/// over the agent endpoint, or the controller's own process), and its link to the failure
/// detector.
pub struct SimHost {
    pub name: String,
    pub store: Arc<dyn Controller>,
    pub ha: Option<Arc<dyn HaLink>>,
}

/// A simulated host as it runs: its machine and the agent on it.
struct Member {
    host: SimHost,
    power: Arc<Power>,
    driver: Arc<SimDriver>,
    ha: Arc<HaState>,
    agent: Arc<Agent>,
}

/// The fleet's view of the VMs on its hosts and the migrations from or to them, by key.
#[derive(Default)]
struct Seen {
    vms: HashMap<String, Vm>,
    migrations: HashMap<String, Migration>,
}

/// Many simulated hosts sharing one watch.
pub struct Fleet {
    spec: SimSpec,
    members: HashMap<String, Member>,
    /// Where the fleet watches (any host's store: reads are open to every host).
    reader: Arc<dyn Controller>,
    seen: Mutex<Seen>,
    started: std::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Fleet {
    /// A fleet of `hosts` (at least one), all like `spec`, each keeping its VMs' files (run
    /// directories, placeholder disks) in `data_dir/NAME`.
    pub fn new(spec: SimSpec, hosts: Vec<SimHost>, data_dir: PathBuf) -> Arc<Self> {
        // The first host's certificate watches for all (tests/sim.rs kills that host to check
        // that the watch does not keep a dead host alive).
        let reader = hosts
            .first()
            .map(|h| h.store.clone())
            .expect("a fleet has at least one host");
        let dice = Arc::new(Dice::new(
            Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64
        ));
        let members = hosts
            .into_iter()
            .map(|host| {
                let power = Arc::new(Power::default());
                let driver = Arc::new(SimDriver {
                    fake: FakeDriver::with_link(spec.link_bytes_per_sec, spec.memory_use),
                    power: power.clone(),
                    dice: dice.clone(),
                    boot: spec.boot,
                    fail_starts: spec.fail_starts,
                    fail_migrations: spec.fail_migrations,
                });
                let ha = Arc::new(HaState::default());
                let cfg = AgentConfig {
                    host: host.name.clone(),
                    data_dir: data_dir.join(&host.name),
                    accel: Accel::Kvm,
                    hypervisor: HYPERVISOR.into(),
                    stop_timeout: Duration::from_secs(30),
                    // Unused: the fleet's watch wakes the workers (see the module's docs).
                    resync: Duration::from_secs(5),
                    address: spec.address,
                    ha: ha.clone(),
                    network: Arc::new(SimNet),
                };
                let store = Arc::new(PoweredStore {
                    store: host.store.clone(),
                    power: power.clone(),
                });
                let agent = Agent::new(store, driver.clone(), cfg, None);
                let member = Member {
                    host,
                    power,
                    driver,
                    ha,
                    agent,
                };
                (member.host.name.clone(), member)
            })
            .collect();
        Arc::new(Self {
            spec,
            members,
            reader,
            seen: Mutex::default(),
            started: std::time::Instant::now(),
        })
    }

    /// Runs the hosts until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        for name in self.members.keys() {
            tokio::spawn(self.clone().host_loop(name.clone()));
        }
        tokio::spawn(self.clone().usage_loop());
        tokio::spawn(self.clone().follow(keys::MIGRATIONS));
        self.follow(keys::VMS).await;
    }

    /// Kills a host (its machine goes off, as a dead machine), or brings it back (empty, as a
    /// machine after a reboot, its agent looking again at every VM placed on it).
    pub fn set_dead(&self, host: &str, dead: bool) {
        let Some(m) = self.members.get(host) else {
            return;
        };
        if m.power.dead() == dead {
            return;
        }
        m.power.set_dead(dead);
        if dead {
            tracing::warn!(host = %host, "simulated host killed (fault injection)");
            m.driver.fake.power_off();
        } else {
            tracing::info!(host = %host, "simulated host healed");
            self.rekick(host);
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
                .collect();
            for name in self.members.keys() {
                self.set_dead(name, listed.contains(name));
            }
        }
    }

    /// The host is one of ours and its machine is on.
    fn on(&self, host: &str) -> Option<&Member> {
        self.members.get(host).filter(|m| m.power.on())
    }

    /// Hands every VM placed on `host` to its agent again (after the machine came back).
    fn rekick(&self, host: &str) {
        let Some(m) = self.on(host) else { return };
        let placed: Vec<(String, Vec<u8>)> = lock(&self.seen)
            .vms
            .iter()
            .filter(|(_, v)| v.status.host.as_deref() == Some(host))
            .filter_map(|(k, v)| serde_json::to_vec(v).ok().map(|b| (k.clone(), b)))
            .collect();
        for (key, value) in placed {
            m.agent.kick(&key, &value);
        }
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
        let seen = lock(&self.seen);
        !seen
            .vms
            .values()
            .any(|v| v.status.host.as_deref() == Some(host))
            && !seen
                .migrations
                .values()
                .any(|m| m.source == host || m.target == host)
    }

    /// One machine's life: its storage leases and HA reports every [`timing::RENEW_EVERY`],
    /// heartbeats, and standby.
    async fn host_loop(self: Arc<Self>, name: String) {
        let m = &self.members[&name];
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
            if m.power.dead() {
                continue;
            }
            if m.power.standby() {
                if n.is_multiple_of(4) {
                    self.maybe_wake(m).await;
                }
                continue;
            }
            // The simulated datastores are always reachable: the lease is renewed.
            m.ha.leases_renewed();
            if let Some(link) = &m.host.ha {
                // A simulated machine is never isolated, so it applies no response.
                let report = HaReport {
                    peers_alive: Vec::new(),
                    gossip: None,
                    isolation_response: None,
                };
                if let Err(e) = link.report(report).await {
                    tracing::debug!(host = %name, error = %e, "HA report failed");
                }
            }
            if !first && !n.is_multiple_of(beat_every) {
                continue;
            }
            first = false;
            let beat = corral_agent::write_heartbeat(&*m.host.store, self.status(false)).await;
            if let Err(e) = beat {
                tracing::warn!(host = %name, error = %e, "heartbeat failed");
                continue;
            }
            // DPM asks for standby in the host's record.
            let asked = get_json::<Host>(&*m.host.store, &keys::host(&name)).await;
            if matches!(asked, Ok(Some(ref h)) if h.value.standby) && self.empty(&name) {
                self.go_standby(m).await;
            }
        }
    }

    /// Powers the host down: it says so in its record, then falls silent.
    async fn go_standby(&self, m: &Member) {
        let name = &m.host.name;
        match corral_agent::write_heartbeat(&*m.host.store, self.status(true)).await {
            Ok(_) => {
                tracing::info!(host = %name, "simulated host in standby");
                m.power.set_standby(true);
                m.driver.fake.power_off();
            }
            Err(e) => tracing::warn!(host = %name, error = %e, "could not enter standby"),
        }
    }

    /// Wakes the host when its record no longer asks for standby (as Wake-on-LAN would).
    async fn maybe_wake(&self, m: &Member) {
        let name = &m.host.name;
        let asked = get_json::<Host>(&*m.host.store, &keys::host(name)).await;
        let Ok(Some(Versioned { value: record, .. })) = asked else {
            return;
        };
        if record.standby {
            return;
        }
        tokio::time::sleep(self.spec.boot).await;
        match corral_agent::write_heartbeat(&*m.host.store, self.status(false)).await {
            Ok(_) => {
                tracing::info!(host = %name, "simulated host woke from standby");
                m.power.set_standby(false);
                self.rekick(name);
            }
            Err(e) => tracing::warn!(host = %name, error = %e, "could not wake"),
        }
    }

    /// Lists, then watches, `prefix` (VMs or migrations), handing each change to the agents
    /// concerned; lists again when the watch ends.
    async fn follow(self: Arc<Self>, prefix: &'static str) {
        loop {
            if let Err(e) = self.follow_once(prefix).await {
                tracing::info!(error = %e, "the fleet's watch ended; listing again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn follow_once(&self, prefix: &str) -> Result<(), StoreError> {
        let (kvs, rev) = self.reader.list(prefix).await?;
        let listed: HashSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        // What went while the fleet was not watching.
        let gone: Vec<String> = {
            let seen = lock(&self.seen);
            let known: Vec<&String> = if prefix == keys::VMS {
                seen.vms.keys().collect()
            } else {
                seen.migrations.keys().collect()
            };
            known
                .into_iter()
                .filter(|k| !listed.contains(k.as_str()))
                .cloned()
                .collect()
        };
        for key in gone {
            self.observe(&key, &[]);
        }
        for kv in &kvs {
            self.observe(&kv.key, &kv.value);
        }
        let mut watch = self.reader.watch(prefix, rev + 1).await?;
        while let Some(ev) = watch.recv().await {
            let ev = ev?;
            let value: &[u8] = if ev.kind == EventKind::Put {
                &ev.kv.value
            } else {
                &[]
            };
            self.observe(&ev.kv.key, value);
        }
        Ok(())
    }

    /// Records a change of a VM or migration (`value` empty when deleted) and hands it to the
    /// agents of the hosts it concerns, before and after the change.
    fn observe(&self, key: &str, value: &[u8]) {
        let ours = |h: &str| self.members.contains_key(h);
        let mut concerned: Vec<String> = Vec::new();
        {
            let mut seen = lock(&self.seen);
            if key.starts_with(keys::MIGRATIONS) {
                if let Some(m) = seen.migrations.remove(key) {
                    concerned.extend([m.source, m.target]);
                }
                let m = serde_json::from_slice::<Migration>(value)
                    .ok()
                    .filter(|m| ours(&m.source) || ours(&m.target));
                if let Some(m) = m {
                    concerned.extend([m.source.clone(), m.target.clone()]);
                    if !m.phase.is_finished() {
                        seen.migrations.insert(key.to_string(), m);
                    }
                }
            } else {
                if let Some(host) = seen.vms.remove(key).and_then(|v| v.status.host) {
                    concerned.push(host);
                }
                let vm = serde_json::from_slice::<Vm>(value)
                    .ok()
                    .filter(|v| v.status.host.as_deref().is_some_and(ours));
                if let Some(vm) = vm {
                    concerned.extend(vm.status.host.clone());
                    seen.vms.insert(key.to_string(), vm);
                }
            }
        }
        concerned.sort();
        concerned.dedup();
        for host in concerned {
            if let Some(m) = self.on(&host) {
                m.agent.kick(key, value);
            }
        }
    }

    /// Reports each running VM's demand every [`corral_agent::usage::PERIOD`], when it changed
    /// enough (a real agent measures its QEMUs as often).
    async fn usage_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(corral_agent::usage::PERIOD);
        loop {
            tick.tick().await;
            let due: Vec<(String, VmUsage, String)> = {
                let seen = lock(&self.seen);
                seen.vms
                    .iter()
                    .filter(|(_, v)| v.status.phase == VmPhase::Running)
                    .filter_map(|(k, v)| {
                        let host = v.status.host.clone()?;
                        let new = self.usage(v)?;
                        corral_agent::usage::changed(v.status.usage.as_ref(), &new)
                            .then(|| (k.clone(), new, host))
                    })
                    .collect()
            };
            for (key, usage, host) in due {
                let Some(m) = self.on(&host) else {
                    continue;
                };
                let written = corral_agent::link::update_vm_status(&*m.host.store, &key, |v| {
                    if v.status.host.as_deref() != Some(host.as_str())
                        || v.status.phase != VmPhase::Running
                    {
                        return false;
                    }
                    v.status.usage = Some(usage.clone());
                    true
                })
                .await;
                if let Err(e) = written {
                    tracing::debug!(vm = %key, error = %e, "could not report usage");
                }
            }
        }
    }
}
