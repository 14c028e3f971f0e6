//! An in-memory driver for control-plane tests: it "runs" VMs instantly, records every call, and can
//! be told to fail the next start or to have a guest power itself off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{Driver, DriverError, LaunchSpec, Observed, RunState};

#[derive(Default)]
pub struct FakeDriver {
    inner: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    running: HashMap<PathBuf, Observed>,
    next_pid: u32,
    fail_next_start: Option<String>,
    /// Guests that ignore the ACPI power button (no acpid, hung).
    deaf: bool,
    /// Calls in order, e.g. "start web", "powerdown web".
    calls: Vec<String>,
}

fn name(run_dir: &Path) -> String {
    run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl FakeDriver {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
    async fn start(&self, run_dir: &Path, _spec: &LaunchSpec) -> Result<u32, DriverError> {
        let mut s = self.state();
        s.calls.push(format!("start {}", name(run_dir)));
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
        Ok(pid)
    }

    async fn observe(&self, run_dir: &Path) -> Result<Option<Observed>, DriverError> {
        Ok(self.state().running.get(run_dir).cloned())
    }

    async fn powerdown(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut s = self.state();
        s.calls.push(format!("powerdown {}", name(run_dir)));
        let deaf = s.deaf;
        if let Some(o) = s.running.get_mut(run_dir).filter(|_| !deaf) {
            o.state = RunState::GuestShutdown;
        }
        Ok(())
    }

    async fn reset(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.state().calls.push(format!("reset {}", name(run_dir)));
        Ok(())
    }

    async fn kill(&self, run_dir: &Path) -> Result<(), DriverError> {
        let mut s = self.state();
        s.calls.push(format!("kill {}", name(run_dir)));
        s.running.remove(run_dir);
        Ok(())
    }
}
