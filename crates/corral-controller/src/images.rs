//! Image endpoints: build JeOS (a task), import an uploaded disk, list, delete.
//!
//! The files themselves are made by [`ImageFiles`], which the binary provides: building and
//! probing disks takes the hypervisor's tools, and the controller links no hypervisor.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use corral_api::{
    keys, validate_name, BuildJeosRequest, Image, ImagePhase, ImageSource, ImageSpec, ImageStatus,
    ObjectMeta, Task, TaskGoal,
};
use corral_store::{get_json, list_json, update_json, Op, Precondition, StoreError};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use crate::tasks::{self, End};
use crate::{ensure_project, ApiError, ApiJson, ApiPath, Ctx};

/// Why image files could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// What was uploaded is not a disk image the hosts can use (the client's mistake).
    #[error("{0}")]
    Bad(String),
    /// Building or storing the files failed.
    #[error("{0}")]
    Failed(String),
}

/// Progress of a build: percent, and what it does now.
pub type Progress = Box<dyn Fn(u8, &str) + Send + Sync>;

/// Makes and removes the files of images, in the controller's data dir.
#[async_trait::async_trait]
pub trait ImageFiles: Send + Sync {
    /// Builds JeOS as image `uid`, reporting progress (percent, what it does).
    async fn build_jeos(
        &self,
        uid: uuid::Uuid,
        progress: Progress,
    ) -> Result<ImageStatus, ImageError>;
    /// Checks the uploaded file `upload` and keeps it as image `uid`.
    async fn import(
        &self,
        uid: uuid::Uuid,
        upload: &std::path::Path,
    ) -> Result<ImageStatus, ImageError>;
    /// Removes the files of image `uid`, if any.
    fn remove(&self, uid: uuid::Uuid);
}

/// Image names that are API paths of their own.
fn validate_image_name(name: &str) -> Result<(), ApiError> {
    validate_name("image", name)?;
    if name == "build-jeos" {
        return Err(ApiError::BadRequest(
            "the image name build-jeos is reserved: pick another name".into(),
        ));
    }
    Ok(())
}

fn not_found(project: &str, name: &str) -> ApiError {
    ApiError::NotFound(format!("image {name} does not exist in project {project}"))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/images", tag = "images",
    params(("project" = String, Path)), responses((status = 200, body = [Image])), security(("bearer" = [])))]
pub async fn list(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<Vec<Image>>, ApiError> {
    ensure_project(&ctx, &project).await?;
    Ok(Json(
        list_json::<Image>(&*ctx.store, &keys::images(&project))
            .await?
            .0,
    ))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/images/{name}", tag = "images",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Image), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<Image>, ApiError> {
    ensure_project(&ctx, &project).await?;
    get_json::<Image>(&*ctx.store, &keys::image(&project, &name))
        .await?
        .map(|v| Json(v.value))
        .ok_or_else(|| not_found(&project, &name))
}

/// VMs of the project whose disk is a clone of the image.
async fn users(ctx: &Ctx, project: &str, image: &str) -> Result<Vec<String>, ApiError> {
    ctx.cache
        .vms_where(&*ctx.store, project, |v| v.spec.image == image)
        .await
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/images/build-jeos", tag = "images",
    params(("project" = String, Path)), request_body = BuildJeosRequest,
    responses((status = 202, description = "build started, or already built (the task says so)", body = Task),
        (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn build_jeos(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
    ApiJson(req): ApiJson<BuildJeosRequest>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    ensure_project(&ctx, &project).await?;
    let name = req.name.clone().unwrap_or_else(|| "jeos".into());
    validate_image_name(&name)?;
    let key = keys::image(&project, &name);
    let mut task = Task::new(
        &project,
        "image.build-jeos",
        format!("image/{name}"),
        TaskGoal::ImageBuild,
    );
    let existing = get_json::<Image>(&*ctx.store, &key).await?;
    let existing_status = existing.as_ref().map(|v| v.value.status.clone());
    let (image, when) = match existing {
        Some(v)
            if matches!(
                v.value.status.phase,
                ImagePhase::Building | ImagePhase::Deleting
            ) =>
        {
            return Err(ApiError::Conflict(format!(
                "image {name} is being built or deleted: follow its task (GET /api/v1/tasks)"
            )))
        }
        Some(v) if v.value.spec.source != ImageSource::Jeos => {
            return Err(ApiError::Conflict(format!(
                "image {name} exists and was imported: build under another name"
            )))
        }
        Some(v) if v.value.status.phase == ImagePhase::Ready && !req.rebuild => {
            // Cached: nothing to do, and the task says why.
            task.state = corral_api::TaskState::Succeeded;
            task.progress = 100;
            task.message = "already built; ask with rebuild: true to build it again".into();
            let task = tasks::submit(&ctx, task, vec![]).await?;
            return Ok((StatusCode::ACCEPTED, Json(task)));
        }
        Some(v) => {
            let mut img = v.value;
            img.meta.bump();
            (img, Precondition::ModRevision(v.revision))
        }
        None => (
            Image {
                meta: ObjectMeta::new(&project, &name),
                spec: ImageSpec {
                    source: ImageSource::Jeos,
                },
                status: ImageStatus {
                    phase: ImagePhase::Building,
                    format: None,
                    path: None,
                    virtual_bytes: 0,
                    actual_bytes: 0,
                    boot: None,
                    message: String::new(),
                },
            },
            Precondition::Absent,
        ),
    };
    let mut image = image;
    image.status.phase = ImagePhase::Building;
    image.status.message = "building".into();
    let op = Op::Put {
        key: key.clone(),
        value: serde_json::to_vec(&image).map_err(StoreError::from)?,
        when,
        lease: None,
    };
    let previous = existing_status;
    let task = match tasks::submit(&ctx, task, vec![op]).await {
        Ok(t) => t,
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::Conflict(format!(
                "image {name} changed while the build was being set up: try again"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    // Checked after the image is marked as building: a VM created from here on conflicts on the
    // image, and one created before is seen here. A rebuild would replace its backing file.
    if let Some(previous) = previous {
        let in_use = users(&ctx, &project, &name).await?;
        if !in_use.is_empty() {
            let msg = format!(
                "image {name} is used by VMs {}: their disks are backed by it; delete them first, or build under another name",
                in_use.join(", ")
            );
            update_json::<Image, StoreError>(&*ctx.store, &key, |img| {
                img.status = previous.clone();
                Ok(true)
            })
            .await?;
            tasks::update(&ctx, task.id, 100, "failed", Some(End::Failed(msg.clone()))).await;
            return Err(ApiError::Conflict(msg));
        }
    }
    let (ctx2, task_id, uid) = (ctx.clone(), task.id, image.meta.uid);
    tokio::spawn(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u8, String)>();
        let reporter = {
            let ctx = ctx2.clone();
            tokio::spawn(async move {
                while let Some((p, msg)) = rx.recv().await {
                    tasks::update(&ctx, task_id, p.min(99), &msg, None).await;
                }
            })
        };
        let progress: Progress = Box::new(move |p: u8, m: &str| {
            let _ = tx.send((p, m.to_string()));
        });
        let result = ctx2.image_files.build_jeos(uid, progress).await;
        let _ = reporter.await;
        let end = match &result {
            Ok(_) => End::Succeeded,
            Err(e) => End::Failed(e.to_string()),
        };
        let written = update_json::<Image, StoreError>(&*ctx2.store, &key, |img| {
            match &result {
                Ok(status) => img.status = status.clone(),
                Err(e) => {
                    img.status.phase = ImagePhase::Failed;
                    img.status.message = e.to_string();
                }
            }
            Ok(true)
        })
        .await;
        if let Err(e) = written {
            tracing::error!(error = %e, "could not record the built image");
        }
        tasks::update(
            &ctx2,
            task_id,
            100,
            if matches!(end, End::Succeeded) {
                "built"
            } else {
                "failed"
            },
            Some(end),
        )
        .await;
    });
    Ok((StatusCode::ACCEPTED, Json(task)))
}

#[utoipa::path(put, path = "/api/v1/projects/{project}/images/{name}", tag = "images",
    params(("project" = String, Path),
        ("name" = String, Path, description = "the new image's name: a DNS label", min_length = 1, max_length = 63, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the disk image: qcow2, or raw"),
    responses((status = 201, body = Image), (status = 400, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody),
        (status = 422, description = "the body is not a disk image (qcow2, or a raw disk with a partition table or file system), or a qcow2 that refers to other files", body = corral_api::ApiErrorBody),
        (status = 413, description = "the image is larger than 64 GiB", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn import(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    let key = keys::image(&project, &name);
    let announced = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_IMAGE_BYTES) {
        return Err(too_large());
    }
    let checked = async {
        ensure_project(&ctx, &project).await?;
        validate_image_name(&name)?;
        if ctx.store.get(&key).await?.is_some() {
            return Err(ApiError::Conflict(format!("image {name} already exists in project {project}: delete it first or pick another name")));
        }
        Ok(())
    }
    .await;
    if let Err(e) = checked {
        // Read the upload to its end before answering: a client still sending would otherwise see a
        // broken connection instead of the reason.
        let mut body = body;
        while let Some(Ok(_)) = body.frame().await {}
        return Err(e);
    }
    let uploads = ctx.data_dir.join("uploads");
    std::fs::create_dir_all(&uploads).map_err(|e| ApiError::Internal(e.to_string()))?;
    let tmp = uploads.join(format!("{}.part", uuid::Uuid::new_v4().simple()));
    let received = receive(body, &tmp).await;
    if let Err(e) = received {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let image_meta = ObjectMeta::new(&project, &name);
    let status = ctx.image_files.import(image_meta.uid, &tmp).await;
    let _ = std::fs::remove_file(&tmp);
    let status = status.map_err(|e| match e {
        ImageError::Bad(why) => ApiError::Unprocessable(format!("cannot import {name}: {why}")),
        ImageError::Failed(why) => ApiError::Internal(format!("importing {name}: {why}")),
    })?;
    let image = Image {
        meta: image_meta,
        spec: ImageSpec {
            source: ImageSource::Import,
        },
        status,
    };
    let value = serde_json::to_vec(&image).map_err(StoreError::from)?;
    match ctx.store.put(&key, value, Precondition::Absent).await {
        Ok(_) => Ok((StatusCode::CREATED, Json(image))),
        Err(StoreError::Conflict { .. }) => {
            ctx.image_files.remove(image.meta.uid);
            Err(ApiError::Conflict(format!(
                "image {name} was created meanwhile: pick another name"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// The largest disk image an upload may bring.
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

fn too_large() -> ApiError {
    ApiError::TooLarge(format!(
        "the image is larger than the {} an upload may bring",
        corral_api::format_bytes(MAX_IMAGE_BYTES)
    ))
}

/// Streams the upload into `path`, at most [`MAX_IMAGE_BYTES`].
async fn receive(body: Body, path: &std::path::Path) -> Result<(), ApiError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut body = body;
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::BadRequest(format!("the upload was interrupted: {e}")))?;
        if let Some(data) = frame.data_ref() {
            received += data.len() as u64;
            if received > MAX_IMAGE_BYTES {
                return Err(too_large());
            }
            file.write_all(data)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
    }
    file.flush()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}

#[utoipa::path(delete, path = "/api/v1/projects/{project}/images/{name}", tag = "images",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    ensure_project(&ctx, &project).await?;
    let key = keys::image(&project, &name);
    let image = get_json::<Image>(&*ctx.store, &key)
        .await?
        .ok_or_else(|| not_found(&project, &name))?;
    if matches!(
        image.value.status.phase,
        ImagePhase::Building | ImagePhase::Deleting
    ) {
        return Err(ApiError::Conflict(format!(
            "image {name} is being built or deleted: wait for that to finish"
        )));
    }
    // Mark it first, then look for users: a VM created from here on conflicts on the image, and
    // one created before is seen below.
    let changed = || ApiError::Conflict(format!("image {name} changed meanwhile: try again"));
    let mut marked = image.value.clone();
    marked.status.phase = ImagePhase::Deleting;
    let value = serde_json::to_vec(&marked).map_err(StoreError::from)?;
    let rev = match ctx
        .store
        .put(&key, value, Precondition::ModRevision(image.revision))
        .await
    {
        Ok(r) => r,
        Err(StoreError::Conflict { .. }) => return Err(changed()),
        Err(e) => return Err(e.into()),
    };
    let in_use = users(&ctx, &project, &name).await?;
    if !in_use.is_empty() {
        let value = serde_json::to_vec(&image.value).map_err(StoreError::from)?;
        ctx.store
            .put(&key, value, Precondition::ModRevision(rev))
            .await?;
        return Err(ApiError::Conflict(format!(
            "image {name} is in use by VMs {}: delete them first (their disks are backed by it)",
            in_use.join(", ")
        )));
    }
    match ctx.store.delete(&key, Precondition::ModRevision(rev)).await {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => return Err(changed()),
        Err(e) => return Err(e.into()),
    }
    ctx.image_files.remove(image.value.meta.uid);
    Ok(StatusCode::NO_CONTENT)
}
