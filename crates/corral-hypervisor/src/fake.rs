//! An in-memory driver for control-plane tests: it "runs" VMs instantly, records every call, and can
//! be told to fail the next start or to have a guest power itself off. With a link speed
//! ([`FakeDriver::with_link`]) a migration takes as long as its memory takes over that link: the
//! hypervisor of simulated hosts builds on this.
//!
//! Fake drivers of agents in one process migrate VMs to each other: an incoming copy registers the
//! address it "listens" on (the host's address and a port of its own) in a process-wide table,
//! where the source's fake finds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;

use crate::migration::{DiskCopy, Incoming, Transfer, TransferStatus, Tuning};
use crate::{Driver, DriverError, LaunchSpec, Observed, RunState};

/// Incoming copies by address: the target driver's state and the copy's run directory.
type Registry = HashMap<SocketAddr, (Arc<Mutex<FakeState>>, PathBuf)>;
static INCOMING: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);
/// The next port an incoming copy "listens" on (a stream port and a disk port each).
static NEXT_PORT: AtomicU16 = AtomicU16::new(20000);

#[derive(Default)]
pub struct FakeDriver {
    inner: Arc<Mutex<FakeState>>,
}

/// An outgoing migration: where to, how many times it was looked at, and since when it runs.
struct Outgoing {
    to: Option<SocketAddr>,
    transfer: Transfer,
    polls: u32,
    since: std::time::Instant,
}

/// How fast migrations copy, and how much of its memory a guest has touched (what is copied).
#[derive(Clone, Copy, Debug)]
struct Link {
    bytes_per_sec: u64,
    touched: f64,
}

#[derive(Default)]
struct FakeState {
    running: HashMap<PathBuf, Observed>,
    /// The memory each VM was started with.
    memory: HashMap<PathBuf, u64>,
    link: Option<Link>,
    next_pid: u32,
    fail_next_start: Option<String>,
    /// Guests that ignore the ACPI power button (no acpid, hung).
    deaf: bool,
    /// Calls in order, e.g. "start web", "powerdown web".
    calls: Vec<String>,
    outgoing: HashMap<PathBuf, Outgoing>,
    fail_next_migration: Option<String>,
    /// Migrations stay active until released (to cancel one, or kill its target, midway).
    hold_migrations: bool,
}

impl FakeState {
    /// Notes a call, unless this is a simulated host's driver (which would note millions).
    fn call(&mut self, call: String) {
        if self.link.is_none() {
            self.calls.push(call);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn name(run_dir: &Path) -> String {
    run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl FakeDriver {
    /// A driver whose migrations copy `touched` (0 to 1) of each guest's memory at
    /// `bytes_per_sec`, in real time, rather than completing on the second look.
    pub fn with_link(bytes_per_sec: u64, touched: f64) -> Self {
        let d = Self::default();
        d.state().link = Some(Link {
            bytes_per_sec: bytes_per_sec.max(1),
            touched: touched.clamp(0.0, 1.0),
        });
        d
    }

    /// Every VM's process is gone at once, as when the machine loses power.
    pub fn power_off(&self) {
        let mut s = self.state();
        s.call("power-off".into());
        let dirs: Vec<PathBuf> = s.running.drain().map(|(d, _)| d).collect();
        s.outgoing.clear();
        s.memory.clear();
        drop(s);
        lock(&INCOMING).retain(|_, (_, dir)| !dirs.contains(dir));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        lock(&self.inner)
    }

    /// The next migration sent from this host fails with `message`.
    pub fn fail_next_migration(&self, message: &str) {
        self.state().fail_next_migration = Some(message.to_string());
    }

    /// Keeps migrations from this host active (true) until released (false).
    pub fn hold_migrations(&self, hold: bool) {
        self.state().hold_migrations = hold;
    }

    /// Advances an outgoing migration of `run_dir` by one look: it completes on the second look
    /// if its target still waits, and fails if the target is gone.
    /// A disk copy that is in sync at once.
    fn start_mirror(&self, run_dir: &Path) {
        let mut s = self.state();
        s.call(format!("mirror {}", name(run_dir)));
        let out = s.outgoing.entry(run_dir.to_path_buf()).or_insert(Outgoing {
            to: None,
            transfer: Transfer::default(),
            polls: 0,
            since: std::time::Instant::now(),
        });
        out.transfer.disk = Some(DiskCopy {
            copied: 1 << 20,
            total: 1 << 20,
            ready: true,
            error: None,
        });
    }

    fn advance(&self, run_dir: &Path) -> Transfer {
        let mut s = self.state();
        let (hold, link) = (s.hold_migrations, s.link);
        let Some(out) = s.outgoing.get_mut(run_dir) else {
            return Transfer::default();
        };
        if out.transfer.status != TransferStatus::Active || hold {
            return out.transfer.clone();
        }
        out.polls += 1;
        let target = out.to.and_then(|to| lock(&INCOMING).get(&to).cloned());
        let target_waits = |t: &Option<(Arc<Mutex<FakeState>>, PathBuf)>| {
            t.as_ref().is_some_and(|(st, dir)| {
                Arc::ptr_eq(st, &self.inner)
                    || lock(st)
                        .running
                        .get(dir)
                        .is_some_and(|o| o.state == RunState::Incoming)
            })
        };
        if !target_waits(&target) {
            out.transfer.status = TransferStatus::Failed("the target closed the connection".into());
            return out.transfer.clone();
        }
        let total = out.transfer.memory_total;
        out.transfer.memory_sent = match link {
            Some(l) => {
                total.min((out.since.elapsed().as_secs_f64() * l.bytes_per_sec as f64) as u64)
            }
            None => total / 2 * u64::from(out.polls.min(2)),
        };
        out.transfer.memory_remaining = total - out.transfer.memory_sent;
        let done = match link {
            Some(_) => out.transfer.memory_remaining == 0,
            None => out.polls >= 2,
        };
        if !done {
            return out.transfer.clone();
        }
        out.transfer.status = TransferStatus::Completed;
        out.transfer.downtime_ms = Some(5);
        let done = out.transfer.clone();
        if let Some(o) = s.running.get_mut(run_dir) {
            o.state = RunState::MigratedAway;
        }
        drop(s);
        if let Some((st, dir)) = target {
            if let Some(o) = lock(&st).running.get_mut(&dir) {
                o.state = RunState::Paused;
            }
        }
        done
    }

    /// From now on guests ignore the ACPI power button.
    pub fn ignore_powerdown(&self) {
        self.state().deaf = true;
    }

    pub fn fail_next_start(&self, message: &str) {
        self.state().fail_next_start = Some(message.to_string());
    }

    /// The guest in `run_dir` powers itself off.
    pub fn guest_powers_off(&self, run_dir: &Path) {
        if let Some(o) = self.state().running.get_mut(run_dir) {
            o.state = RunState::GuestShutdown;
        }
    }

    /// The process of `run_dir` dies (crash, OOM kill).
    pub fn crash(&self, run_dir: &Path) {
        self.state().running.remove(run_dir);
    }

    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    pub fn is_running(&self, run_dir: &Path) -> bool {
        self.state().running.contains_key(run_dir)
    }
}

#[async_trait]
impl Driver for FakeDriver {
    async fn start(&self, run_dir: &Path, spec: &LaunchSpec) -> Result<u32, DriverError> {
        let mut s = self.state();
        s.call(format!("start {}", name(run_dir)));
        if let Some(msg) = s.fail_next_start.take() {
            return Err(DriverError::StartFailed(msg));
        }
        if let Some(o) = s.running.get(run_dir) {
            return Ok(o.pid);
        }
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
        s.running.insert(
            run_dir.to_path_buf(),
            Observed {
                pid,
                state: RunState::Running,
            },
        );
        s.memory
            .insert(run_dir.to_path_buf(), spec.memory_mib << 20);
        Ok(pid)
    }

    async fn observe(&self, run_dir: &Path) -> Result<Option<Observed>, DriverError> {
        Ok(self.state().running.get(run_dir).cloned())
    }

    async fn powerdown(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut s = self.state();
        s.call(format!("powerdown {}", name(run_dir)));
        let deaf = s.deaf;
        if let Some(o) = s.running.get_mut(run_dir).filter(|_| !deaf) {
            o.state = RunState::GuestShutdown;
        }
        Ok(())
    }

    async fn reset(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.state().call(format!("reset {}", name(run_dir)));
        Ok(())
    }

    async fn fence(&self, run_dir: &Path) -> Result<bool, DriverError> {
        let mut s = self.state();
        s.call(format!("fence {}", name(run_dir)));
        s.outgoing.remove(run_dir);
        s.memory.remove(run_dir);
        Ok(s.running.remove(run_dir).is_some())
    }

    async fn kill(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut s = self.state();
        s.call(format!("kill {}", name(run_dir)));
        s.running.remove(run_dir);
        s.memory.remove(run_dir);
        s.outgoing.remove(run_dir);
        lock(&INCOMING).retain(|_, (_, dir)| dir != run_dir);
        Ok(())
    }
    async fn start_incoming(
        &self,
        run_dir: &Path,
        spec: &LaunchSpec,
        address: std::net::IpAddr,
        export_disk: bool,
    ) -> Result<Incoming, DriverError> {
        let mut s = self.state();
        s.call(format!("incoming {}", name(run_dir)));
        if let Some(msg) = s.fail_next_start.take() {
            return Err(DriverError::StartFailed(msg));
        }
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
        s.running.insert(
            run_dir.to_path_buf(),
            Observed {
                pid,
                state: RunState::Incoming,
            },
        );
        s.memory
            .insert(run_dir.to_path_buf(), spec.memory_mib << 20);
        let port = NEXT_PORT.fetch_add(2, Ordering::Relaxed);
        lock(&INCOMING).insert(
            SocketAddr::new(address, port),
            (self.inner.clone(), run_dir.to_path_buf()),
        );
        Ok(Incoming {
            pid,
            port,
            disk_port: export_disk.then_some(port + 1),
        })
    }

    async fn mirror_disk(&self, run_dir: &Path, _to: SocketAddr) -> Result<(), DriverError> {
        self.start_mirror(run_dir);
        Ok(())
    }

    async fn send(
        &self,
        run_dir: &Path,
        to: SocketAddr,
        tuning: &Tuning,
    ) -> Result<(), DriverError> {
        let mut s = self.state();
        s.call(format!(
            "send {} auto-converge={} downtime={}ms",
            name(run_dir),
            tuning.auto_converge,
            tuning.downtime_limit_ms
        ));
        let status = match s.fail_next_migration.take() {
            Some(msg) => TransferStatus::Failed(msg),
            None => TransferStatus::Active,
        };
        let disk = s.outgoing.remove(run_dir).and_then(|o| o.transfer.disk);
        let memory_total = match (s.link, s.memory.get(run_dir)) {
            (Some(l), Some(m)) => (*m as f64 * l.touched) as u64,
            _ => 256 << 20,
        };
        s.outgoing.insert(
            run_dir.to_path_buf(),
            Outgoing {
                to: Some(to),
                transfer: Transfer {
                    status,
                    memory_total,
                    disk,
                    ..Transfer::default()
                },
                polls: 0,
                since: std::time::Instant::now(),
            },
        );
        Ok(())
    }

    async fn transfer(&self, run_dir: &Path) -> Result<Transfer, DriverError> {
        Ok(self.advance(run_dir))
    }

    async fn cancel_transfer(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut s = self.state();
        s.call(format!("cancel {}", name(run_dir)));
        if let Some(out) = s.outgoing.get_mut(run_dir) {
            if out.transfer.status == TransferStatus::Active {
                out.transfer.status = TransferStatus::Cancelled;
            }
            out.transfer.disk = None;
        }
        Ok(())
    }

    async fn finish_disk_copy(&self, run_dir: &Path) -> Result<(), DriverError> {
        if let Some(out) = self.state().outgoing.get_mut(run_dir) {
            out.transfer.disk = None;
        }
        Ok(())
    }

    async fn copy_disk(&self, run_dir: &Path, dest: &Path) -> Result<(), DriverError> {
        self.state().call(format!("copy-disk {}", name(run_dir)));
        std::fs::write(dest, b"fake disk").map_err(|e| DriverError::io("copying the disk", e))?;
        self.start_mirror(run_dir);
        Ok(())
    }

    async fn switch_disk(&self, run_dir: &Path, _dest: &Path) -> Result<(), DriverError> {
        self.finish_disk_copy(run_dir).await
    }

    async fn resume(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut s = self.state();
        s.call(format!("resume {}", name(run_dir)));
        // Like QEMU, a source whose state went away may run on (after a migration that failed).
        if let Some(o) = s.running.get_mut(run_dir) {
            if matches!(o.state, RunState::Paused | RunState::MigratedAway) {
                o.state = RunState::Running;
            }
        }
        Ok(())
    }
}
