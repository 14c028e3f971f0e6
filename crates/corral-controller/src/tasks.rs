//! Tasks: long operations clients follow. A VM task does no work itself: it waits until the VM's
//! observed state (written by the host agent) reaches its goal, and reports the steps on the way.
//! Its goal is stored with it, so a restarted controller picks up following where it left off.

use std::time::Duration;

use chrono::Utc;
use corral_api::{
    keys, Host, Image, ImagePhase, Migration, MigrationPhase, PowerState, Task, TaskGoal,
    TaskState, Vm, VmPhase,
};
use corral_store::{get_json, list_json, update_json, Op, Precondition, StoreError};
use uuid::Uuid;

use crate::{ApiError, Ctx};

/// How long a task may take before it is reported as failed.
const TASK_TIMEOUT: Duration = Duration::from_secs(600);

const SUPERSEDED: &str = "superseded: a later request changed whether the VM should run";

/// Where a task stands, judged from the VM.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Progress(u8, String),
    Done(String),
    Failed(String),
    Cancelled(String),
}

fn failure(vm: &Vm) -> String {
    vm.status
        .conditions
        .iter()
        .find(|c| !c.status && !c.message.is_empty())
        .map(|c| format!("{}: {}", c.reason, c.message))
        .unwrap_or_else(|| "the VM is in phase failed".into())
}

fn progress_of(vm: &Vm) -> Verdict {
    let disk = vm
        .status
        .condition(corral_api::ConditionType::DiskReady)
        .is_some_and(|c| c.status);
    match vm.status.phase {
        VmPhase::Pending => Verdict::Progress(10, "waiting for the host agent".into()),
        VmPhase::Stopping => {
            Verdict::Progress(50, "waiting for the guest to shut down (ACPI)".into())
        }
        VmPhase::Deleting => Verdict::Progress(50, "removing the VM and its disk".into()),
        _ if disk => Verdict::Progress(40, "disk ready".into()),
        _ => Verdict::Progress(20, "working".into()),
    }
}

/// Judges a VM task from the VM as it is now (`None`: the VM does not exist). Pure.
pub fn evaluate(goal: &TaskGoal, vm: Option<&Vm>) -> Verdict {
    let Some(vm) = vm else {
        return match goal {
            TaskGoal::VmDelete => Verdict::Done("deleted".into()),
            _ => Verdict::Failed("the VM was deleted".into()),
        };
    };
    let observed = |g: u64| vm.status.observed_generation >= g;
    // A later request changed what the VM should do: this task's goal will never be reached.
    let superseded = |want: PowerState| vm.spec.power != want;
    let phase = vm.status.phase;
    match goal {
        TaskGoal::VmCreate { start, .. } if vm.status.host.is_none() => {
            match vm.status.condition(corral_api::ConditionType::Scheduled) {
                Some(c) if !c.status && *start => Verdict::Failed(format!(
                    "the VM is pending: {}; it starts once a host can take it",
                    c.message
                )),
                Some(c) if !c.status => Verdict::Done(format!("created; pending: {}", c.message)),
                _ => Verdict::Progress(5, "waiting for placement".into()),
            }
        }
        TaskGoal::VmCreate { generation, start } => match (observed(*generation), phase, start) {
            (true, VmPhase::Failed, _) => Verdict::Failed(failure(vm)),
            (true, VmPhase::Running, true) => Verdict::Done(format!(
                "running on {}",
                vm.status.host.as_deref().unwrap_or("?")
            )),
            (true, _, false)
                if vm
                    .status
                    .condition(corral_api::ConditionType::DiskReady)
                    .is_some_and(|c| c.status) =>
            {
                Verdict::Done("created".into())
            }
            (_, _, true) if superseded(PowerState::Running) => Verdict::Failed(SUPERSEDED.into()),
            _ => progress_of(vm),
        },
        TaskGoal::VmStart { .. } if superseded(PowerState::Running) => {
            Verdict::Failed(SUPERSEDED.into())
        }
        TaskGoal::VmStop { .. } if superseded(PowerState::Stopped) => {
            Verdict::Failed(SUPERSEDED.into())
        }
        TaskGoal::VmStart { generation } => match (observed(*generation), phase) {
            (true, VmPhase::Failed) => Verdict::Failed(failure(vm)),
            (true, VmPhase::Running) => Verdict::Done("running".into()),
            _ => progress_of(vm),
        },
        TaskGoal::VmStop { generation } => match (observed(*generation), phase) {
            (true, VmPhase::Failed) => Verdict::Failed(failure(vm)),
            (true, VmPhase::Stopped) => {
                let how = vm
                    .status
                    .condition(corral_api::ConditionType::Running)
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                Verdict::Done(if how.is_empty() {
                    "stopped".into()
                } else {
                    format!("stopped: {how}")
                })
            }
            _ => progress_of(vm),
        },
        TaskGoal::VmReboot { reboots } => match phase {
            VmPhase::Failed => Verdict::Failed(failure(vm)),
            VmPhase::Running if vm.status.reboots >= *reboots => Verdict::Done("rebooted".into()),
            VmPhase::Stopped => Verdict::Failed("the VM stopped before it was rebooted".into()),
            _ => Verdict::Progress(50, "resetting".into()),
        },
        TaskGoal::VmMoveStorage { datastore, .. } if vm.spec.datastore != *datastore => {
            Verdict::Failed("superseded: a later request moved the disk elsewhere".into())
        }
        TaskGoal::VmMoveStorage {
            generation,
            datastore,
        } => {
            let on = vm.status.disk.as_ref().map(|d| d.datastore.as_str());
            let moved = vm.status.condition(corral_api::ConditionType::StorageMoved);
            match (observed(*generation), on, moved) {
                (true, Some(ds), _) if ds == datastore => {
                    Verdict::Done(format!("the disk is on datastore {datastore}"))
                }
                (true, _, Some(c)) if !c.status => {
                    Verdict::Failed(format!("{}: {}", c.reason, c.message))
                }
                (_, None, _) if vm.status.host.is_none() || phase == VmPhase::Pending => {
                    Verdict::Done(format!("the disk will be made on datastore {datastore}"))
                }
                _ => Verdict::Progress(50, format!("copying the disk to datastore {datastore}")),
            }
        }
        TaskGoal::VmDelete => progress_of(vm),
        TaskGoal::ImageBuild | TaskGoal::VmMigrate { .. } | TaskGoal::HostEvacuate { .. } => {
            Verdict::Failed("not a task judged from its VM".into())
        }
    }
}

/// How long a finished task is kept.
pub const TASK_RETENTION: chrono::Duration = chrono::Duration::days(7);
/// How many finished tasks are kept at most (the newest).
pub const TASKS_KEPT: usize = 10_000;

/// The order tasks are listed in: newest first (ties by id, so pages never overlap).
pub fn newest_first(a: &Task, b: &Task) -> std::cmp::Ordering {
    b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id))
}

/// The finished tasks that have expired at `now`: those that ended more than `retention` ago,
/// and those beyond the newest `keep` finished ones. Running tasks never expire. Pure.
pub fn expired(
    tasks: &[Task],
    now: chrono::DateTime<chrono::Utc>,
    retention: chrono::Duration,
    keep: usize,
) -> Vec<uuid::Uuid> {
    let mut finished: Vec<&Task> = tasks.iter().filter(|t| t.is_finished()).collect();
    finished.sort_by(|a, b| newest_first(a, b));
    finished
        .iter()
        .enumerate()
        .filter(|(i, t)| *i >= keep || now - t.updated_at > retention)
        .map(|(_, t)| t.id)
        .collect()
}

/// Removes expired tasks once a minute.
pub fn spawn_janitor(ctx: Ctx) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = expire(&ctx).await {
                tracing::warn!(error = %e, "could not remove expired tasks");
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    });
}

async fn expire(ctx: &Ctx) -> Result<(), ApiError> {
    let (tasks, _) = list_json::<Task>(&*ctx.store, keys::TASKS).await?;
    let gone = expired(&tasks, chrono::Utc::now(), TASK_RETENTION, TASKS_KEPT);
    for chunk in gone.chunks(500) {
        let ops = chunk
            .iter()
            .map(|id| Op::Delete {
                key: keys::task(*id),
                when: Precondition::Any,
            })
            .collect();
        match ctx.store.txn(ops).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Stores a new task together with `ops`, all in one transaction, and starts following it if it
/// is a VM task. A failed precondition in `ops` comes back as the store's `Conflict`, naming the key.
pub async fn submit(ctx: &Ctx, task: Task, mut ops: Vec<Op>) -> Result<Task, StoreError> {
    ops.push(Op::Put {
        key: keys::task(task.id),
        value: serde_json::to_vec(&task)?,
        when: Precondition::Absent,
        lease: None,
    });
    ctx.store.txn(ops).await?;
    follow_if_vm_task(ctx, &task);
    Ok(task)
}

fn follow_if_vm_task(ctx: &Ctx, task: &Task) {
    if task.goal != TaskGoal::ImageBuild {
        let ctx = ctx.clone();
        let task = task.clone();
        tokio::spawn(async move { follow(ctx, task).await });
    }
}

/// How a task that ends, ends.
pub enum End {
    Succeeded,
    /// Failed, for the reason given.
    Failed(String),
}

/// Records progress (or the end) of a task.
pub async fn update(ctx: &Ctx, id: uuid::Uuid, progress: u8, message: &str, end: Option<End>) {
    let end = end.map(|r| match r {
        End::Succeeded => (TaskState::Succeeded, None),
        End::Failed(e) => (TaskState::Failed, Some(e)),
    });
    record(ctx, id, progress, message, end).await;
}

/// Records progress, or the end state with the error if any.
async fn record(
    ctx: &Ctx,
    id: uuid::Uuid,
    progress: u8,
    message: &str,
    end: Option<(TaskState, Option<String>)>,
) {
    let res = update_json::<Task, StoreError>(&*ctx.store, &keys::task(id), |t| {
        if t.is_finished() || (t.progress == progress && t.message == message && end.is_none()) {
            return Ok(false);
        }
        t.progress = progress;
        t.message = message.to_string();
        t.updated_at = Utc::now();
        if let Some((state, error)) = &end {
            t.state = *state;
            t.error.clone_from(error);
        }
        Ok(true)
    })
    .await;
    if let Err(e) = res {
        tracing::warn!(task = %id, error = %e, "could not record task progress");
    }
}

fn vm_key(task: &Task) -> String {
    keys::vm(&task.project, task.target_name())
}

/// What a task waits on: the keys (or a prefix) to watch, one or two.
fn watched(task: &Task) -> Vec<String> {
    match &task.goal {
        // The record, and the VM: the move ends when the guest runs on the target.
        TaskGoal::VmMigrate { .. } => vec![
            keys::migration(&task.project, task.target_name()),
            vm_key(task),
        ],
        TaskGoal::HostEvacuate { .. } => vec![keys::VMS.to_string()],
        _ => vec![vm_key(task)],
    }
}

/// Judges a migration task from its record (`None`: the record is gone) and its VM: done once the
/// guest runs on the target. Pure.
pub fn evaluate_migration(id: Uuid, m: Option<&Migration>, vm: Option<&Vm>) -> Verdict {
    let Some(m) = m.filter(|m| m.id == id) else {
        return Verdict::Failed("the migration record was replaced or removed".into());
    };
    let p = &m.progress;
    match m.phase {
        MigrationPhase::Preparing => Verdict::Progress(5, m.summary()),
        MigrationPhase::TargetReady => Verdict::Progress(10, m.summary()),
        MigrationPhase::Transferring if p.stage == "disk" => {
            Verdict::Progress(10 + p.percent / 2, m.summary())
        }
        MigrationPhase::Transferring => {
            let base = if m.shared_storage { 10 } else { 60 };
            let span = 99 - base;
            Verdict::Progress(
                base + (u16::from(p.percent) * u16::from(span) / 100) as u8,
                m.summary(),
            )
        }
        MigrationPhase::Completed => {
            let resuming = vm.is_some_and(|v| {
                v.meta.uid == m.vm_uid
                    && v.status
                        .condition(corral_api::ConditionType::Running)
                        .is_some_and(|c| c.reason == corral_api::host_protocol::RESUMING)
            });
            if resuming {
                Verdict::Progress(99, format!("{}: resuming the guest", m.summary()))
            } else {
                Verdict::Done(format!("migrated {}", m.summary()))
            }
        }
        MigrationPhase::Failed => Verdict::Failed(m.summary()),
        MigrationPhase::Cancelled => Verdict::Cancelled(m.summary()),
    }
}

/// Whether evacuation moves this VM off `host`: it runs there, is not pinned and not going away.
pub(crate) fn evacuable(v: &Vm, host: &str) -> bool {
    v.status.host.as_deref() == Some(host)
        && v.status.phase == VmPhase::Running
        && v.spec.power == PowerState::Running
        && v.spec.host.is_none()
        && v.meta.deletion_requested_at.is_none()
}

/// Judges an evacuation from the VMs it still has to move off the host. Pure.
/// `vms`: those placed on the host (others are ignored); `migrations`: all of them.
pub fn evaluate_evacuation<'a>(
    host: &Host,
    vms: &[&Vm],
    migrations: impl Iterator<Item = &'a Migration>,
) -> Verdict {
    if !host.maintenance {
        return Verdict::Failed(format!(
            "{} left maintenance before it was empty",
            host.name
        ));
    }
    let left: Vec<&Vm> = vms
        .iter()
        .copied()
        .filter(|v| evacuable(v, &host.name))
        .collect();
    if left.is_empty() {
        let staying: Vec<&str> = vms
            .iter()
            .filter(|v| v.status.host.as_deref() == Some(host.name.as_str()))
            .map(|v| v.meta.name.as_str())
            .collect();
        return Verdict::Done(if staying.is_empty() {
            format!("{} is empty", host.name)
        } else {
            format!(
                "{}: every running VM moved; staying (stopped, pinned or failed): {}",
                host.name,
                staying.join(", ")
            )
        });
    }
    let moving = migrations
        .filter(|m| m.source == host.name && !m.phase.is_finished())
        .count();
    let names: Vec<&str> = left.iter().map(|v| v.meta.name.as_str()).collect();
    Verdict::Progress(
        50,
        format!(
            "{} VMs still on {} ({}), {moving} migrating",
            left.len(),
            host.name,
            names.join(", ")
        ),
    )
}

/// Reads what the task depends on and judges it.
async fn judge(ctx: &Ctx, task: &Task) -> Result<Verdict, ApiError> {
    Ok(match &task.goal {
        TaskGoal::VmMigrate { id } => {
            let key = keys::migration(&task.project, task.target_name());
            let m = get_json::<Migration>(&*ctx.store, &key).await?;
            let vm = get_json::<Vm>(&*ctx.store, &vm_key(task)).await?;
            evaluate_migration(
                *id,
                m.map(|m| m.value).as_ref(),
                vm.map(|v| v.value).as_ref(),
            )
        }
        TaskGoal::HostEvacuate { host } => {
            // From the cache: the host's own VMs, not every VM of the cluster, at each check.
            let o = ctx.cache.read(&*ctx.store).await?;
            match o.hosts.get(&keys::host(host)) {
                None => Verdict::Failed(format!("host {host} was removed")),
                Some(h) => {
                    let vms: Vec<&Vm> = o.placed_on(host).map(|e| &*e.value).collect();
                    let migrations = o.migrations.values().map(|e| &*e.value);
                    evaluate_evacuation(&h.value, &vms, migrations)
                }
            }
        }
        goal => {
            let vm = get_json::<Vm>(&*ctx.store, &vm_key(task)).await?;
            evaluate(goal, vm.map(|v| v.value).as_ref())
        }
    })
}

/// Follows a VM task until the VM reaches the goal, fails, or the task times out (counted from
/// the task's creation, also across controller restarts).
async fn follow(ctx: Ctx, task: Task) {
    let keys = watched(&task);
    let age = (chrono::Utc::now() - task.created_at)
        .to_std()
        .unwrap_or_default();
    let deadline = tokio::time::Instant::now() + TASK_TIMEOUT.saturating_sub(age);
    let mut watches: Vec<Option<corral_store::WatchStream>> = keys.iter().map(|_| None).collect();
    loop {
        if tokio::time::Instant::now() >= deadline {
            let msg = "timed out after 10 minutes; the VM's conditions say where it stands";
            return update(&ctx, task.id, 100, "failed", Some(End::Failed(msg.into()))).await;
        }
        for (w, key) in watches.iter_mut().zip(&keys) {
            if w.is_none() {
                *w = ctx.store.watch(key, 0).await.ok();
            }
        }
        match judge(&ctx, &task).await {
            Ok(Verdict::Done(msg)) => {
                return update(&ctx, task.id, 100, &msg, Some(End::Succeeded)).await
            }
            Ok(Verdict::Failed(msg)) => {
                return update(&ctx, task.id, 100, "failed", Some(End::Failed(msg))).await
            }
            Ok(Verdict::Cancelled(msg)) => {
                let end = Some((TaskState::Cancelled, Some(msg)));
                return record(&ctx, task.id, 100, "cancelled", end).await;
            }
            Ok(Verdict::Progress(p, msg)) => update(&ctx, task.id, p, &msg, None).await,
            Err(e) => tracing::warn!(error = %e, "task could not read what it follows"),
        }
        // Wake on a change of what the task follows, or after a second at the latest; a watch
        // that ended is made again on the next round.
        let (first, rest) = watches.split_at_mut(1);
        let changed = async {
            tokio::select! {
                ok = next_change(first[0].as_mut()) => (0, ok),
                ok = next_change(rest.first_mut().and_then(Option::as_mut)) => (1, ok),
            }
        };
        if let Ok((i, false)) = tokio::time::timeout(Duration::from_secs(1), changed).await {
            watches[i] = None;
        }
    }
}

/// Whether the watch delivered a change (false: it ended); never returns without a watch.
async fn next_change(w: Option<&mut corral_store::WatchStream>) -> bool {
    match w {
        Some(w) => matches!(w.recv().await, Some(Ok(_))),
        None => std::future::pending().await,
    }
}

/// After a restart: follow VM tasks again; image builds died with the old process.
pub async fn resume(ctx: &Ctx) -> Result<(), ApiError> {
    let (tasks, _) = list_json::<Task>(&*ctx.store, keys::TASKS).await?;
    // Images whose build died with the old process.
    let (projects, _) = ctx.store.list(keys::IMAGES).await?;
    for kv in projects {
        let building = serde_json::from_slice::<Image>(&kv.value)
            .is_ok_and(|i| i.status.phase == ImagePhase::Building);
        if building {
            update_json::<Image, StoreError>(&*ctx.store, &kv.key, |i| {
                i.status.phase = ImagePhase::Failed;
                i.status.message =
                    "the controller restarted during the build: build it again".into();
                Ok(true)
            })
            .await?;
        }
    }
    for t in tasks.into_iter().filter(|t| !t.is_finished()) {
        if t.goal == TaskGoal::ImageBuild {
            update(
                ctx,
                t.id,
                100,
                "failed",
                Some(End::Failed(
                    "the controller restarted during the build: run it again".into(),
                )),
            )
            .await;
        } else {
            follow_if_vm_task(ctx, &t);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_api::{ObjectMeta, PowerState, TaskState, VmSpec, VmStatus};

    #[test]
    fn finished_tasks_expire_after_a_week_or_beyond_the_newest_kept() {
        let now = Utc::now();
        let task = |age_days: i64, state: TaskState| {
            let mut t = Task::new("default", "vm.start", "vm/a".into(), TaskGoal::VmDelete);
            t.created_at = now - chrono::Duration::days(age_days);
            t.updated_at = t.created_at;
            t.state = state;
            t
        };
        let tasks = vec![
            task(0, TaskState::Succeeded),
            task(1, TaskState::Failed),
            task(8, TaskState::Succeeded),
            task(30, TaskState::Running),
            task(2, TaskState::Succeeded),
        ];
        let week = chrono::Duration::days(7);
        let gone = expired(&tasks, now, week, 100);
        assert_eq!(
            gone,
            vec![tasks[2].id],
            "older than a week; running ones stay"
        );
        let gone = expired(&tasks, now, week, 2);
        assert_eq!(
            gone,
            vec![tasks[4].id, tasks[2].id],
            "beyond the newest two finished, oldest too"
        );
    }

    fn vm(phase: VmPhase, observed: u64) -> Vm {
        let mut status = VmStatus {
            phase,
            observed_generation: observed,
            ..VmStatus::default()
        };
        match phase {
            VmPhase::Failed => status.set_condition(
                corral_api::ConditionType::Running,
                false,
                "StartFailed",
                "no memory",
            ),
            VmPhase::Pending => {}
            _ => status.set_condition(corral_api::ConditionType::DiskReady, true, "Cloned", ""),
        }
        status.host = Some("h1".into());
        Vm {
            meta: ObjectMeta::new("default", "a"),
            spec: VmSpec {
                image: "jeos".into(),
                cpus: 1,
                memory_bytes: 1 << 28,
                disk_bytes: 0,
                power: PowerState::Running,
                force_stop: false,
                reboots: 0,
                host: None,
                datastore: corral_api::LOCAL_DATASTORE.into(),
                ha: Default::default(),
                ha_priority: Default::default(),
                ha_after: Vec::new(),
                nics: Vec::new(),
                security_groups: Vec::new(),
            },
            status,
            ha: None,
        }
    }

    #[test]
    fn a_task_ends_only_when_its_generation_was_observed() {
        let goal = TaskGoal::VmStart { generation: 3 };
        assert!(
            matches!(
                evaluate(&goal, Some(&vm(VmPhase::Running, 2))),
                Verdict::Progress(..)
            ),
            "an older observation does not count"
        );
        assert!(matches!(
            evaluate(&goal, Some(&vm(VmPhase::Running, 3))),
            Verdict::Done(_)
        ));
        assert_eq!(
            evaluate(&goal, Some(&vm(VmPhase::Failed, 3))),
            Verdict::Failed("StartFailed: no memory".into())
        );
        assert!(matches!(evaluate(&goal, None), Verdict::Failed(_)));
    }

    #[test]
    fn create_without_start_ends_stopped_and_delete_ends_when_gone() {
        let goal = TaskGoal::VmCreate {
            generation: 1,
            start: false,
        };
        assert!(matches!(
            evaluate(&goal, Some(&vm(VmPhase::Stopped, 1))),
            Verdict::Done(_)
        ));
        assert!(matches!(
            evaluate(&goal, Some(&vm(VmPhase::Pending, 0))),
            Verdict::Progress(10, _)
        ));
        assert!(matches!(
            evaluate(&TaskGoal::VmDelete, Some(&vm(VmPhase::Deleting, 1))),
            Verdict::Progress(..)
        ));
        assert!(matches!(
            evaluate(&TaskGoal::VmDelete, None),
            Verdict::Done(_)
        ));
    }
}
