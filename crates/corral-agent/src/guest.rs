//! What this host makes for a guest, and derives alone from the store's records: the VM's
//! directories, its disk (a linked clone of its image: a qcow2 file at a path derived from the
//! datastore and the VM's uid, or an RBD image named by the uid, never read from what another
//! host wrote), and what QEMU is started with. Shared by the reconciler, the migration target and
//! the storage move.

use std::path::{Path, PathBuf};

use corral_api::{
    keys, Accel, Datastore, DatastoreKind, DatastoreSecret, Image, ImagePhase, Vm, LOCAL_DATASTORE,
};
use corral_ceph::Pool;
use corral_hypervisor::{DiskSource, Driver, LaunchSpec};
use corral_store::{get_json, Versioned};

use crate::link::Controller;
use crate::{layout, AgentConfig, AgentError};

/// A VM's disk: a qcow2 file on this host (or a shared mount), or an image in an RBD pool.
#[derive(Clone, Debug)]
pub(crate) enum Disk {
    File(PathBuf),
    Rbd { pool: Pool, image: String },
}

impl Disk {
    /// The file, for what only works on files (`doing` says what, for the refusal).
    pub(crate) fn file(&self, doing: &str) -> Result<&Path, AgentError> {
        match self {
            Disk::File(p) => Ok(p),
            Disk::Rbd { .. } => Err(AgentError::Refused(format!(
                "{doing} is not possible for a disk on an RBD datastore yet"
            ))),
        }
    }

    pub(crate) fn as_file(&self) -> Option<&Path> {
        match self {
            Disk::File(p) => Some(p),
            Disk::Rbd { .. } => None,
        }
    }

    pub(crate) async fn exists(&self) -> Result<bool, AgentError> {
        match self {
            Disk::File(p) => Ok(p.exists()),
            Disk::Rbd { pool, image } => Ok(pool.exists(image).await?),
        }
    }

    /// Removes an RBD image (a file disk goes with its directory: [`remove_vm_files`]).
    pub(crate) async fn remove_image(&self) -> Result<(), AgentError> {
        if let Disk::Rbd { pool, image } = self {
            pool.remove(image).await?;
        }
        Ok(())
    }

    /// What QEMU opens.
    pub(crate) fn source(&self) -> DiskSource {
        match self {
            Disk::File(p) => DiskSource::File(p.clone()),
            Disk::Rbd { pool, image } => DiskSource::Rbd {
                pool: pool.name().to_string(),
                image: image.clone(),
                user: pool.user().to_string(),
                conf: pool.conf().to_path_buf(),
            },
        }
    }
}

impl PartialEq for Disk {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disk::File(p) => write!(f, "{}", p.display()),
            Disk::Rbd { pool, image } => write!(f, "rbd:{}/{image}", pool.name()),
        }
    }
}

/// Where a VM's disk lives now: on the datastore its status says the disk was made on (a storage
/// move may be under way), else on the spec's. Derived like every disk, never read from a
/// path some host wrote into the status (see [`disk_on`]).
pub(crate) async fn disk_path(
    store: &dyn Controller,
    cfg: &AgentConfig,
    vm: &Vm,
) -> Result<Disk, AgentError> {
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
pub(crate) async fn known_disk(store: &dyn Controller, cfg: &AgentConfig, vm: &Vm) -> Option<Disk> {
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
) -> Result<Disk, AgentError> {
    disk_on(store, cfg, &vm.spec.datastore, vm.meta.uid).await
}

/// The disk of the VM `uid` on `datastore`: in the datastore's directory for the VM (its path was
/// validated when an operator created it), in the run directory for the `local` datastore, or
/// the RBD image named by the uid in an RBD datastore's pool. Every host derives it the same way,
/// so what one host writes can never point another at a file or an image.
pub(crate) async fn disk_on(
    store: &dyn Controller,
    cfg: &AgentConfig,
    datastore: &str,
    uid: uuid::Uuid,
) -> Result<Disk, AgentError> {
    if datastore == LOCAL_DATASTORE {
        return Ok(Disk::File(
            layout::vm_dir(&cfg.data_dir, uid).join(layout::DISK_FILE),
        ));
    }
    let ds = datastore_record(store, datastore).await?;
    match ds.kind {
        DatastoreKind::Dir => Ok(Disk::File(
            layout::datastore_vm_dir(ds.directory()?, uid).join(layout::DISK_FILE),
        )),
        DatastoreKind::Rbd => Ok(Disk::Rbd {
            pool: rbd_pool(store, cfg, &ds).await?,
            image: layout::rbd_vm_disk(uid),
        }),
    }
}

async fn datastore_record(store: &dyn Controller, name: &str) -> Result<Datastore, AgentError> {
    corral_api::validate_name("datastore", name)?;
    get_json::<Datastore>(store, &keys::datastore(name))
        .await?
        .map(|v| v.value)
        .ok_or_else(|| AgentError::Missing {
            what: "datastore",
            name: name.to_string(),
        })
}

/// The pool of an RBD datastore, with its configuration and keyring written in this host's data
/// dir (from the datastore's record and secret, checked again before they are written).
async fn rbd_pool(
    store: &dyn Controller,
    cfg: &AgentConfig,
    ds: &Datastore,
) -> Result<Pool, AgentError> {
    let missing = |what| AgentError::Missing {
        what,
        name: ds.name.clone(),
    };
    let settings = ds
        .rbd
        .as_ref()
        .ok_or_else(|| missing("RBD settings of datastore"))?;
    let secret = get_json::<DatastoreSecret>(store, &keys::datastore_secret(&ds.name))
        .await?
        .ok_or_else(|| missing("Ceph key of datastore"))?;
    let dir = layout::ceph_dir(&cfg.data_dir, &ds.name);
    Ok(Pool::configure(&dir, settings, &secret.value.key)?)
}

/// Creates a directory that only its owner may enter (it holds disks, sockets, console logs).
pub(crate) fn private_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(|e| AgentError::io("creating", dir, e))
}

/// Makes `disk` a linked clone of the VM's image unless it exists. A file clone is made under a
/// temporary name and renamed, so a crash never leaves a half-made disk under the real name; an
/// RBD clone is made from the image stored once in the pool, which is imported first if it is
/// not there yet ([`Pool::clone_base`], [`Pool::publish_base`] keep the same rule).
pub(crate) async fn clone_disk(
    store: &dyn Controller,
    driver: &dyn Driver,
    vm: &Vm,
    disk: &Disk,
) -> Result<(), AgentError> {
    if let Disk::File(path) = disk {
        if path.exists() {
            return Ok(());
        }
    }
    let image = image_of(store, vm).await?;
    let backing = PathBuf::from(image.status.path.clone().unwrap_or_default());
    let format = image.status.format.unwrap_or(corral_api::DiskFormat::Qcow2);
    match disk {
        Disk::File(path) => {
            if let Some(parent) = path.parent() {
                private_dir(parent)?;
            }
            let tmp = path.with_extension("qcow2.part");
            driver
                .create_disk(&backing, format, &tmp, vm.spec.disk_bytes)
                .await?;
            std::fs::rename(&tmp, path).map_err(|e| AgentError::io("creating", path, e))
        }
        Disk::Rbd { pool, image: name } => {
            let base = layout::rbd_base_image(image.meta.uid);
            // A stored image stays while VMs on the datastore use it: once seen, it is not
            // asked about again (a clone that finds it gone forgets it, and imports it anew).
            let stored = format!("{}/{base}", pool.conf().display());
            if !known_stored(&stored) && !pool.exists(&base).await? {
                // One import per image on this host at a time: the VMs waiting for it clone it
                // once it is there (50 VMs created at once import it once, not 50 times).
                let lock = import_lock(&stored);
                let _importing = lock.lock().await;
                if !pool.exists(&base).await? {
                    // Several hosts may import at once: each into its own name; the first to
                    // publish wins and the others' copies go.
                    let staged = format!("{base}.part-{}", uuid::Uuid::new_v4().simple());
                    let imported = driver
                        .import_disk(&backing, format, &pool.qemu_img_target(&staged))
                        .await;
                    if let Err(e) = imported {
                        if let Err(rm) = pool.remove(&staged).await {
                            tracing::warn!(image = %staged, error = %rm, "could not remove a failed import");
                        }
                        return Err(e.into());
                    }
                    pool.publish_base(&staged, &base).await?;
                }
            }
            let base_size = image.status.virtual_bytes;
            match pool
                .clone_base(&base, base_size, name, vm.spec.disk_bytes)
                .await
            {
                Ok(()) => {
                    remember_stored(&stored, true);
                    Ok(())
                }
                Err(e) => {
                    if e.not_found() {
                        remember_stored(&stored, false);
                    }
                    Err(e.into())
                }
            }
        }
    }
}

/// Stored images this host has seen in their pools (keys: the pool's configuration and the
/// image name).
fn stored_images() -> std::sync::MutexGuard<'static, std::collections::HashSet<String>> {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    SEEN.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn known_stored(key: &str) -> bool {
    stored_images().contains(key)
}

fn remember_stored(key: &str, present: bool) {
    let mut seen = stored_images();
    if present {
        seen.insert(key.to_string());
    } else {
        seen.remove(key);
    }
}

/// The lock that orders this host's imports of one stored image (`key`: the pool's
/// configuration and the image name).
fn import_lock(key: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    locks.entry(key.to_string()).or_default().clone()
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

pub(crate) fn launch_spec(vm: &Vm, image: &Image, disk: &Disk, accel: Accel) -> LaunchSpec {
    LaunchSpec {
        name: vm.meta.name.clone(),
        cpus: vm.spec.cpus,
        memory_mib: vm.spec.memory_bytes >> 20,
        disk: disk.source(),
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
