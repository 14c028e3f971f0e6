//! Starting live migrations (on request, or to empty a host entering maintenance), cancelling them,
//! and judging their tasks. The move itself is done by the two host agents (see
//! `corral_agent`'s migrate module); the controller only picks the target and writes the record.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use corral_api::{
    keys, Datastore, Host, HostState, MigrateVmRequest, Migration, MigrationPhase, PowerState,
    Task, TaskGoal, Vm, VmPhase, LOCAL_DATASTORE,
};
use corral_scheduler as sched;
use corral_store::{get_json, Op, Precondition, StoreError};

use crate::tasks;
use crate::{ensure_project, placement, ApiError, ApiJson, ApiPath, Ctx};

/// Migrations one host in maintenance sends at a time.
const EVACUATION_PARALLELISM: usize = 2;
/// A VM whose evacuation failed is tried again after this long.
const EVACUATION_RETRY: Duration = Duration::from_secs(30);
/// A migration whose record has not changed for this long is given up.
const STALE_AFTER: Duration = Duration::from_secs(120);

/// Whether a VM's disk sits on a datastore every host mounts.
async fn on_shared_storage(ctx: &Ctx, vm: &Vm) -> Result<bool, ApiError> {
    if vm.spec.datastore == LOCAL_DATASTORE {
        return Ok(false);
    }
    Ok(
        get_json::<Datastore>(&*ctx.store, &keys::datastore(&vm.spec.datastore))
            .await?
            .is_some_and(|d| d.value.shared),
    )
}

/// Picks the target, and writes the migration record and its task in one transaction guarded by
/// the VM, the target host and the previous record: a VM changed or placed elsewhere meanwhile
/// makes the caller try again.
pub async fn start(
    ctx: &Ctx,
    project: &str,
    name: &str,
    to: Option<&str>,
    reason: &str,
) -> Result<Task, ApiError> {
    ensure_project(ctx, project).await?;
    let vm_key = keys::vm(project, name);
    let mig_key = keys::migration(project, name);
    loop {
        let vm = get_json::<Vm>(&*ctx.store, &vm_key).await?.ok_or_else(|| {
            ApiError::NotFound(format!("VM {name} does not exist in project {project}"))
        })?;
        let v = &vm.value;
        if v.meta.deletion_requested_at.is_some() {
            return Err(ApiError::Conflict(format!("VM {name} is being deleted")));
        }
        let Some(source) = v.status.host.clone() else {
            return Err(ApiError::Conflict(format!(
                "VM {name} is not placed on a host yet: there is nothing to move"
            )));
        };
        if v.spec.power != PowerState::Running || v.status.phase != VmPhase::Running {
            return Err(ApiError::Conflict(format!(
                "VM {name} is not running (it is {}): live migration moves running VMs; start it first",
                v.status.phase
            )));
        }
        let source_up = get_json::<Host>(&*ctx.store, &keys::host(&source))
            .await?
            .is_some_and(|h| {
                placement::host_state(&h.value, Utc::now(), ctx.ha.heard(&source)).0
                    != HostState::NotResponding
            });
        if !source_up {
            return Err(ApiError::Conflict(format!(
                "VM {name} runs on {source}, which is not responding: it cannot send the VM anywhere"
            )));
        }
        if to == Some(source.as_str()) {
            return Err(ApiError::Conflict(format!(
                "VM {name} already runs on {source}: name another host in `to`"
            )));
        }
        if let Some(pin) = &v.spec.host {
            return Err(ApiError::Conflict(format!(
                "VM {name} is pinned to {pin} (its spec names the host): pinned VMs stay where they are"
            )));
        }
        if let Some(d) = v
            .status
            .disk
            .as_ref()
            .filter(|d| !d.datastore.is_empty() && d.datastore != v.spec.datastore)
        {
            return Err(ApiError::Conflict(format!(
                "the disk of VM {name} is moving from datastore {} to {}: migrate it once that is done",
                d.datastore, v.spec.datastore
            )));
        }
        let previous = get_json::<Migration>(&*ctx.store, &mig_key).await?;
        if let Some(p) = previous.as_ref().filter(|p| !p.value.phase.is_finished()) {
            return Err(ApiError::Conflict(format!(
                "VM {name} is already being migrated ({}): wait for it or cancel its task",
                p.value.summary()
            )));
        }
        if let Some(t) = to {
            if get_json::<Host>(&*ctx.store, &keys::host(t))
                .await?
                .is_none()
            {
                return Err(ApiError::NotFound(format!("there is no host {t}")));
            }
        }
        let shared_storage = on_shared_storage(ctx, v).await?;
        let _one_at_a_time = ctx.placement.lock().await;
        let view = placement::view(ctx).await?;
        let target = match view.decide_migration(v, to) {
            sched::Decision::Place { host } => host,
            sched::Decision::Pending { reason } => {
                return Err(ApiError::Conflict(format!(
                    "VM {name} cannot move: {reason}"
                )))
            }
        };
        let migration = Migration::new(
            project,
            name,
            v.meta.uid,
            (source.as_str(), target.as_str()),
            shared_storage,
            reason,
        );
        let task = Task::new(
            project,
            "vm.migrate",
            format!("vm/{name}"),
            TaskGoal::VmMigrate { id: migration.id },
        );
        let ops = vec![
            Op::Check {
                key: vm_key.clone(),
                when: Precondition::ModRevision(vm.revision),
            },
            Op::Check {
                key: keys::host(&target),
                when: Precondition::ModRevision(view.host_revision(&target)),
            },
            Op::Put {
                key: mig_key.clone(),
                value: serde_json::to_vec(&migration).map_err(StoreError::from)?,
                when: previous.as_ref().map_or(Precondition::Absent, |p| {
                    Precondition::ModRevision(p.revision)
                }),
                lease: None,
            },
        ];
        match tasks::submit(ctx, task, ops).await {
            Ok(task) => return Ok(task),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/vms/{name}/migrate", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path)), request_body = MigrateVmRequest,
    responses((status = 202, description = "accepted; follow (or cancel) the task", body = Task),
        (status = 400, body = corral_api::ApiErrorBody), (status = 404, body = corral_api::ApiErrorBody),
        (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn migrate(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<MigrateVmRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let task = start(&ctx, &project, &name, req.to.as_deref(), "requested").await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/vms/{name}/migration", operation_id = "get_migration", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "the VM's current or last migration", body = Migration),
        (status = 404, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<Migration>, ApiError> {
    ensure_project(&ctx, &project).await?;
    get_json::<Migration>(&*ctx.store, &keys::migration(&project, &name))
        .await?
        .map(|m| Json(m.value))
        .ok_or_else(|| ApiError::NotFound(format!("VM {name} has not been migrated")))
}

/// Asks a migration to stop: at once if the target is still preparing, else at the source's next
/// step. A migration past the switchover completes anyway.
pub async fn cancel(ctx: &Ctx, task: &Task) -> Result<(), ApiError> {
    let TaskGoal::VmMigrate { id } = &task.goal else {
        return Err(ApiError::Conflict(match &task.goal {
            TaskGoal::HostEvacuate { host } => {
                format!("an evacuation ends when its host {host} leaves maintenance")
            }
            _ => format!(
                "a {} task cannot be cancelled; only migrations can",
                task.kind
            ),
        }));
    };
    let key = keys::migration(&task.project, task.target_name());
    let updated = corral_store::update_json::<Migration, ApiError>(&*ctx.store, &key, |m| {
        if m.id != *id || m.phase.is_finished() || m.cancel_requested {
            return Ok(false);
        }
        m.cancel_requested = true;
        if m.phase == MigrationPhase::Preparing {
            m.phase = MigrationPhase::Cancelled;
            m.error = Some("cancelled on request".into());
        }
        m.updated_at = Utc::now();
        Ok(true)
    })
    .await?;
    match updated {
        Some(m) if m.id == *id && m.phase == MigrationPhase::Completed => Err(ApiError::Conflict(
            "the migration already completed; migrate the VM again to move it back".into(),
        )),
        Some(m) if m.id == *id => Ok(()),
        _ => Err(ApiError::NotFound(
            "the migration of this task no longer exists".into(),
        )),
    }
}

/// Ends migrations nobody drives any more: the source stopped responding, or the record has not
/// moved for [`STALE_AFTER`] (both hosts report at least every second while they work). Safe at any
/// phase short of completed: the handover is a compare-and-swap on this very record, so once it is
/// failed no host can complete it.
pub async fn give_up_stale(ctx: &Ctx) -> Result<(), ApiError> {
    let unfinished: Vec<(String, u64, Migration)> = {
        let o = ctx.cache.read(&*ctx.store).await?;
        o.migrations
            .iter()
            .filter(|(_, e)| !e.value.phase.is_finished())
            .map(|(k, e)| (k.clone(), e.revision, (*e.value).clone()))
            .collect()
    };
    let now = Utc::now();
    for (key, rev, m) in unfinished {
        let silent = get_json::<Host>(&*ctx.store, &keys::host(&m.source))
            .await?
            .is_none_or(|h| {
                let heard = ctx.ha.heard(&m.source);
                placement::host_state(&h.value, now, heard).0 == HostState::NotResponding
            });
        let stale = (now - m.updated_at).to_std().unwrap_or_default() > STALE_AFTER;
        if !(silent || stale) {
            continue;
        }
        let why = if silent {
            format!("the source host {} stopped responding", m.source)
        } else {
            format!("no progress reported for {} s", STALE_AFTER.as_secs())
        };
        let ended = Migration {
            phase: MigrationPhase::Failed,
            error: Some(why),
            updated_at: now,
            ..m
        };
        let put = ctx
            .store
            .put(
                &key,
                serde_json::to_vec(&ended).map_err(StoreError::from)?,
                Precondition::ModRevision(rev),
            )
            .await;
        match put {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Starts migrations off every host in maintenance or going to standby, a few at a time per host.
pub async fn evacuate(ctx: &Ctx) -> Result<(), ApiError> {
    let (draining, vms, migrations) = {
        let o = ctx.cache.read(&*ctx.store).await?;
        let draining: Vec<std::sync::Arc<Host>> = o
            .hosts
            .values()
            .filter(|e| e.value.maintenance || (e.value.standby && !e.value.status.standby))
            .map(|e| e.value.clone())
            .collect();
        if draining.is_empty() {
            return Ok(());
        }
        let on = |v: &Vm| {
            draining
                .iter()
                .any(|h| v.status.host.as_ref() == Some(&h.name))
        };
        let vms: Vec<std::sync::Arc<Vm>> = o
            .vms
            .values()
            .filter(|e| on(&e.value))
            .map(|e| e.value.clone())
            .collect();
        let migrations: Vec<std::sync::Arc<Migration>> =
            o.migrations.values().map(|e| e.value.clone()).collect();
        (draining, vms, migrations)
    };
    for host in draining {
        let mut busy = migrations
            .iter()
            .filter(|m| m.source == host.name && !m.phase.is_finished())
            .count();
        for vm in vms.iter().filter(|v| tasks::evacuable(v, &host.name)) {
            if busy >= EVACUATION_PARALLELISM {
                break;
            }
            let last = migrations
                .iter()
                .find(|m| m.vm_uid == vm.meta.uid && m.project == vm.meta.project);
            let recently_failed = last.is_some_and(|m| {
                m.phase.is_finished()
                    && m.phase != MigrationPhase::Completed
                    && (Utc::now() - m.updated_at).to_std().unwrap_or_default() < EVACUATION_RETRY
            });
            if last.is_some_and(|m| !m.phase.is_finished()) || recently_failed {
                continue;
            }
            let why = if host.maintenance {
                "maintenance"
            } else {
                "standby (DPM)"
            };
            let reason = format!("evacuating {} for {why}", host.name);
            match start(ctx, &vm.meta.project, &vm.meta.name, None, &reason).await {
                Ok(_) => busy += 1,
                Err(e) => {
                    tracing::debug!(vm = %vm.meta.name, host = %host.name, error = %e, "cannot evacuate yet")
                }
            }
        }
    }
    Ok(())
}
