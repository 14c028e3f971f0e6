//! Hosts, cluster placement settings and VM groups: the cluster's compute.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use corral_api::{
    keys, ClusterSettings, CreateGroupRequest, Datastore, Host, HostInfo, MaintenanceResponse,
    ObjectMeta, VmGroup,
};
use corral_store::{get_json, list_json, Op, Precondition, StoreError};
use serde::{Deserialize, Serialize};

use crate::{ensure_project, placement, ApiError, ApiJson, ApiPath, ApiQuery, Ctx, PageQuery};

fn host_not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("host {name} does not exist"))
}

#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts", params(PageQuery),
    responses((status = 200, description = "in name order", body = [HostInfo]), (status = 400, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(ctx): State<Ctx>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Vec<HostInfo>>, ApiError> {
    let limit = q.limit()?;
    Ok(Json(infos(&ctx, |h| q.after_start(h), limit).await?))
}

/// The hosts `select` takes (at most `limit`) as the API shows them, with what HA's failure
/// detector sees of each.
async fn infos(
    ctx: &Ctx,
    select: impl Fn(&str) -> bool,
    limit: usize,
) -> Result<Vec<HostInfo>, ApiError> {
    let (_, mut infos) = view_of(ctx, select, limit).await?;
    for i in &mut infos {
        i.ha = ctx.ha.describe(&i.host.name);
        i.isolation_response = ctx.ha.applied_response(&i.host.name);
    }
    Ok(infos)
}

/// The hosts `select` takes (at most `limit`) and the view they were read from; the cache's lock
/// is held only while the hosts' VMs are picked out.
async fn view_of(
    ctx: &Ctx,
    select: impl Fn(&str) -> bool,
    limit: usize,
) -> Result<(placement::ClusterView, Vec<HostInfo>), ApiError> {
    let (view, chosen) = {
        let o = ctx.cache.read(&*ctx.store).await?;
        let view = placement::ClusterView::new(&o, ctx);
        let chosen = view.hosts_with_vms(&o, select, limit);
        (view, chosen)
    };
    let infos = view.host_infos(chosen, |h| ctx.ha.last_seen(h));
    Ok((view, infos))
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}", tag = "hosts", params(("name" = String, Path)),
    responses((status = 200, body = HostInfo), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(ctx): State<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<HostInfo>, ApiError> {
    infos(&ctx, |h| h == name, 1)
        .await?
        .pop()
        .map(Json)
        .ok_or_else(|| host_not_found(&name))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{name}", tag = "hosts", params(("name" = String, Path)),
    responses((status = 204, description = "removed; its certificate no longer opens the agent endpoint"),
        (status = 404, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn remove(
    State(ctx): State<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let (view, mut infos) = view_of(&ctx, |h| h == name, 1).await?;
    let Some(info) = infos.pop() else {
        return Err(host_not_found(&name));
    };
    let rev = view.host_revision(&name);
    if !info.vms.is_empty() {
        return Err(ApiError::Conflict(format!(
            "host {name} still has VMs {}: move them (put the host in maintenance) or delete them first",
            info.vms.join(", ")
        )));
    }
    // The host record and every certificate issued to the host go in one transaction; a VM placed
    // there meanwhile conflicts with the host's revision.
    let mut ops = vec![Op::Delete {
        key: keys::host(&name),
        when: Precondition::ModRevision(rev),
    }];
    let (certs, _) = ctx.store.list(crate::agents::CERTS).await?;
    ops.extend(
        certs
            .into_iter()
            .filter(|kv| kv.value == name.as_bytes())
            .map(|kv| Op::Delete {
                key: kv.key,
                when: Precondition::ModRevision(kv.mod_revision),
            }),
    );
    match ctx.store.txn(ops).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => Err(ApiError::Conflict(
            format!("host {name} changed meanwhile: try again"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Body of `PUT /api/v1/hosts/{name}/maintenance`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MaintenanceRequest {
    /// true: enter maintenance (no new VMs); false: return to service.
    pub maintenance: bool,
}

#[utoipa::path(put, path = "/api/v1/hosts/{name}/maintenance", tag = "hosts", params(("name" = String, Path)),
    request_body = MaintenanceRequest,
    responses((status = 200, description = "the host, and when entering, the task that follows its evacuation by live migration", body = MaintenanceResponse),
        (status = 404, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn maintenance(
    State(ctx): State<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<MaintenanceRequest>,
) -> Result<Json<MaintenanceResponse>, ApiError> {
    let key = keys::host(&name);
    // A heartbeat may land between read and write: read again and retry.
    let task = loop {
        let Some(current) = get_json::<Host>(&*ctx.store, &key).await? else {
            return Err(host_not_found(&name));
        };
        let mut host = current.value;
        host.maintenance = req.maintenance;
        let put = Op::Put {
            key: key.clone(),
            value: serde_json::to_vec(&host).map_err(StoreError::from)?,
            when: Precondition::ModRevision(current.revision),
            lease: None,
        };
        // The flag and the task that follows the evacuation are written together.
        let written = if req.maintenance {
            let goal = corral_api::TaskGoal::HostEvacuate { host: name.clone() };
            let task = corral_api::Task::new(
                corral_api::DEFAULT_PROJECT,
                "host.evacuate",
                format!("host/{name}"),
                goal,
            );
            crate::tasks::submit(&ctx, task, vec![put]).await.map(Some)
        } else {
            ctx.store.txn(vec![put]).await.map(|_| None)
        };
        match written {
            Ok(task) => break task,
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let Json(host) = get(State(ctx), ApiPath(name)).await?;
    Ok(Json(MaintenanceResponse { host, task }))
}

#[utoipa::path(put, path = "/api/v1/hosts/{name}/capacity", tag = "hosts", params(("name" = String, Path)),
    request_body = corral_api::Capacity,
    responses((status = 200, description = "the host; its agent's next report (within 30 s) is believed up to the new capacity", body = HostInfo),
        (status = 400, body = corral_api::ApiErrorBody), (status = 404, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn set_capacity(
    State(ctx): State<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<corral_api::Capacity>,
) -> Result<Json<HostInfo>, ApiError> {
    req.check()?;
    let key = keys::host(&name);
    // A heartbeat may land between read and write: read again and retry.
    loop {
        let Some(current) = get_json::<Host>(&*ctx.store, &key).await? else {
            return Err(host_not_found(&name));
        };
        let mut host = current.value;
        host.approved = Some(req);
        let put = Op::Put {
            key: key.clone(),
            value: serde_json::to_vec(&host).map_err(StoreError::from)?,
            when: Precondition::ModRevision(current.revision),
            lease: None,
        };
        match ctx.store.txn(vec![put]).await {
            Ok(_) => break,
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    get(State(ctx), ApiPath(name)).await
}

#[utoipa::path(post, path = "/api/v1/hosts/join-tokens", tag = "hosts", request_body = crate::agents::JoinTokenRequest,
    responses((status = 201, description = "a single-use token a new host joins with", body = crate::agents::JoinToken)),
    security(("bearer" = [])))]
pub async fn join_token(
    State(ctx): State<Ctx>,
    ApiJson(req): ApiJson<crate::agents::JoinTokenRequest>,
) -> Result<(StatusCode, Json<crate::agents::JoinToken>), ApiError> {
    let secs = req.ttl_seconds.unwrap_or(3600);
    if !(60..=7 * 24 * 3600).contains(&secs) {
        return Err(ApiError::BadRequest(format!(
            "ttl_seconds {secs} is out of range: a join token lives 60 s to 7 days (604800 s)"
        )));
    }
    let ttl = std::time::Duration::from_secs(secs);
    let token = crate::agents::new_join_token(&ctx, &ctx.ca, ttl).await?;
    Ok((StatusCode::CREATED, Json(token)))
}

#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, body = ClusterSettings)), security(("bearer" = [])))]
pub async fn get_cluster(State(ctx): State<Ctx>) -> Result<Json<ClusterSettings>, ApiError> {
    Ok(Json(placement::settings(&ctx).await?))
}

#[utoipa::path(put, path = "/api/v1/cluster", tag = "cluster", request_body = ClusterSettings,
    responses((status = 200, body = ClusterSettings), (status = 400, body = corral_api::ApiErrorBody),
        (status = 409, description = "the cluster has too few hosts to tolerate that many failures", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn put_cluster(
    State(ctx): State<Ctx>,
    ApiJson(req): ApiJson<ClusterSettings>,
) -> Result<Json<ClusterSettings>, ApiError> {
    req.validate()?;
    let mut view = placement::view(&ctx).await?;
    if req.ha_host_failures_to_tolerate as usize >= view.hosts.len().max(1) {
        return Err(ApiError::Conflict(format!(
            "ha_host_failures_to_tolerate {} leaves no host to restart VMs on: the cluster has {} host(s); tolerate fewer failures",
            req.ha_host_failures_to_tolerate,
            view.hosts.len()
        )));
    }
    view.settings = req.clone();
    let (datastores, _) = list_json::<Datastore>(&*ctx.store, keys::DATASTORES).await?;
    crate::ha::admission(&view, &datastores, None)?;
    let bytes = serde_json::to_vec(&req).map_err(StoreError::from)?;
    ctx.store
        .put(keys::CLUSTER, bytes, Precondition::Any)
        .await?;
    Ok(Json(req))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/groups", tag = "groups", params(("project" = String, Path)),
    responses((status = 200, body = [VmGroup])), security(("bearer" = [])))]
pub async fn list_groups(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<Vec<VmGroup>>, ApiError> {
    ensure_project(&ctx, &project).await?;
    Ok(Json(
        list_json::<VmGroup>(&*ctx.store, &keys::groups(&project))
            .await?
            .0,
    ))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/groups/{name}", tag = "groups",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = VmGroup), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn get_group(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<VmGroup>, ApiError> {
    ensure_project(&ctx, &project).await?;
    get_json::<VmGroup>(&*ctx.store, &keys::group(&project, &name))
        .await?
        .map(|v| Json(v.value))
        .ok_or_else(|| {
            ApiError::NotFound(format!("group {name} does not exist in project {project}"))
        })
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/groups", tag = "groups", params(("project" = String, Path)),
    request_body = CreateGroupRequest,
    responses((status = 201, body = VmGroup), (status = 400, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn create_group(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
    ApiJson(req): ApiJson<CreateGroupRequest>,
) -> Result<(StatusCode, Json<VmGroup>), ApiError> {
    ensure_project(&ctx, &project).await?;
    req.validate()?;
    let group = VmGroup {
        meta: ObjectMeta::new(&project, &req.name),
        rule: req.rule,
        strength: req.strength,
        members: req.members,
    };
    let bytes = serde_json::to_vec(&group).map_err(StoreError::from)?;
    match ctx.store.put(&keys::group(&project, &req.name), bytes, Precondition::Absent).await {
        Ok(_) => Ok((StatusCode::CREATED, Json(group))),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "a group named {} already exists in project {project}: delete it first or pick another name",
            req.name
        ))),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(delete, path = "/api/v1/projects/{project}/groups/{name}", tag = "groups",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn delete_group(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    ensure_project(&ctx, &project).await?;
    match ctx
        .store
        .delete(&keys::group(&project, &name), Precondition::Any)
        .await
    {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::NotFound { .. }) => Err(ApiError::NotFound(format!(
            "group {name} does not exist in project {project}"
        ))),
        Err(e) => Err(e.into()),
    }
}
