//! Where things live in the data directory of a host (and on its datastores). Pure path
//! building, shared by the agent that makes the files and the controller that reads some of them.

use std::path::{Path, PathBuf};

use uuid::Uuid;

/// Run directory of a VM: its disk, pid file and console log (its QMP and serial sockets are in a
/// short directory of their own: `corral_hypervisor::socket_dir`).
/// Named by uid (short, unique for all time) so socket paths stay within the unix limit.
pub fn vm_dir(data_dir: &Path, uid: Uuid) -> PathBuf {
    data_dir.join("vms").join(uid.simple().to_string())
}

/// Directory of a VM's disk on a datastore other than `local`.
pub fn datastore_vm_dir(datastore_path: &Path, uid: Uuid) -> PathBuf {
    datastore_path
        .join("corral-vms")
        .join(uid.simple().to_string())
}

/// Every RBD image Corral makes in a pool starts so; others in the pool are left alone.
pub const RBD_IMAGE_PREFIX: &str = "corral-";

/// The RBD image an image is stored as in a pool, once per pool: VMs are clones of its snapshot.
pub fn rbd_base_image(image_uid: Uuid) -> String {
    format!("{RBD_IMAGE_PREFIX}image-{}", image_uid.simple())
}

/// The RBD image of a VM's disk.
pub fn rbd_vm_disk(vm_uid: Uuid) -> String {
    format!("{RBD_IMAGE_PREFIX}vm-{}", vm_uid.simple())
}

/// Where a host (or the controller) keeps the Ceph configuration and keyring of an RBD datastore.
pub fn ceph_dir(data_dir: &Path, datastore: &str) -> PathBuf {
    data_dir.join("ceph").join(datastore)
}

/// File name of a VM's disk in its directory.
pub const DISK_FILE: &str = "disk.qcow2";

/// The serial console's log in a VM's run directory.
pub fn console_log(run_dir: &Path) -> PathBuf {
    run_dir.join("console.log")
}

/// Directory of an image's files.
pub fn image_dir(data_dir: &Path, uid: Uuid) -> PathBuf {
    data_dir.join("images").join(uid.simple().to_string())
}

/// Downloaded Debian packages, kept between JeOS builds.
pub fn package_cache(data_dir: &Path) -> PathBuf {
    data_dir.join("cache").join("debs")
}

/// Marks a run directory whose VM HA protects: the host kills it when it fences itself. A file in
/// the run directory, so fencing needs neither the store nor the agent's memory of it.
pub const HA_MARKER: &str = "ha-protected";

/// The directory on a shared datastore where each host renews its storage lease.
pub fn lease_dir(datastore_path: &Path) -> PathBuf {
    datastore_path.join(".corral-ha")
}
