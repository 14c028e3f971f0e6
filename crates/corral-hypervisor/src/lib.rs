//! How a host runs guests. Everything above this crate speaks the [`Driver`] trait; the QEMU driver
//! ([`QemuDriver`]) is the real one, [`fake::FakeDriver`] stands in for it in control-plane tests.
//!
//! A VM instance is named by its run directory on the host, which holds what QEMU needs to be found
//! again by a new agent process: the pid file, the QMP socket, the serial console socket and log.
//! QEMU runs detached from the agent (its own session), so VMs survive an agent restart.
//! This crate never touches the store.

pub mod accel;
pub mod disk;
pub mod fake;
pub mod migration;
mod qemu;
pub mod qmp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub use accel::{detect_accel, AccelChoice};
pub use migration::{DiskCopy, Incoming, Transfer, TransferStatus, Tuning};
pub use qemu::{qemu_version, QemuDriver};

/// Everything needed to start one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchSpec {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The VM's own disk.
    pub disk: DiskSource,
    /// Kernel, initrd and command line for direct kernel boot; `None` boots from the disk.
    pub direct_boot: Option<corral_api::DirectBoot>,
    pub accel: corral_api::Accel,
    /// Network interfaces, eth0 first: a tap prepared by the host's network driver, and the MAC.
    pub nics: Vec<NicLaunch>,
}

/// Where a VM's disk is.
#[derive(Clone, Debug, PartialEq)]
pub enum DiskSource {
    /// A qcow2 file (a linked clone of its image).
    File(PathBuf),
    /// A raw RBD image, opened through librbd with the configuration file `conf` (monitors and
    /// keyring) as Ceph user `user`. The names are checked by whoever builds this (they reach
    /// QEMU's options, where a comma would start another one).
    Rbd {
        pool: String,
        image: String,
        user: String,
        conf: PathBuf,
    },
}

impl From<PathBuf> for DiskSource {
    fn from(p: PathBuf) -> Self {
        DiskSource::File(p)
    }
}

/// One virtio NIC, attached to a tap that exists before QEMU starts.
#[derive(Clone, Debug, PartialEq)]
pub struct NicLaunch {
    pub tap: String,
    pub mac: String,
}

/// What the guest is doing, as the hypervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// The guest powered itself off; the process waits to be told to quit.
    GuestShutdown,
    /// Paused and ready to run on `resume` (an incoming copy once its state arrived).
    Paused,
    /// Waiting for the state of a VM running on another host.
    Incoming,
    /// Its state went to another host; this copy must never run again.
    MigratedAway,
    /// Anything else QEMU reports (paused, in migration, ...).
    Other(String),
}

/// A live VM process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub pid: u32,
    pub state: RunState,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("QEMU did not start: {0}")]
    StartFailed(String),
    #[error("QMP at {path}: {message}")]
    Qmp { path: String, message: String },
    #[error("{what} failed: {message}")]
    Io { what: String, message: String },
    #[error(
        "the path {0} is too long for a unix socket (108 bytes at most): use a shorter --data-dir"
    )]
    PathTooLong(String),
    #[error("{0}")]
    Unavailable(String),
    /// A file offered as a disk image that Corral will not run a guest from; the sentence says why.
    #[error("{0}")]
    NotADisk(String),
    #[error("unknown accelerator {0:?}: auto, kvm and tcg are known")]
    UnknownAccel(String),
    #[error("KVM was asked for, but this machine has no hardware virtualization (no vmx/svm CPU flag, or no /dev/kvm)")]
    NoKvm,
}

impl DriverError {
    pub fn io(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        DriverError::Io {
            what: what.into(),
            message: e.to_string(),
        }
    }
}

/// One hypervisor. Every call is idempotent where that makes sense: observing or killing a VM that is
/// not running is not an error.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Starts the VM; returns once the hypervisor runs it. `run_dir` must exist.
    async fn start(&self, run_dir: &Path, spec: &LaunchSpec) -> Result<u32, DriverError>;
    /// The VM's process, or `None` when it does not run.
    async fn observe(&self, run_dir: &Path) -> Result<Option<Observed>, DriverError>;
    /// Asks the guest to shut down (ACPI power button).
    async fn powerdown(&self, run_dir: &Path) -> Result<(), DriverError>;
    /// Hard reset, as the reset button of a PC.
    async fn reset(&self, run_dir: &Path) -> Result<(), DriverError>;
    /// Powers off at once and waits until the process is gone.
    async fn kill(&self, run_dir: &Path) -> Result<(), DriverError>;
    /// Kills the VM's process without asking anything of it, so it is gone within a bounded time
    /// even if it hangs (HA fencing). Returns whether a process was running.
    async fn fence(&self, run_dir: &Path) -> Result<bool, DriverError>;

    // Live migration. The target starts a paused copy that waits for the state on `address`; the
    // source mirrors its disk into it (unless the storage is shared), sends memory and device state,
    // and finishes the disk copy once the guest is paused at the switchover. The target resumes only
    // when told, after the control plane has handed the VM over: a VM never runs on two hosts.

    /// Starts the VM paused, listening on `address` for its state (and, with `export_disk`,
    /// serving its disk, which must exist, to the source's mirror).
    async fn start_incoming(
        &self,
        run_dir: &Path,
        spec: &LaunchSpec,
        address: std::net::IpAddr,
        export_disk: bool,
    ) -> Result<Incoming, DriverError>;
    /// Starts copying the disk into the NBD export at `to` while the guest runs; returns at once.
    /// Addresses, not URIs: the driver writes QEMU's `nbd:` and `tcp:` URIs itself, so no
    /// other transport (`exec:`, `file:`, `unix:`) can ever reach QEMU from a migration.
    async fn mirror_disk(&self, run_dir: &Path, to: SocketAddr) -> Result<(), DriverError>;
    /// Starts sending memory and device state to `to` over TCP; returns at once.
    async fn send(
        &self,
        run_dir: &Path,
        to: SocketAddr,
        tuning: &Tuning,
    ) -> Result<(), DriverError>;
    /// How the outgoing copy stands.
    async fn transfer(&self, run_dir: &Path) -> Result<Transfer, DriverError>;
    /// Stops an outgoing copy; the guest goes on running here.
    async fn cancel_transfer(&self, run_dir: &Path) -> Result<(), DriverError>;
    /// After the switchover: completes the disk mirror (the guest is paused, so nothing is lost).
    async fn finish_disk_copy(&self, run_dir: &Path) -> Result<(), DriverError>;
    /// Starts copying the running VM's disk into a new image at `dest` (a clone of the same image,
    /// created by the hypervisor); returns at once. Progress shows in [`Driver::transfer`].
    async fn copy_disk(&self, run_dir: &Path, dest: &Path) -> Result<(), DriverError>;
    /// Once the copy is in sync: the VM goes on with the copy (`dest`) as its disk.
    async fn switch_disk(&self, run_dir: &Path, dest: &Path) -> Result<(), DriverError>;
    /// Runs a VM that is paused (an incoming copy once handed over).
    async fn resume(&self, run_dir: &Path) -> Result<(), DriverError>;

    /// Creates `disk` as a thin linked clone of `backing` (`size` 0 keeps the backing file's
    /// size). The disk format is the hypervisor's, so making one is too: `qemu-img` here.
    async fn create_disk(
        &self,
        backing: &Path,
        format: corral_api::DiskFormat,
        disk: &Path,
        size: u64,
    ) -> Result<(), DriverError> {
        disk::create_linked_clone(backing, format, disk, size).await
    }
    /// Writes the disk image `source` into a new RBD image (`target`, a `qemu-img` `rbd:` target);
    /// returns once it is complete.
    async fn import_disk(
        &self,
        source: &Path,
        format: corral_api::DiskFormat,
        target: &str,
    ) -> Result<(), DriverError> {
        disk::import(source, format, target).await
    }
    /// The file `disk` is a linked clone of, if any.
    async fn disk_backing(&self, disk: &Path) -> Result<Option<String>, DriverError> {
        Ok(disk::info(disk).await?.backing_filename)
    }
}

/// Files of a VM instance inside its run directory.
pub use corral_api::layout::console_log;

/// The directory of a VM's QMP and serial sockets: short, and named by a hash of the run
/// directory, so socket paths fit a unix socket address (108 bytes) however long the data dir
/// is, and two hosts' copies of one VM (a migration between lab hosts) never share it.
pub fn socket_dir(run_dir: &Path) -> PathBuf {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    let base = if euid == 0 {
        PathBuf::from("/run/corral")
    } else {
        PathBuf::from(format!("/tmp/corral-{euid}"))
    };
    // FNV-1a: stable across builds, so a new agent finds the sockets of the QEMUs it adopts.
    let hash = run_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    base.join(format!("{hash:016x}"))
}

/// A socket of the VM in `run_dir`: in its [`socket_dir`], or in the run directory itself for a
/// QEMU started before sockets moved there (so it is still adopted).
pub(crate) fn vm_socket(run_dir: &Path, name: &str) -> PathBuf {
    let legacy = run_dir.join(name);
    if legacy.exists() {
        legacy
    } else {
        socket_dir(run_dir).join(name)
    }
}

/// Removes the socket directories of every VM run directory under `dir` (`.../vms/UID`, of any
/// host whose data dir is below it), which QEMUs killed from outside the driver leave behind.
pub fn remove_socket_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        if path.parent().and_then(Path::file_name) == Some(std::ffi::OsStr::new("vms")) {
            let _ = std::fs::remove_dir_all(socket_dir(&path));
        } else {
            remove_socket_dirs(&path);
        }
    }
}

pub(crate) const SERIAL_SOCKET: &str = "serial.sock";
pub(crate) const QMP_SOCKET: &str = "qmp.sock";

/// The serial console socket: what a client writes there is typed on the guest's ttyS0.
pub fn serial_socket(run_dir: &Path) -> PathBuf {
    vm_socket(run_dir, SERIAL_SOCKET)
}

/// Sends a signal to a process (QEMU, or a helper such as dnsmasq) found by its pid file.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and has no memory effects on this process.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Whether a process runs: present, and not a zombie waiting to be reaped (when Corral is PID 1 or a
/// subreaper, daemonized QEMUs become its children). A multi-threaded process whose main thread
/// exited first still runs (and holds its files and locks) until every thread is gone, so each
/// thread is looked at, not only the main one.
pub fn process_alive(pid: u32) -> bool {
    let running = |stat: &str| {
        !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| running(&stat)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_however_long_the_data_dir() {
        let long = Path::new("/home").join("a-rather-long-user-name".repeat(8));
        let run_dir = long.join(".local/share/corral/vms/0123456789abcdef0123456789abcdef");
        assert!(run_dir.join("serial.sock").as_os_str().len() > 107);
        for name in [QMP_SOCKET, SERIAL_SOCKET] {
            let sock = socket_dir(&run_dir).join(name);
            assert!(sock.as_os_str().len() <= 107, "{}", sock.display());
        }
        let other = long.join("lab/hosts/host-2/data/vms/0123456789abcdef0123456789abcdef");
        assert_ne!(
            socket_dir(&run_dir),
            socket_dir(&other),
            "two hosts' copies of one VM"
        );
        assert_eq!(socket_dir(&run_dir), socket_dir(&run_dir), "stable");
    }
}
