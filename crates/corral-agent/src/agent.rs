//! The host agent's top: it registers the host and heartbeats, starts the loops (usage, network,
//! HA, gossip), follows the VMs and migrations, and runs one worker per VM placed here (and per
//! migration to here), which reconciles it whenever it changes or its requeue time comes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use corral_api::{keys, HostStatus, Migration, Vm};
use corral_hypervisor::{Driver, RunState};
use tokio::sync::mpsc;

use crate::guest::remove_vm_files;
use crate::lifecycle::{Outcome, WorkerState};
use crate::link::{write_heartbeat, Controller};
use crate::reconcile::reconcile;
use crate::{AgentConfig, AgentError, HEARTBEAT_WITH_REPORTS};

/// A host agent bound to the controller and a driver.
pub struct Agent {
    store: Arc<dyn Controller>,
    driver: Arc<dyn Driver>,
    cfg: AgentConfig,
    /// The controller's failure detector; none for an agent without a controller to report to.
    ha_link: Option<Arc<dyn crate::ha::HaLink>>,
    /// Where this host's gossip listens, once bound.
    gossip: std::sync::OnceLock<std::net::SocketAddr>,
    /// The worker of each VM (and each migration to here) this host looks after.
    workers: std::sync::Mutex<HashMap<String, mpsc::Sender<()>>>,
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|kb| kb.parse::<u64>().ok())
                })
        })
        .map_or(0, |kb| kb * 1024)
}

impl Agent {
    pub fn new(
        store: Arc<dyn Controller>,
        driver: Arc<dyn Driver>,
        cfg: AgentConfig,
        ha_link: Option<Arc<dyn crate::ha::HaLink>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            driver,
            cfg,
            ha_link,
            gossip: std::sync::OnceLock::new(),
            workers: std::sync::Mutex::default(),
        })
    }

    /// Records this host's capacity and a fresh heartbeat, keeping what the operator set.
    async fn heartbeat(&self) -> Result<(), AgentError> {
        let status = HostStatus {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: memory_bytes(),
            accel: self.cfg.accel,
            hypervisor: self.cfg.hypervisor.clone(),
            last_heartbeat: Utc::now(),
            gossip: self.gossip.get().copied(),
            address: Some(self.cfg.address),
            power_control: false,
            standby: false,
            capacity_refused: None,
        };
        write_heartbeat(&*self.store, status).await
    }

    /// Registers the host, then reconciles VMs until the task is dropped.
    pub async fn run(self: Arc<Self>) -> Result<(), AgentError> {
        if self.ha_link.is_some() {
            match crate::gossip::bind(self.cfg.address).await {
                Ok((socket, addr)) => {
                    let _ = self.gossip.set(addr);
                    tokio::spawn(crate::gossip::run(socket, addr, self.cfg.ha.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gossip cannot listen; peers will not see this host")
                }
            }
        }
        tokio::spawn(crate::usage::run(self.store.clone(), self.cfg.host.clone()));
        tokio::spawn(crate::network::run(
            self.store.clone(),
            self.cfg.network.clone(),
            self.cfg.host.clone(),
        ));
        tokio::spawn(crate::ha::run(
            self.store.clone(),
            self.driver.clone(),
            self.cfg.host.clone(),
            self.cfg.data_dir.clone(),
            self.gossip.get().copied(),
            self.cfg.ha.clone(),
            self.ha_link.clone(),
        ));
        // The controller may be down: VMs keep running, and the loops below keep trying.
        if let Err(e) = self.heartbeat().await {
            tracing::warn!(error = %e, "first heartbeat failed; retrying");
        }
        // The controller hears from a host with an HA link four times a second; the record then
        // only needs refreshing now and then (a thousand hosts' records cost the store little).
        let every = if self.ha_link.is_some() {
            HEARTBEAT_WITH_REPORTS
        } else {
            Duration::from_secs(5)
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = me.heartbeat().await {
                    // Soon, not a whole period later: until its first one lands, the host is
                    // shown as not registered and gets no VM.
                    tracing::warn!(error = %e, "heartbeat failed; trying again in 2 s");
                    tick.reset_after(Duration::from_secs(2));
                }
            }
        });
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            if let Err(e) = self.clone().follow().await {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %e, "lost the store; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }

    /// Lists the VMs and migrations, then follows their changes until a watch ends.
    async fn follow(self: Arc<Self>) -> Result<(), AgentError> {
        let (kvs, rev) = self.store.list(keys::VMS).await?;
        let (migrations, mig_rev) = self.store.list(keys::MIGRATIONS).await?;
        self.sweep(&kvs, &migrations).await;
        for kv in kvs.iter().chain(&migrations) {
            self.kick(&kv.key, &kv.value);
        }
        let mut watch = self.store.watch(keys::VMS, rev + 1).await?;
        let mut mig_watch = self.store.watch(keys::MIGRATIONS, mig_rev + 1).await?;
        let mut resync = tokio::time::interval(self.cfg.resync);
        loop {
            tokio::select! {
                ev = watch.recv() => match ev {
                    Some(Ok(e)) => self.kick(&e.kv.key, &e.kv.value),
                    Some(Err(e)) => { tracing::info!(error = %e, "watch ended; listing again"); break; }
                    None => break,
                },
                ev = mig_watch.recv() => match ev {
                    Some(Ok(e)) => self.kick(&e.kv.key, &e.kv.value),
                    Some(Err(e)) => { tracing::info!(error = %e, "watch ended; listing again"); break; }
                    None => break,
                },
                _ = resync.tick() => {
                    let mut workers = self.lock_workers();
                    workers.retain(|_, tx| !tx.is_closed());
                    for (key, tx) in workers.iter() {
                        if tx.try_send(()).is_err() {
                            tracing::debug!(vm = %key, "already has a reconcile queued");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes what no VM of this host accounts for: the run directories (and QEMUs) of VMs that
    /// moved away or whose migration here ended while this agent was not running. A QEMU that runs
    /// a guest is never killed here, only reported.
    pub(crate) async fn sweep(
        &self,
        vms: &[corral_store::KeyValue],
        migrations: &[corral_store::KeyValue],
    ) {
        let me = Some(self.cfg.host.as_str());
        let mut known: std::collections::HashSet<String> = vms
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Vm>(&kv.value).ok())
            .filter(|v| v.status.host.as_deref() == me)
            .map(|v| v.meta.uid.simple().to_string())
            .collect();
        known.extend(
            migrations
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Migration>(&kv.value).ok())
                .filter(|m| Some(m.target.as_str()) == me && !m.phase.is_finished())
                .map(|m| m.vm_uid.simple().to_string()),
        );
        let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("vms")) else {
            return;
        };
        for dir in entries.flatten().map(|e| e.path()) {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_none_or(|n| known.contains(&n)) {
                continue;
            }
            match self.driver.observe(&dir).await {
                Ok(Some(o)) if o.state == RunState::Running => {
                    tracing::warn!(dir = %dir.display(), "a guest runs here that no VM of this host accounts for; left alone");
                    continue;
                }
                Ok(Some(_)) => {
                    if let Err(e) = self.driver.kill(&dir).await {
                        tracing::warn!(dir = %dir.display(), error = %e, "could not stop a leftover QEMU");
                        continue;
                    }
                }
                Ok(None) => {}
                Err(_) => continue,
            }
            tracing::info!(dir = %dir.display(), "removing a leftover VM directory");
            if let Err(e) = remove_vm_files(&dir, None) {
                tracing::warn!(error = %e, "could not remove a leftover VM directory");
            }
        }
    }

    fn lock_workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<()>>> {
        self.workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes the worker of a key that changed (a VM or a migration: `value` as stored, empty when
    /// deleted), starting one if the key is this host's business: a VM placed here, or a migration
    /// to here. A VM's worker also wakes when its migration changes. Any key that has a worker
    /// wakes it (the VM may have moved or been deleted: it finds out). The agent's own watch calls
    /// this; so does a fleet of simulated hosts, which shares one watch among its agents.
    pub fn kick(self: &Arc<Self>, key: &str, value: &[u8]) {
        let me = Some(self.cfg.host.as_str());
        let mut workers = self.lock_workers();
        let ours = if key.starts_with(keys::MIGRATIONS) {
            if let Some(vm_key) = keys::vm_of_migration(key) {
                if let Some(tx) = workers.get(&vm_key).filter(|tx| !tx.is_closed()) {
                    let _ = tx.try_send(());
                }
            }
            serde_json::from_slice::<Migration>(value)
                .is_ok_and(|m| Some(m.target.as_str()) == me && !m.phase.is_finished())
        } else {
            serde_json::from_slice::<Vm>(value).is_ok_and(|vm| vm.status.host.as_deref() == me)
        };
        if let Some(tx) = workers.get(key).filter(|tx| !tx.is_closed()) {
            // A full channel already holds a kick: changes coalesce.
            let _ = tx.try_send(());
            return;
        }
        if ours {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(self.clone().worker(key.to_string(), rx));
            let _ = tx.try_send(());
            workers.insert(key.to_string(), tx);
        } else {
            // A worker that ended (its VM went away): forgotten.
            workers.remove(key);
        }
    }

    /// Reconciles one VM whenever kicked or when its requeue time comes; never two at once for a VM.
    async fn worker(self: Arc<Self>, key: String, mut kicks: mpsc::Receiver<()>) {
        let mut ws = WorkerState::default();
        while kicks.recv().await.is_some() {
            loop {
                // Boxed: a pass's future (a migration's above all) is large, and a worker
                // waiting for its next kick should not hold that room (a host may have
                // thousands of VMs, a simulated fleet a hundred thousand).
                let step = if key.starts_with(keys::MIGRATIONS) {
                    let target =
                        crate::migrate::run_target(&*self.store, &*self.driver, &self.cfg, &key);
                    Box::pin(target).await
                } else {
                    Box::pin(reconcile(
                        &*self.store,
                        &*self.driver,
                        &self.cfg,
                        &key,
                        &mut ws,
                    ))
                    .await
                };
                let wait = match step {
                    Ok(Outcome::Gone) => return,
                    Ok(Outcome::Steady) => break,
                    Ok(Outcome::Requeue(d)) => d,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "reconcile failed; retrying");
                        Duration::from_secs(2)
                    }
                };
                tokio::select! {
                    k = kicks.recv() => if k.is_none() { return },
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
