//! Measures what each VM running on this host uses (its QEMU's CPU time and resident memory) and
//! records it in the VM's status: the demand DRS balances on. A measurement is written only when it
//! changed noticeably or has grown old, so an idle cluster writes little.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use corral_api::{keys, Vm, VmPhase, VmUsage};
use corral_store::list_json;

use crate::link::Controller;
use crate::AgentError;

/// How often VMs are measured.
pub const PERIOD: Duration = Duration::from_secs(5);
/// A measurement older than this is written again even if unchanged.
const REFRESH_SECS: i64 = 60;
/// Linux reports process CPU time in ticks of USER_HZ, 100 per second on every architecture
/// Corral runs on.
const TICKS_PER_SEC: f64 = 100.0;
const PAGE_BYTES: u64 = 4096;

/// CPU ticks (user + system) and resident bytes of a process.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks, rss_pages * PAGE_BYTES))
}

/// Whether `new` is worth a write over `old`.
pub fn changed(old: Option<&VmUsage>, new: &VmUsage) -> bool {
    let Some(old) = old else { return true };
    let stale = (new.measured_at - old.measured_at).num_seconds() >= REFRESH_SECS;
    let cpu = (new.cpu_cores - old.cpu_cores).abs() > 0.05;
    let mem = new.memory_bytes.abs_diff(old.memory_bytes) > old.memory_bytes / 20;
    stale || cpu || mem
}

async fn measure(
    store: &dyn Controller,
    host: &str,
    last: &mut HashMap<u32, (u64, Instant)>,
) -> Result<(), AgentError> {
    let (vms, _) = list_json::<Vm>(store, keys::VMS).await?;
    let mut seen = Vec::new();
    for vm in vms {
        let (Some(pid), true) = (
            vm.status.pid,
            vm.status.host.as_deref() == Some(host) && vm.status.phase == VmPhase::Running,
        ) else {
            continue;
        };
        let Some((ticks, rss)) = sample(pid) else {
            continue;
        };
        seen.push(pid);
        let now = Instant::now();
        let Some((before, at)) = last.insert(pid, (ticks, now)) else {
            continue;
        };
        let secs = now.duration_since(at).as_secs_f64();
        if secs <= 0.0 {
            continue;
        }
        let usage = VmUsage {
            cpu_cores: ticks.saturating_sub(before) as f64 / TICKS_PER_SEC / secs,
            memory_bytes: rss,
            measured_at: Utc::now(),
        };
        if !changed(vm.status.usage.as_ref(), &usage) {
            continue;
        }
        let key = keys::vm(&vm.meta.project, &vm.meta.name);
        crate::link::update_vm_status(store, &key, |v| {
            // Still the same process on this host: else the measurement belongs to no one.
            if v.status.pid != Some(pid) || v.status.host.as_deref() != Some(host) {
                return false;
            }
            v.status.usage = Some(usage.clone());
            true
        })
        .await?;
    }
    last.retain(|pid, _| seen.contains(pid));
    Ok(())
}

/// Measures this host's VMs until the task is dropped.
pub(crate) async fn run(store: Arc<dyn Controller>, host: String) {
    let mut last = HashMap::new();
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        if let Err(e) = measure(&*store, &host, &mut last).await {
            tracing::debug!(error = %e, "measuring VM usage failed; trying again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_measured() {
        let (ticks, rss) = sample(std::process::id()).expect("own /proc entry");
        assert!(rss > 0);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(120) {}
        let (later, _) = sample(std::process::id()).expect("again");
        assert!(later > ticks, "a busy process accumulates CPU time");
    }

    #[test]
    fn small_changes_are_not_written() {
        let at = Utc::now();
        let old = VmUsage {
            cpu_cores: 0.50,
            memory_bytes: 100 << 20,
            measured_at: at,
        };
        let same = VmUsage {
            cpu_cores: 0.52,
            memory_bytes: 101 << 20,
            measured_at: at,
        };
        assert!(!changed(Some(&old), &same));
        let busier = VmUsage {
            cpu_cores: 0.9,
            ..same.clone()
        };
        assert!(changed(Some(&old), &busier));
        let later = VmUsage {
            measured_at: at + chrono::Duration::seconds(61),
            ..same
        };
        assert!(changed(Some(&old), &later));
        assert!(changed(None, &old));
    }
}
