//! The QEMU driver: starts `qemu-system-x86_64` daemonized (so it outlives the agent), finds it again
//! through the pid file and QMP socket in the run directory, and controls it over QMP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use corral_api::Accel;
use tokio::process::Command;

use crate::qmp::Qmp;
use crate::{console_log, serial_socket, Driver, DriverError, LaunchSpec, Observed, RunState};

const QEMU: &str = "qemu-system-x86_64";
/// Longest path a unix socket address can hold (sun_path, with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Clone, Debug, Default)]
pub struct QemuDriver;

fn qmp_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("qmp.sock")
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
        format!("unix:{},server=on,wait=off", p(qmp_socket(run_dir))),
        "-chardev".into(),
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            p(serial_socket(run_dir)),
            p(console_log(run_dir))
        ),
        "-serial".into(),
        "chardev:serial0".into(),
        "-drive".into(),
        format!(
            "file={},if=virtio,format=qcow2,discard=unmap",
            p(spec.disk.clone())
        ),
    ]);
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

/// Sends a signal to a process.
#[allow(unsafe_code)]
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and has no memory effects on this process.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
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

#[async_trait]
impl Driver for QemuDriver {
    async fn start(&self, run_dir: &Path, spec: &LaunchSpec) -> Result<u32, DriverError> {
        if let Some(pid) = live_pid(run_dir) {
            return Ok(pid);
        }
        // QEMU option values are comma-separated: a comma in a path would change the options.
        if run_dir.to_string_lossy().contains(',') {
            return Err(DriverError::StartFailed(format!(
                "the path {} contains a comma, which QEMU options cannot carry: use a --data-dir without commas",
                run_dir.display()
            )));
        }
        for sock in [qmp_socket(run_dir), serial_socket(run_dir)] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(DriverError::PathTooLong(sock.display().to_string()));
            }
            let _ = std::fs::remove_file(&sock);
        }
        let _ = std::fs::remove_file(pid_file(run_dir));
        // Each power-on starts a fresh console log.
        std::fs::write(console_log(run_dir), b"")
            .map_err(|e| DriverError::io("creating the console log", e))?;
        let args = qemu_args(run_dir, spec);
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
            DriverError::StartFailed(
                "QEMU exited right after it started; see the console log".into(),
            )
        })
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
        Ok(())
    }
}
