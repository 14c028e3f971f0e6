//! Where things live in the data directory of a host.

use std::path::{Path, PathBuf};

use uuid::Uuid;

/// Run directory of a VM: its disk, QMP and serial sockets, pid file and console log.
/// Named by uid (short, unique for all time) so socket paths stay within the unix limit.
pub fn vm_dir(data_dir: &Path, uid: Uuid) -> PathBuf {
    data_dir.join("vms").join(uid.simple().to_string())
}

pub fn vm_disk(data_dir: &Path, uid: Uuid) -> PathBuf {
    vm_dir(data_dir, uid).join("disk.qcow2")
}

/// Directory of an image's files.
pub fn image_dir(data_dir: &Path, uid: Uuid) -> PathBuf {
    data_dir.join("images").join(uid.simple().to_string())
}

/// Downloaded Debian packages, kept between JeOS builds.
pub fn package_cache(data_dir: &Path) -> PathBuf {
    data_dir.join("cache").join("debs")
}
