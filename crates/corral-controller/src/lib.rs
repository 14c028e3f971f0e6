//! The control plane's front: the REST API under `/api/v1`. Handlers validate a request completely
//! (against the request itself and the cluster's state) before they write anything, then write the
//! desired state and a task in one store transaction. They never drive a hypervisor: host agents
//! reconcile what was written. Every endpoint but `/health` needs the bearer token.

pub mod agents;
mod auth;
mod cache;
mod datastores;
mod drs;
mod error;
mod events;
pub mod ha;
pub mod host_writes;
mod hosts;
mod images;
mod migrations;
mod networks;
mod placement;
mod tasks;
mod vms;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use corral_api::{keys, Health, Task};
use corral_store::{get_json, list_json, Precondition, Store, StoreError};
use utoipa::OpenApi;

pub use error::{ApiError, ApiJson, ApiPath, ApiQuery};
pub use host_writes::LocalHost;
pub use images::{ImageError, ImageFiles, Progress};

/// A page of a list (VMs, hosts): items in name order, after the one named `after`, at most `limit`.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most this many items, 1 to 1000 (default: all).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Only items whose names sort after this one: the last name of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

/// The most items one page holds.
pub const MAX_PAGE: usize = 1000;

impl PageQuery {
    /// How many items to return; a limit out of range is a 400 that says how to page.
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            Some(l) if l == 0 || l > MAX_PAGE => Err(ApiError::BadRequest(format!(
                "limit must be 1 to {MAX_PAGE}: page through more with `after` (the last name of a page)"
            ))),
            l => Ok(l.unwrap_or(usize::MAX)),
        }
    }

    /// Whether an item named `name` comes after the page's start.
    pub fn after_start(&self, name: &str) -> bool {
        self.after.as_deref().is_none_or(|a| name > a)
    }
}

/// What every handler needs.
#[derive(Clone)]
pub struct Ctx {
    pub store: Arc<dyn Store>,
    /// Where image files and VM run directories live (the all-in-one host's data dir).
    pub data_dir: PathBuf,
    admin_token_hash: Vec<u8>,
    /// Placement decisions are made one at a time.
    placement: Arc<tokio::sync::Mutex<()>>,
    /// The cluster CA (created in `DATA_DIR/pki` on first start).
    ca: Arc<corral_pki::Ca>,
    /// HA's failure detector.
    ha: Arc<ha::Monitor>,
    /// The latest DRS plan, which `drs apply PLAN` carries out.
    drs_plan: Arc<tokio::sync::Mutex<Option<corral_api::DrsPlan>>>,
    /// What placement, HA, DRS and the lists read, kept current from the store.
    cache: Arc<cache::Cache>,
    /// Makes and removes image files (the binary wires in the hypervisor's tools).
    image_files: Arc<dyn ImageFiles>,
    /// Free space of RBD datastores as last read for a VM create, and when.
    rbd_free: Arc<std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>>,
}

/// Prepares the store (the default project, the hash of the admin token) and resumes tasks.
/// The token itself lives with the operator (the binary keeps it in a 0600 file); the store only
/// holds its SHA-256, written on every start, so the file is the one source of truth.
pub async fn init(
    store: Arc<dyn Store>,
    data_dir: PathBuf,
    image_files: Arc<dyn ImageFiles>,
    admin_token: &str,
) -> Result<Ctx, ApiError> {
    let project = keys::project(corral_api::DEFAULT_PROJECT);
    match store
        .put(&project, b"{}".to_vec(), Precondition::Absent)
        .await
    {
        Ok(_) | Err(StoreError::Conflict { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let hash = auth::hash(admin_token);
    let stored = store.get(keys::ADMIN_TOKEN).await?;
    if stored.is_none_or(|kv| kv.value != hash) {
        store
            .put(keys::ADMIN_TOKEN, hash.clone(), Precondition::Any)
            .await?;
    }
    let ca = corral_pki::Ca::load_or_create(&data_dir.join("pki"))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let cache = cache::Cache::start(store.clone()).await?;
    let ctx = Ctx {
        cache,
        store,
        data_dir,
        admin_token_hash: hash,
        placement: Default::default(),
        ca: Arc::new(ca),
        ha: Default::default(),
        drs_plan: Default::default(),
        image_files,
        rbd_free: Arc::default(),
    };
    tasks::resume(&ctx).await?;
    spawn_placer(ctx.clone());
    tasks::spawn_janitor(ctx.clone());
    ha::spawn(ctx.clone());
    drs::spawn(ctx.clone());
    Ok(ctx)
}

/// A new random API token.
pub fn new_token() -> String {
    auth::new_token()
}

pub(crate) async fn ensure_project(ctx: &Ctx, project: &str) -> Result<(), ApiError> {
    if ctx.store.get(&keys::project(project)).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "project {project} does not exist: create it first (POST /api/v1/projects)"
        )));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/health", tag = "system", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// A page of the task list: newest first, after the task `after`, at most `limit`.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskPageQuery {
    /// At most this many tasks, 1 to 1000 (default: all).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Only tasks older than this one: the id of the last task of the previous page.
    #[serde(default)]
    pub after: Option<uuid::Uuid>,
}

#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(TaskPageQuery),
    responses((status = 200, description = "newest first; finished tasks are kept for 7 days (the newest 10,000)", body = [Task]),
        (status = 400, body = corral_api::ApiErrorBody),
        (status = 404, description = "`after` names no task (it may have expired)", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
async fn list_tasks(
    State(ctx): State<Ctx>,
    ApiQuery(q): ApiQuery<TaskPageQuery>,
) -> Result<Json<Vec<Task>>, ApiError> {
    let limit = PageQuery {
        limit: q.limit,
        after: None,
    }
    .limit()?;
    let (mut tasks, _) = list_json::<Task>(&*ctx.store, keys::TASKS).await?;
    tasks.sort_by(tasks::newest_first);
    let start = match q.after {
        Some(id) => match tasks.iter().position(|t| t.id == id) {
            Some(i) => i + 1,
            None => {
                return Err(ApiError::NotFound(format!(
                    "there is no task {id} to page after (it may have expired): list from the start"
                )))
            }
        },
        None => 0,
    };
    Ok(Json(tasks.into_iter().skip(start).take(limit).collect()))
}

#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks", params(("id" = uuid::Uuid, Path)),
    responses((status = 200, body = Task), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
async fn get_task(
    State(ctx): State<Ctx>,
    ApiPath(id): ApiPath<uuid::Uuid>,
) -> Result<Json<Task>, ApiError> {
    get_json::<Task>(&*ctx.store, &keys::task(id))
        .await?
        .map(|v| Json(v.value))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "task {id} does not exist (finished tasks expire after 7 days)"
            ))
        })
}

#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", tag = "tasks", params(("id" = uuid::Uuid, Path)),
    responses((status = 202, description = "asked to stop; follow the task to its end", body = Task),
        (status = 404, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
async fn cancel_task(
    State(ctx): State<Ctx>,
    ApiPath(id): ApiPath<uuid::Uuid>,
) -> Result<(axum::http::StatusCode, Json<Task>), ApiError> {
    let Json(task) = get_task(State(ctx.clone()), ApiPath(id)).await?;
    if task.is_finished() {
        return Err(ApiError::Conflict(format!(
            "task {id} already ended ({:?}); nothing to cancel",
            task.state
        )));
    }
    migrations::cancel(&ctx, &task).await?;
    let Json(task) = get_task(State(ctx), ApiPath(id)).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(task)))
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What every operation shares, stated once: operationIds unique across the document (the tag and
/// the handler, e.g. `vms_list`, `hosts_list`, so generated clients do not collide), 401 on every
/// operation that needs the token, 413 on every operation that takes a JSON body.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ApiErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for (path, item) in api.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                let tag = op
                    .tags
                    .as_ref()
                    .and_then(|t| t.first())
                    .cloned()
                    .unwrap_or_default();
                if let Some(id) = op.operation_id.as_mut() {
                    if !id.starts_with(&format!("{tag}_")) {
                        *id = format!("{tag}_{id}");
                    }
                }
                let r = &mut op.responses.responses;
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    r.entry("401".into()).or_insert_with(|| {
                        error("no token, or not a valid one: send Authorization: Bearer TOKEN")
                    });
                }
                let json_body = op
                    .request_body
                    .as_ref()
                    .is_some_and(|b| b.content.contains_key("application/json"));
                let params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
                if json_body || params {
                    r.entry("400".into())
                        .or_insert_with(|| error("the body or a parameter is not valid"));
                }
                if path.contains('{') {
                    r.entry("404".into()).or_insert_with(|| {
                        error("the project, or the object the path names, does not exist")
                    });
                }
                if json_body {
                    r.entry("413".into())
                        .or_insert_with(|| error("the request body is larger than 1 MiB"));
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Corral API", description = "Corral, an open virtual datacenter OS: VMs, images, hosts, networks and tasks."),
    paths(
        health, list_tasks, get_task, cancel_task, events::list,
        hosts::list, hosts::get, hosts::remove, hosts::maintenance, hosts::set_capacity, hosts::join_token, hosts::get_cluster, hosts::put_cluster,
        hosts::list_groups, hosts::get_group, hosts::create_group, hosts::delete_group,
        datastores::list, datastores::get, datastores::create, datastores::delete,
        vms::list, vms::get, vms::create, vms::start, vms::stop, vms::reboot, vms::delete, vms::console,
        vms::move_storage, migrations::migrate, migrations::get,
        networks::list, networks::get, networks::create, networks::delete,
        networks::list_groups, networks::get_group, networks::create_group, networks::set_rules, networks::delete_group,
        networks::list_projects, networks::create_project,
        drs::get_plan, drs::apply,
        images::list, images::get, images::build_jeos, images::import, images::delete,
    ),
    modifiers(&BearerAuth, &CommonResponses)
)]
struct ApiDoc;

/// The OpenAPI document of this API, as served at `/api/v1/openapi.json` and committed in `docs/`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The API's routes.
pub fn router(ctx: Ctx) -> Router {
    let p = "/api/v1/projects/{project}";
    let authed = Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/hosts", get(hosts::list))
        .route("/api/v1/hosts/join-tokens", post(hosts::join_token))
        .route(
            "/api/v1/hosts/{name}",
            get(hosts::get).delete(hosts::remove),
        )
        .route("/api/v1/hosts/{name}/maintenance", put(hosts::maintenance))
        .route("/api/v1/hosts/{name}/capacity", put(hosts::set_capacity))
        .route(
            "/api/v1/cluster",
            get(hosts::get_cluster).put(hosts::put_cluster),
        )
        .route(
            "/api/v1/datastores",
            get(datastores::list).post(datastores::create),
        )
        .route(
            "/api/v1/datastores/{name}",
            get(datastores::get).delete(datastores::delete),
        )
        .route(
            &format!("{p}/groups"),
            get(hosts::list_groups).post(hosts::create_group),
        )
        .route(
            &format!("{p}/groups/{{name}}"),
            get(hosts::get_group).delete(hosts::delete_group),
        )
        .route(
            "/api/v1/projects",
            get(networks::list_projects).post(networks::create_project),
        )
        .route(
            &format!("{p}/networks"),
            get(networks::list).post(networks::create),
        )
        .route(
            &format!("{p}/networks/{{name}}"),
            get(networks::get).delete(networks::delete),
        )
        .route(
            &format!("{p}/security-groups"),
            get(networks::list_groups).post(networks::create_group),
        )
        .route(
            &format!("{p}/security-groups/{{name}}"),
            get(networks::get_group)
                .put(networks::set_rules)
                .delete(networks::delete_group),
        )
        .route("/api/v1/drs/plan", get(drs::get_plan))
        .route("/api/v1/drs/apply", post(drs::apply))
        .route("/api/v1/tasks", get(list_tasks))
        .route("/api/v1/events", get(events::list))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route(&format!("{p}/vms"), get(vms::list).post(vms::create))
        .route(
            &format!("{p}/vms/{{name}}"),
            get(vms::get).delete(vms::delete),
        )
        .route(&format!("{p}/vms/{{name}}/start"), post(vms::start))
        .route(&format!("{p}/vms/{{name}}/stop"), post(vms::stop))
        .route(&format!("{p}/vms/{{name}}/reboot"), post(vms::reboot))
        .route(
            &format!("{p}/vms/{{name}}/migrate"),
            post(migrations::migrate),
        )
        .route(
            &format!("{p}/vms/{{name}}/move-storage"),
            post(vms::move_storage),
        )
        .route(&format!("{p}/vms/{{name}}/migration"), get(migrations::get))
        .route(&format!("{p}/vms/{{name}}/console"), get(vms::console))
        .route(&format!("{p}/images"), get(images::list))
        .route(&format!("{p}/images/build-jeos"), post(images::build_jeos))
        .route(
            &format!("{p}/images/{{name}}"),
            get(images::get)
                .put(images::import)
                .delete(images::delete)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route_layer(axum::middleware::from_fn(refuse_large_bodies))
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/api/v1/health", get(health))
        .merge(authed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(ctx)
}

/// Refuses a request whose announced body is over [`MAX_JSON_BODY`] at once, before reading it
/// (an image upload has its own limit, checked by its handler). A body sent without a length is
/// cut off at the limit as it arrives.
async fn refuse_large_bodies(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // PUT /api/v1/projects/{project}/images/{name}
    let segments: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let upload = req.method() == axum::http::Method::PUT
        && matches!(segments[..], ["api", "v1", "projects", _, "images", _]);
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if !upload && announced.is_some_and(|n| n > MAX_JSON_BODY as u64) {
        return ApiError::too_large_json().into_response();
    }
    next.run(req).await
}

/// The largest JSON request body the API takes (image uploads have their own limit:
/// `images::MAX_IMAGE_BYTES`).
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Places VMs that wait for a host, removes waiting VMs whose deletion was asked for, and moves
/// running VMs off hosts in maintenance.
fn spawn_placer(ctx: Ctx) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = placement::place_pending(&ctx).await {
                tracing::warn!(error = %e, "placing pending VMs failed");
            }
            if let Err(e) = migrations::give_up_stale(&ctx).await {
                tracing::warn!(error = %e, "checking migrations failed");
            }
            if let Err(e) = migrations::evacuate(&ctx).await {
                tracing::warn!(error = %e, "evacuating hosts in maintenance failed");
            }
        }
    });
}
