//! The source's side of a live migration as one pure decision: given the migration record, the VM,
//! what QEMU reports of the guest and of the copy, what the source's loop remembers and the clock,
//! what the source does next. `run_source` reads, asks [`next`], and carries the step out; nothing
//! here touches a store, QEMU or a clock, so each case is a unit test.

use std::time::{Duration, Instant};

use corral_api::{Migration, MigrationPhase, MigrationProgress, PowerState, Vm};
use corral_hypervisor::{RunState, Transfer, TransferStatus};

/// How long the source waits for the target to prepare.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// A copy that moves no byte for this long is given up (a cut link, a hung target).
const STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// A migration that has not converged after this long is given up.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the source looks at the copy (more often once memory moves: the switchover is noticed
/// sooner, and the guest waits paused until it is), and writes progress at most.
const POLL: Duration = Duration::from_millis(20);
const POLL_MEMORY: Duration = Duration::from_millis(10);
const REPORT: Duration = Duration::from_secs(1);

/// What the source's loop remembers between looks.
#[derive(Clone, Debug)]
pub(super) struct Memory {
    began: Instant,
    /// Whether this migration's memory stream was started (by this run, or by one before an agent
    /// restart: QEMU then reports it active when first looked at).
    memory_started: bool,
    /// When the memory copy was first seen going: convergence is timed from there.
    memory_since: Option<Instant>,
    /// Bytes copied so far, and since when that count stands still.
    moved: (u64, Instant),
    last_report: Instant,
    /// The record's phase when this run took the migration up, until the first look.
    resumed: Option<MigrationPhase>,
}

impl Memory {
    /// A run taking up a migration whose record stands at `phase`.
    pub(super) fn new(phase: MigrationPhase, now: Instant) -> Self {
        Self {
            began: now,
            memory_started: false,
            memory_since: None,
            moved: (0, now),
            last_report: now,
            resumed: Some(phase),
        }
    }

    /// The copy was started: the disk mirror, or (`memory`) the memory stream.
    pub(super) fn copy_started(&mut self, memory: bool, now: Instant) {
        self.memory_started = memory;
        self.moved = (0, now);
    }

    /// The progress to record for `transfer`.
    pub(super) fn progress(&self, transfer: &Transfer) -> MigrationProgress {
        progress_of(transfer, self.memory_started)
    }

    /// Whether the memory stream was started.
    pub(super) fn memory_moves(&self) -> bool {
        self.memory_started
    }

    /// How long to wait before the next look.
    pub(super) fn poll(&self) -> Duration {
        if self.memory_started {
            POLL_MEMORY
        } else {
            POLL
        }
    }
}

/// What the source sees on one look.
#[derive(Debug)]
pub(super) struct Look<'a> {
    pub(super) migration: &'a Migration,
    /// `None`: the VM was deleted.
    pub(super) vm: Option<&'a Vm>,
    /// The guest's state; `None`: its QEMU is gone.
    pub(super) state: Option<RunState>,
    pub(super) transfer: &'a Transfer,
    pub(super) now: Instant,
}

/// What the source does next.
#[derive(Debug, PartialEq)]
pub(super) enum Step {
    /// Ended by the target or the controller: stop sending and note the end. Should the copy have
    /// completed already, the VM's worker resumes the paused guest here.
    Ended,
    /// The guest's QEMU exited: the migration failed.
    QemuExited,
    /// The state is on the target: hand the VM over.
    HandOver,
    /// Stop the copy and end the migration so (unless the copy completed meanwhile).
    GiveUp { phase: MigrationPhase, why: String },
    /// The target is ready: start the disk mirror (on shared storage, the memory stream) towards
    /// its registered address, and record the transfer.
    StartCopy,
    /// The disk is in sync: send the memory.
    SendMemory,
    /// Look again after this long, recording this progress first if there is one.
    Wait {
        after: Duration,
        report: Option<MigrationProgress>,
    },
}

/// Whether `transfer` and `state` say the guest's state went to the target ("completed" alone may
/// be the VM's arrival here; paused after sending is the departure).
pub(super) fn sent(transfer: &Transfer, state: &RunState) -> bool {
    transfer.status == TransferStatus::Completed && *state == RunState::MigratedAway
}

fn give_up(phase: MigrationPhase, why: impl Into<String>) -> Step {
    Step::GiveUp {
        phase,
        why: why.into(),
    }
}

/// Why the migration must stop at the owner's request, if it must.
fn stop_reason(m: &Migration, vm: Option<&Vm>) -> Option<&'static str> {
    match vm {
        None => Some("the VM was deleted"),
        Some(v) if v.meta.deletion_requested_at.is_some() => Some("the VM is being deleted"),
        Some(v) if v.spec.power != PowerState::Running => Some("the VM is being stopped"),
        _ if m.cancel_requested => Some("cancelled on request"),
        _ => None,
    }
}

/// The source's next step (and what it remembers from this look).
pub(super) fn next(mem: &mut Memory, look: &Look) -> Step {
    let m = look.migration;
    if m.phase.is_finished() {
        return Step::Ended;
    }
    let Some(state) = &look.state else {
        return Step::QemuExited;
    };
    let t = look.transfer;
    if mem.resumed.take() == Some(MigrationPhase::Transferring)
        && t.status == TransferStatus::Active
    {
        mem.memory_started = true;
    }
    // Whatever else happened meanwhile, the state is on the target now.
    if sent(t, state) {
        return Step::HandOver;
    }
    if let Some(why) = stop_reason(m, look.vm) {
        return give_up(MigrationPhase::Cancelled, why);
    }
    match m.phase {
        MigrationPhase::Preparing => {
            if look.now.saturating_duration_since(mem.began) > PREPARE_TIMEOUT {
                let why = format!(
                    "host {} did not prepare within {} s",
                    m.target,
                    PREPARE_TIMEOUT.as_secs()
                );
                return give_up(MigrationPhase::Failed, why);
            }
            Step::Wait {
                after: mem.poll(),
                report: None,
            }
        }
        MigrationPhase::TargetReady => Step::StartCopy,
        MigrationPhase::Transferring => transferring(mem, m, t, look.now),
        MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled => {
            Step::Ended
        }
    }
}

fn transferring(mem: &mut Memory, m: &Migration, t: &Transfer, now: Instant) -> Step {
    if !m.shared_storage && mem.memory_started && t.disk.is_none() {
        return give_up(
            MigrationPhase::Failed,
            "the disk copy to the target stopped",
        );
    }
    if let Some(e) = t.disk.as_ref().and_then(|d| d.error.as_ref()) {
        return give_up(MigrationPhase::Failed, format!("copying the disk: {e}"));
    }
    // What QEMU reports before this migration's stream started is an earlier migration's end.
    let status = if mem.memory_started {
        &t.status
    } else {
        &TransferStatus::None
    };
    match status {
        TransferStatus::Failed(e) => return give_up(MigrationPhase::Failed, e.clone()),
        TransferStatus::Cancelled => return give_up(MigrationPhase::Cancelled, "cancelled"),
        // QEMU knows of no migration (an agent restart in the middle): the copy it had going is
        // lost; starting over is the user's call.
        TransferStatus::None if mem.memory_started || m.shared_storage => {
            return give_up(
                MigrationPhase::Failed,
                "the source QEMU lost track of the migration",
            );
        }
        TransferStatus::None => match &t.disk {
            Some(d) if d.ready => return Step::SendMemory,
            Some(_) => {}
            None => return give_up(MigrationPhase::Failed, "the disk copy stopped"),
        },
        TransferStatus::Active | TransferStatus::Completed => mem.memory_started = true,
    }
    let bytes = t.memory_sent + t.disk.as_ref().map_or(0, |d| d.copied);
    if bytes != mem.moved.0 {
        mem.moved = (bytes, now);
    } else if now.saturating_duration_since(mem.moved.1) > STALL_TIMEOUT {
        let why = format!(
            "no progress for {} s: is {} reachable?",
            STALL_TIMEOUT.as_secs(),
            m.target
        );
        return give_up(MigrationPhase::Failed, why);
    }
    if mem.memory_started {
        mem.memory_since.get_or_insert(now);
    }
    if mem
        .memory_since
        .is_some_and(|t| now.saturating_duration_since(t) > CONVERGE_TIMEOUT)
    {
        let why = format!(
            "did not converge within {} s: the guest dirties memory faster than the link sends it",
            CONVERGE_TIMEOUT.as_secs()
        );
        return give_up(MigrationPhase::Failed, why);
    }
    let mut report = None;
    if now.saturating_duration_since(mem.last_report) >= REPORT {
        mem.last_report = now;
        report = Some(mem.progress(t));
    }
    Step::Wait {
        after: mem.poll(),
        report,
    }
}

fn percent(done: u64, total: u64) -> u8 {
    (done.min(total) * 100).checked_div(total).unwrap_or(0) as u8
}

fn progress_of(t: &Transfer, memory_started: bool) -> MigrationProgress {
    let mut p = MigrationProgress::default();
    if let Some(d) = &t.disk {
        p.disk_copied_bytes = d.copied;
        p.disk_total_bytes = d.total;
    }
    if !memory_started {
        p.stage = "disk".into();
        p.percent = percent(p.disk_copied_bytes, p.disk_total_bytes);
        return p;
    }
    p.stage = "memory".into();
    p.memory_total_bytes = t.memory_total;
    p.memory_sent_bytes = t.memory_sent;
    p.memory_remaining_bytes = t.memory_remaining;
    p.dirty_rate_bytes = t.dirty_rate_bytes;
    p.mbps = t.mbps;
    p.percent = percent(
        t.memory_total - t.memory_remaining.min(t.memory_total),
        t.memory_total,
    );
    let rate = t.mbps * 1e6 / 8.0;
    if rate > 0.0 {
        p.expected_remaining_ms = Some((t.memory_remaining as f64 / rate * 1000.0) as u64);
    }
    p
}

#[cfg(test)]
mod tests;
