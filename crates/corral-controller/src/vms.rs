//! VM endpoints. Each validates against the request and the cluster's state, then writes the desired
//! state and a task in one transaction; the host agent does the rest.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use corral_api::{
    format_bytes, keys, ConsoleChunk, CreateVmRequest, Datastore, DatastoreKind, Image, ImagePhase,
    MoveStorageRequest, ObjectMeta, PowerState, StopVmRequest, Task, TaskGoal, Vm, VmPhase,
    VmStatus, LOCAL_DATASTORE,
};
use corral_store::{get_json, list_json, Op, Precondition, StoreError, Versioned};
use serde::Deserialize;

use crate::{
    ensure_project, placement, tasks, ApiError, ApiJson, ApiPath, ApiQuery, Ctx, PageQuery,
};

fn vm_not_found(project: &str, name: &str) -> ApiError {
    ApiError::NotFound(format!("VM {name} does not exist in project {project}"))
}

async fn load(ctx: &Ctx, project: &str, name: &str) -> Result<Vm, ApiError> {
    ensure_project(ctx, project).await?;
    get_json::<Vm>(&*ctx.store, &keys::vm(project, name))
        .await?
        .map(|v| v.value)
        .ok_or_else(|| vm_not_found(project, name))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/vms", tag = "vms",
    params(("project" = String, Path), PageQuery),
    responses((status = 200, description = "in name order", body = [Vm]), (status = 400, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Vec<Vm>>, ApiError> {
    let limit = q.limit()?;
    ensure_project(&ctx, &project).await?;
    let (datastores, _) = list_json::<Datastore>(&*ctx.store, keys::DATASTORES).await?;
    let prefix = keys::vms(&project);
    let o = ctx.cache.read(&*ctx.store).await?;
    let vms = o
        .vms_in(&prefix, q.after.as_deref())
        .take(limit)
        .map(|e| {
            let mut vm = (*e.value).clone();
            vm.ha = Some(crate::ha::protection(&vm, &datastores));
            vm
        })
        .collect();
    Ok(Json(vms))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/vms/{name}", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<Vm>, ApiError> {
    let mut vm = load(&ctx, &project, &name).await?;
    let (datastores, _) = list_json::<Datastore>(&*ctx.store, keys::DATASTORES).await?;
    vm.ha = Some(crate::ha::protection(&vm, &datastores));
    Ok(Json(vm))
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/vms", tag = "vms",
    params(("project" = String, Path)), request_body = CreateVmRequest,
    responses((status = 202, description = "accepted; follow the task", body = Task),
        (status = 400, body = corral_api::ApiErrorBody), (status = 404, body = corral_api::ApiErrorBody),
        (status = 409, description = "the VM cannot be made as asked now: a name taken, no capacity, a disk larger than its RBD datastore's free space", body = corral_api::ApiErrorBody),
        (status = 422, description = "a memory size below 64M or not whole MiB, or a disk size not a multiple of 512 bytes or above 16T", body = corral_api::ApiErrorBody),
        (status = 503, description = "the VM's RBD datastore cannot be reached to see whether its disk fits", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
    ApiJson(req): ApiJson<CreateVmRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    ensure_project(&ctx, &project).await?;
    let mut spec = req.to_spec()?;
    let image_key = keys::image(&project, &spec.image);
    let image = get_json::<Image>(&*ctx.store, &image_key).await?;
    let image_rev = image.as_ref().map_or(0, |v| v.revision);
    let image = match image.map(|v| v.value) {
        Some(i) if i.status.phase == ImagePhase::Ready => i,
        Some(_) => {
            return Err(ApiError::Conflict(format!(
                "image {} is not ready yet: wait for its build task to finish",
                spec.image
            )))
        }
        None => {
            return Err(ApiError::NotFound(format!(
                "image {} does not exist in project {project}: build JeOS or import an image first",
                spec.image
            )))
        }
    };
    if spec.disk_bytes == 0 {
        spec.disk_bytes = image.status.virtual_bytes;
    } else if spec.disk_bytes < image.status.virtual_bytes {
        return Err(ApiError::BadRequest(format!(
            "disk size {} is smaller than image {} ({}): ask for {} or more",
            format_bytes(spec.disk_bytes),
            spec.image,
            format_bytes(image.status.virtual_bytes),
            format_bytes(image.status.virtual_bytes)
        )));
    }
    check_capacity(&ctx, spec.cpus, spec.memory_bytes).await?;
    // The datastore must exist and stay (a delete in between conflicts on its key).
    let datastore_guard = if spec.datastore == LOCAL_DATASTORE {
        None
    } else {
        let key = keys::datastore(&spec.datastore);
        match get_json::<Datastore>(&*ctx.store, &key).await? {
            Some(ds) if !ds.value.deleting => {
                if ds.value.kind == DatastoreKind::Rbd {
                    let size = spec.disk_bytes.max(image.status.virtual_bytes);
                    crate::datastores::check_room(&ctx, &ds.value, size).await?;
                }
                Some(Op::Check {
                    key,
                    when: Precondition::ModRevision(ds.revision),
                })
            }
            _ => {
                return Err(ApiError::NotFound(format!(
                "datastore {} does not exist: create it first, or leave the datastore out (local)",
                spec.datastore
            )))
            }
        }
    };
    let meta = ObjectMeta::new(&project, &req.name);
    // Creates are placed one at a time, which also hands out addresses one at a time, and a
    // network or group delete (which takes the same lock) cannot slip in between check and write.
    let _one_at_a_time = ctx.placement.lock().await;
    crate::networks::check_groups(&ctx, &project, &spec.security_groups).await?;
    let (nics, nic_ops) =
        crate::networks::attach(&ctx, &project, &req.name, meta.uid, &req.nics).await?;
    spec.nics = nics;
    let vm = Vm {
        meta,
        spec,
        status: VmStatus::default(),
        ha: None,
    };
    let goal = TaskGoal::VmCreate {
        generation: vm.meta.generation,
        start: req.start,
    };
    loop {
        // Admission control adds up the protected VMs; a plain placement needs no other VM.
        // A VM created stopped holds no room: admission control counts it once it starts.
        let admission = vm.spec.ha == corral_api::HaPolicy::Restart && vm.holds_capacity();
        let view = match admission {
            true => placement::view(&ctx).await?,
            false => placement::placement_view(&ctx).await?,
        };
        if let Some(pin) = &vm.spec.host {
            if !view.hosts.iter().any(|h| *h.name == **pin) {
                return Err(ApiError::BadRequest(format!(
                    "host {pin} does not exist: name a host of the cluster, or leave the host out"
                )));
            }
        }
        if admission {
            let (datastores, _) = list_json::<Datastore>(&*ctx.store, keys::DATASTORES).await?;
            crate::ha::admission(&view, &datastores, Some(&vm))?;
        }
        let mut vm = vm.clone();
        let host_guard = view.apply(&mut vm);
        let task = Task::new(
            &project,
            "vm.create",
            format!("vm/{}", req.name),
            goal.clone(),
        );
        // The image must still be the ready one we checked: a delete or rebuild in between conflicts.
        let mut ops = vec![Op::Check {
            key: image_key.clone(),
            when: Precondition::ModRevision(image_rev),
        }];
        ops.extend(host_guard);
        ops.extend(datastore_guard.clone());
        ops.extend(nic_ops.iter().cloned());
        ops.push(Op::Put {
            key: keys::vm(&project, &req.name),
            value: serde_json::to_vec(&vm).map_err(StoreError::from)?,
            when: Precondition::Absent,
            lease: None,
        });
        return match tasks::submit(&ctx, task, ops).await {
            Ok(task) => Ok((StatusCode::ACCEPTED, Json(task))),
            Err(StoreError::Conflict { key }) if key.starts_with(keys::DATASTORES) => Err(ApiError::Conflict(format!(
                "datastore {} changed while the VM was being created (being deleted?): try again",
                vm.spec.datastore
            ))),
            Err(StoreError::Conflict { key }) if key.starts_with(keys::NETWORKS) => Err(ApiError::Conflict(
                "a network of the VM changed while it was being created (being deleted?): try again".into()
            )),
            Err(StoreError::Conflict { key }) if key.starts_with(keys::IPS) => Err(ApiError::Conflict(format!(
                "address {} was taken by another VM at the same moment: try again",
                key.rsplit('/').next().unwrap_or_default()
            ))),
            // The chosen host changed between plan and apply (heartbeat, maintenance, gone): plan again.
            Err(StoreError::Conflict { key }) if key.starts_with(keys::HOSTS) => continue,
            Err(StoreError::Conflict { key }) if key == image_key => Err(ApiError::Conflict(format!(
                "image {} changed while the VM was being created (deleted or rebuilt): try again",
                vm.spec.image
            ))),
            Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
                "a VM named {} already exists in project {project}: pick another name or delete it first",
                req.name
            ))),
            Err(e) => Err(e.into()),
        };
    }
}

/// A VM must fit on some host: no more vCPUs than its CPUs, no more memory than it has.
async fn check_capacity(ctx: &Ctx, cpus: u32, memory: u64) -> Result<(), ApiError> {
    let (max_cpus, max_mem) = {
        let o = ctx.cache.read(&*ctx.store).await?;
        let hosts = || o.hosts.values().map(|e| &e.value.status);
        let Some(max_cpus) = hosts().map(|h| h.cpus).max() else {
            return Ok(());
        };
        (max_cpus, hosts().map(|h| h.memory_bytes).max().unwrap_or(0))
    };
    if cpus > max_cpus {
        return Err(ApiError::BadRequest(format!(
            "the VM asks for {cpus} CPUs but the largest host has {max_cpus}: ask for {max_cpus} or fewer"
        )));
    }
    if memory > max_mem {
        return Err(ApiError::BadRequest(format!(
            "the VM asks for {} of memory but the largest host has {}: ask for less",
            format_bytes(memory),
            format_bytes(max_mem)
        )));
    }
    Ok(())
}

/// Changes a VM's spec and stores a task for the change, in one transaction guarded by the VM's
/// revision; retries when the VM changed in between.
async fn change(
    ctx: &Ctx,
    project: &str,
    name: &str,
    kind: &str,
    edit: impl Fn(&mut Vm) -> Result<TaskGoal, ApiError>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    change_guarded(ctx, project, name, kind, Vec::new(), edit).await
}

/// [`change`], with more keys that must still be as they were read (`guards`).
async fn change_guarded(
    ctx: &Ctx,
    project: &str,
    name: &str,
    kind: &str,
    guards: Vec<Op>,
    edit: impl Fn(&mut Vm) -> Result<TaskGoal, ApiError>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    change_with(ctx, project, name, kind, |vm| {
        Ok((edit(vm)?, guards.clone()))
    })
    .await
    .map_err(|u| match u {
        Unchanged::Refused(e) => e,
        Unchanged::Guard(k) => ApiError::Conflict(format!(
            "VM {name} changed while this request was checked ({k}): try again"
        )),
    })
}

/// Why [`change_with`] did not change the VM.
enum Unchanged {
    /// Refused, as the API answers.
    Refused(ApiError),
    /// A key the edit guarded (not the VM's own) changed since it was read.
    Guard(String),
}

impl From<ApiError> for Unchanged {
    fn from(e: ApiError) -> Self {
        Unchanged::Refused(e)
    }
}

impl From<StoreError> for Unchanged {
    fn from(e: StoreError) -> Self {
        Unchanged::Refused(e.into())
    }
}

/// [`change`], where the edit also names the keys that must still be as they were read.
async fn change_with(
    ctx: &Ctx,
    project: &str,
    name: &str,
    kind: &str,
    edit: impl Fn(&mut Vm) -> Result<(TaskGoal, Vec<Op>), ApiError>,
) -> Result<(StatusCode, Json<Task>), Unchanged> {
    ensure_project(ctx, project).await?;
    let key = keys::vm(project, name);
    loop {
        let Some(Versioned {
            value: mut vm,
            revision,
        }) = get_json::<Vm>(&*ctx.store, &key).await?
        else {
            return Err(vm_not_found(project, name).into());
        };
        if vm.meta.deletion_requested_at.is_some() {
            return Err(ApiError::Conflict(format!("VM {name} is being deleted")).into());
        }
        let (goal, mut ops) = edit(&mut vm)?;
        vm.meta.bump();
        let task = Task::new(project, kind, format!("vm/{name}"), goal);
        let op = Op::Put {
            key: key.clone(),
            value: serde_json::to_vec(&vm).map_err(StoreError::from)?,
            when: Precondition::ModRevision(revision),
            lease: None,
        };
        ops.push(op);
        match tasks::submit(ctx, task, ops).await {
            Ok(task) => return Ok((StatusCode::ACCEPTED, Json(task))),
            Err(StoreError::Conflict { key: k }) if k != key => return Err(Unchanged::Guard(k)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/vms/{name}/start", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 202, description = "accepted; a stopped VM starts on its host if that has room now, else on another host that reaches its disk", body = Task),
        (status = 404, body = corral_api::ApiErrorBody),
        (status = 409, description = "no host that reaches the VM's disk has room to run it now (or HA admission control refuses it)", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    ensure_project(&ctx, &project).await?;
    let (datastores, _) = list_json::<Datastore>(&*ctx.store, keys::DATASTORES).await?;
    // A stopped VM holds no CPU or memory: its start is admitted against what is free now, one
    // at a time as placements are, so two starts cannot both take a host's last room.
    let _one_at_a_time = ctx.placement.lock().await;
    loop {
        let view = placement::view(&ctx).await?;
        let started = change_with(&ctx, &project, &name, "vm.start", |vm| {
            let shared = vm.spec.datastore != LOCAL_DATASTORE
                && datastores
                    .iter()
                    .any(|d| d.name == vm.spec.datastore && d.shared);
            // The cluster's HA policy is judged first: no placement makes a refused VM fit it.
            if !vm.holds_capacity() && vm.spec.ha == corral_api::HaPolicy::Restart {
                crate::ha::admission(&view, &datastores, Some(vm))?;
            }
            let mut guards = Vec::new();
            match view.admit_start(vm, shared) {
                placement::StartAdmission::Here => {}
                placement::StartAdmission::Move { host, revision } => {
                    let from = vm.status.host.clone().unwrap_or_default();
                    let msg = format!("{from} has no room to run it now: moved to {host} to start");
                    vm.status.host = Some(host.clone());
                    vm.status.run_dir = None;
                    vm.status.set_condition(
                        corral_api::ConditionType::Scheduled,
                        true,
                        "PlacedAtStart",
                        &msg,
                    );
                    vm.status
                        .push_event(corral_api::VmEvent::new("PlacedAtStart", msg));
                    guards.push(Op::Check {
                        key: keys::host(&host),
                        when: Precondition::ModRevision(revision),
                    });
                }
                placement::StartAdmission::Refused(why) => {
                    return Err(ApiError::Conflict(format!(
                        "VM {} cannot start now: {why}",
                        vm.meta.name
                    )))
                }
            }
            vm.spec.power = PowerState::Running;
            vm.spec.force_stop = false;
            Ok((
                TaskGoal::VmStart {
                    generation: vm.meta.generation + 1,
                },
                guards,
            ))
        })
        .await;
        match started {
            Ok(task) => return Ok(task),
            Err(Unchanged::Refused(e)) => return Err(e),
            // The host it was to move to changed since it was read: decide again.
            Err(Unchanged::Guard(_)) => continue,
        }
    }
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/vms/{name}/stop", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path)), request_body = StopVmRequest,
    responses((status = 202, body = Task), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn stop(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<StopVmRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    change(&ctx, &project, &name, "vm.stop", |vm| {
        vm.spec.power = PowerState::Stopped;
        vm.spec.force_stop = req.force;
        Ok(TaskGoal::VmStop {
            generation: vm.meta.generation + 1,
        })
    })
    .await
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/vms/{name}/reboot", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 202, body = Task), (status = 409, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn reboot(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    change(&ctx, &project, &name, "vm.reboot", |vm| {
        if vm.spec.power != PowerState::Running || vm.status.phase != VmPhase::Running {
            return Err(ApiError::Conflict(format!(
                "VM {} is not running: start it first",
                vm.meta.name
            )));
        }
        vm.spec.reboots += 1;
        Ok(TaskGoal::VmReboot {
            reboots: vm.spec.reboots,
        })
    })
    .await
}

/// What the datastore `name` is made of; `None` if there is no such datastore.
async fn datastore_kind(ctx: &Ctx, name: &str) -> Result<Option<DatastoreKind>, ApiError> {
    if name == LOCAL_DATASTORE {
        return Ok(Some(DatastoreKind::Dir));
    }
    Ok(get_json::<Datastore>(&*ctx.store, &keys::datastore(name))
        .await?
        .map(|d| d.value.kind))
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/vms/{name}/move-storage", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path)), request_body = MoveStorageRequest,
    responses((status = 202, description = "accepted; a running VM keeps running while its disk is copied", body = Task),
        (status = 400, body = corral_api::ApiErrorBody), (status = 404, body = corral_api::ApiErrorBody),
        (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn move_storage(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<MoveStorageRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let ds = req.datastore.clone();
    let Some(to_kind) = datastore_kind(&ctx, &ds).await? else {
        return Err(ApiError::NotFound(format!("there is no datastore {ds}")));
    };
    let from = get_json::<Vm>(&*ctx.store, &keys::vm(&project, &name))
        .await?
        .map(|v| v.value.spec.datastore);
    let from_kind = match &from {
        Some(f) => datastore_kind(&ctx, f).await?,
        None => None,
    };
    if to_kind == DatastoreKind::Rbd || from_kind == Some(DatastoreKind::Rbd) {
        return Err(ApiError::Conflict(format!(
            "moving a disk to or from an RBD datastore is not possible yet (from {}, to {ds}): create the VM on the datastore it should live on",
            from.unwrap_or_default()
        )));
    }
    // Guarded by the migration record too: a migration started meanwhile makes this try again.
    let mig_key = keys::migration(&project, &name);
    let migration = get_json::<corral_api::Migration>(&*ctx.store, &mig_key).await?;
    let migrating = migration
        .as_ref()
        .is_some_and(|m| !m.value.phase.is_finished());
    let guard = Op::Check {
        key: mig_key,
        when: migration.as_ref().map_or(Precondition::Absent, |m| {
            Precondition::ModRevision(m.revision)
        }),
    };
    change_guarded(
        &ctx,
        &project,
        &name,
        "vm.move-storage",
        vec![guard],
        |vm| {
            if vm.spec.datastore == ds {
                return Err(ApiError::Conflict(format!(
                    "the disk of VM {} is already on datastore {ds}",
                    vm.meta.name
                )));
            }
            if migrating {
                return Err(ApiError::Conflict(format!(
                    "VM {} is being migrated: move its storage once the migration has ended",
                    vm.meta.name
                )));
            }
            vm.spec.datastore.clone_from(&ds);
            Ok(TaskGoal::VmMoveStorage {
                generation: vm.meta.generation + 1,
                datastore: ds.clone(),
            })
        },
    )
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete even if the VM runs (it is powered off first).
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(delete, path = "/api/v1/projects/{project}/vms/{name}", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path), DeleteQuery),
    responses((status = 202, body = Task), (status = 409, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn delete(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    change(&ctx, &project, &name, "vm.delete", |vm| {
        // A guest runs (or is being brought down) there, or is about to be started on its host.
        let running = matches!(vm.status.phase, VmPhase::Running | VmPhase::Stopping)
            || (vm.spec.power == PowerState::Running
                && vm.status.host.is_some()
                && vm.status.phase != VmPhase::Failed);
        if running && !q.force {
            return Err(ApiError::Conflict(format!(
                "VM {} is running: stop it first, or delete it anyway with force=true",
                vm.meta.name
            )));
        }
        vm.meta.deletion_requested_at = Some(Utc::now());
        vm.spec.force_stop = true;
        Ok(TaskGoal::VmDelete)
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// Byte offset to read from (0: the start of the log of the current power-on).
    #[serde(default)]
    pub offset: u64,
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/vms/{name}/console", tag = "vms",
    params(("project" = String, Path), ("name" = String, Path), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn console(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> Result<Json<ConsoleChunk>, ApiError> {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 64 * 1024;
    let vm = load(&ctx, &project, &name).await?;
    // The log sits in the VM's run directory on its host, as the agent recorded it. Hosts of the
    // local lab share this machine's file system; relaying consoles of remote hosts is future work.
    // The directory is named by the VM's uid, so a host cannot point the console at another VM's log.
    let own_dir = corral_api::layout::vm_dir(&ctx.data_dir, vm.meta.uid);
    let run_dir = vm
        .status
        .run_dir
        .as_ref()
        .map(std::path::PathBuf::from)
        .filter(|d| {
            d.is_absolute()
                && d.file_name() == own_dir.file_name()
                && !d.components().any(|c| c == std::path::Component::ParentDir)
        })
        .unwrap_or(own_dir);
    let path = corral_api::layout::console_log(&run_dir);
    let mut data = Vec::new();
    if let Ok(mut f) = std::fs::File::open(&path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        // A log shorter than the offset was restarted by a new power-on: read it from the start.
        let offset = if q.offset > len { 0 } else { q.offset };
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        f.take(MAX)
            .read_to_end(&mut data)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let next = offset + data.len() as u64;
        return Ok(Json(ConsoleChunk {
            offset,
            next_offset: next,
            data: String::from_utf8_lossy(&data).into_owned(),
        }));
    }
    Ok(Json(ConsoleChunk {
        offset: 0,
        next_offset: 0,
        data: String::new(),
    }))
}
