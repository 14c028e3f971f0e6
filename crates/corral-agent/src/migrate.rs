//! Live migration as the two hosts carry it out, driven by the migration record (see
//! `corral_api::Migration`).
//!
//! - The target prepares: a run directory, the disk (the shared one, or a fresh linked clone of the
//!   same image that the source mirrors into), and a paused QEMU waiting for the state. It records
//!   where it listens, then watches its copy until the migration ends; if it fails or is cancelled
//!   it removes the copy. It never resumes the copy itself: that happens once the VM is its own.
//! - The source copies the disk, then memory, reports progress, and once QEMU says the copy is
//!   complete (the guest is paused on both sides) hands the VM over in one transaction that also
//!   marks the migration completed. Only then does the target's VM worker resume the guest, and the
//!   source removes its paused copy. Any failure before the handover leaves the guest running on
//!   the source, and the target's copy is removed: the VM never runs on two hosts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use corral_api::host_protocol::{HostWrite, MigrationStep, VmRef, Written};
use corral_api::{
    keys, ClusterSettings, Host, Migration, MigrationEndpoints, MigrationPhase, MigrationResult,
    Vm, VmEvent,
};
use corral_hypervisor::{Driver, RunState, Transfer, Tuning};
use corral_store::{get_json, Versioned};

use crate::guest::{
    clone_disk, disk_on, disk_path, image_of, known_disk, launch_spec, new_disk_path, private_dir,
    remove_vm_files, Disk,
};
use crate::lifecycle::Outcome;
use crate::link::{migration_step, update_vm_status, Controller};
use crate::{layout, AgentConfig, AgentError};

use corral_api::ValidationError;

mod source;
use source::Step;

/// How often the record and the VM are read again while memory moves (for a cancel or a stop).
const STORE_POLL: Duration = Duration::from_millis(200);

/// How this cluster wants memory sent.
async fn tuning(store: &dyn Controller) -> Result<Tuning, AgentError> {
    let settings = get_json::<ClusterSettings>(store, keys::CLUSTER)
        .await?
        .map(|s| s.value)
        .unwrap_or_default();
    let default = Tuning::default();
    Ok(Tuning {
        max_bandwidth_bytes: settings
            .migration_bandwidth_bytes
            .unwrap_or(default.max_bandwidth_bytes),
        downtime_limit_ms: settings.migration_downtime_limit_ms,
        auto_converge: settings.migration_auto_converge,
    })
}

/// Where the source sends `m`: the target's registered fabric address (from its host record) and
/// the ports it recorded; the refusal's sentence when that is not a usable address.
async fn endpoints(
    store: &dyn Controller,
    m: &Migration,
) -> Result<Result<MigrationEndpoints, ValidationError>, AgentError> {
    let Some(target) = get_json::<Host>(store, &keys::host(&m.target)).await? else {
        return Ok(Err(ValidationError::new(format!(
            "host {} is no longer in the cluster",
            m.target
        ))));
    };
    Ok(m.stream_to(&target.value))
}

/// The unfinished migration of `vm` whose source is this host, if any.
pub(crate) async fn outgoing(
    store: &dyn Controller,
    host: &str,
    vm: &Vm,
) -> Result<Option<Versioned<Migration>>, AgentError> {
    let key = keys::migration(&vm.meta.project, &vm.meta.name);
    Ok(get_json::<Migration>(store, &key).await?.filter(|m| {
        m.value.vm_uid == vm.meta.uid && m.value.source == host && !m.value.phase.is_finished()
    }))
}

/// Takes `step` on the migration record at `key` unless it already ended, reading again whenever
/// it changed in between; returns the record as it was when the step was taken.
async fn take(
    store: &dyn Controller,
    key: &str,
    step: MigrationStep,
) -> Result<Option<Migration>, AgentError> {
    loop {
        let Some(Versioned { value: m, revision }) = get_json::<Migration>(store, key).await?
        else {
            return Ok(None);
        };
        if m.phase.is_finished() {
            return Ok(None);
        }
        if migration_step(store, &m, revision, step.clone()).await? {
            return Ok(Some(m));
        }
    }
}

/// Ends the migration as failed (or cancelled); the source also notes it in the VM's events.
pub(crate) async fn end(
    store: &dyn Controller,
    mig_key: &str,
    vm_key: &str,
    host: &str,
    phase: MigrationPhase,
    error: &str,
) -> Result<(), AgentError> {
    let error = error.to_string();
    let step = if phase == MigrationPhase::Cancelled {
        MigrationStep::Cancelled {
            error: error.clone(),
        }
    } else {
        MigrationStep::Failed {
            error: error.clone(),
        }
    };
    if let Some(mut m) = take(store, mig_key, step)
        .await?
        .filter(|m| m.source == host)
    {
        m.phase = phase;
        m.error = Some(error);
        note_end(store, vm_key, &m).await?;
    }
    Ok(())
}

/// Adds a migration that did not complete to the VM's events (the source's VM: only it writes),
/// once: noting the same end again changes nothing.
pub(crate) async fn note_end(
    store: &dyn Controller,
    vm_key: &str,
    m: &Migration,
) -> Result<(), AgentError> {
    let reason = if m.phase == MigrationPhase::Cancelled {
        "MigrationCancelled"
    } else {
        "MigrationFailed"
    };
    let event = VmEvent::new(reason, m.summary());
    update_vm_status(store, vm_key, |vm| {
        if vm.meta.uid != m.vm_uid || vm.status.host.as_deref() != Some(m.source.as_str()) {
            return false;
        }
        let noted = vm
            .status
            .events
            .last()
            .is_some_and(|e| e.reason == event.reason && e.message == event.message);
        if noted {
            return false;
        }
        vm.status.push_event(event.clone());
        true
    })
    .await
}

/// The source's side of one migration: what every step of it acts on.
struct Source<'a> {
    store: &'a dyn Controller,
    driver: &'a dyn Driver,
    cfg: &'a AgentConfig,
    vm_key: &'a str,
    mig_key: &'a str,
    dir: &'a Path,
}

/// Carries out the source's side of a migration, from wherever it stands, until it ends: reads
/// the record, the VM and QEMU, and does what [`source::next`] decides. Runs in the VM's worker,
/// so nothing else touches the VM meanwhile.
pub(crate) async fn run_source(
    store: &dyn Controller,
    driver: &dyn Driver,
    cfg: &AgentConfig,
    vm_key: &str,
    mig: Versioned<Migration>,
) -> Result<Outcome, AgentError> {
    let src = Source {
        store,
        driver,
        cfg,
        vm_key,
        mig_key: &keys::migration(&mig.value.project, &mig.value.vm),
        dir: &layout::vm_dir(&cfg.data_dir, mig.value.vm_uid),
    };
    let mut mem = source::Memory::new(mig.value.phase, Instant::now());
    // The record and the VM as last read, and when.
    let mut read: Option<(Instant, Versioned<Migration>, Option<Versioned<Vm>>)> = None;
    loop {
        // Before memory moves the store is read on every look; while it moves, QEMU is looked at
        // far more often than the store is read.
        let fresh = read
            .as_ref()
            .is_none_or(|(at, ..)| !mem.memory_moves() || at.elapsed() >= STORE_POLL);
        if fresh {
            let Some(m) = get_json::<Migration>(store, src.mig_key).await? else {
                return Ok(Outcome::Requeue(Duration::ZERO));
            };
            read = Some((Instant::now(), m, get_json::<Vm>(store, vm_key).await?));
        }
        let Some((_, m, vm)) = &read else {
            return Ok(Outcome::Requeue(Duration::ZERO));
        };
        let (m, mig_rev) = (m.value.clone(), m.revision);
        if m.id != mig.value.id {
            return Ok(Outcome::Requeue(Duration::ZERO));
        }
        let state = driver.observe(src.dir).await?.map(|o| o.state);
        let transfer = match state {
            Some(_) => driver.transfer(src.dir).await?,
            None => Transfer::default(),
        };
        let look = source::Look {
            migration: &m,
            vm: vm.as_ref().map(|v| &v.value),
            state,
            transfer: &transfer,
            now: Instant::now(),
        };
        match source::next(&mut mem, &look) {
            Step::Ended => {
                driver.cancel_transfer(src.dir).await?;
                note_end(store, vm_key, &m).await?;
                return Ok(Outcome::Requeue(Duration::ZERO));
            }
            Step::QemuExited => {
                let why = format!("the VM's QEMU on {} exited during the migration", cfg.host);
                end(
                    store,
                    src.mig_key,
                    vm_key,
                    &cfg.host,
                    MigrationPhase::Failed,
                    &why,
                )
                .await?;
                return Ok(Outcome::Requeue(Duration::ZERO));
            }
            Step::HandOver => return src.hand_over(m.id, &transfer).await,
            Step::GiveUp { phase, why } => return src.give_up(m.id, phase, &why).await,
            Step::StartCopy => {
                // Where to, from the target's own record: never a URI a host wrote.
                let to = match endpoints(store, &m).await? {
                    Ok(to) => to,
                    Err(why) => return src.give_up(m.id, MigrationPhase::Failed, &why.0).await,
                };
                let started = match to.disk {
                    None => driver.send(src.dir, to.stream, &tuning(store).await?).await,
                    Some(disk) => driver.mirror_disk(src.dir, disk).await,
                };
                if let Err(e) = started {
                    let why = e.to_string();
                    return src.give_up(m.id, MigrationPhase::Failed, &why).await;
                }
                mem.copy_started(m.shared_storage, Instant::now());
                let progress = mem.progress(&transfer);
                take(store, src.mig_key, MigrationStep::Transferring { progress }).await?;
                // The record changed: read it again before the next step.
                read = None;
            }
            Step::SendMemory => {
                let to = match endpoints(store, &m).await? {
                    Ok(to) => to.stream,
                    Err(why) => return src.give_up(m.id, MigrationPhase::Failed, &why.0).await,
                };
                if let Err(e) = driver.send(src.dir, to, &tuning(store).await?).await {
                    let why = e.to_string();
                    return src.give_up(m.id, MigrationPhase::Failed, &why).await;
                }
                mem.copy_started(true, Instant::now());
            }
            Step::Wait { report, .. } => {
                if let Some(progress) = report {
                    // A record changed meanwhile gets the next report.
                    let step = MigrationStep::Transferring { progress };
                    migration_step(store, &m, mig_rev, step).await?;
                }
            }
        }
        tokio::time::sleep(mem.poll()).await;
    }
}

impl Source<'_> {
    /// Stops the copy and ends migration `id` as `phase` because of `why`, unless the copy
    /// completed just before the cancel: then it stands, and the VM is handed over.
    async fn give_up(
        &self,
        id: uuid::Uuid,
        phase: MigrationPhase,
        why: &str,
    ) -> Result<Outcome, AgentError> {
        self.driver.cancel_transfer(self.dir).await?;
        let t = self.driver.transfer(self.dir).await?;
        let state = self.driver.observe(self.dir).await?.map(|o| o.state);
        if state.is_some_and(|s| source::sent(&t, &s)) {
            return self.hand_over(id, &t).await;
        }
        let (store, host) = (self.store, &self.cfg.host);
        end(store, self.mig_key, self.vm_key, host, phase, why).await?;
        Ok(Outcome::Requeue(Duration::ZERO))
    }

    /// The copy is complete and the guest paused on both sides: finish the disk copy, then give
    /// the VM to the target and mark the migration completed in one transaction, then remove the
    /// source's copy.
    async fn hand_over(&self, id: uuid::Uuid, transfer: &Transfer) -> Result<Outcome, AgentError> {
        let Source {
            store,
            driver,
            cfg,
            vm_key,
            mig_key,
            dir,
        } = *self;
        let completed_at = Utc::now();
        let (shared, source) = get_json::<Migration>(store, mig_key)
            .await?
            .map(|m| (m.value.shared_storage, m.value.source))
            .unwrap_or_default();
        // Without its disk in sync the target's copy must not run: the guest resumes here instead.
        let disk_done = match (&transfer.disk, shared) {
            (_, true) => Ok(()),
            (Some(_), false) => driver
                .finish_disk_copy(dir)
                .await
                .map_err(|e| e.to_string()),
            (None, false) => {
                Err("the disk copy to the target stopped before the switchover".into())
            }
        };
        if let Err(why) = disk_done {
            end(
                store,
                mig_key,
                vm_key,
                &source,
                MigrationPhase::Failed,
                &why,
            )
            .await?;
            return Ok(Outcome::Requeue(Duration::ZERO));
        }
        let source_disk = loop {
            let (Some(vm), Some(mig)) = (
                get_json::<Vm>(store, vm_key).await?,
                get_json::<Migration>(store, mig_key).await?,
            ) else {
                return Err(AgentError::Refused(
                    "the VM or its migration record vanished during the handover".into(),
                ));
            };
            let (v, m) = (vm.value, mig.value);
            if m.id != id || m.phase != MigrationPhase::Transferring {
                // Ended meanwhile (the target failed, the controller gave up): no handover; the
                // VM's worker resumes the paused guest here.
                return Ok(Outcome::Requeue(Duration::ZERO));
            }
            let total_ms = (Utc::now() - m.created_at).num_milliseconds().max(0) as u64;
            // The mirror's last report, if QEMU already dropped the finished job.
            let disk_bytes = transfer
                .disk
                .as_ref()
                .map_or(m.progress.disk_total_bytes, |d| d.total);
            let source_disk = match &v.status.disk {
                Some(_) => known_disk(store, cfg, &v).await,
                None => None,
            };
            let result = MigrationResult {
                downtime_ms: transfer.downtime_ms.unwrap_or(0),
                total_ms,
                memory_bytes: transfer.memory_sent,
                disk_bytes,
                completed_at: Some(completed_at),
            };
            // The controller gives the VM the copy the target recorded, and completes the
            // migration with it.
            let handover = HostWrite::Handover {
                vm: VmRef::of(&v),
                vm_revision: vm.revision,
                migration_revision: mig.revision,
                result,
            };
            match store.write(handover).await? {
                Written::Applied { .. } => break (source_disk, m.shared_storage),
                Written::Stale => continue,
            }
        };
        tracing::info!(vm = %vm_key, "handed over after live migration");
        // The paused source copy: its state lives on elsewhere.
        driver.kill(dir).await?;
        let (disk, shared) = source_disk;
        let own = disk.as_ref().filter(|_| !shared).and_then(Disk::as_file);
        remove_vm_files(dir, own)?;
        Ok(Outcome::Gone)
    }
}

/// The target's side: prepares the incoming copy, watches it, and removes it if the migration does
/// not complete. Returns how long to wait before looking again.
pub(crate) async fn run_target(
    store: &dyn Controller,
    driver: &dyn Driver,
    cfg: &AgentConfig,
    mig_key: &str,
) -> Result<Outcome, AgentError> {
    let Some(Versioned { value: m, revision }) = get_json::<Migration>(store, mig_key).await?
    else {
        return Ok(Outcome::Gone);
    };
    let vm_key = keys::vm(&m.project, &m.vm);
    let vm = get_json::<Vm>(store, &vm_key)
        .await?
        .map(|v| v.value)
        .filter(|v| v.meta.uid == m.vm_uid);
    let ours = vm
        .as_ref()
        .is_some_and(|v| v.status.host.as_deref() == Some(cfg.host.as_str()));
    let dir = layout::vm_dir(&cfg.data_dir, m.vm_uid);
    if m.target != cfg.host {
        // A later migration of the VM goes elsewhere: a copy an earlier one left here goes.
        if !ours && dir.exists() {
            driver.kill(&dir).await?;
            remove_vm_files(&dir, None)?;
        }
        return Ok(Outcome::Gone);
    }
    // Only what this host made: the run directory, and the disk it cloned (never a shared one),
    // where this host makes its clones of the VM (a recorded path anywhere else is not removed).
    let clean_up = |made: Option<&str>| {
        let dir = dir.clone();
        let made = made.filter(|_| !m.shared_storage).map(PathBuf::from);
        let uid = m.vm_uid;
        async move {
            let disk = match made {
                Some(p) => own_clone(store, cfg, uid, &p).await?,
                None => None,
            };
            driver.kill(&dir).await?;
            remove_vm_files(&dir, disk.as_deref())
        }
    };
    // Fails the migration, then removes the copy, but only once the record (this migration's)
    // provably ended without completing: from then on no handover can happen.
    let fail = |why: String| async move {
        end(
            store,
            mig_key,
            &vm_key,
            &cfg.host,
            MigrationPhase::Failed,
            &why,
        )
        .await?;
        let now = get_json::<Migration>(store, mig_key)
            .await?
            .map(|n| n.value);
        if let Some(n) = now.filter(|n| {
            n.id == m.id && matches!(n.phase, MigrationPhase::Failed | MigrationPhase::Cancelled)
        }) {
            clean_up(n.target_disk.as_deref()).await?;
        }
        Ok::<_, AgentError>(Outcome::Gone)
    };
    let Some(vm) = vm else {
        return fail("the VM was deleted".into()).await;
    };
    match m.phase {
        MigrationPhase::Preparing => match prepare(store, driver, cfg, &vm, &m, &dir).await {
            Ok((ready, disk)) => {
                if migration_step(store, &m, revision, ready).await? {
                    Ok(Outcome::Requeue(Duration::from_millis(500)))
                } else {
                    // Cancelled meanwhile: what was just made is not recorded anywhere, so it
                    // goes now.
                    clean_up(Some(&disk)).await?;
                    Ok(Outcome::Requeue(Duration::ZERO))
                }
            }
            Err(e) => fail(format!("host {} could not prepare: {e}", cfg.host)).await,
        },
        MigrationPhase::TargetReady | MigrationPhase::Transferring => {
            match driver.observe(&dir).await {
                // QMP did not answer: look again rather than guess.
                Err(_) => Ok(Outcome::Requeue(Duration::from_secs(1))),
                Ok(Some(o))
                    if matches!(
                        o.state,
                        RunState::Incoming | RunState::Paused | RunState::Running
                    ) =>
                {
                    Ok(Outcome::Requeue(Duration::from_millis(500)))
                }
                Ok(_) => fail(format!("the waiting QEMU on {} exited", cfg.host)).await,
            }
        }
        // The VM is ours now: its own worker resumes it.
        MigrationPhase::Completed => Ok(Outcome::Gone),
        MigrationPhase::Failed | MigrationPhase::Cancelled => {
            if !ours {
                clean_up(m.target_disk.as_deref()).await?;
            }
            Ok(Outcome::Gone)
        }
    }
}

/// `recorded` if it is where this host makes a disk for the VM `uid` (on `local` or on some
/// datastore), else `None` (with a warning): a clean-up never removes a file it did not make.
async fn own_clone(
    store: &dyn Controller,
    cfg: &AgentConfig,
    uid: uuid::Uuid,
    recorded: &Path,
) -> Result<Option<PathBuf>, AgentError> {
    let (datastores, _) =
        corral_store::list_json::<corral_api::Datastore>(store, keys::DATASTORES).await?;
    let names = std::iter::once(corral_api::LOCAL_DATASTORE.to_string())
        .chain(datastores.into_iter().map(|d| d.name));
    for name in names {
        let derived = disk_on(store, cfg, &name, uid).await.ok();
        if derived.as_ref().and_then(Disk::as_file) == Some(recorded) {
            return Ok(Some(recorded.to_path_buf()));
        }
    }
    tracing::warn!(path = %recorded.display(), "not removing a disk this host did not make");
    Ok(None)
}

/// Makes the run directory and the disk, starts the waiting QEMU, and returns the step that
/// readies the migration, with the disk's path. What it made is removed again if it fails.
async fn prepare(
    store: &dyn Controller,
    driver: &dyn Driver,
    cfg: &AgentConfig,
    vm: &Vm,
    m: &Migration,
    dir: &Path,
) -> Result<(MigrationStep, String), AgentError> {
    private_dir(dir)?;
    if vm.status.disk.is_none() {
        return Err(AgentError::Refused("the VM has no disk yet".into()));
    }
    // Derived here from the datastore and the VM's uid, never from the source's status.
    let source_disk = disk_path(store, cfg, vm).await?;
    let (disk, cloned) = if m.shared_storage {
        if !source_disk.exists().await? {
            return Err(AgentError::Refused(format!(
                "the shared disk {source_disk} is not visible on this host: is the datastore {} reachable from here?",
                vm.spec.datastore
            )));
        }
        (source_disk, false)
    } else {
        let doing = "a migration that copies the disk";
        let path = new_disk_path(store, cfg, vm).await?;
        let path = path.file(doing)?;
        // On `local` every host derives its own path, so the two are equal by construction.
        if vm.spec.datastore != corral_api::LOCAL_DATASTORE
            && Some(path) == source_disk.as_file()
            && path.exists()
        {
            // The VM's own disk is visible here: replacing it with a fresh clone would destroy it.
            return Err(AgentError::Refused(format!(
                "the VM's disk {} is visible on this host too: datastore {} is shared, and must be marked so",
                path.display(),
                vm.spec.datastore
            )));
        }
        // A fresh clone of the same image: the source mirrors only the VM's own layer into it.
        let _ = std::fs::remove_file(path);
        let disk = Disk::File(path.to_path_buf());
        clone_disk(store, driver, vm, &disk).await?;
        (disk, true)
    };
    let started = async {
        let image = image_of(store, vm).await?;
        crate::network::prepare(store, cfg, vm).await?;
        let spec = launch_spec(vm, &image, &disk, cfg.accel);
        Ok::<_, AgentError>(
            driver
                .start_incoming(dir, &spec, cfg.address, !m.shared_storage)
                .await?,
        )
    }
    .await;
    let incoming = match started {
        Ok(i) => i,
        Err(e) => {
            let _ = driver.kill(dir).await;
            let made = disk.as_file().filter(|_| cloned);
            if let Err(rm) = remove_vm_files(dir, made) {
                tracing::warn!(error = %rm, "could not remove a failed incoming copy");
            }
            return Err(e);
        }
    };
    let disk = disk.to_string();
    let ready = MigrationStep::TargetReady {
        target_port: incoming.port,
        disk_port: incoming.disk_port,
        target_pid: incoming.pid,
        target_run_dir: dir.display().to_string(),
        target_disk: disk.clone(),
    };
    Ok((ready, disk))
}
