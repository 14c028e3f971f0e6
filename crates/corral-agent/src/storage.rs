//! Storage moves: a VM's disk goes to another datastore. A running VM keeps running: the hypervisor
//! mirrors the disk into a new clone on the target datastore and switches to it once in sync
//! (QEMU's drive-mirror and block-job-complete). A stopped VM's disk file is simply copied.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corral_api::{DiskStatus, Vm};
use corral_hypervisor::Driver;
use corral_store::get_json;

use crate::guest::{disk_path, new_disk_path, private_dir};
use crate::link::Controller;
use crate::{AgentConfig, AgentError};

/// A copy that is not in sync after this long is given up.
const COPY_TIMEOUT: Duration = Duration::from_secs(1800);

/// Moves the VM's disk to the datastore of its spec and returns the disk as it is now. On failure
/// the VM keeps its old disk and the partial copy is removed. `live`: a QEMU has the disk open
/// (running or paused), so the hypervisor copies it.
pub(crate) async fn move_disk(
    store: &dyn Controller,
    driver: &dyn Driver,
    cfg: &AgentConfig,
    vm_key: &str,
    vm: &Vm,
    run_dir: &Path,
    live: bool,
) -> Result<DiskStatus, AgentError> {
    let old = vm
        .status
        .disk
        .clone()
        .ok_or_else(|| AgentError::Refused("the VM has no disk yet".into()))?;
    let doing = "a storage move";
    let old_path = disk_path(store, cfg, vm).await?.file(doing)?.to_path_buf();
    let dest = new_disk_path(store, cfg, vm)
        .await?
        .file(doing)?
        .to_path_buf();
    let moved = DiskStatus {
        path: dest.display().to_string(),
        datastore: vm.spec.datastore.clone(),
        ..old.clone()
    };
    if dest == old_path {
        return Ok(moved);
    }
    if let Some(parent) = dest.parent() {
        private_dir(parent)?;
    }
    let _ = std::fs::remove_file(&dest);
    let copied = if live {
        copy_running(store, driver, vm_key, vm, run_dir, &dest).await
    } else {
        let part = dest.with_extension("qcow2.part");
        std::fs::copy(&old_path, &part)
            .and_then(|_| std::fs::rename(&part, &dest))
            .map_err(|e| (AgentError::io("copying the disk to", &dest, e), false))
    };
    if let Err((e, switching)) = copied {
        // Once the switch was asked for, QEMU may be writing to the copy: keep both files.
        if !switching {
            let _ = std::fs::remove_file(&dest);
        }
        return Err(e);
    }
    remove_old_disk(&old_path, run_dir);
    Ok(moved)
}

/// Has QEMU mirror the disk into `dest` and switch to it. Errors say whether the switch was asked
/// for. Stops early when the VM is to be deleted or its disk is wanted elsewhere.
async fn copy_running(
    store: &dyn Controller,
    driver: &dyn Driver,
    vm_key: &str,
    vm: &Vm,
    run_dir: &Path,
    dest: &Path,
) -> Result<(), (AgentError, bool)> {
    driver
        .copy_disk(run_dir, dest)
        .await
        .map_err(|e| (e.into(), false))?;
    let started = Instant::now();
    let mut checked = Instant::now();
    loop {
        let t = driver
            .transfer(run_dir)
            .await
            .map_err(|e| (e.into(), false))?;
        let mut failed = match t.disk {
            Some(d) if d.ready => break,
            Some(d) => d.error.map(|e| format!("the copy failed: {e}")),
            None => Some("the copy stopped".to_string()),
        };
        if started.elapsed() > COPY_TIMEOUT {
            failed = Some(format!(
                "the copy was not in sync after {} s: the guest writes faster than the datastore takes it",
                COPY_TIMEOUT.as_secs()
            ));
        }
        if checked.elapsed() > Duration::from_secs(1) {
            checked = Instant::now();
            let now = get_json::<Vm>(store, vm_key).await.ok().flatten();
            let wanted = now.is_some_and(|v| {
                v.value.meta.deletion_requested_at.is_none()
                    && v.value.spec.datastore == vm.spec.datastore
            });
            if !wanted {
                failed =
                    Some("stopped: the VM is being deleted or its disk is wanted elsewhere".into());
            }
        }
        if let Some(why) = failed {
            let _ = driver.cancel_transfer(run_dir).await;
            return Err((AgentError::Refused(why), false));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver
        .switch_disk(run_dir, dest)
        .await
        .map_err(|e| (e.into(), true))
}

/// Removes the disk that was moved away: its own directory on a datastore (named by the VM's uid),
/// or the file alone when it sits in the run directory.
fn remove_old_disk(old: &Path, run_dir: &Path) {
    let dir: Option<PathBuf> = old.parent().map(Path::to_path_buf);
    let own_dir = dir
        .as_deref()
        .filter(|d| *d != run_dir && d.file_name() == run_dir.file_name());
    let removed = match own_dir {
        Some(d) => std::fs::remove_dir_all(d),
        None => std::fs::remove_file(old),
    };
    if let Err(e) = removed {
        tracing::warn!(disk = %old.display(), error = %e, "could not remove the old disk");
    }
}
