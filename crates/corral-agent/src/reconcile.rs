//! The VM reconciler and the loop that runs one worker per VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use corral_api::{
    keys, Accel, Datastore, DiskStatus, Host, HostStatus, Image, ImagePhase, Migration, PowerState,
    Vm, VmPhase, LOCAL_DATASTORE,
};
use corral_hypervisor::{Driver, LaunchSpec, RunState};
use corral_store::{get_json, update_json, Precondition, Store, StoreError, Versioned};
use tokio::sync::mpsc;

use crate::lifecycle::{self, Action, Facts};
pub(crate) use crate::lifecycle::{Outcome, WorkerState};
use crate::{layout, AgentError};

/// How often an agent that reports to the failure detector rewrites its host record.
pub const HEARTBEAT_WITH_REPORTS: Duration = Duration::from_secs(30);

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This host's name in the cluster.
    pub host: String,
    pub data_dir: PathBuf,
    pub accel: Accel,
    /// What the hypervisor reports of its version.
    pub hypervisor: String,
    /// How long a guest gets to shut down after the ACPI power button before it is powered off.
    pub stop_timeout: Duration,
    /// How often every VM is reconciled even when nothing changed (catches crashed guests).
    pub resync: Duration,
    /// Where VMs migrating to this host are received: this host's address on the fabric.
    pub address: std::net::IpAddr,
    /// What the HA loops share with the VM workers (storage lease, fencing).
    pub ha: Arc<crate::ha::HaState>,
    /// Makes this host's bridges, tunnels, taps, DHCP and firewall what the networks ask for.
    pub network: Arc<dyn corral_network::NetDriver>,
}

/// Where a VM's disk lives now: on the datastore its status says the disk was made on (a storage
/// move may be under way), else on the spec's. Derived like every disk path, never read from a
/// path some host wrote into the status (see [`disk_on`]).
pub(crate) async fn disk_path(
    store: &dyn Store,
    cfg: &AgentConfig,
    vm: &Vm,
) -> Result<PathBuf, String> {
    let datastore = vm
        .status
        .disk
        .as_ref()
        .map(|d| d.datastore.as_str())
        .filter(|d| !d.is_empty())
        .unwrap_or(&vm.spec.datastore);
    disk_on(store, cfg, datastore, vm.meta.uid).await
}

/// The VM's disk where it can still be derived; `None` (with a warning) when its datastore is
/// gone, so a delete or handover still goes through (the disk, if any, is left for an operator).
pub(crate) async fn known_disk(store: &dyn Store, cfg: &AgentConfig, vm: &Vm) -> Option<PathBuf> {
    match disk_path(store, cfg, vm).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(vm = %vm.meta.name, error = %e, "not removing the VM's disk: cannot tell where it is");
            None
        }
    }
}

/// Where this host makes a disk for the VM: on the datastore of its spec.
pub(crate) async fn new_disk_path(
    store: &dyn Store,
    cfg: &AgentConfig,
    vm: &Vm,
) -> Result<PathBuf, String> {
    disk_on(store, cfg, &vm.spec.datastore, vm.meta.uid).await
}

/// The disk of the VM `uid` on `datastore`: in the datastore's directory for the VM (its path was
/// validated when an operator created it), or in the run directory for the `local` datastore.
/// Every host derives it the same way, so what one host writes can never point another at a file.
pub(crate) async fn disk_on(
    store: &dyn Store,
    cfg: &AgentConfig,
    datastore: &str,
    uid: uuid::Uuid,
) -> Result<PathBuf, String> {
    if datastore == LOCAL_DATASTORE {
        return Ok(layout::vm_dir(&cfg.data_dir, uid).join(layout::DISK_FILE));
    }
    corral_api::validate_name("datastore", datastore).map_err(|e| e.to_string())?;
    match get_json::<Datastore>(store, &keys::datastore(datastore)).await {
        Ok(Some(ds)) => {
            let path = Path::new(&ds.value.path);
            corral_api::validate_datastore_path(&ds.value.path).map_err(|e| e.to_string())?;
            Ok(layout::datastore_vm_dir(path, uid).join(layout::DISK_FILE))
        }
        Ok(None) => Err(format!("datastore {datastore} does not exist")),
        Err(e) => Err(e.to_string()),
    }
}

/// Creates a directory that only its owner may enter (it holds disks, sockets, console logs).
pub(crate) fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .and_then(|()| {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(|e| format!("creating {}: {e}", dir.display()))
}

/// Makes `disk` a linked clone of the VM's image unless it exists. The clone is made under a
/// temporary name and renamed, so a crash never leaves a half-made disk under the real name.
pub(crate) async fn clone_disk(
    store: &dyn Store,
    driver: &dyn Driver,
    vm: &Vm,
    disk: &Path,
) -> Result<(), String> {
    if disk.exists() {
        return Ok(());
    }
    let image = image_of(store, vm).await?;
    let backing = PathBuf::from(image.status.path.clone().unwrap_or_default());
    let format = image.status.format.unwrap_or(corral_api::DiskFormat::Qcow2);
    if let Some(parent) = disk.parent() {
        private_dir(parent)?;
    }
    let tmp = disk.with_extension("qcow2.part");
    driver
        .create_disk(&backing, format, &tmp, vm.spec.disk_bytes)
        .await
        .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, disk).map_err(|e| format!("creating {}: {e}", disk.display()))
}

/// Makes sure the VM's disk exists (a linked clone of its image) and is recorded in its status.
async fn ensure_disk(
    store: &dyn Store,
    driver: &dyn Driver,
    vm: &mut Vm,
    dir: &Path,
    disk: &Path,
) -> Result<(), String> {
    private_dir(dir)?;
    vm.status
        .run_dir
        .get_or_insert_with(|| dir.display().to_string());
    clone_disk(store, driver, vm, disk).await?;
    // The path shown is the one derived here, whatever an earlier host recorded.
    if let Some(d) = vm.status.disk.as_mut() {
        let derived = disk.display().to_string();
        if d.path != derived {
            d.path = derived;
        }
    }
    if vm.status.disk.is_none() {
        let backing = driver
            .disk_backing(disk)
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        vm.status.disk = Some(DiskStatus {
            path: disk.display().to_string(),
            backing,
            datastore: vm.spec.datastore.clone(),
        });
        let msg = format!("linked clone of image {}", vm.spec.image);
        vm.status
            .set_condition(corral_api::ConditionType::DiskReady, true, "Cloned", &msg);
    }
    Ok(())
}

async fn write_status(
    store: &dyn Store,
    key: &str,
    rev: u64,
    vm: &Vm,
) -> Result<Option<u64>, AgentError> {
    let bytes = serde_json::to_vec(vm).map_err(StoreError::from)?;
    match store.put(key, bytes, Precondition::ModRevision(rev)).await {
        Ok(r) => Ok(Some(r)),
        Err(StoreError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn image_of(store: &dyn Store, vm: &Vm) -> Result<Image, String> {
    let key = keys::image(&vm.meta.project, &vm.spec.image);
    match get_json::<Image>(store, &key).await {
        Ok(Some(Versioned { value, .. })) if value.status.phase == ImagePhase::Ready => Ok(value),
        Ok(Some(_)) => Err(format!("image {} is not ready", vm.spec.image)),
        Ok(None) => Err(format!("image {} does not exist", vm.spec.image)),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn launch_spec(vm: &Vm, image: &Image, disk: &Path, accel: Accel) -> LaunchSpec {
    LaunchSpec {
        name: vm.meta.name.clone(),
        cpus: vm.spec.cpus,
        memory_mib: vm.spec.memory_bytes >> 20,
        disk: disk.to_path_buf(),
        direct_boot: image.status.boot.clone(),
        accel,
        nics: vm
            .spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| corral_hypervisor::NicLaunch {
                tap: corral_network::tap_name(vm.meta.uid, i),
                mac: n.mac.clone(),
            })
            .collect(),
    }
}

/// Starts the guest: its image must be ready and its NICs prepared first.
async fn start(
    store: &dyn Store,
    driver: &dyn Driver,
    cfg: &AgentConfig,
    vm: &Vm,
    dir: &Path,
    disk: &Path,
) -> Result<u32, String> {
    let image = image_of(store, vm).await?;
    crate::network::prepare(store, cfg, vm).await?;
    driver
        .start(dir, &launch_spec(vm, &image, disk, cfg.accel))
        .await
        .map_err(|e| e.to_string())
}

/// Moves the VM at `key` one step toward its spec and records what was observed. Idempotent.
pub(crate) async fn reconcile(
    store: &dyn Store,
    driver: &dyn Driver,
    cfg: &AgentConfig,
    key: &str,
    ws: &mut WorkerState,
) -> Result<Outcome, AgentError> {
    let Some(Versioned {
        value: mut vm,
        mut revision,
    }) = get_json::<Vm>(store, key).await?
    else {
        return Ok(Outcome::Gone);
    };
    // Only VMs the scheduler placed on this host; a VM placed later wakes a new worker.
    if vm.status.host.as_deref() != Some(cfg.host.as_str()) {
        return Ok(Outcome::Gone);
    }
    // A migration away from here runs to its end before anything else happens to the VM.
    if let Some(m) = crate::migrate::outgoing(store, &cfg.host, &vm).await? {
        return crate::migrate::run_source(store, driver, cfg, key, m).await;
    }
    let dir = layout::vm_dir(&cfg.data_dir, vm.meta.uid);
    let before = vm.clone();

    // Deletion needs no QMP: it must work also when QEMU hangs.
    if vm.meta.deletion_requested_at.is_some() {
        let mut rev = revision;
        if vm.status.phase != VmPhase::Deleting {
            vm.status.phase = VmPhase::Deleting;
            match write_status(store, key, revision, &vm).await? {
                Some(r) => rev = r,
                None => return Ok(Outcome::Requeue(Duration::ZERO)),
            }
        }
        driver.kill(&dir).await?;
        let disk = match &vm.status.disk {
            Some(_) => known_disk(store, cfg, &vm).await,
            None => None,
        };
        remove_vm_files(&dir, disk.as_deref())?;
        return match store.delete(key, Precondition::ModRevision(rev)).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(Outcome::Gone),
            Err(StoreError::Conflict { .. }) => Ok(Outcome::Requeue(Duration::ZERO)),
            Err(e) => Err(e.into()),
        };
    }

    let made = match disk_path(store, cfg, &vm).await {
        Ok(disk) => ensure_disk(store, driver, &mut vm, &dir, &disk)
            .await
            .map(|()| disk),
        Err(msg) => Err(msg),
    };
    let disk = match made {
        Ok(disk) => disk,
        Err(msg) => {
            vm.status.phase = VmPhase::Failed;
            vm.status.set_condition(
                corral_api::ConditionType::DiskReady,
                false,
                "DiskUnavailable",
                &msg,
            );
            vm.status.observed_generation = vm.meta.generation;
            let retry = Outcome::Requeue(Duration::from_secs(10));
            return finish(store, key, revision, &before, &vm, retry).await;
        }
    };
    mark_protected(&dir, vm.spec.wants_ha_restart());
    let observed = match driver.observe(&dir).await {
        Ok(o) => o,
        // A force stop does not need QEMU's answer either.
        Err(e) if vm.spec.power == PowerState::Stopped && vm.spec.force_stop => {
            tracing::warn!(vm = %vm.meta.name, error = %e, "QMP does not answer; powering off");
            driver.kill(&dir).await?;
            None
        }
        Err(e) => return Err(e.into()),
    };

    if let Some(d) = vm.status.disk.as_mut().filter(|d| d.datastore.is_empty()) {
        d.datastore.clone_from(&vm.spec.datastore);
    }
    // The disk should be on another datastore (tried once per generation of the spec).
    let moving = vm
        .status
        .disk
        .as_ref()
        .is_some_and(|d| d.datastore != vm.spec.datastore);
    let failed_before = vm.status.observed_generation == vm.meta.generation
        && vm
            .status
            .condition(corral_api::ConditionType::StorageMoved)
            .is_some_and(|c| !c.status);
    if moving && !failed_before {
        let live = observed.is_some();
        match crate::storage::move_disk(store, driver, cfg, key, &vm, &dir, live).await {
            Ok(disk) => {
                let msg = format!("moved to datastore {}", disk.datastore);
                vm.status.disk = Some(disk);
                vm.status.set_condition(
                    corral_api::ConditionType::StorageMoved,
                    true,
                    "Moved",
                    &msg,
                );
            }
            Err(msg) => {
                vm.status.set_condition(
                    corral_api::ConditionType::StorageMoved,
                    false,
                    "MoveFailed",
                    &msg,
                );
            }
        }
        vm.status.observed_generation = vm.meta.generation;
        return finish(
            store,
            key,
            revision,
            &before,
            &vm,
            Outcome::Requeue(Duration::ZERO),
        )
        .await;
    }
    let facts = Facts {
        now: Instant::now(),
        wall: Utc::now(),
        stop_timeout: cfg.stop_timeout,
        lease_fresh: cfg.ha.may_start_protected(),
    };
    let plan = lifecycle::plan(&mut vm, &before, observed.as_ref(), ws, facts);
    let (mut outcome, mut next) = (plan.outcome, plan.worker);
    for action in plan.actions {
        match action {
            Action::Persist => match write_status(store, key, revision, &vm).await? {
                Some(r) => revision = r,
                None => return Ok(Outcome::Requeue(Duration::ZERO)),
            },
            Action::RequireLease => {
                if !cfg.ha.may_start_protected() {
                    return Ok(Outcome::Requeue(Duration::from_millis(500)));
                }
            }
            Action::Start => {
                if before.status.phase == VmPhase::Running {
                    tracing::warn!(vm = %vm.meta.name, "QEMU exited while the VM should run; starting it again");
                }
                let result = start(store, driver, cfg, &vm, &dir, &disk).await;
                outcome = lifecycle::started(&mut vm, &mut next, result, Utc::now());
            }
            Action::Kill => driver.kill(&dir).await?,
            Action::Powerdown => driver.powerdown(&dir).await?,
            Action::Resume => driver.resume(&dir).await?,
            Action::Reset => driver.reset(&dir).await?,
        }
    }
    *ws = next;
    lifecycle::settle(&mut vm, &outcome);
    finish(store, key, revision, &before, &vm, outcome).await
}

/// Removes a VM's run directory and socket directory and, when given, the directory of its disk
/// on a datastore (only if it is the VM's own, named by its uid like the run directory).
pub(crate) fn remove_vm_files(run_dir: &Path, disk: Option<&Path>) -> Result<(), AgentError> {
    let disk_dir = disk.and_then(|d| d.parent().map(Path::to_path_buf));
    let uid_name = run_dir.file_name().map(|n| n.to_owned());
    // The socket directory too: a fenced QEMU (killed without asking) leaves its sockets.
    let dirs = [
        run_dir.to_path_buf(),
        corral_hypervisor::socket_dir(run_dir),
    ]
    .into_iter()
    .chain(disk_dir.filter(|d| d.file_name().map(|n| n.to_owned()) == uid_name));
    for d in dirs {
        match std::fs::remove_dir_all(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::Other(format!("removing {}: {e}", d.display()))),
        }
    }
    Ok(())
}

/// Keeps the run directory's HA marker in step with the VM's protection (fencing reads it).
fn mark_protected(dir: &Path, protected: bool) {
    let marker = dir.join(layout::HA_MARKER);
    let result = match (protected, marker.exists()) {
        (true, false) => std::fs::write(&marker, b""),
        (false, true) => std::fs::remove_file(&marker),
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(path = %marker.display(), error = %e, "could not update the HA marker");
    }
}

/// Writes the VM back if anything changed; a lost compare-and-swap means "look again now".
async fn finish(
    store: &dyn Store,
    key: &str,
    rev: u64,
    before: &Vm,
    vm: &Vm,
    outcome: Outcome,
) -> Result<Outcome, AgentError> {
    if vm == before {
        return Ok(outcome);
    }
    match write_status(store, key, rev, vm).await? {
        Some(_) => Ok(outcome),
        None => Ok(Outcome::Requeue(Duration::ZERO)),
    }
}

/// A host agent bound to a store and a driver.
pub struct Agent {
    store: Arc<dyn Store>,
    driver: Arc<dyn Driver>,
    cfg: AgentConfig,
    /// The controller's failure detector; none for an agent without a controller to report to.
    ha_link: Option<Arc<dyn crate::ha::HaLink>>,
    /// Where this host's gossip listens, once bound.
    gossip: std::sync::OnceLock<std::net::SocketAddr>,
    /// The worker of each VM (and each migration to here) this host looks after.
    workers: std::sync::Mutex<HashMap<String, mpsc::Sender<()>>>,
}

/// Writes the host's status (registering the host if it is not yet), keeping what the operator set;
/// returns the record as written.
pub async fn write_heartbeat(
    store: &dyn Store,
    host: &str,
    status: HostStatus,
) -> Result<Host, AgentError> {
    let key = keys::host(host);
    loop {
        let updated = update_json::<Host, AgentError>(store, &key, |h| {
            h.status = status.clone();
            Ok(true)
        })
        .await?;
        if let Some(record) = updated {
            return Ok(record);
        }
        let record = Host {
            name: host.to_string(),
            maintenance: false,
            standby: false,
            approved: None,
            status: status.clone(),
        };
        let bytes = serde_json::to_vec(&record).map_err(StoreError::from)?;
        match store.put(&key, bytes, Precondition::Absent).await {
            Ok(_) => return Ok(record),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
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
        store: Arc<dyn Store>,
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
        write_heartbeat(&*self.store, &self.cfg.host, status)
            .await
            .map(drop)
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
    async fn sweep(&self, vms: &[corral_store::KeyValue], migrations: &[corral_store::KeyValue]) {
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
                let step = if key.starts_with(keys::MIGRATIONS) {
                    crate::migrate::run_target(&*self.store, &*self.driver, &self.cfg, &key).await
                } else {
                    reconcile(&*self.store, &*self.driver, &self.cfg, &key, &mut ws).await
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

#[cfg(test)]
mod tests;
