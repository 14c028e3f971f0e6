//! Datastores: where VM disks live. A `dir` datastore is a path on the hosts (shared or not); an
//! `rbd` datastore is a Ceph pool, which the controller checks with the given user and key before
//! it records anything, and whose key it keeps as a secret that hosts read and the API never
//! returns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use corral_api::{
    format_bytes, keys, layout, CreateDatastoreRequest, Datastore, DatastoreDetail, DatastoreKind,
    DatastoreSecret, DatastoreUsage, RbdSettings,
};
use corral_ceph::{CephError, Pool};
use corral_store::{get_json, list_json, Op, Precondition, StoreError};

use crate::{ApiError, ApiJson, ApiPath, Ctx};

fn datastore_not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("datastore {name} does not exist"))
}

#[utoipa::path(get, path = "/api/v1/datastores", tag = "datastores",
    responses((status = 200, description = "the datastores; `local` (each host's data dir) is built in and not listed", body = [Datastore])),
    security(("bearer" = [])))]
pub async fn list(State(ctx): State<Ctx>) -> Result<Json<Vec<Datastore>>, ApiError> {
    Ok(Json(
        list_json::<Datastore>(&*ctx.store, keys::DATASTORES)
            .await?
            .0,
    ))
}

#[utoipa::path(get, path = "/api/v1/datastores/{name}", tag = "datastores", params(("name" = String, Path)),
    responses((status = 200, description = "the datastore, with its space as its storage reports it now (RBD)", body = DatastoreDetail),
        (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(ctx): State<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<DatastoreDetail>, ApiError> {
    let ds = get_json::<Datastore>(&*ctx.store, &keys::datastore(&name))
        .await?
        .ok_or_else(|| datastore_not_found(&name))?
        .value;
    let (usage, usage_error) = match ds.kind {
        DatastoreKind::Dir => (None, None),
        DatastoreKind::Rbd => match rbd_usage(&ctx, &ds).await {
            Ok(u) => (Some(u), None),
            Err(e) => (None, Some(e.to_string())),
        },
    };
    Ok(Json(DatastoreDetail {
        datastore: ds,
        usage,
        usage_error,
    }))
}

async fn rbd_usage(ctx: &Ctx, ds: &Datastore) -> Result<DatastoreUsage, ApiError> {
    let u = stored_pool(ctx, ds)
        .await?
        .usage()
        .await
        .map_err(ceph_failed)?;
    let capacity = u.used.saturating_add(u.available);
    Ok(DatastoreUsage {
        capacity_bytes: capacity,
        used_bytes: u.used,
        provisioned_bytes: u.provisioned,
        overcommit: if capacity == 0 {
            0.0
        } else {
            // Two decimals are all anyone reads.
            (u.provisioned as f64 / capacity as f64 * 100.0).round() / 100.0
        },
    })
}

/// How long a pool's free space, as read for a VM create, is believed (50 creates at once ask
/// Ceph once).
const FREE_SPACE_TTL: Duration = Duration::from_secs(5);

/// Refuses a disk of `bytes` on the RBD datastore `ds` when its pool has less space free: thin
/// disks share the free space, but a disk larger than all of it would fill the pool before the
/// guest filled the disk.
pub(crate) async fn check_room(ctx: &Ctx, ds: &Datastore, bytes: u64) -> Result<(), ApiError> {
    let cached = ctx
        .rbd_free
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&ds.name)
        .filter(|(at, _)| at.elapsed() < FREE_SPACE_TTL)
        .map(|(_, free)| *free);
    let free = match cached {
        Some(f) => f,
        None => {
            let (_, free) = stored_pool(ctx, ds).await?.space().await.map_err(|e| {
                ApiError::Unavailable(format!(
                    "datastore {} cannot be reached to see whether the disk fits: {e}",
                    ds.name
                ))
            })?;
            ctx.rbd_free
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(ds.name.clone(), (Instant::now(), free));
            free
        }
    };
    if bytes > free {
        return Err(ApiError::Conflict(format!(
            "a disk of {} cannot fit on datastore {}: its pool has {} free; give a smaller --disk, free space in the pool, or use another datastore",
            format_bytes(bytes),
            ds.name,
            format_bytes(free)
        )));
    }
    Ok(())
}

fn ceph_failed(e: CephError) -> ApiError {
    ApiError::Unavailable(format!("Ceph: {e}"))
}

/// The pool of a recorded RBD datastore, configured in the controller's data dir.
async fn stored_pool(ctx: &Ctx, ds: &Datastore) -> Result<Pool, ApiError> {
    let settings = ds
        .rbd
        .as_ref()
        .ok_or_else(|| ApiError::Internal(format!("datastore {} has no RBD settings", ds.name)))?;
    let secret = get_json::<DatastoreSecret>(&*ctx.store, &keys::datastore_secret(&ds.name))
        .await?
        .ok_or_else(|| {
            ApiError::Internal(format!("datastore {} has no Ceph key recorded", ds.name))
        })?;
    configure(
        layout::ceph_dir(&ctx.data_dir, &ds.name),
        settings,
        &secret.value.key,
    )
}

fn configure(dir: PathBuf, settings: &RbdSettings, key: &str) -> Result<Pool, ApiError> {
    Pool::configure(&dir, settings, key).map_err(|e| match e {
        CephError::Invalid(v) => v.into(),
        e => ApiError::Internal(e.to_string()),
    })
}

/// Opens the pool with the user and key given, from a directory of its own that is removed
/// afterwards, so nothing of a refused datastore stays behind.
async fn check_pool(
    ctx: &Ctx,
    name: &str,
    settings: &RbdSettings,
    key: &str,
) -> Result<(), ApiError> {
    let scratch = ctx
        .data_dir
        .join("ceph")
        .join(format!(".check-{}", uuid::Uuid::new_v4().simple()));
    let checked = async {
        configure(scratch.clone(), settings, key)?
            .check()
            .await
            .map_err(|e| {
                ApiError::Unprocessable(format!(
                    "datastore {name} cannot be used: {e}; check the pool, the monitors, the user and its key (the user needs caps mon 'profile rbd' and osd 'profile rbd pool={}')",
                    settings.pool
                ))
            })
    }
    .await;
    remove_dir(&scratch);
    checked
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a Ceph directory");
        }
    }
}

#[utoipa::path(post, path = "/api/v1/datastores", tag = "datastores", request_body = CreateDatastoreRequest,
    responses((status = 201, body = Datastore), (status = 400, body = corral_api::ApiErrorBody),
        (status = 409, body = corral_api::ApiErrorBody),
        (status = 422, description = "the fields are well-formed but do not go together, or the RBD pool cannot be opened with them (Ceph's reason is given)", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(ctx): State<Ctx>,
    ApiJson(req): ApiJson<CreateDatastoreRequest>,
) -> Result<(StatusCode, Json<Datastore>), ApiError> {
    req.validate()?;
    let key = keys::datastore(&req.name);
    let taken = || {
        ApiError::Conflict(format!(
            "a datastore named {} already exists: pick another name",
            req.name
        ))
    };
    // Before Ceph is asked (which may take seconds): the name is checked again when written.
    if ctx.store.get(&key).await?.is_some() {
        return Err(taken());
    }
    let mut ds = Datastore {
        name: req.name.clone(),
        kind: req.kind,
        path: req.path.clone().unwrap_or_default(),
        shared: req.shared,
        rbd: None,
        created_at: chrono::Utc::now(),
        deleting: false,
    };
    let mut ops = Vec::new();
    if let Some(rbd) = &req.rbd {
        check_pool(&ctx, &req.name, &rbd.settings, &rbd.key).await?;
        // Every host reaches the pool through its monitors.
        ds.shared = true;
        ds.rbd = Some(rbd.settings.clone());
        let secret = DatastoreSecret {
            key: rbd.key.clone(),
        };
        ops.push(Op::Put {
            key: keys::datastore_secret(&req.name),
            value: serde_json::to_vec(&secret).map_err(StoreError::from)?,
            when: Precondition::Any,
            lease: None,
        });
    }
    ops.push(Op::Put {
        key,
        value: serde_json::to_vec(&ds).map_err(StoreError::from)?,
        when: Precondition::Absent,
        lease: None,
    });
    match ctx.store.txn(ops).await {
        Ok(_) => Ok((StatusCode::CREATED, Json(ds))),
        Err(StoreError::Conflict { .. }) => Err(taken()),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(delete, path = "/api/v1/datastores/{name}", tag = "datastores", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody),
        (status = 503, description = "the images Corral stored in the RBD pool could not be removed; the datastore is kept", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(ctx): State<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let key = keys::datastore(&name);
    let ds = get_json::<Datastore>(&*ctx.store, &key)
        .await?
        .ok_or_else(|| datastore_not_found(&name))?;
    // Mark it first, then look for users: a VM created from here on conflicts on the datastore.
    let mut marked = ds.value.clone();
    marked.deleting = true;
    let changed = || ApiError::Conflict(format!("datastore {name} changed meanwhile: try again"));
    let rev = match ctx
        .store
        .put(
            &key,
            serde_json::to_vec(&marked).map_err(StoreError::from)?,
            Precondition::ModRevision(ds.revision),
        )
        .await
    {
        Ok(r) => r,
        Err(StoreError::Conflict { .. }) => return Err(changed()),
        Err(e) => return Err(e.into()),
    };
    let unmark = |rev| {
        let store = ctx.store.clone();
        let value = serde_json::to_vec(&ds.value).map_err(StoreError::from);
        async move {
            store
                .put(&key, value?, Precondition::ModRevision(rev))
                .await?;
            Ok::<_, ApiError>(())
        }
    };
    let (vms, _) = list_json::<corral_api::Vm>(&*ctx.store, keys::VMS).await?;
    let users: Vec<String> = vms
        .iter()
        .filter(|v| v.spec.datastore == name)
        .map(|v| format!("{}/{}", v.meta.project, v.meta.name))
        .collect();
    if !users.is_empty() {
        unmark(rev).await?;
        return Err(ApiError::Conflict(format!(
            "datastore {name} holds the disks of VMs {}: delete them first",
            users.join(", ")
        )));
    }
    if ds.value.kind == DatastoreKind::Rbd {
        if let Err(e) = remove_rbd_images(&ctx, &ds.value).await {
            unmark(rev).await?;
            return Err(ApiError::Unavailable(format!(
                "datastore {name} is kept: the images Corral stored in its pool could not be removed ({e}); try again once Ceph answers"
            )));
        }
    }
    let mut ops = vec![Op::Delete {
        key: keys::datastore(&name),
        when: Precondition::ModRevision(rev),
    }];
    if ds.value.kind == DatastoreKind::Rbd {
        ops.push(Op::Delete {
            key: keys::datastore_secret(&name),
            when: Precondition::Any,
        });
    }
    match ctx.store.txn(ops).await {
        Ok(_) => {
            remove_dir(&layout::ceph_dir(&ctx.data_dir, &name));
            Ok(StatusCode::NO_CONTENT)
        }
        Err(StoreError::Conflict { .. }) => Err(changed()),
        Err(e) => Err(e.into()),
    }
}

/// Fences the disk of the VM `uid` on the RBD datastore `ds` ([`Pool::fence_image`]): the
/// addresses of the clients cut off.
pub(crate) async fn fence_disk(
    ctx: &Ctx,
    ds: &Datastore,
    uid: uuid::Uuid,
) -> Result<Vec<String>, ApiError> {
    stored_pool(ctx, ds)
        .await?
        .fence_image(&layout::rbd_vm_disk(uid))
        .await
        .map_err(ceph_failed)
}

/// Removes every image Corral made in the pool (no VM uses the datastore any more): what is left
/// of disks first (clones a crash left half made), then the stored images they were cloned from.
/// Images of others in the pool are left alone.
async fn remove_rbd_images(ctx: &Ctx, ds: &Datastore) -> Result<(), ApiError> {
    let pool = stored_pool(ctx, ds).await?;
    let images = pool.images().await.map_err(ceph_failed)?;
    let ours = |kind: &str| {
        let prefix = format!("{}{kind}-", layout::RBD_IMAGE_PREFIX);
        images
            .iter()
            .filter(move |i| i.starts_with(&prefix))
            .cloned()
    };
    for disk in ours("vm") {
        pool.remove(&disk).await.map_err(ceph_failed)?;
    }
    for base in ours("image") {
        pool.remove_base(&base).await.map_err(ceph_failed)?;
    }
    Ok(())
}
