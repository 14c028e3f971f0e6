//! The VM lifecycle as one pure decision: given the VM (its spec and the status recorded so far),
//! what the hypervisor reports of it, the worker's own memory and the clock, what happens next.
//! [`plan`] returns the status to record and the hypervisor actions to take, in order; the
//! reconciler carries them out and gives a start's result back to [`started`]. Nothing here
//! touches a store, a hypervisor or a clock, so every host (real or simulated) decides alike, and
//! each case is a unit test.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use corral_api::{host_protocol::RESUMING, ConditionType, PowerState, Vm, VmPhase};
use corral_hypervisor::{Observed, RunState};

use crate::AgentError;

/// What the worker does after one reconcile.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The VM is in its desired state; wait for a change.
    Steady,
    /// In transition (or failed): look again after this long.
    Requeue(Duration),
    /// The VM was deleted or belongs to another host: the worker ends.
    Gone,
}

/// Per-VM memory of a worker that does not belong in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct WorkerState {
    /// When the ACPI shutdown was requested.
    pub(crate) stopping_since: Option<Instant>,
    /// Consecutive failed starts, for backoff.
    pub(crate) failures: u32,
    /// The reboot count this worker already reset the VM for.
    pub(crate) reset_done: u64,
}

/// What the decision depends on besides the VM and the hypervisor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts {
    pub(crate) now: Instant,
    pub(crate) wall: DateTime<Utc>,
    /// How long a guest gets to shut down after the ACPI power button.
    pub(crate) stop_timeout: Duration,
    /// Whether this host may start an HA-protected VM now (a fresh storage lease, not fenced).
    pub(crate) lease_fresh: bool,
}

/// One thing to do, in the order given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Record the status as planned so far, guarded by the revision read; a lost race ends the
    /// pass (look again now). Comes first where what follows must not happen unrecorded.
    Persist,
    /// Go on only if the lease is still fresh (a [`Action::Persist`] before may have taken a
    /// while), else look again shortly.
    RequireLease,
    /// Start the guest (its image and NICs first); its result goes to [`started`].
    Start,
    /// Power off at once.
    Kill,
    /// Press the ACPI power button.
    Powerdown,
    /// Run a paused guest.
    Resume,
    /// Hard reset.
    Reset,
}

/// What one pass does: the actions, then the outcome (a start's result may change it), and what
/// the worker remembers once the actions are done (an action that fails leaves its memory as it
/// was, so the action is tried again).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) actions: Vec<Action>,
    pub(crate) outcome: Outcome,
    pub(crate) worker: WorkerState,
}

/// How long to wait before a retry after `failures` failed starts in a row.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1 << failures.min(6)).min(300))
}

pub(crate) fn mark_stopped(vm: &mut Vm, reason: &str, msg: &str) {
    vm.status.phase = VmPhase::Stopped;
    vm.status.pid = None;
    vm.status.started_at = None;
    vm.status
        .set_condition(ConditionType::Running, false, reason, msg);
}

/// Moves `vm`'s status (and, for a guest's own power-off, its spec) to what follows from
/// `observed`, and says what to do. `before` is the VM as read, before this pass changed it.
pub(crate) fn plan(
    vm: &mut Vm,
    before: &Vm,
    observed: Option<&Observed>,
    ws: &WorkerState,
    facts: Facts,
) -> Plan {
    let mut ws = ws.clone();
    let (actions, outcome) = decide(vm, before, observed, &mut ws, facts);
    Plan {
        actions,
        outcome,
        worker: ws,
    }
}

fn decide(
    vm: &mut Vm,
    before: &Vm,
    observed: Option<&Observed>,
    ws: &mut WorkerState,
    facts: Facts,
) -> (Vec<Action>, Outcome) {
    let protected = vm.spec.wants_ha_restart();
    match (vm.spec.power, observed) {
        (PowerState::Running, None) => {
            ws.stopping_since = None;
            if !protected {
                return (vec![Action::Start], Outcome::Steady);
            }
            if !facts.lease_fresh {
                let msg = "this host holds no fresh storage lease (or fenced itself): HA-protected VMs start here once it does";
                vm.status
                    .set_condition(ConditionType::Running, false, "WaitingForLease", msg);
                return (Vec::new(), Outcome::Requeue(Duration::from_millis(500)));
            }
            // Claim the VM before QEMU starts: if the controller moved it to another host
            // meanwhile (its host was taken for failed), the write loses and nothing starts.
            let actions = vec![Action::Persist, Action::RequireLease, Action::Start];
            (actions, Outcome::Steady)
        }
        (PowerState::Running, Some(o))
            if o.state == RunState::GuestShutdown && ws.stopping_since.is_some() =>
        {
            // Our own ACPI request finished after the owner asked for the VM to run again:
            // power off now and start it on the next pass.
            ws.stopping_since = None;
            vm.status.phase = VmPhase::Stopping;
            (vec![Action::Kill], Outcome::Requeue(Duration::ZERO))
        }
        (PowerState::Running, Some(o)) if o.state == RunState::GuestShutdown => {
            // The guest shut itself down: that is the owner's wish, as with a physical machine.
            // Recorded before QEMU goes: had the record lost a race with another write (the
            // VM's usage), the next pass would find a VM that should run and no QEMU, and start
            // the guest again.
            vm.spec.power = PowerState::Stopped;
            vm.meta.bump();
            mark_stopped(vm, "GuestPoweredOff", "the guest shut itself down");
            (vec![Action::Persist, Action::Kill], Outcome::Steady)
        }
        (PowerState::Running, Some(o)) if o.state == RunState::Incoming => {
            // Handed over while QEMU still loads the last of the state: it is paused in a moment.
            (Vec::new(), Outcome::Requeue(Duration::from_millis(20)))
        }
        (PowerState::Running, Some(o))
            if matches!(o.state, RunState::Paused | RunState::MigratedAway) =>
        {
            // An incoming copy that is now this host's VM, or a source copy whose migration did
            // not complete (its target copy is being removed): the guest goes on here.
            vm.status.phase = VmPhase::Running;
            vm.status.pid = Some(o.pid);
            vm.status.started_at.get_or_insert(facts.wall);
            let handed_over = vm
                .status
                .condition(ConditionType::Running)
                .filter(|c| c.reason == RESUMING)
                .map(|c| c.message.clone());
            if let Some(msg) = handed_over {
                vm.status
                    .set_condition(ConditionType::Running, true, "Migrated", &msg);
            } else if o.state == RunState::MigratedAway {
                let msg = "the migration did not complete; the guest runs on here";
                vm.status
                    .set_condition(ConditionType::Running, true, "Resumed", msg);
            }
            (vec![Action::Resume], Outcome::Steady)
        }
        (PowerState::Running, Some(o)) => {
            let mut actions = Vec::new();
            if vm.spec.reboots > vm.status.reboots && ws.reset_done < vm.spec.reboots {
                // Remembered here too: if the status write loses a race, no second reset.
                ws.reset_done = vm.spec.reboots;
                actions.push(Action::Reset);
                vm.status.reboots = vm.spec.reboots;
                vm.status.started_at = Some(facts.wall);
                vm.status.set_condition(
                    ConditionType::Running,
                    true,
                    "Rebooted",
                    "reset by request",
                );
            } else if vm.spec.reboots > vm.status.reboots {
                vm.status.reboots = vm.spec.reboots;
            } else if let RunState::Other(state) = &o.state {
                vm.status.set_condition(
                    ConditionType::Running,
                    true,
                    "HypervisorState",
                    &format!("QEMU reports {state}"),
                );
            } else if before.status.pid != Some(o.pid) {
                vm.status.set_condition(
                    ConditionType::Running,
                    true,
                    "Adopted",
                    "found running after an agent restart",
                );
            }
            vm.status.phase = VmPhase::Running;
            vm.status.pid = Some(o.pid);
            vm.status.started_at.get_or_insert(facts.wall);
            (actions, Outcome::Steady)
        }
        (PowerState::Stopped, Some(o)) => {
            let timed_out = ws
                .stopping_since
                .is_some_and(|t| facts.now.saturating_duration_since(t) >= facts.stop_timeout);
            if vm.spec.force_stop || o.state == RunState::GuestShutdown || timed_out {
                let (reason, msg) = if o.state == RunState::GuestShutdown {
                    ("ShutDown", "the guest shut down")
                } else if vm.spec.force_stop {
                    ("PoweredOff", "powered off without asking the guest")
                } else {
                    (
                        "PoweredOffAfterTimeout",
                        "the guest did not shut down in time; powered off",
                    )
                };
                ws.stopping_since = None;
                mark_stopped(vm, reason, msg);
                return (vec![Action::Kill], Outcome::Steady);
            }
            let mut actions = Vec::new();
            if ws.stopping_since.is_none() {
                actions.push(Action::Powerdown);
                ws.stopping_since = Some(facts.now);
            }
            vm.status.phase = VmPhase::Stopping;
            (actions, Outcome::Requeue(Duration::from_millis(200)))
        }
        (PowerState::Stopped, None) => {
            ws.stopping_since = None;
            if vm.status.phase != VmPhase::Stopped {
                let was_running = vm
                    .status
                    .condition(ConditionType::Running)
                    .is_some_and(|c| c.status);
                let msg = if was_running {
                    "the process is gone"
                } else {
                    ""
                };
                mark_stopped(vm, "Stopped", msg);
            }
            (Vec::new(), Outcome::Steady)
        }
    }
}

/// Records a start's result (the pid, or why it failed) and returns the pass's outcome: a failed
/// start is tried again after a backoff that doubles with each failure in a row.
pub(crate) fn started(
    vm: &mut Vm,
    ws: &mut WorkerState,
    result: Result<u32, AgentError>,
    wall: DateTime<Utc>,
) -> Outcome {
    match result {
        Ok(pid) => {
            ws.failures = 0;
            vm.status.phase = VmPhase::Running;
            vm.status.pid = Some(pid);
            vm.status.started_at = Some(wall);
            vm.status.reboots = vm.spec.reboots;
            vm.status
                .set_condition(ConditionType::Running, true, "Started", "");
            Outcome::Steady
        }
        Err(e) => {
            ws.failures += 1;
            vm.status.phase = VmPhase::Failed;
            vm.status.pid = None;
            let msg = e.to_string();
            vm.status
                .set_condition(ConditionType::Running, false, "StartFailed", &msg);
            Outcome::Requeue(backoff(ws.failures))
        }
    }
}

/// The spec counts as seen once the VM settled in it, or failed at it.
pub(crate) fn settle(vm: &mut Vm, outcome: &Outcome) {
    if *outcome == Outcome::Steady || vm.status.phase == VmPhase::Failed {
        vm.status.observed_generation = vm.meta.generation;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use corral_api::{HaPolicy, ObjectMeta, VmSpec, VmStatus};

    /// A VM of project `default` with 1 vCPU, 256 MiB and a 1 GiB disk from image `jeos`, on
    /// datastore `nfs`, placed nowhere (the reconciler's tests use it too).
    pub(crate) fn vm_named(name: &str, power: PowerState) -> Vm {
        Vm {
            meta: ObjectMeta::new("default", name),
            spec: VmSpec {
                image: "jeos".into(),
                cpus: 1,
                memory_bytes: 256 << 20,
                disk_bytes: 1 << 30,
                power,
                force_stop: false,
                reboots: 0,
                host: None,
                datastore: "nfs".into(),
                ha: HaPolicy::Off,
                ha_priority: Default::default(),
                ha_after: Vec::new(),
                nics: Vec::new(),
                security_groups: Vec::new(),
            },
            status: VmStatus::default(),
            ha: None,
        }
    }

    fn vm(power: PowerState) -> Vm {
        vm_named("web", power)
    }

    fn facts(lease_fresh: bool) -> Facts {
        Facts {
            now: Instant::now(),
            wall: Utc::now(),
            stop_timeout: Duration::from_secs(30),
            lease_fresh,
        }
    }

    fn running(pid: u32, state: RunState) -> Observed {
        Observed { pid, state }
    }

    fn reason(vm: &Vm) -> String {
        vm.status
            .condition(ConditionType::Running)
            .map(|c| c.reason.clone())
            .unwrap_or_default()
    }

    /// One pass with a fresh lease, the worker remembering what the plan says.
    fn step(
        vm: &mut Vm,
        observed: Option<&Observed>,
        ws: &mut WorkerState,
    ) -> (Vec<Action>, Outcome) {
        let before = vm.clone();
        let p = plan(vm, &before, observed, ws, facts(true));
        *ws = p.worker;
        (p.actions, p.outcome)
    }

    #[test]
    fn a_vm_that_should_run_is_started_and_a_failed_start_backs_off() {
        let mut v = vm(PowerState::Running);
        let mut ws = WorkerState::default();
        let p = step(&mut v, None, &mut ws);
        assert_eq!(p, (vec![Action::Start], Outcome::Steady));
        let out = started(
            &mut v,
            &mut ws,
            Err(AgentError::ImageNotReady("jeos".into())),
            Utc::now(),
        );
        assert_eq!(
            (out, v.status.phase, reason(&v)),
            (
                Outcome::Requeue(Duration::from_secs(10)),
                VmPhase::Failed,
                "StartFailed".into()
            )
        );
        let out = started(
            &mut v,
            &mut ws,
            Err(AgentError::ImageNotReady("jeos".into())),
            Utc::now(),
        );
        assert_eq!(out, Outcome::Requeue(Duration::from_secs(20)), "doubles");
        settle(&mut v, &out);
        assert_eq!(
            v.status.observed_generation, v.meta.generation,
            "failed at it"
        );
        let out = started(&mut v, &mut ws, Ok(42), Utc::now());
        assert_eq!(
            (out, v.status.pid, ws.failures),
            (Outcome::Steady, Some(42), 0)
        );
        assert_eq!(
            (v.status.phase, reason(&v)),
            (VmPhase::Running, "Started".into())
        );
    }

    #[test]
    fn a_protected_vm_is_claimed_before_it_starts_and_waits_for_a_lease() {
        let mut v = vm(PowerState::Running);
        v.spec.ha = HaPolicy::Restart;
        let ws = WorkerState::default();
        let before = v.clone();
        let p = plan(&mut v, &before, None, &ws, facts(false));
        assert_eq!(
            (p.actions, p.outcome),
            (vec![], Outcome::Requeue(Duration::from_millis(500)))
        );
        assert_eq!(reason(&v), "WaitingForLease");
        let p = plan(&mut v, &before, None, &ws, facts(true));
        let claim = vec![Action::Persist, Action::RequireLease, Action::Start];
        assert_eq!((p.actions, p.outcome), (claim, Outcome::Steady));
    }

    #[test]
    fn a_guest_that_powers_itself_off_is_recorded_before_qemu_goes() {
        let mut v = vm(PowerState::Running);
        let generation = v.meta.generation;
        let p = step(
            &mut v,
            Some(&running(7, RunState::GuestShutdown)),
            &mut WorkerState::default(),
        );
        assert_eq!(p, (vec![Action::Persist, Action::Kill], Outcome::Steady));
        assert_eq!(v.spec.power, PowerState::Stopped, "the owner's wish");
        assert!(v.meta.generation > generation);
        assert_eq!(
            (v.status.phase, reason(&v)),
            (VmPhase::Stopped, "GuestPoweredOff".into())
        );
    }

    #[test]
    fn a_stop_asks_the_guest_once_then_powers_off_after_the_timeout() {
        let mut v = vm(PowerState::Stopped);
        let mut ws = WorkerState::default();
        let up = running(7, RunState::Running);
        let p = step(&mut v, Some(&up), &mut ws);
        assert_eq!(
            p,
            (
                vec![Action::Powerdown],
                Outcome::Requeue(Duration::from_millis(200))
            )
        );
        assert_eq!(v.status.phase, VmPhase::Stopping);
        let p = step(&mut v, Some(&up), &mut ws);
        assert!(p.0.is_empty(), "the button is pressed once: {p:?}");
        let mut late = facts(true);
        late.now += Duration::from_secs(31);
        let before = v.clone();
        let p = plan(&mut v, &before, Some(&up), &ws, late);
        assert_eq!(
            (p.actions, p.outcome),
            (vec![Action::Kill], Outcome::Steady)
        );
        assert_eq!(reason(&v), "PoweredOffAfterTimeout");
        assert!(p.worker.stopping_since.is_none());

        let mut v = vm(PowerState::Stopped);
        v.spec.force_stop = true;
        let p = step(&mut v, Some(&up), &mut WorkerState::default());
        assert_eq!((p.0, reason(&v)), (vec![Action::Kill], "PoweredOff".into()));
    }

    #[test]
    fn a_start_during_our_own_shutdown_powers_off_and_starts_again() {
        let mut v = vm(PowerState::Running);
        let mut ws = WorkerState {
            stopping_since: Some(Instant::now()),
            ..WorkerState::default()
        };
        let p = step(&mut v, Some(&running(7, RunState::GuestShutdown)), &mut ws);
        assert_eq!(p, (vec![Action::Kill], Outcome::Requeue(Duration::ZERO)));
        assert_eq!(v.spec.power, PowerState::Running, "still wanted running");
    }

    #[test]
    fn a_reboot_resets_once_even_if_its_record_is_lost() {
        let mut v = vm(PowerState::Running);
        v.spec.reboots = 1;
        v.status.pid = Some(7);
        let mut ws = WorkerState::default();
        let up = running(7, RunState::Running);
        let mut lost = v.clone();
        assert_eq!(step(&mut lost, Some(&up), &mut ws).0, vec![Action::Reset]);
        assert_eq!(reason(&lost), "Rebooted");
        // The write lost a race: the next pass sees the old status, and resets nothing.
        let p = step(&mut v, Some(&up), &mut ws);
        assert!(p.0.is_empty(), "{p:?}");
        assert_eq!(v.status.reboots, 1);
    }

    #[test]
    fn a_handed_over_guest_is_resumed_and_says_so() {
        let mut v = vm(PowerState::Running);
        v.status
            .set_condition(ConditionType::Running, true, RESUMING, "from h1 in 1.0 s");
        let p = step(
            &mut v,
            Some(&running(9, RunState::Paused)),
            &mut WorkerState::default(),
        );
        assert_eq!(p, (vec![Action::Resume], Outcome::Steady));
        assert_eq!((v.status.pid, reason(&v)), (Some(9), "Migrated".into()));
        let p = step(
            &mut v,
            Some(&running(9, RunState::Incoming)),
            &mut WorkerState::default(),
        );
        assert_eq!(p, (vec![], Outcome::Requeue(Duration::from_millis(20))));
    }

    #[test]
    fn a_guest_found_running_is_adopted_and_a_lost_one_is_recorded() {
        let mut v = vm(PowerState::Running);
        v.status.phase = VmPhase::Running;
        v.status.pid = Some(3);
        let p = step(
            &mut v,
            Some(&running(4, RunState::Running)),
            &mut WorkerState::default(),
        );
        assert_eq!((p.0.len(), reason(&v)), (0, "Adopted".into()));

        let mut v = vm(PowerState::Stopped);
        v.status.phase = VmPhase::Running;
        v.status
            .set_condition(ConditionType::Running, true, "Started", "");
        step(&mut v, None, &mut WorkerState::default());
        let c = v.status.condition(ConditionType::Running).cloned();
        assert_eq!(v.status.phase, VmPhase::Stopped);
        assert_eq!(c.map(|c| c.message), Some("the process is gone".into()));
    }
}
