//! The QEMU driver: starts `qemu-system-x86_64` daemonized (so it outlives the agent), finds it again
//! through the pid file in the run directory and the QMP socket in its socket directory
//! ([`crate::socket_dir`]), and controls it over QMP.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use corral_api::Accel;
use serde_json::{json, Value};
use tokio::process::Command;

use crate::migration::{DiskCopy, Incoming, Transfer, TransferStatus, Tuning};
use crate::qmp::Qmp;
use crate::{
    console_log, serial_socket, signal, socket_dir, vm_socket, DiskSource, Driver, DriverError,
    LaunchSpec, Observed, RunState, QMP_SOCKET, SERIAL_SOCKET,
};

const QEMU: &str = "qemu-system-x86_64";
/// Longest path a unix socket address can hold (sun_path, with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Clone, Debug, Default)]
pub struct QemuDriver;

fn qmp_socket(run_dir: &Path) -> PathBuf {
    vm_socket(run_dir, QMP_SOCKET)
}

fn pid_file(run_dir: &Path) -> PathBuf {
    run_dir.join("qemu.pid")
}

/// The version line QEMU prints, e.g. "QEMU emulator version 7.2.22 (Debian ...)".
pub async fn qemu_version() -> Result<String, DriverError> {
    let out = Command::new(QEMU).arg("--version").output().await.map_err(|e| {
        DriverError::Unavailable(format!(
            "{QEMU} cannot be run ({e}): install the Debian package qemu-system-x86 (scripts/setup.sh does)"
        ))
    })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The full QEMU command line for a VM.
pub fn qemu_args(run_dir: &Path, spec: &LaunchSpec) -> Vec<String> {
    let p = |p: PathBuf| p.display().to_string();
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("corral-{},debug-threads=on", spec.name),
        "-machine".into(),
        match spec.accel {
            Accel::Kvm => "pc,accel=kvm".into(),
            Accel::Tcg => "pc,accel=tcg".into(),
        },
    ];
    if spec.accel == Accel::Kvm {
        args.extend(["-cpu".into(), "host".into()]);
    }
    args.extend([
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        // Keep the process after the guest powers off, so the agent can tell a guest shutdown from a crash.
        "-no-shutdown".into(),
        "-daemonize".into(),
        "-pidfile".into(),
        p(pid_file(run_dir)),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            p(socket_dir(run_dir).join(QMP_SOCKET))
        ),
        "-chardev".into(),
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            p(socket_dir(run_dir).join(SERIAL_SOCKET)),
            p(console_log(run_dir))
        ),
        "-serial".into(),
        "chardev:serial0".into(),
        "-drive".into(),
        match &spec.disk {
            DiskSource::File(f) => {
                format!("file={},if=virtio,format=qcow2,discard=unmap", p(f.clone()))
            }
            // librbd's own cache, as Proxmox and OpenStack run it (flushed when the guest asks).
            DiskSource::Rbd {
                pool,
                image,
                user,
                conf,
            } => format!(
                "file.driver=rbd,file.pool={pool},file.image={image},file.user={user},file.conf={},if=virtio,format=raw,cache=writeback,discard=unmap",
                p(conf.clone())
            ),
        },
    ]);
    for (i, nic) in spec.nics.iter().enumerate() {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap),
            "-device".into(),
            format!("virtio-net-pci,netdev=net{i},mac={}", nic.mac),
        ]);
    }
    if let Some(b) = &spec.direct_boot {
        args.extend([
            "-kernel".into(),
            b.kernel.clone(),
            "-initrd".into(),
            b.initrd.clone(),
            "-append".into(),
            format!("{} corral.hostname={}", b.cmdline, spec.name),
        ]);
    }
    args
}

/// The pid in the run directory's pid file, if that process is alive and is the QEMU of this directory
/// (a recycled pid belongs to someone else).
fn live_pid(run_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(run_dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = qmp_socket(run_dir).display().to_string();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(&needle));
    ours.then_some(pid)
}

async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if !crate::process_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Makes sure the directory that holds the VMs' socket directories is this user's alone: a real
/// directory (not a link), owned by us, that nobody else may enter. Whoever could swap a socket
/// there would control the VM through QMP.
fn private_socket_base(base: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::create_dir(base) {
        Ok(()) => std::fs::set_permissions(base, PermissionsExt::from_mode(0o700))
            .map_err(|e| DriverError::io("creating the socket directory", e))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(DriverError::io("creating the socket directory", e)),
    }
    let meta = std::fs::symlink_metadata(base)
        .map_err(|e| DriverError::io("checking the socket directory", e))?;
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if !meta.file_type().is_dir() || meta.uid() != euid {
        return Err(DriverError::io(
            "checking the socket directory",
            format!(
                "{} is not a directory of this user's: remove it and start again",
                base.display()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(base, PermissionsExt::from_mode(0o700))
            .map_err(|e| DriverError::io("making the socket directory private", e))?;
    }
    Ok(())
}

/// Runs QEMU daemonized with `args` in `run_dir` and returns its pid.
async fn launch(run_dir: &Path, args: Vec<String>) -> Result<u32, DriverError> {
    // QEMU option values are comma-separated: a comma in a path would change the options.
    if run_dir.to_string_lossy().contains(',') {
        return Err(DriverError::StartFailed(format!(
            "the path {} contains a comma, which QEMU options cannot carry: use a --data-dir without commas",
            run_dir.display()
        )));
    }
    let sockets = socket_dir(run_dir);
    if let Some(base) = sockets.parent() {
        private_socket_base(base)?;
    }
    std::fs::create_dir_all(&sockets)
        .and_then(|()| {
            std::fs::set_permissions(
                &sockets,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )
        })
        .map_err(|e| DriverError::io("creating the socket directory", e))?;
    for name in [QMP_SOCKET, SERIAL_SOCKET] {
        // A socket an older QEMU left in the run directory would be taken for this one's.
        let _ = std::fs::remove_file(run_dir.join(name));
        let sock = sockets.join(name);
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DriverError::PathTooLong(sock.display().to_string()));
        }
        let _ = std::fs::remove_file(&sock);
    }
    let _ = std::fs::remove_file(pid_file(run_dir));
    // Each power-on starts a fresh console log.
    std::fs::write(console_log(run_dir), b"")
        .map_err(|e| DriverError::io("creating the console log", e))?;
    tracing::debug!(?args, "starting QEMU");
    // With -daemonize the command returns once the guest is set up; QEMU then lives in its own
    // session, out of the agent's process group, so Ctrl-C on the agent does not reach it.
    let out = Command::new(QEMU)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| DriverError::StartFailed(format!("{QEMU} could not be run: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(DriverError::StartFailed(stderr));
    }
    live_pid(run_dir).ok_or_else(|| {
        DriverError::StartFailed("QEMU exited right after it started; see the console log".into())
    })
}

/// The block job that mirrors a VM's disk to its migration target.
const MIRROR_JOB: &str = "corral-mirror";
const DISK_EXPORT: &str = "disk";

/// A TCP port on `address` that nobody listens on now.
fn free_port(address: IpAddr) -> Result<u16, DriverError> {
    std::net::TcpListener::bind((address, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DriverError::io(format!("finding a free port on {address}"), e))
}

/// `address:port` as QEMU's URIs want it (IPv6 in brackets).
fn host_port(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The VM's disk as QEMU's block layer names it: (device, node name).
async fn disk_node(qmp: &mut Qmp) -> Result<(String, String), DriverError> {
    let blocks = qmp.execute("query-block", None).await?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|b| {
            let device = b.get("device")?.as_str()?;
            let node = b.get("inserted")?.get("node-name")?.as_str()?;
            Some((device.to_string(), node.to_string()))
        })
        .ok_or_else(|| DriverError::Qmp {
            path: "query-block".into(),
            message: "the VM has no disk".into(),
        })
}

/// The mirror job as `query-jobs` shows it, if there is one.
async fn mirror_job(qmp: &mut Qmp) -> Result<Option<Value>, DriverError> {
    let jobs = qmp.execute("query-jobs", None).await?;
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j.get("id").and_then(Value::as_str) == Some(MIRROR_JOB))
        .cloned())
}

/// Waits until the mirror job has concluded (it flushes what is in flight first), dismisses it,
/// and returns how it ended. Jobs are started with auto-dismiss off, so an error is never missed.
async fn conclude_job(qmp: &mut Qmp, what: &str) -> Result<(), DriverError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let Some(job) = mirror_job(qmp).await? else {
            return Err(DriverError::io(what, "the copy job is gone"));
        };
        if job.get("status").and_then(Value::as_str) == Some("concluded") {
            let _ = qmp
                .execute("job-dismiss", Some(json!({ "id": MIRROR_JOB })))
                .await;
            return match job.get("error").and_then(Value::as_str) {
                Some(e) => Err(DriverError::io(what, e)),
                None => Ok(()),
            };
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DriverError::io(what, "the copy did not finish within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops and forgets any mirror job (one left by an agent that restarted, or a failed one).
async fn clear_job(qmp: &mut Qmp) -> Result<(), DriverError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Some(job) = mirror_job(qmp).await? {
        if job.get("status").and_then(Value::as_str) == Some("concluded") {
            qmp.execute("job-dismiss", Some(json!({ "id": MIRROR_JOB })))
                .await?;
            continue;
        }
        let _ = qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": MIRROR_JOB, "force": true})),
            )
            .await;
        if tokio::time::Instant::now() > deadline {
            return Err(DriverError::io(
                "stopping the disk copy",
                "the copy job did not stop within 30 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn u64_at(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Reads `query-migrate` and the mirror job (from `query-jobs`) into a [`Transfer`].
fn transfer_of(migrate: &Value, jobs: &Value) -> Transfer {
    let status = match migrate.get("status").and_then(Value::as_str) {
        None | Some("none") => TransferStatus::None,
        Some("completed") => TransferStatus::Completed,
        Some("cancelled") => TransferStatus::Cancelled,
        Some("failed") => TransferStatus::Failed(
            migrate
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("QEMU reports the migration failed")
                .to_string(),
        ),
        Some(_) => TransferStatus::Active,
    };
    let page = u64_at(migrate, &["ram", "page-size"]).max(1);
    let disk = jobs.as_array().into_iter().flatten().find_map(|j| {
        (j.get("id")?.as_str()? == MIRROR_JOB).then(|| {
            let status = j.get("status").and_then(Value::as_str).unwrap_or("");
            let error = j.get("error").and_then(Value::as_str).map(str::to_string);
            DiskCopy {
                copied: u64_at(j, &["current-progress"]),
                total: u64_at(j, &["total-progress"]),
                ready: status == "ready",
                error: error.or_else(|| {
                    matches!(status, "concluded" | "aborting" | "null")
                        .then(|| format!("the copy job ended ({status})"))
                }),
            }
        })
    });
    Transfer {
        status,
        memory_total: u64_at(migrate, &["ram", "total"]),
        memory_sent: u64_at(migrate, &["ram", "transferred"]),
        memory_remaining: u64_at(migrate, &["ram", "remaining"]),
        dirty_rate_bytes: u64_at(migrate, &["ram", "dirty-pages-rate"]) * page,
        mbps: migrate
            .get("ram")
            .and_then(|r| r.get("mbps"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        downtime_ms: migrate.get("downtime").and_then(Value::as_u64),
        disk,
    }
}

#[async_trait]
impl Driver for QemuDriver {
    async fn start(&self, run_dir: &Path, spec: &LaunchSpec) -> Result<u32, DriverError> {
        if let Some(pid) = live_pid(run_dir) {
            return Ok(pid);
        }
        launch(run_dir, qemu_args(run_dir, spec)).await
    }

    async fn observe(&self, run_dir: &Path) -> Result<Option<Observed>, DriverError> {
        let Some(pid) = live_pid(run_dir) else {
            return Ok(None);
        };
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        let status = qmp.execute("query-status", None).await?;
        let state = match status.get("status").and_then(|s| s.as_str()) {
            Some("running") => RunState::Running,
            Some("shutdown") => RunState::GuestShutdown,
            Some("paused" | "prelaunch") => RunState::Paused,
            Some("inmigrate") => RunState::Incoming,
            Some("postmigrate") => RunState::MigratedAway,
            Some(other) => RunState::Other(other.to_string()),
            None => RunState::Other("unknown".into()),
        };
        Ok(Some(Observed { pid, state }))
    }

    async fn powerdown(&self, run_dir: &Path) -> Result<(), DriverError> {
        if live_pid(run_dir).is_none() {
            return Ok(());
        }
        Qmp::connect(&qmp_socket(run_dir))
            .await?
            .execute("system_powerdown", None)
            .await?;
        Ok(())
    }

    async fn reset(&self, run_dir: &Path) -> Result<(), DriverError> {
        Qmp::connect(&qmp_socket(run_dir))
            .await?
            .execute("system_reset", None)
            .await?;
        Ok(())
    }

    async fn fence(&self, run_dir: &Path) -> Result<bool, DriverError> {
        let Some(pid) = live_pid(run_dir) else {
            return Ok(false);
        };
        signal(pid, libc::SIGKILL);
        if wait_gone(pid, Duration::from_secs(1)).await {
            Ok(true)
        } else {
            Err(DriverError::io(
                "fencing QEMU",
                std::io::Error::other(format!("pid {pid} survived SIGKILL for 1 s")),
            ))
        }
    }

    async fn kill(&self, run_dir: &Path) -> Result<(), DriverError> {
        let Some(pid) = live_pid(run_dir) else {
            return Ok(());
        };
        // Ask QEMU to quit; if it does not answer or linger, kill it.
        if let Ok(mut qmp) = Qmp::connect(&qmp_socket(run_dir)).await {
            let _ = qmp.execute("quit", None).await;
        }
        if !wait_gone(pid, Duration::from_secs(5)).await {
            // Only if the pid still is this VM's QEMU (it may have exited and been reused).
            if live_pid(run_dir) == Some(pid) {
                signal(pid, libc::SIGKILL);
            }
            if !wait_gone(pid, Duration::from_secs(5)).await {
                return Err(DriverError::io(
                    "killing QEMU",
                    format!("process {pid} is still alive"),
                ));
            }
        }
        for f in [
            qmp_socket(run_dir),
            serial_socket(run_dir),
            pid_file(run_dir),
        ] {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(socket_dir(run_dir));
        Ok(())
    }
    async fn start_incoming(
        &self,
        run_dir: &Path,
        spec: &LaunchSpec,
        address: IpAddr,
        export_disk: bool,
    ) -> Result<Incoming, DriverError> {
        // A copy left by an earlier attempt holds no state anyone needs.
        self.kill(run_dir).await?;
        let mut args = qemu_args(run_dir, spec);
        // Paused until handed over (-S); the listening address is given over QMP below.
        args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        let pid = launch(run_dir, args).await?;
        let prepared = async {
            let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
            let disk_port = if export_disk {
                let (_, node) = disk_node(&mut qmp).await?;
                let port = free_port(address)?;
                let addr = json!({"type": "inet", "data": {"host": address.to_string(), "port": port.to_string()}});
                qmp.execute("nbd-server-start", Some(json!({ "addr": addr })))
                    .await?;
                qmp.execute(
                    "block-export-add",
                    Some(json!({"type": "nbd", "id": DISK_EXPORT, "name": DISK_EXPORT, "node-name": node, "writable": true})),
                )
                .await?;
                Some(port)
            } else {
                None
            };
            // Images stay inactive here until `cont`: the source owns the shared disk until then.
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "late-block-activate", "state": true}]})),
            )
            .await?;
            let port = free_port(address)?;
            let uri = format!("tcp:{}", host_port(address, port));
            qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
                .await?;
            Ok::<_, DriverError>(Incoming {
                pid,
                port,
                disk_port,
            })
        }
        .await;
        if prepared.is_err() {
            let _ = self.kill(run_dir).await;
        }
        prepared
    }

    async fn mirror_disk(&self, run_dir: &Path, to: SocketAddr) -> Result<(), DriverError> {
        let disk_uri = format!(
            "nbd:{}:exportname={DISK_EXPORT}",
            host_port(to.ip(), to.port())
        );
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        let (device, _) = disk_node(&mut qmp).await?;
        clear_job(&mut qmp).await?;
        // Only the VM's own layer: the target's disk is a clone of the same image.
        qmp.execute(
            "drive-mirror",
            Some(
                json!({"device": device, "job-id": MIRROR_JOB, "target": disk_uri, "sync": "top",
                "mode": "existing", "format": "raw", "auto-dismiss": false}),
            ),
        )
        .await?;
        Ok(())
    }

    async fn send(
        &self,
        run_dir: &Path,
        to: SocketAddr,
        tuning: &Tuning,
    ) -> Result<(), DriverError> {
        let uri = format!("tcp:{}", host_port(to.ip(), to.port()));
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "auto-converge", "state": tuning.auto_converge}]})),
        )
        .await?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": tuning.max_bandwidth_bytes, "downtime-limit": tuning.downtime_limit_ms})),
        )
        .await?;
        qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
        Ok(())
    }

    async fn transfer(&self, run_dir: &Path) -> Result<Transfer, DriverError> {
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        let migrate = qmp.execute("query-migrate", None).await?;
        let jobs = qmp.execute("query-jobs", None).await?;
        Ok(transfer_of(&migrate, &jobs))
    }

    async fn cancel_transfer(&self, run_dir: &Path) -> Result<(), DriverError> {
        if live_pid(run_dir).is_none() {
            return Ok(());
        }
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        // Either may not be running: nothing to cancel then.
        let _ = qmp.execute("migrate_cancel", None).await;
        clear_job(&mut qmp).await
    }

    async fn finish_disk_copy(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        // Cancelling a mirror that is in sync completes it: the target holds every write.
        qmp.execute("block-job-cancel", Some(json!({ "device": MIRROR_JOB })))
            .await?;
        conclude_job(&mut qmp, "finishing the disk copy").await
    }

    async fn copy_disk(&self, run_dir: &Path, dest: &Path) -> Result<(), DriverError> {
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        let (device, _) = disk_node(&mut qmp).await?;
        // QEMU creates the copy with the same backing image: the VM's own layer is all that moves.
        qmp.execute(
            "drive-mirror",
            Some(
                json!({"device": device, "job-id": MIRROR_JOB, "target": dest.display().to_string(),
                "sync": "top", "mode": "absolute-paths", "format": "qcow2"}),
            ),
        )
        .await?;
        Ok(())
    }

    async fn switch_disk(&self, run_dir: &Path, dest: &Path) -> Result<(), DriverError> {
        let what = "switching to the copied disk";
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        qmp.execute("block-job-complete", Some(json!({ "device": MIRROR_JOB })))
            .await?;
        // A completed mirror may be gone already rather than concluded: what counts is the file the
        // disk now reads and writes.
        match conclude_job(&mut qmp, what).await {
            Ok(()) => {}
            Err(_) if mirror_job(&mut qmp).await?.is_none() => {}
            Err(e) => return Err(e),
        }
        let blocks = qmp.execute("query-block", None).await?;
        let file = blocks
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|b| b.get("inserted")?.get("file")?.as_str().map(str::to_string));
        if file.as_deref() == Some(&*dest.to_string_lossy()) {
            Ok(())
        } else {
            Err(DriverError::io(
                what,
                format!("the disk still uses {}", file.unwrap_or_default()),
            ))
        }
    }

    async fn resume(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut qmp = Qmp::connect(&qmp_socket(run_dir)).await?;
        // The disk export of an incoming copy has served its purpose.
        if qmp
            .execute("block-export-del", Some(json!({ "id": DISK_EXPORT })))
            .await
            .is_ok()
        {
            let _ = qmp.execute("nbd-server-stop", None).await;
        }
        qmp.execute("cont", None).await?;
        Ok(())
    }
}
