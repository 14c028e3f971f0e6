//! HA on the host: storage leases, self-fencing, and reports to the controller.
//!
//! A host may run HA-protected VMs only while it holds its storage lease: a file per shared
//! datastore (`PATH/.corral-ha/HOST`) that it rewrites every [`timing::RENEW_EVERY`]. The
//! controller restarts a protected VM elsewhere only after it has seen that file unchanged for
//! [`timing::LEASE_EXPIRES_AFTER`]; a host that has not renewed for [`timing::FENCE_AFTER`] (storage
//! gone, or it gave the lease up because it is isolated) has killed its protected VMs by then. So
//! the two copies never overlap (the argument, with its clock assumptions, is in docs/HA.md).
//!
//! Every tick the agent also reports to the controller, with the peers its gossip sees alive. A
//! host that hears neither the controller nor any peer for [`timing::ISOLATED_AFTER`] is isolated:
//! under the `power-off` isolation response it kills its protected VMs and stops renewing, so they
//! run again on connected hosts; under `leave-running` it keeps both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use corral_api::{keys, timing, Datastore, IsolationResponse};
use corral_hypervisor::Driver;
use corral_store::list_json;

use crate::layout;
use crate::link::Controller;
use corral_api::host_protocol::{HaReply, HaReport};

/// How an agent reaches the controller's failure detector.
#[async_trait]
pub trait HaLink: Send + Sync {
    async fn report(&self, report: HaReport) -> Result<HaReply, crate::AgentError>;
}

/// What the agent's HA loops share with its VM workers.
#[derive(Debug)]
pub struct HaState {
    started: Instant,
    /// The host is isolated and gave its leases up (power-off response): it renews nothing and
    /// starts no protected VM until the controller answers again.
    fenced: AtomicBool,
    /// When every shared datastore's lease was last renewed.
    renewed: Mutex<Option<Instant>>,
    /// Peers the gossip sees alive, and every peer the controller named.
    pub(crate) peers_alive: Mutex<Vec<String>>,
    pub(crate) peers_known: Mutex<Vec<(String, SocketAddr)>>,
}

impl Default for HaState {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            fenced: AtomicBool::new(false),
            renewed: Mutex::new(None),
            peers_alive: Mutex::default(),
            peers_known: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HaState {
    /// Whether this host may start a protected VM now: it holds a fresh lease and is not fenced.
    /// Half the fencing time, so a VM started now has time to be seen running before any fence.
    pub fn may_start_protected(&self) -> bool {
        !self.fenced.load(Ordering::SeqCst)
            && lock(&self.renewed).is_some_and(|t| t.elapsed() < timing::FENCE_AFTER / 2)
    }

    /// Every shared datastore's lease was renewed just now (a simulated host, whose datastores
    /// are simulated too, says so on each of its renewal ticks).
    pub fn leases_renewed(&self) {
        *lock(&self.renewed) = Some(Instant::now());
    }

    fn since_renewed(&self) -> Duration {
        lock(&self.renewed).unwrap_or(self.started).elapsed()
    }
}

/// Shared datastores whose leases this host renews: from the store (and kept in the data dir),
/// or, while the controller does not answer, from that copy, so a restarted agent still renews, or
/// fences. Never waits on the controller for longer than a renewal period.
async fn shared_datastores(store: &dyn Controller, data_dir: &Path) -> Vec<PathBuf> {
    let file = data_dir.join("ha-datastores.json");
    let listed = tokio::time::timeout(
        timing::RENEW_EVERY,
        list_json::<Datastore>(store, keys::DATASTORES),
    )
    .await;
    match listed {
        Ok(Ok((ds, _))) => {
            let paths: Vec<PathBuf> = ds
                .into_iter()
                .filter_map(|d| d.lease_directory().map(Path::to_path_buf))
                .collect();
            if let Ok(bytes) = serde_json::to_vec(&paths) {
                let tmp = file.with_extension("json.part");
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &file);
                }
            }
            paths
        }
        _ => std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default(),
    }
}

/// Rewrites this host's lease file on one datastore (a new file renamed over the old one).
fn renew(path: &Path, host: &str, seq: u64) -> std::io::Result<()> {
    let dir = layout::lease_dir(path);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{host}.part"));
    let body = format!(
        "{{\"host\":\"{host}\",\"seq\":{seq},\"at\":\"{}\"}}\n",
        chrono::Utc::now().to_rfc3339()
    );
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, dir.join(host))
}

/// Kills every protected VM of this host that runs (the run directories with the HA marker).
async fn fence(driver: &dyn Driver, data_dir: &Path, why: &str) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("vms")) else {
        return;
    };
    for dir in entries.flatten().map(|e| e.path()) {
        if !dir.join(layout::HA_MARKER).exists() {
            continue;
        }
        match driver.fence(&dir).await {
            Ok(true) => {
                tracing::warn!(dir = %dir.display(), "fenced: {why}; protected VM killed")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "fencing could not kill a protected VM")
            }
        }
    }
}

/// Renews leases, reports to the controller and fences when needed, until the task is dropped.
/// Three loops, so that none waits on another: renewals never wait on the controller.
pub(crate) async fn run(
    store: Arc<dyn Controller>,
    driver: Arc<dyn Driver>,
    host: String,
    data_dir: PathBuf,
    gossip: Option<SocketAddr>,
    state: Arc<HaState>,
    link: Option<Arc<dyn HaLink>>,
) {
    tokio::spawn(watchdog(driver.clone(), data_dir.clone(), state.clone()));
    tokio::spawn(renew_leases(store, host, data_dir.clone(), state.clone()));
    if let Some(link) = link {
        report(link, driver, data_dir, gossip, state).await;
    }
}

/// Whatever else hangs (a datastore write, the controller), protected VMs do not outlive the lease.
/// (It does not mark the host fenced: a stale lease alone keeps protected VMs from starting.)
async fn watchdog(driver: Arc<dyn Driver>, data_dir: PathBuf, state: Arc<HaState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        // Every tick while the lease is stale: a start that raced the lease's end dies too.
        let late = state.since_renewed();
        if late > timing::FENCE_AFTER {
            let why = format!("storage lease not renewed for {:.1} s", late.as_secs_f64());
            fence(&*driver, &data_dir, &why).await;
        }
    }
}

/// Rewrites this host's lease on every shared datastore every [`timing::RENEW_EVERY`], unless
/// the host fenced itself.
async fn renew_leases(
    store: Arc<dyn Controller>,
    host: String,
    data_dir: PathBuf,
    state: Arc<HaState>,
) {
    let mut seq = 0u64;
    let mut datastores = Vec::new();
    let mut tick = tokio::time::interval(timing::RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if seq.is_multiple_of(8) {
            datastores = shared_datastores(&*store, &data_dir).await;
        }
        seq += 1;
        if state.fenced.load(Ordering::SeqCst) {
            continue;
        }
        let mut all = true;
        for ds in &datastores {
            let (path, host) = (ds.clone(), host.clone());
            let renewed = tokio::time::timeout(
                timing::RENEW_EVERY * 2,
                tokio::task::spawn_blocking(move || renew(&path, &host, seq)),
            )
            .await;
            if !matches!(renewed, Ok(Ok(Ok(())))) {
                tracing::warn!(datastore = %ds.display(), "could not renew the storage lease");
                all = false;
            }
        }
        if all {
            state.leases_renewed();
        }
    }
}

/// Reports to the controller every [`timing::RENEW_EVERY`]; fences the host when it is isolated
/// (under the power-off response) and takes it out of the fence once the controller answers.
async fn report(
    link: Arc<dyn HaLink>,
    driver: Arc<dyn Driver>,
    data_dir: PathBuf,
    gossip: Option<SocketAddr>,
    state: Arc<HaState>,
) {
    let mut controller_seen = Instant::now();
    // None until the controller first answers (the default applies meanwhile).
    let mut response: Option<IsolationResponse> = None;
    let mut tick = tokio::time::interval(timing::RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let report = HaReport {
            peers_alive: lock(&state.peers_alive).clone(),
            gossip,
            isolation_response: response,
        };
        match tokio::time::timeout(timing::RENEW_EVERY * 2, link.report(report)).await {
            Ok(Ok(reply)) => {
                controller_seen = Instant::now();
                response = Some(reply.isolation_response);
                *lock(&state.peers_known) = reply.peers;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "HA report failed"),
            Err(_) => tracing::debug!("HA report timed out"),
        }
        let fenced = state.fenced.load(Ordering::SeqCst);
        let alone = lock(&state.peers_alive).is_empty() && !lock(&state.peers_known).is_empty();
        let isolated = controller_seen.elapsed() > timing::ISOLATED_AFTER && alone;
        if isolated && response.unwrap_or_default() == IsolationResponse::PowerOff && !fenced {
            state.fenced.store(true, Ordering::SeqCst);
            let why = format!(
                "isolated: no answer from the controller for {:.1} s and no peer alive",
                controller_seen.elapsed().as_secs_f64()
            );
            fence(&*driver, &data_dir, &why).await;
        } else if fenced && controller_seen.elapsed() < timing::SILENT_AFTER {
            tracing::warn!("the controller answers again: taking storage leases again");
            state.fenced.store(false, Ordering::SeqCst);
        }
    }
}
