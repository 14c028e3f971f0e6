//! DRS: plans (the scheduler's `drs` planner on the cluster as it is, with each VM's measured
//! demand, and with power management on, the hosts that could then go to standby) and their
//! application as live migrations, on request (`manual`) or every [`DRS_PERIOD_SECS`] (`auto`).
//! The latest plan is kept in memory, so `corral drs apply ID` carries out exactly what `corral drs
//! plan` showed, or refuses if a newer plan replaced it.
//!
//! DPM acts in `auto` on hosts whose agent can power the machine (simulated hosts, for now): one
//! host at a time is asked for standby, emptied as for maintenance, and powers down; a standby host
//! is woken when a VM waits for room or a host runs above [`DPM_WAKE_LOAD`]. Real hosts cannot be
//! powered by Corral yet, so for them the plan only names what would be done.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use corral_api::{
    drs_threshold, keys, ApplyDrsRequest, ApplyDrsResponse, Datastore, DrsMode, DrsPlan, Host,
    PowerManagement, PowerState, Vm, VmPhase, DPM_MAX_LOAD, DPM_WAKE_LOAD, DRS_HOLD_SECS,
    DRS_PERIOD_SECS, LOCAL_DATASTORE,
};
use corral_scheduler::drs::{self, DrsVm};
use corral_store::{list_json, update_json};

use crate::placement::{self, qualified, ClusterView};
use crate::{events, migrations, ApiError, ApiJson, Ctx};

/// Whether DRS may move the VM now: running, not pinned, not being deleted or migrated, its disk
/// on a shared datastore, and not moved within the hold time.
fn movable(vm: &Vm, view: &ClusterView, shared: &[String]) -> bool {
    let migrating = view
        .migrations
        .iter()
        .any(|m| m.vm_uid == vm.meta.uid && !m.phase.is_finished());
    let held = vm.status.events.iter().any(|e| {
        e.reason.starts_with("Migrat") && (Utc::now() - e.at).num_seconds() < DRS_HOLD_SECS
    });
    vm.spec.host.is_none()
        && vm.spec.power == PowerState::Running
        && vm.status.phase == VmPhase::Running
        && vm.meta.deletion_requested_at.is_none()
        && !migrating
        && shared.contains(&vm.spec.datastore)
        && !held
}

/// A plan for the cluster as it is now.
pub async fn plan_now(ctx: &Ctx) -> Result<DrsPlan, ApiError> {
    let view = placement::view(ctx).await?;
    let (datastores, _) = list_json::<Datastore>(&*ctx.store, keys::DATASTORES).await?;
    let shared: Vec<String> = datastores
        .iter()
        .filter(|d| d.shared && d.name != LOCAL_DATASTORE)
        .map(|d| d.name.clone())
        .collect();
    let vms: Vec<DrsVm> = view
        .vms
        .iter()
        .filter(|v| v.status.phase == VmPhase::Running)
        .filter_map(|v| {
            let usage = v.status.usage.as_ref();
            Some(DrsVm {
                name: qualified(&v.meta.project, &v.meta.name),
                host: v.status.host.clone()?,
                cpus: v.spec.cpus,
                memory_bytes: v.spec.memory_bytes,
                // Not measured yet: count what it was given.
                cpu_demand: usage.map_or(f64::from(v.spec.cpus), |u| u.cpu_cores),
                memory_demand: usage.map_or(v.spec.memory_bytes, |u| u.memory_bytes),
                movable: movable(v, &view, &shared),
            })
        })
        .collect();
    let (policy, hosts, groups) = (view.policy(), view.sched_hosts(), view.sched_groups());
    let threshold = drs_threshold(view.settings.drs_aggressiveness);
    let p = drs::plan(&policy, &hosts, &groups, &vms, threshold);
    let power = if view.settings.power_management == PowerManagement::Auto {
        // Room to restart the VMs of as many failed hosts as HA is told to tolerate, and one more.
        let keep_on = view.settings.ha_host_failures_to_tolerate as usize + 1;
        drs::standby(
            &policy,
            &hosts,
            &groups,
            &vms,
            &p.moves,
            keep_on,
            DPM_MAX_LOAD,
        )
    } else {
        Vec::new()
    };
    let plan = DrsPlan {
        id: uuid::Uuid::new_v4(),
        created_at: Utc::now(),
        moves: p.moves,
        before: p.before,
        after: p.after,
        imbalance_before: p.imbalance_before,
        imbalance_after: p.imbalance_after,
        threshold: p.threshold,
        note: p.note,
        power,
    };
    *ctx.drs_plan.lock().await = Some(plan.clone());
    Ok(plan)
}

/// Starts the plan's migrations; a move that can no longer be made is skipped with its reason.
async fn carry_out(ctx: &Ctx, plan: DrsPlan) -> ApplyDrsResponse {
    let mut tasks = Vec::new();
    let mut skipped = Vec::new();
    for m in &plan.moves {
        let (project, name) = m.vm.split_once('/').unwrap_or(("", &m.vm));
        let reason = format!("DRS: {}", m.reason);
        match migrations::start(ctx, project, name, Some(&m.to), &reason).await {
            Ok(t) => tasks.push(t),
            Err(e) => skipped.push(format!("{} -> {}: {e}", m.vm, m.to)),
        }
    }
    ApplyDrsResponse {
        plan,
        tasks,
        skipped,
    }
}

#[utoipa::path(get, path = "/api/v1/drs/plan", tag = "drs",
    responses((status = 200, description = "what DRS would move now, and every host's load before and after", body = DrsPlan)),
    security(("bearer" = [])))]
pub async fn get_plan(State(ctx): State<Ctx>) -> Result<Json<DrsPlan>, ApiError> {
    Ok(Json(plan_now(&ctx).await?))
}

#[utoipa::path(post, path = "/api/v1/drs/apply", tag = "drs", request_body = ApplyDrsRequest,
    responses((status = 202, description = "the migrations started, one task each", body = ApplyDrsResponse),
        (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn apply(
    State(ctx): State<Ctx>,
    ApiJson(req): ApiJson<ApplyDrsRequest>,
) -> Result<(StatusCode, Json<ApplyDrsResponse>), ApiError> {
    if placement::settings(&ctx).await?.drs_mode == DrsMode::Off {
        return Err(ApiError::Conflict(
            "DRS is off: set the cluster's drs_mode to manual (or auto), then apply".into(),
        ));
    }
    let plan = match req.plan {
        None => plan_now(&ctx).await?,
        Some(id) => match ctx.drs_plan.lock().await.clone() {
            Some(p) if p.id == id => p,
            _ => {
                return Err(ApiError::Conflict(format!(
                    "plan {id} is not the latest plan (a newer one replaced it, or the controller restarted): ask for a plan again (GET /api/v1/drs/plan)"
                )))
            }
        },
    };
    Ok((StatusCode::ACCEPTED, Json(carry_out(&ctx, plan).await)))
}

/// Asks a host for standby (`true`) or to wake (`false`), and records the event.
async fn set_standby(ctx: &Ctx, host: &str, standby: bool, why: &str) -> Result<(), ApiError> {
    let changed = update_json::<Host, ApiError>(&*ctx.store, &keys::host(host), |h| {
        let change = h.standby != standby;
        h.standby = standby;
        Ok(change)
    })
    .await?;
    if changed.is_some() {
        let (reason, what) = if standby {
            ("HostStandby", "goes to standby")
        } else {
            ("HostWaking", "is woken")
        };
        events::record(
            &*ctx.store,
            reason,
            &format!("host/{host}"),
            &format!("host {host} {what}: {why}"),
        )
        .await;
    }
    Ok(())
}

/// DPM's step: wake a standby host when capacity is short, else send the plan's first candidate
/// that can be powered to standby, one host at a time.
async fn power(ctx: &Ctx, view: &ClusterView, plan: &DrsPlan) -> Result<(), ApiError> {
    let hosts: Vec<&Host> = view.hosts.iter().map(|h| &*h.value).collect();
    let waiting = view
        .vms
        .iter()
        .filter(|v| v.status.host.is_none() && v.meta.deletion_requested_at.is_none())
        .count();
    let hot = plan.before.iter().find(|l| l.load > DPM_WAKE_LOAD);
    if waiting > 0 || hot.is_some() {
        // The largest asleep host: the most room per wake-up.
        let asleep = hosts
            .iter()
            .filter(|h| h.standby)
            .max_by_key(|h| (h.status.memory_bytes, std::cmp::Reverse(h.name.clone())));
        if let Some(h) = asleep {
            let why = match hot {
                Some(l) if waiting == 0 => format!("{} runs at {:.0}%", l.host, l.load * 100.0),
                _ => format!("{waiting} VM(s) wait for room"),
            };
            set_standby(ctx, &h.name, false, &why).await?;
        }
        return Ok(());
    }
    // One host at a time: the last one asked must be down first.
    if hosts.iter().any(|h| h.standby && !h.status.standby) {
        return Ok(());
    }
    for action in &plan.power {
        let Some(h) = hosts.iter().find(|h| h.name == action.host) else {
            continue;
        };
        // Stopped VMs would be stranded on a host that sleeps: only hosts with running VMs only.
        let stranded = view.vms.iter().any(|v| {
            v.status.host.as_deref() == Some(h.name.as_str())
                && (v.status.phase != VmPhase::Running || v.spec.power != PowerState::Running)
        });
        if h.status.power_control && !h.maintenance && !stranded {
            return set_standby(ctx, &h.name, true, &action.reason).await;
        }
    }
    Ok(())
}

/// Automatic DRS: every period ([`DRS_PERIOD_SECS`]), when the cluster is in `auto` and no migration is under way,
/// plans and carries the plan out.
pub fn spawn(ctx: Ctx) {
    // Labs and tests may run it more often (`CORRAL_DRS_PERIOD_SECS`).
    let period = std::env::var("CORRAL_DRS_PERIOD_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(DRS_PERIOD_SECS);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(period));
        tick.tick().await;
        loop {
            tick.tick().await;
            let step = async {
                if placement::settings(&ctx).await?.drs_mode != DrsMode::Auto {
                    return Ok::<_, ApiError>(());
                }
                let view = placement::view(&ctx).await?;
                if view.migrations.iter().any(|m| !m.phase.is_finished()) {
                    return Ok(());
                }
                let plan = plan_now(&ctx).await?;
                if view.settings.power_management == PowerManagement::Auto {
                    power(&ctx, &view, &plan).await?;
                }
                if !plan.moves.is_empty() {
                    let done = carry_out(&ctx, plan).await;
                    tracing::info!(
                        started = done.tasks.len(),
                        skipped = ?done.skipped,
                        "automatic DRS applied a plan"
                    );
                }
                Ok(())
            };
            if let Err(e) = step.await {
                tracing::warn!(error = %e, "automatic DRS failed; trying again next period");
            }
        }
    });
}
