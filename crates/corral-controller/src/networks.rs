//! Networks, address management, security groups and projects: the definitions the hosts' network
//! reconcilers make real. Addresses are handed out here, at VM creation, and recorded both in the
//! VM's spec and as a reservation key per address, written in the VM's own transaction, so two VMs
//! never get one address. A reservation whose VM is gone is free again.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use corral_api::{
    generated_mac, keys, parse_mac, AttachedNic, Cidr, CreateNetworkRequest, CreateProjectRequest,
    CreateSecurityGroupRequest, Network, NetworkSpec, Nic, NicRequest, ObjectMeta, SecurityGroup,
    SecurityRule, Segment, SetRulesRequest, Vm, DEFAULT_SECURITY_GROUP,
};
use corral_store::{get_json, list_json, Op, Precondition, StoreError, Versioned};
use serde::{Deserialize, Serialize};

use crate::{ensure_project, ApiError, ApiJson, ApiPath, Ctx};

/// The first VXLAN network identifier Corral hands out.
const FIRST_VNI: u32 = 100;

/// What an address reservation key holds.
#[derive(Serialize, Deserialize)]
struct Reservation {
    vm: String,
    uid: uuid::Uuid,
}

fn network_not_found(project: &str, name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "network {name} does not exist in project {project}"
    ))
}

fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, ApiError> {
    Ok(serde_json::to_vec(v).map_err(StoreError::from)?)
}

/// The NICs of `vms` on network `name`.
fn attached<'a>(vms: impl Iterator<Item = &'a Vm>, name: &str) -> Vec<AttachedNic> {
    vms.flat_map(|vm| {
        vm.spec
            .nics
            .iter()
            .filter(move |n| n.network == name)
            .map(|n| AttachedNic {
                vm: vm.meta.name.clone(),
                mac: n.mac.clone(),
                ip: n.ip.clone(),
            })
    })
    .collect()
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/networks", tag = "networks",
    params(("project" = String, Path)), responses((status = 200, body = [Network])), security(("bearer" = [])))]
pub async fn list(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<Vec<Network>>, ApiError> {
    ensure_project(&ctx, &project).await?;
    let (nets, _) = list_json::<Network>(&*ctx.store, &keys::networks(&project)).await?;
    Ok(Json(nets))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/networks/{name}", tag = "networks",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "the network with the VM NICs attached to it", body = Network),
        (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<Network>, ApiError> {
    ensure_project(&ctx, &project).await?;
    let mut net = get_json::<Network>(&*ctx.store, &keys::network(&project, &name))
        .await?
        .ok_or_else(|| network_not_found(&project, &name))?
        .value;
    let o = ctx.cache.read(&*ctx.store).await?;
    let vms = keys::vms(&project);
    net.attached = Some(attached(o.vms_in(&vms, None).map(|e| &*e.value), &name));
    Ok(Json(net))
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/networks", tag = "networks",
    params(("project" = String, Path)), request_body = CreateNetworkRequest,
    responses((status = 201, body = Network), (status = 400, body = corral_api::ApiErrorBody),
        (status = 409, body = corral_api::ApiErrorBody),
        (status = 422, description = "the network's address has host bits set", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
    ApiJson(req): ApiJson<CreateNetworkRequest>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    ensure_project(&ctx, &project).await?;
    let cidr = req.validate()?;
    check_fabric(&ctx, &cidr).await?;
    // Creates that raced on the same networks try again on what the winner wrote: a conflict
    // is reported only when it is real (an overlap, a name, a VLAN).
    for _ in 0..CREATE_ATTEMPTS {
        match try_create(&ctx, &project, &req, cidr).await? {
            Some(net) => return Ok((StatusCode::CREATED, Json(net))),
            None => continue,
        }
    }
    Err(ApiError::Unavailable(format!(
        "network {} could not be created: {CREATE_ATTEMPTS} other network changes came in between; try again",
        req.name
    )))
}

/// How many times a create reads the networks again after losing a race.
const CREATE_ATTEMPTS: usize = 200;

/// A tenant network must not take the addresses of the hosts' fabric (a host would route its
/// agent's traffic into the bridge and lose the controller) or of loopback.
async fn check_fabric(ctx: &Ctx, cidr: &Cidr) -> Result<(), ApiError> {
    let loopback = Cidr {
        base: Ipv4Addr::new(127, 0, 0, 0),
        prefix: 8,
    };
    if cidr.overlaps(&loopback) {
        return Err(ApiError::BadRequest(format!(
            "{cidr} overlaps loopback (127.0.0.0/8): pick another range"
        )));
    }
    let o = ctx.cache.read(&*ctx.store).await?;
    let on_fabric = o.hosts.values().find_map(|h| match h.value.status.address {
        Some(std::net::IpAddr::V4(a)) if cidr.contains(a) => Some((h.name.clone(), a)),
        _ => None,
    });
    if let Some((host, a)) = on_fabric {
        return Err(ApiError::BadRequest(format!(
            "{cidr} holds the fabric address {a} of host {host}: the hosts reach each other and the controller there, so tenant networks need another range"
        )));
    }
    Ok(())
}

/// One attempt at creating the network: `None` when another network change came in between
/// (read again and retry).
async fn try_create(
    ctx: &Ctx,
    project: &str,
    req: &CreateNetworkRequest,
    cidr: Cidr,
) -> Result<Option<Network>, ApiError> {
    let changed = ctx.store.get(keys::NETWORKS_CHANGED).await?;
    // A network with a gateway is routed by its hosts: its addresses must be its own in the
    // cluster, or replies could leave by another network that uses them too.
    let (all, _) = list_json::<Network>(&*ctx.store, keys::NETWORKS).await?;
    if let Some(other) = all
        .iter()
        .find(|n| (req.gateway || n.spec.gateway) && n.cidr().overlaps(&cidr))
    {
        return Err(ApiError::Conflict(format!(
            "{cidr} overlaps network {}/{} ({}), and a network with a gateway needs addresses no other network uses: pick another range, or create both without a gateway",
            other.meta.project, other.meta.name, other.spec.cidr
        )));
    }
    let (taken, _) = ctx.store.list(keys::SEGMENTS).await?;
    let taken: HashSet<&str> = taken.iter().map(|kv| kv.key.as_str()).collect();
    let segment = match req.vlan {
        Some(id) => Segment::Vlan { id },
        None => (FIRST_VNI..)
            .map(|vni| Segment::Vxlan { vni })
            .find(|s| !taken.contains(keys::segment(s).as_str()))
            .unwrap_or(Segment::Vxlan { vni: FIRST_VNI }),
    };
    let net = Network {
        meta: ObjectMeta::new(project, &req.name),
        spec: NetworkSpec {
            cidr: cidr.to_string(),
            gateway: req.gateway,
            segment,
        },
        attached: None,
    };
    let key = keys::network(project, &req.name);
    let seg_key = keys::segment(&segment);
    let ops = vec![
        Op::Put {
            key: keys::NETWORKS_CHANGED.into(),
            value: Vec::new(),
            when: changed.map_or(Precondition::Absent, |kv| {
                Precondition::ModRevision(kv.mod_revision)
            }),
            lease: None,
        },
        Op::Put {
            key: key.clone(),
            value: to_bytes(&net)?,
            when: Precondition::Absent,
            lease: None,
        },
        Op::Put {
            key: seg_key.clone(),
            value: to_bytes(&serde_json::json!({ "network": key }))?,
            when: Precondition::Absent,
            lease: None,
        },
    ];
    match ctx.store.txn(ops).await {
        Ok(_) => Ok(Some(net)),
        Err(StoreError::Conflict { key: k }) if k == keys::NETWORKS_CHANGED => Ok(None),
        Err(StoreError::Conflict { key: k }) if k == key => Err(ApiError::Conflict(format!(
            "a network named {} already exists in project {project}: pick another name",
            req.name
        ))),
        Err(StoreError::Conflict { .. }) => match segment {
            Segment::Vlan { id } => Err(ApiError::Conflict(format!(
                "VLAN {id} already carries another network: pick another VLAN id, or none for an overlay"
            ))),
            // Taken by a network made before this store kept the marker: read again.
            Segment::Vxlan { .. } => Ok(None),
        },
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(delete, path = "/api/v1/projects/{project}/networks/{name}", tag = "networks",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    ensure_project(&ctx, &project).await?;
    let key = keys::network(&project, &name);
    // VM creates hand out addresses under this lock: none can attach to the network meanwhile.
    let _no_creates = ctx.placement.lock().await;
    let net = get_json::<Network>(&*ctx.store, &key)
        .await?
        .ok_or_else(|| network_not_found(&project, &name))?;
    let users = ctx
        .cache
        .vms_where(&*ctx.store, &project, |v| {
            v.spec.nics.iter().any(|n| n.network == name)
        })
        .await?;
    if !users.is_empty() {
        return Err(ApiError::Conflict(format!(
            "network {name} is in use by VMs {}: delete them first",
            users.join(", ")
        )));
    }
    let (reservations, _) = ctx.store.list(&keys::ips(&project, &name)).await?;
    let mut ops = vec![
        Op::Delete {
            key: key.clone(),
            when: Precondition::ModRevision(net.revision),
        },
        Op::Delete {
            key: keys::segment(&net.value.spec.segment),
            when: Precondition::Any,
        },
    ];
    ops.extend(reservations.into_iter().map(|kv| Op::Delete {
        key: kv.key,
        when: Precondition::ModRevision(kv.mod_revision),
    }));
    match ctx.store.txn(ops).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "network {name} changed meanwhile (a VM attached?): try again"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Chooses the NICs of a new VM: each network must exist in the project; an address asked for
/// must be free, else the lowest free one is taken; a MAC asked for must be unused on the network,
/// else one is derived from the VM's uid. Returns the NICs and the store operations that reserve
/// the addresses and keep the networks from being deleted meanwhile.
pub async fn attach(
    ctx: &Ctx,
    project: &str,
    vm: &str,
    uid: uuid::Uuid,
    requests: &[NicRequest],
) -> Result<(Vec<Nic>, Vec<Op>), ApiError> {
    if requests.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    // The project's VMs (their uids hold addresses) and the MACs in use per network, from the
    // controller's cache: a pass in memory, not a read and parse of every VM in the store.
    let (live, mut macs_in_use) = {
        let o = ctx.cache.read(&*ctx.store).await?;
        let mut live: HashSet<uuid::Uuid> = HashSet::new();
        let mut macs: HashMap<String, HashSet<String>> = HashMap::new();
        for e in o.vms_in(&keys::vms(project), None) {
            live.insert(e.value.meta.uid);
            for n in &e.value.spec.nics {
                macs.entry(n.network.clone())
                    .or_default()
                    .insert(n.mac.clone());
            }
        }
        (live, macs)
    };
    let mut nets: HashMap<String, Versioned<Network>> = HashMap::new();
    let mut nics = Vec::new();
    let mut ops = Vec::new();
    for (index, req) in requests.iter().enumerate() {
        if !nets.contains_key(&req.network) {
            let key = keys::network(project, &req.network);
            let net = get_json::<Network>(&*ctx.store, &key)
                .await?
                .ok_or_else(|| network_not_found(project, &req.network))?;
            ops.push(Op::Check {
                key,
                when: Precondition::ModRevision(net.revision),
            });
            nets.insert(req.network.clone(), net);
        }
        let cidr = nets[&req.network].value.cidr();
        // Addresses held by live VMs (and by the NICs chosen so far); stale reservations are free.
        let (kvs, _) = ctx.store.list(&keys::ips(project, &req.network)).await?;
        let mut held: HashMap<Ipv4Addr, String> = HashMap::new();
        let mut stale: HashMap<Ipv4Addr, u64> = HashMap::new();
        for kv in &kvs {
            let Some(ip) = kv.key.rsplit('/').next().and_then(|s| s.parse().ok()) else {
                continue;
            };
            match serde_json::from_slice::<Reservation>(&kv.value) {
                Ok(r) if live.contains(&r.uid) => {
                    held.insert(ip, r.vm);
                }
                Ok(r) => {
                    // Not a VM the cache holds: stale, unless the store still has that VM (a
                    // record the cache could not parse): then fail (the read says why) rather
                    // than hand its address out twice. Rare: only stale reservations get here.
                    let owner = get_json::<Vm>(&*ctx.store, &keys::vm(project, &r.vm)).await?;
                    if owner.is_some_and(|o| o.value.meta.uid == r.uid) {
                        held.insert(ip, r.vm);
                    } else {
                        stale.insert(ip, kv.mod_revision);
                    }
                }
                Err(_) => {
                    stale.insert(ip, kv.mod_revision);
                }
            }
        }
        for n in nics.iter().filter(|n: &&Nic| n.network == req.network) {
            if let Ok(ip) = n.ip.parse() {
                held.insert(ip, vm.to_string());
            }
        }
        let ip = match &req.ip {
            Some(ip) => {
                let ip: Ipv4Addr = ip.parse().map_err(|_| {
                    ApiError::BadRequest(format!("{ip:?} is not an IPv4 address"))
                })?;
                cidr.check_vm_address(ip)?;
                if let Some(owner) = held.get(&ip) {
                    return Err(ApiError::Conflict(format!(
                        "address {ip} on network {} is taken by VM {owner}: pick another, or leave out ip=",
                        req.network
                    )));
                }
                ip
            }
            None => cidr
                .vm_addresses()
                .find(|ip| !held.contains_key(ip))
                .ok_or_else(|| {
                    ApiError::Conflict(format!(
                        "network {} ({cidr}) has no free address left: delete a VM on it or use another network",
                        req.network
                    ))
                })?,
        };
        // In use on the network: by other VMs, and by the NICs chosen so far.
        let macs = macs_in_use.entry(req.network.clone()).or_default();
        let mac = match &req.mac {
            Some(m) => {
                let m = parse_mac(m)?;
                if macs.contains(&m) {
                    return Err(ApiError::Conflict(format!(
                        "MAC {m} is already used on network {}: pick another, or leave out mac=",
                        req.network
                    )));
                }
                m
            }
            None => (0..)
                .map(|attempt| generated_mac(uid, index, attempt))
                .find(|m| !macs.contains(m))
                .unwrap_or_default(),
        };
        ops.push(Op::Put {
            key: keys::ip(project, &req.network, &ip.to_string()),
            value: to_bytes(&Reservation {
                vm: vm.to_string(),
                uid,
            })?,
            when: stale
                .get(&ip)
                .map_or(Precondition::Absent, |r| Precondition::ModRevision(*r)),
            lease: None,
        });
        macs.insert(mac.clone());
        nics.push(Nic {
            network: req.network.clone(),
            mac,
            ip: ip.to_string(),
        });
    }
    Ok((nics, ops))
}

fn group_not_found(project: &str, name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "security group {name} does not exist in project {project}"
    ))
}

/// A group as stored, or the built-in `default` while nobody changed it.
async fn load_group(
    ctx: &Ctx,
    project: &str,
    name: &str,
) -> Result<Option<Versioned<SecurityGroup>>, ApiError> {
    let stored =
        get_json::<SecurityGroup>(&*ctx.store, &keys::security_group(project, name)).await?;
    Ok(stored.or_else(|| {
        (name == DEFAULT_SECURITY_GROUP).then(|| Versioned {
            value: SecurityGroup::builtin_default(project),
            revision: 0,
        })
    }))
}

/// Every security group of the project, the built-in `default` included.
pub async fn groups_of(ctx: &Ctx, project: &str) -> Result<Vec<SecurityGroup>, ApiError> {
    let (mut groups, _) =
        list_json::<SecurityGroup>(&*ctx.store, &keys::security_groups(project)).await?;
    if !groups.iter().any(|g| g.meta.name == DEFAULT_SECURITY_GROUP) {
        groups.insert(0, SecurityGroup::builtin_default(project));
    }
    Ok(groups)
}

/// The groups a new VM names must exist.
pub async fn check_groups(ctx: &Ctx, project: &str, names: &[String]) -> Result<(), ApiError> {
    for name in names {
        if load_group(ctx, project, name).await?.is_none() {
            return Err(group_not_found(project, name));
        }
    }
    Ok(())
}

/// Rules are valid and name only groups that exist (or the group itself); returns them as they
/// are stored (normalized).
async fn check_rules(
    ctx: &Ctx,
    project: &str,
    group: &str,
    rules: &[SecurityRule],
) -> Result<Vec<SecurityRule>, ApiError> {
    let mut checked = Vec::with_capacity(rules.len());
    for r in rules {
        let r = r.normalized()?;
        if let Some(g) = r.group.as_deref().filter(|g| *g != group) {
            if load_group(ctx, project, g).await?.is_none() {
                return Err(ApiError::NotFound(format!(
                    "rule \"{r}\" names group {g}, which does not exist in project {project}: create it first"
                )));
            }
        }
        checked.push(r);
    }
    Ok(checked)
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/security-groups", tag = "networks",
    params(("project" = String, Path)), responses((status = 200, body = [SecurityGroup])), security(("bearer" = [])))]
pub async fn list_groups(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
) -> Result<Json<Vec<SecurityGroup>>, ApiError> {
    ensure_project(&ctx, &project).await?;
    Ok(Json(groups_of(&ctx, &project).await?))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/security-groups/{name}", tag = "networks",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = SecurityGroup), (status = 404, body = corral_api::ApiErrorBody)), security(("bearer" = [])))]
pub async fn get_group(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<Json<SecurityGroup>, ApiError> {
    ensure_project(&ctx, &project).await?;
    load_group(&ctx, &project, &name)
        .await?
        .map(|g| Json(g.value))
        .ok_or_else(|| group_not_found(&project, &name))
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/security-groups", tag = "networks",
    params(("project" = String, Path)), request_body = CreateSecurityGroupRequest,
    responses((status = 201, body = SecurityGroup), (status = 400, body = corral_api::ApiErrorBody),
        (status = 409, body = corral_api::ApiErrorBody),
        (status = 422, description = "a rule names both a CIDR and a group (or neither), ports for a protocol other than tcp or udp, a port range whose lower end is above its upper, or a CIDR with host bits set", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn create_group(
    State(ctx): State<Ctx>,
    ApiPath(project): ApiPath<String>,
    ApiJson(req): ApiJson<CreateSecurityGroupRequest>,
) -> Result<(StatusCode, Json<SecurityGroup>), ApiError> {
    ensure_project(&ctx, &project).await?;
    corral_api::validate_name("security group", &req.name)?;
    let exists = || {
        ApiError::Conflict(format!(
            "a security group named {} already exists in project {project}: change its rules instead (PUT .../security-groups/NAME/rules)",
            req.name
        ))
    };
    if req.name == DEFAULT_SECURITY_GROUP {
        return Err(exists());
    }
    let checked = check_rules(&ctx, &project, &req.name, &req.rules).await?;
    let mut rules = SecurityGroup::new_rules(&req.name);
    rules.extend(checked);
    let group = SecurityGroup {
        meta: ObjectMeta::new(&project, &req.name),
        rules,
    };
    match ctx
        .store
        .put(
            &keys::security_group(&project, &req.name),
            to_bytes(&group)?,
            Precondition::Absent,
        )
        .await
    {
        Ok(_) => Ok((StatusCode::CREATED, Json(group))),
        Err(StoreError::Conflict { .. }) => Err(exists()),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(put, path = "/api/v1/projects/{project}/security-groups/{name}", tag = "networks",
    params(("project" = String, Path), ("name" = String, Path)), request_body = SetRulesRequest,
    responses((status = 200, description = "the group with its new rules, applied on every host within a second or so", body = SecurityGroup),
        (status = 400, body = corral_api::ApiErrorBody), (status = 404, body = corral_api::ApiErrorBody),
        (status = 409, body = corral_api::ApiErrorBody),
        (status = 422, description = "a rule names both a CIDR and a group (or neither), ports for a protocol other than tcp or udp, a port range whose lower end is above its upper, or a CIDR with host bits set", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn set_rules(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<SetRulesRequest>,
) -> Result<Json<SecurityGroup>, ApiError> {
    ensure_project(&ctx, &project).await?;
    let current = load_group(&ctx, &project, &name)
        .await?
        .ok_or_else(|| group_not_found(&project, &name))?;
    let checked = check_rules(&ctx, &project, &name, &req.rules).await?;
    if req
        .generation
        .is_some_and(|g| g != current.value.meta.generation)
    {
        return Err(ApiError::Conflict(format!(
            "security group {name} changed since you read it: read it again and retry"
        )));
    }
    let mut group = current.value;
    group.rules = checked;
    group.meta.bump();
    let when = match current.revision {
        0 => Precondition::Absent,
        r => Precondition::ModRevision(r),
    };
    match ctx
        .store
        .put(
            &keys::security_group(&project, &name),
            to_bytes(&group)?,
            when,
        )
        .await
    {
        Ok(_) => Ok(Json(group)),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "security group {name} changed meanwhile: look at it again and retry"
        ))),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(delete, path = "/api/v1/projects/{project}/security-groups/{name}", tag = "networks",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = corral_api::ApiErrorBody),
        (status = 409, description = "VMs use the group, or it is the built-in default group", body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_group(
    State(ctx): State<Ctx>,
    ApiPath((project, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    ensure_project(&ctx, &project).await?;
    if name == DEFAULT_SECURITY_GROUP {
        return Err(ApiError::Conflict(
            "the default group is built in and cannot be deleted: change its rules instead".into(),
        ));
    }
    // VM creates check their groups under this lock: none can join the group meanwhile.
    let _no_creates = ctx.placement.lock().await;
    let group = get_json::<SecurityGroup>(&*ctx.store, &keys::security_group(&project, &name))
        .await?
        .ok_or_else(|| group_not_found(&project, &name))?;
    let users = ctx
        .cache
        .vms_where(&*ctx.store, &project, |v| {
            v.spec.security_groups.contains(&name)
        })
        .await?;
    if !users.is_empty() {
        return Err(ApiError::Conflict(format!(
            "security group {name} applies to VMs {}: delete them first",
            users.join(", ")
        )));
    }
    let referring: Vec<String> = groups_of(&ctx, &project)
        .await?
        .into_iter()
        .filter(|g| {
            g.meta.name != name && g.rules.iter().any(|r| r.group.as_deref() == Some(&name))
        })
        .map(|g| g.meta.name)
        .collect();
    if !referring.is_empty() {
        return Err(ApiError::Conflict(format!(
            "rules of security groups {} name {name}: remove those rules first",
            referring.join(", ")
        )));
    }
    match ctx
        .store
        .delete(
            &keys::security_group(&project, &name),
            Precondition::ModRevision(group.revision),
        )
        .await
    {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "security group {name} changed meanwhile: try again"
        ))),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(get, path = "/api/v1/projects", tag = "projects",
    responses((status = 200, description = "project names", body = [String])), security(("bearer" = [])))]
pub async fn list_projects(State(ctx): State<Ctx>) -> Result<Json<Vec<String>>, ApiError> {
    let (kvs, _) = ctx.store.list(keys::PROJECTS).await?;
    Ok(Json(
        kvs.iter()
            .filter_map(|kv| kv.key.strip_prefix(keys::PROJECTS).map(str::to_string))
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", request_body = CreateProjectRequest,
    responses((status = 201, description = "all project names, the new one included", body = [String]),
        (status = 400, body = corral_api::ApiErrorBody), (status = 409, body = corral_api::ApiErrorBody)),
    security(("bearer" = [])))]
pub async fn create_project(
    State(ctx): State<Ctx>,
    ApiJson(req): ApiJson<CreateProjectRequest>,
) -> Result<(StatusCode, Json<Vec<String>>), ApiError> {
    corral_api::validate_name("project", &req.name)?;
    match ctx
        .store
        .put(
            &keys::project(&req.name),
            b"{}".to_vec(),
            Precondition::Absent,
        )
        .await
    {
        Ok(_) => Ok((StatusCode::CREATED, list_projects(State(ctx)).await?)),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "project {} already exists",
            req.name
        ))),
        Err(e) => Err(e.into()),
    }
}
