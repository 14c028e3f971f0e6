use std::time::{Duration, Instant};

use corral_api::{Migration, MigrationPhase, PowerState, Vm};
use corral_hypervisor::{DiskCopy, RunState, Transfer, TransferStatus};

use super::{next, Look, Memory, Step};
use crate::lifecycle::tests::vm_named;

fn migration(phase: MigrationPhase, shared: bool) -> Migration {
    let uid = uuid::Uuid::new_v4();
    let m = Migration::new("default", "web", uid, ("h1", "h2"), shared, "requested");
    Migration { phase, ..m }
}

fn memory(sent: u64, status: TransferStatus) -> Transfer {
    Transfer {
        status,
        memory_total: 1000,
        memory_sent: sent,
        memory_remaining: 1000 - sent,
        ..Transfer::default()
    }
}

fn mirror(copied: u64, ready: bool) -> Transfer {
    Transfer {
        disk: Some(DiskCopy {
            copied,
            total: 100,
            ready,
            error: None,
        }),
        ..Transfer::default()
    }
}

/// One look at `m` with the VM running and the guest in `state`, `after` the run began.
fn look(
    mem: &mut Memory,
    m: &Migration,
    vm: Option<&Vm>,
    state: Option<RunState>,
    t: &Transfer,
    now: Instant,
) -> Step {
    next(
        mem,
        &Look {
            migration: m,
            vm,
            state,
            transfer: t,
            now,
        },
    )
}

fn running() -> Vm {
    vm_named("web", PowerState::Running)
}

fn reason(step: Step) -> (MigrationPhase, String) {
    match step {
        Step::GiveUp { phase, why } => (phase, why),
        other => panic!("expected the migration to be given up, got {other:?}"),
    }
}

#[test]
fn a_shared_storage_migration_starts_reports_each_second_and_hands_over() {
    let t0 = Instant::now();
    let vm = running();
    let mut mem = Memory::new(MigrationPhase::Preparing, t0);
    let mut m = migration(MigrationPhase::Preparing, true);
    let idle = Transfer::default();
    let state = Some(RunState::Running);
    let waited = look(&mut mem, &m, Some(&vm), state.clone(), &idle, t0);
    assert!(matches!(waited, Step::Wait { report: None, .. }));
    m.phase = MigrationPhase::TargetReady;
    let step = look(&mut mem, &m, Some(&vm), state.clone(), &idle, t0);
    assert_eq!(step, Step::StartCopy);
    mem.copy_started(true, t0);
    m.phase = MigrationPhase::Transferring;
    let t = memory(100, TransferStatus::Active);
    let early = look(
        &mut mem,
        &m,
        Some(&vm),
        state.clone(),
        &t,
        t0 + Duration::from_millis(500),
    );
    assert!(
        matches!(early, Step::Wait { report: None, .. }),
        "{early:?}"
    );
    let t = memory(600, TransferStatus::Active);
    let later = t0 + Duration::from_millis(1100);
    let Step::Wait {
        report: Some(p),
        after,
    } = look(&mut mem, &m, Some(&vm), state, &t, later)
    else {
        panic!("a second of copying reports its progress");
    };
    assert_eq!((p.stage.as_str(), p.percent), ("memory", 60));
    assert_eq!(
        after,
        Duration::from_millis(10),
        "memory moving is watched closely"
    );
    let done = memory(1000, TransferStatus::Completed);
    let step = look(
        &mut mem,
        &m,
        Some(&vm),
        Some(RunState::MigratedAway),
        &done,
        later,
    );
    assert_eq!(step, Step::HandOver);
}

#[test]
fn a_shared_nothing_migration_mirrors_the_disk_then_sends_memory_once_in_sync() {
    let t0 = Instant::now();
    let vm = running();
    let mut mem = Memory::new(MigrationPhase::TargetReady, t0);
    let m = migration(MigrationPhase::Transferring, false);
    mem.copy_started(false, t0);
    // An earlier migration's "completed" is not this one's.
    let mut t = mirror(50, false);
    t.status = TransferStatus::Completed;
    let step = look(&mut mem, &m, Some(&vm), Some(RunState::Running), &t, t0);
    assert!(matches!(step, Step::Wait { .. }), "{step:?}");
    let step = look(
        &mut mem,
        &m,
        Some(&vm),
        Some(RunState::Running),
        &mirror(100, true),
        t0,
    );
    assert_eq!(step, Step::SendMemory);
    mem.copy_started(true, t0);
    // The mirror vanishing once memory moves means the disk on the target is not in sync.
    let t = memory(10, TransferStatus::Active);
    let (phase, why) = reason(look(
        &mut mem,
        &m,
        Some(&vm),
        Some(RunState::Running),
        &t,
        t0,
    ));
    assert_eq!(phase, MigrationPhase::Failed);
    assert!(why.contains("disk copy to the target stopped"), "{why}");
}

#[test]
fn a_completed_copy_is_handed_over_even_when_a_stop_arrives_with_it() {
    let t0 = Instant::now();
    let mut mem = Memory::new(MigrationPhase::Transferring, t0);
    let m = migration(MigrationPhase::Transferring, true);
    let stopped = vm_named("web", PowerState::Stopped);
    let done = memory(1000, TransferStatus::Completed);
    let step = look(
        &mut mem,
        &m,
        Some(&stopped),
        Some(RunState::MigratedAway),
        &done,
        t0,
    );
    assert_eq!(step, Step::HandOver, "the state is on the target already");
    let going = memory(10, TransferStatus::Active);
    let (phase, why) = reason(look(
        &mut mem,
        &m,
        Some(&stopped),
        Some(RunState::Running),
        &going,
        t0,
    ));
    assert_eq!(
        (phase, why.as_str()),
        (MigrationPhase::Cancelled, "the VM is being stopped")
    );
    let (_, why) = reason(look(
        &mut mem,
        &m,
        None,
        Some(RunState::Running),
        &going,
        t0,
    ));
    assert_eq!(why, "the VM was deleted");
    let mut cancelled = m.clone();
    cancelled.cancel_requested = true;
    let (_, why) = reason(look(
        &mut mem,
        &cancelled,
        Some(&running()),
        Some(RunState::Running),
        &going,
        t0,
    ));
    assert_eq!(why, "cancelled on request");
}

#[test]
fn an_ended_record_or_a_dead_qemu_ends_the_run() {
    let t0 = Instant::now();
    let mut mem = Memory::new(MigrationPhase::Transferring, t0);
    let vm = running();
    let t = memory(10, TransferStatus::Active);
    for phase in [
        MigrationPhase::Failed,
        MigrationPhase::Cancelled,
        MigrationPhase::Completed,
    ] {
        let m = migration(phase, true);
        let step = look(&mut mem, &m, Some(&vm), Some(RunState::Running), &t, t0);
        assert_eq!(step, Step::Ended, "{phase:?}");
    }
    let m = migration(MigrationPhase::Transferring, true);
    let step = look(&mut mem, &m, Some(&vm), None, &Transfer::default(), t0);
    assert_eq!(step, Step::QemuExited);
}

#[test]
fn a_silent_target_a_stalled_copy_and_a_copy_that_never_converges_are_given_up() {
    let t0 = Instant::now();
    let vm = running();
    let state = Some(RunState::Running);
    let mut mem = Memory::new(MigrationPhase::Preparing, t0);
    let m = migration(MigrationPhase::Preparing, true);
    let (phase, why) = reason(look(
        &mut mem,
        &m,
        Some(&vm),
        state.clone(),
        &Transfer::default(),
        t0 + Duration::from_secs(61),
    ));
    assert_eq!(phase, MigrationPhase::Failed);
    assert_eq!(why, "host h2 did not prepare within 60 s");

    let m = migration(MigrationPhase::Transferring, true);
    let mut mem = Memory::new(MigrationPhase::TargetReady, t0);
    mem.copy_started(true, t0);
    let t = memory(10, TransferStatus::Active);
    assert!(matches!(
        look(&mut mem, &m, Some(&vm), state.clone(), &t, t0),
        Step::Wait { .. }
    ));
    let stuck = t0 + Duration::from_secs(19);
    assert!(matches!(
        look(&mut mem, &m, Some(&vm), state.clone(), &t, stuck),
        Step::Wait { .. }
    ));
    let (_, why) = reason(look(
        &mut mem,
        &m,
        Some(&vm),
        state.clone(),
        &t,
        t0 + Duration::from_secs(21),
    ));
    assert_eq!(why, "no progress for 20 s: is h2 reachable?");

    // Moving, but for longer than the convergence limit.
    let mut mem = Memory::new(MigrationPhase::TargetReady, t0);
    mem.copy_started(true, t0);
    let mut sent = 0;
    let mut at = t0;
    let why = loop {
        sent += 1;
        at += Duration::from_secs(10);
        match look(
            &mut mem,
            &m,
            Some(&vm),
            state.clone(),
            &memory(sent, TransferStatus::Active),
            at,
        ) {
            Step::Wait { .. } => assert!(at < t0 + Duration::from_secs(320), "never gave up"),
            other => break reason(other).1,
        }
    };
    assert!(why.starts_with("did not converge within 300 s"), "{why}");
    assert!(at > t0 + Duration::from_secs(300));
}

#[test]
fn after_an_agent_restart_a_running_stream_counts_and_a_forgotten_one_fails() {
    let t0 = Instant::now();
    let vm = running();
    let m = migration(MigrationPhase::Transferring, false);
    // QEMU still sends: the memory stream started before the restart.
    let mut mem = Memory::new(MigrationPhase::Transferring, t0);
    let mut t = memory(10, TransferStatus::Active);
    t.disk = mirror(100, true).disk;
    let step = look(&mut mem, &m, Some(&vm), Some(RunState::Running), &t, t0);
    assert!(matches!(step, Step::Wait { .. }), "{step:?}");
    assert!(mem.memory_moves());
    // QEMU forgot the stream it had going.
    let mut forgot = t.clone();
    forgot.status = TransferStatus::None;
    let (phase, why) = reason(look(
        &mut mem,
        &m,
        Some(&vm),
        Some(RunState::Running),
        &forgot,
        t0,
    ));
    assert_eq!(phase, MigrationPhase::Failed);
    assert_eq!(why, "the source QEMU lost track of the migration");
    // QEMU's own failure of this run's stream, and a failed mirror, end it with QEMU's words.
    let mut mem = Memory::new(MigrationPhase::Transferring, t0);
    mem.copy_started(true, t0);
    let failed = memory(10, TransferStatus::Failed("socket closed".into()));
    let mut failed = failed;
    failed.disk = mirror(100, true).disk;
    let (_, why) = reason(look(
        &mut mem,
        &m,
        Some(&vm),
        Some(RunState::Running),
        &failed,
        t0,
    ));
    assert_eq!(why, "socket closed");
    let mut broken = mirror(10, false);
    if let Some(d) = broken.disk.as_mut() {
        d.error = Some("No space left on device".into());
    }
    let mut mem = Memory::new(MigrationPhase::TargetReady, t0);
    mem.copy_started(false, t0);
    let (_, why) = reason(look(
        &mut mem,
        &m,
        Some(&vm),
        Some(RunState::Running),
        &broken,
        t0,
    ));
    assert_eq!(why, "copying the disk: No space left on device");
}
