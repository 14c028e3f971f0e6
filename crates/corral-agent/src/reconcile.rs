//! The VM reconciler: one pass moves a VM placed on this host one step toward its spec (its
//! deletion, its disk, a storage move, then the [`lifecycle`] plan carried out) and records what
//! was observed. A migration away from here is handed to the migration source.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use corral_api::host_protocol::{HostWrite, VmRef, Written};
use corral_api::{DiskStatus, PowerState, Vm, VmPhase};
use corral_hypervisor::Driver;
use corral_store::{get_json, Versioned};

use crate::guest::{
    clone_disk, disk_path, image_of, known_disk, launch_spec, private_dir, remove_vm_files, Disk,
};
use crate::lifecycle::{self, Action, Facts, Outcome, WorkerState};
use crate::link::Controller;
use crate::{layout, AgentConfig, AgentError};

/// Makes sure the VM's disk exists (a linked clone of its image) and is recorded in its status.
async fn ensure_disk(
    store: &dyn Controller,
    driver: &dyn Driver,
    vm: &mut Vm,
    dir: &Path,
    disk: &Disk,
) -> Result<(), AgentError> {
    private_dir(dir)?;
    vm.status
        .run_dir
        .get_or_insert_with(|| dir.display().to_string());
    let derived = disk.to_string();
    // An RBD disk once recorded exists (only its VM's deletion removes it): no round trip to the
    // cluster on every pass.
    let recorded = vm.status.disk.as_ref().is_some_and(|d| d.path == derived);
    if !(recorded && matches!(disk, Disk::Rbd { .. })) {
        clone_disk(store, driver, vm, disk).await?;
    }
    // The path shown is the one derived here, whatever an earlier host recorded.
    if let Some(d) = vm.status.disk.as_mut() {
        if d.path != derived {
            d.path.clone_from(&derived);
        }
    }
    if vm.status.disk.is_none() {
        let backing = match disk {
            Disk::File(f) => driver.disk_backing(f).await?.unwrap_or_default(),
            Disk::Rbd { pool, .. } => {
                let image = image_of(store, vm).await?;
                format!(
                    "rbd:{}/{}@{}",
                    pool.name(),
                    layout::rbd_base_image(image.meta.uid),
                    corral_ceph::BASE_SNAPSHOT
                )
            }
        };
        vm.status.disk = Some(DiskStatus {
            path: derived,
            backing,
            datastore: vm.spec.datastore.clone(),
        });
        let msg = format!("linked clone of image {}", vm.spec.image);
        vm.status
            .set_condition(corral_api::ConditionType::DiskReady, true, "Cloned", &msg);
    }
    Ok(())
}

/// Records the VM's status as read at `rev`; the revision written at, or `None` if the VM changed
/// meanwhile. A desired power that went to stopped since `before` is the guest's own power-off.
async fn write_status(
    store: &dyn Controller,
    rev: u64,
    before: &Vm,
    vm: &Vm,
) -> Result<Option<u64>, AgentError> {
    let powered_off = vm.spec.power == PowerState::Stopped && before.spec.power != vm.spec.power;
    crate::link::vm_status(store, vm, rev, powered_off).await
}

/// Starts the guest: its image must be ready and its NICs prepared first.
async fn start(
    store: &dyn Controller,
    driver: &dyn Driver,
    cfg: &AgentConfig,
    vm: &Vm,
    dir: &Path,
    disk: &Disk,
) -> Result<u32, AgentError> {
    let image = image_of(store, vm).await?;
    crate::network::prepare(store, cfg, vm).await?;
    Ok(driver
        .start(dir, &launch_spec(vm, &image, disk, cfg.accel))
        .await?)
}

/// Moves the VM at `key` one step toward its spec and records what was observed. Idempotent.
pub(crate) async fn reconcile(
    store: &dyn Controller,
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
            match write_status(store, revision, &before, &vm).await? {
                Some(r) => rev = r,
                None => return Ok(Outcome::Requeue(Duration::ZERO)),
            }
        }
        driver.kill(&dir).await?;
        let disk = match &vm.status.disk {
            Some(_) => known_disk(store, cfg, &vm).await,
            None => None,
        };
        if let Some(d) = &disk {
            d.remove_image().await?;
        }
        remove_vm_files(&dir, disk.as_ref().and_then(Disk::as_file))?;
        let release = HostWrite::VmReleased {
            vm: VmRef::of(&vm),
            revision: rev,
        };
        return match store.write(release).await? {
            Written::Applied { .. } => Ok(Outcome::Gone),
            // Changed meanwhile (or gone already): the next pass sees which.
            Written::Stale => Ok(Outcome::Requeue(Duration::ZERO)),
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
        Err(e) => {
            vm.status.phase = VmPhase::Failed;
            vm.status.set_condition(
                corral_api::ConditionType::DiskReady,
                false,
                "DiskUnavailable",
                &e.to_string(),
            );
            vm.status.observed_generation = vm.meta.generation;
            let retry = Outcome::Requeue(Duration::from_secs(10));
            return finish(store, revision, &before, &vm, retry).await;
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
            Err(e) => {
                vm.status.set_condition(
                    corral_api::ConditionType::StorageMoved,
                    false,
                    "MoveFailed",
                    &e.to_string(),
                );
            }
        }
        vm.status.observed_generation = vm.meta.generation;
        return finish(
            store,
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
            Action::Persist => match write_status(store, revision, &before, &vm).await? {
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
    finish(store, revision, &before, &vm, outcome).await
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
    store: &dyn Controller,
    rev: u64,
    before: &Vm,
    vm: &Vm,
    outcome: Outcome,
) -> Result<Outcome, AgentError> {
    if vm == before {
        return Ok(outcome);
    }
    match write_status(store, rev, before, vm).await? {
        Some(_) => Ok(outcome),
        None => Ok(Outcome::Requeue(Duration::ZERO)),
    }
}

#[cfg(test)]
mod tests;
