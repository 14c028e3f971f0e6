//! What this host makes for a guest, and derives alone from the store's records: the VM's
//! directories, its disk (a linked clone of its image, at a path derived from the datastore and
//! the VM's uid, never read from what another host wrote), and what QEMU is started with. Shared by
//! the reconciler, the migration target and the storage move.

use std::path::{Path, PathBuf};

use corral_api::{keys, Accel, Datastore, Image, ImagePhase, Vm, LOCAL_DATASTORE};
use corral_hypervisor::{Driver, LaunchSpec};
use corral_store::{get_json, Versioned};

use crate::link::Controller;
use crate::{layout, AgentConfig, AgentError};

/// Where a VM's disk lives now: on the datastore its status says the disk was made on (a storage
/// move may be under way), else on the spec's. Derived like every disk path, never read from a
/// path some host wrote into the status (see [`disk_on`]).
pub(crate) async fn disk_path(
    store: &dyn Controller,
    cfg: &AgentConfig,
    vm: &Vm,
) -> Result<PathBuf, AgentError> {
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
pub(crate) async fn known_disk(
    store: &dyn Controller,
    cfg: &AgentConfig,
    vm: &Vm,
) -> Option<PathBuf> {
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
    store: &dyn Controller,
    cfg: &AgentConfig,
    vm: &Vm,
) -> Result<PathBuf, AgentError> {
    disk_on(store, cfg, &vm.spec.datastore, vm.meta.uid).await
}

/// The disk of the VM `uid` on `datastore`: in the datastore's directory for the VM (its path was
/// validated when an operator created it), or in the run directory for the `local` datastore.
/// Every host derives it the same way, so what one host writes can never point another at a file.
pub(crate) async fn disk_on(
    store: &dyn Controller,
    cfg: &AgentConfig,
    datastore: &str,
    uid: uuid::Uuid,
) -> Result<PathBuf, AgentError> {
    if datastore == LOCAL_DATASTORE {
        return Ok(layout::vm_dir(&cfg.data_dir, uid).join(layout::DISK_FILE));
    }
    corral_api::validate_name("datastore", datastore)?;
    let Some(ds) = get_json::<Datastore>(store, &keys::datastore(datastore)).await? else {
        return Err(AgentError::Missing {
            what: "datastore",
            name: datastore.to_string(),
        });
    };
    corral_api::validate_datastore_path(&ds.value.path)?;
    Ok(layout::datastore_vm_dir(Path::new(&ds.value.path), uid).join(layout::DISK_FILE))
}

/// Creates a directory that only its owner may enter (it holds disks, sockets, console logs).
pub(crate) fn private_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(|e| AgentError::io("creating", dir, e))
}

/// Makes `disk` a linked clone of the VM's image unless it exists. The clone is made under a
/// temporary name and renamed, so a crash never leaves a half-made disk under the real name.
pub(crate) async fn clone_disk(
    store: &dyn Controller,
    driver: &dyn Driver,
    vm: &Vm,
    disk: &Path,
) -> Result<(), AgentError> {
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
        .await?;
    std::fs::rename(&tmp, disk).map_err(|e| AgentError::io("creating", disk, e))
}

/// The VM's image, once it is ready.
pub(crate) async fn image_of(store: &dyn Controller, vm: &Vm) -> Result<Image, AgentError> {
    let key = keys::image(&vm.meta.project, &vm.spec.image);
    match get_json::<Image>(store, &key).await? {
        Some(Versioned { value, .. }) if value.status.phase == ImagePhase::Ready => Ok(value),
        Some(_) => Err(AgentError::ImageNotReady(vm.spec.image.clone())),
        None => Err(AgentError::Missing {
            what: "image",
            name: vm.spec.image.clone(),
        }),
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
            Err(e) => return Err(AgentError::io("removing", &d, e)),
        }
    }
    Ok(())
}
