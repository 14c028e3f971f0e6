//! The agent endpoint: how host agents on other machines reach the control plane, over mutually
//! authenticated TLS on its own port.
//!
//! A new host joins with a join token (single use, expiring, stored as a hash) and gets a host
//! certificate from the cluster CA; the token also carries the CA's fingerprint, so the agent knows
//! it talks to the right controller before it sends the token. From then on the host is known by its
//! certificate's fingerprint. The agent reads and writes the store through this endpoint, within
//! what a host may do: read VMs and images, write its own host record and the VMs placed on it.
//! Everything else, and everything without a certificate of this cluster, is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use corral_api::host_protocol::{HaReply, HaReport, JoinRequest, JoinResponse};
use corral_api::{keys, validate_name, Host, HostStatus, Migration, MigrationPhase, Vm};
use corral_pki::{Ca, Identity};

use corral_store::{get_json, KeyValue, Op, Precondition, Revision, StoreError, WatchPage};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use crate::{ApiError, ApiJson, ApiQuery, Ctx};

/// Fingerprint of a host certificate -> the host it was issued to.
pub(crate) const CERTS: &str = "/corral/host-certs/";
const JOIN_TOKENS: &str = "/corral/join-tokens/";

/// The fingerprint of the client certificate the TLS handshake verified, if any.
#[derive(Clone, Debug)]
struct Peer(Option<String>);

#[derive(Clone)]
struct AgentCtx {
    ctx: Ctx,
    ca: Arc<Ca>,
}

/// A join token as stored: only the hash of its secret.
#[derive(Serialize, Deserialize)]
struct StoredToken {
    secret_sha256: String,
    expires_at: DateTime<Utc>,
}

/// Body of `POST /api/v1/hosts/join-tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinTokenRequest {
    /// How long the token is valid, in seconds (default 3600; 60 s to 7 days).
    #[serde(default)]
    #[schema(minimum = 60, maximum = 604800)]
    pub ttl_seconds: Option<u64>,
}

/// A new join token: give it to `corral agent --join URL --token TOKEN` on the new host.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

fn sha256_hex(s: &str) -> String {
    corral_pki::fingerprint(s.as_bytes())
}

/// Makes a join token: `CA-FINGERPRINT.ID.SECRET`.
pub async fn new_join_token(ctx: &Ctx, ca: &Ca, ttl: Duration) -> Result<JoinToken, ApiError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let secret = crate::new_token();
    let expires_at =
        Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
    let stored = StoredToken {
        secret_sha256: sha256_hex(&secret),
        expires_at,
    };
    let bytes = serde_json::to_vec(&stored).map_err(StoreError::from)?;
    // An unused token vanishes with its lease.
    let lease = ctx.store.grant_lease(ttl).await?;
    let put = Op::Put {
        key: format!("{JOIN_TOKENS}{id}"),
        value: bytes,
        when: Precondition::Absent,
        lease: Some(lease),
    };
    ctx.store.txn(vec![put]).await?;
    let fp = ca
        .fingerprint()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(JoinToken {
        token: format!("{fp}.{id}.{secret}"),
        expires_at,
    })
}

async fn ca_pem(State(a): State<AgentCtx>) -> String {
    a.ca.cert_pem().to_string()
}

fn bad_token() -> ApiError {
    ApiError::Unauthorized(
        "the join token is not valid, was already used, or has expired: make a new one (POST /api/v1/hosts/join-tokens on the controller)".into(),
    )
}

async fn join(
    State(a): State<AgentCtx>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    validate_name("host", &req.host)?;
    let mut parts = req.token.split('.');
    let (Some(_fp), Some(id), Some(secret), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad_token());
    };
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_token());
    }
    let key = format!("{JOIN_TOKENS}{id}");
    let stored = get_json::<StoredToken>(&*a.ctx.store, &key)
        .await?
        .ok_or_else(bad_token)?;
    if stored.value.secret_sha256 != sha256_hex(secret) || stored.value.expires_at < Utc::now() {
        return Err(bad_token());
    }
    let identity =
        a.ca.issue_host(&req.host)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    let fp = corral_pki::fingerprint(
        corral_pki::first_cert(&identity.cert_pem)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .as_ref(),
    );
    let host = Host {
        name: req.host.clone(),
        maintenance: false,
        standby: false,
        // Its agent's first registration sets the capacity the operator trusts it with.
        approved: None,
        // Its agent registers it (and the host's capacity) once it runs.
        status: HostStatus::unregistered(),
    };
    // One transaction: the token is used up, the name is taken, the certificate is known.
    let ops = vec![
        Op::Delete {
            key: key.clone(),
            when: Precondition::ModRevision(stored.revision),
        },
        Op::Put {
            key: keys::host(&req.host),
            value: serde_json::to_vec(&host).map_err(StoreError::from)?,
            when: Precondition::Absent,
            lease: None,
        },
        Op::Put {
            key: format!("{CERTS}{fp}"),
            value: req.host.clone().into_bytes(),
            when: Precondition::Absent,
            lease: None,
        },
    ];
    match a.ctx.store.txn(ops).await {
        Ok(_) => {}
        Err(StoreError::Conflict { key: k }) if k == key => return Err(bad_token()),
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::Conflict(format!(
                "a host named {} is already in the cluster: join under another host name",
                req.host
            )))
        }
        Err(e) => return Err(e.into()),
    }
    a.ctx.ha.seen(&req.host);
    tracing::info!(host = %req.host, "host joined");
    Ok(Json(JoinResponse {
        cert_pem: identity.cert_pem,
        key_pem: identity.key_pem,
        ca_pem: a.ca.cert_pem().to_string(),
    }))
}

/// The host a request comes from, by its verified certificate.
async fn host_of(a: &AgentCtx, peer: &Peer) -> Result<String, ApiError> {
    let Some(fp) = &peer.0 else {
        return Err(ApiError::Unauthorized(
            "agent calls need a host certificate of this cluster: join first (POST /agent/v1/join with a join token)"
                .into(),
        ));
    };
    match a.ctx.store.get(&format!("{CERTS}{fp}")).await? {
        Some(kv) => Ok(String::from_utf8_lossy(&kv.value).into_owned()),
        None => Err(ApiError::Unauthorized(
            "this host certificate is not (or no longer) known to the cluster".into(),
        )),
    }
}

/// Keys a host may read: what it may list, and the cluster settings.
fn may_read(key: &str) -> bool {
    may_list(key) || key == keys::CLUSTER
}

/// Prefixes a host may list and watch: what it runs and what its network reconciler needs (the
/// networks, security groups and its peers' fabric addresses).
fn may_list(prefix: &str) -> bool {
    prefix.starts_with(keys::VMS)
        || prefix.starts_with(keys::IMAGES)
        || prefix.starts_with(keys::DATASTORES)
        || prefix.starts_with(keys::MIGRATIONS)
        || prefix.starts_with(keys::NETWORKS)
        || prefix.starts_with(keys::SECURITY_GROUPS)
        || prefix.starts_with(keys::HOSTS)
}

fn forbidden(host: &str, key: &str) -> ApiError {
    ApiError::Forbidden(format!("host {host} may not touch {key}: agents read VMs, images, networks and hosts and write only their own host and the VMs placed on it"))
}

#[derive(Deserialize)]
struct KeyQuery {
    key: String,
}

#[derive(Deserialize)]
struct PrefixQuery {
    prefix: String,
    #[serde(default)]
    from: Revision,
}

async fn kv_get(
    State(a): State<AgentCtx>,
    Extension(peer): Extension<Peer>,
    ApiQuery(q): ApiQuery<KeyQuery>,
) -> Result<Json<Option<KeyValue>>, ApiError> {
    let host = host_of(&a, &peer).await?;
    if !may_read(&q.key) {
        return Err(forbidden(&host, &q.key));
    }
    Ok(Json(a.ctx.store.get(&q.key).await?))
}

async fn kv_list(
    State(a): State<AgentCtx>,
    Extension(peer): Extension<Peer>,
    ApiQuery(q): ApiQuery<PrefixQuery>,
) -> Result<Json<(Vec<KeyValue>, Revision)>, ApiError> {
    let host = host_of(&a, &peer).await?;
    if !may_list(&q.prefix) {
        return Err(forbidden(&host, &q.prefix));
    }
    Ok(Json(a.ctx.store.list(&q.prefix).await?))
}

async fn ha_report(
    State(a): State<AgentCtx>,
    Extension(peer): Extension<Peer>,
    ApiJson(r): ApiJson<HaReport>,
) -> Result<Json<HaReply>, ApiError> {
    let host = host_of(&a, &peer).await?;
    Ok(Json(crate::ha::report(&a.ctx, &host, r)))
}

async fn revision(
    State(a): State<AgentCtx>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Revision>, ApiError> {
    host_of(&a, &peer).await?;
    Ok(Json(a.ctx.store.current_revision().await?))
}

fn refuse(host: &str, key: &str, why: &str) -> ApiError {
    ApiError::Forbidden(format!("host {host} may not write {key}: {why}"))
}

/// Checks one operation of a host against what hosts may do, and returns it as it will be applied
/// together with a guard: the key must still be as it was when checked.
///
/// - its own host record: only `status` changes; the heartbeat time is the controller's clock;
/// - a VM placed on it: only `status` changes, except that the desired power may go to stopped (the
///   guest shut itself down); it is deleted only after someone asked for its deletion;
/// - a migration it is the source or target of: the steps of its side (see [`migration_step`]);
/// - a VM it is the source of, handed to the migration's target: only in the transaction that
///   marks the migration completed;
/// - checks of keys it may read.
async fn authorize(a: &AgentCtx, host: &str, op: Op, txn: &[Op]) -> Result<Vec<Op>, ApiError> {
    let (key, new, lease) = match &op {
        Op::Check { key, .. } => {
            return if may_read(key) {
                Ok(vec![op])
            } else {
                Err(forbidden(host, key))
            };
        }
        Op::Put {
            key,
            value,
            lease,
            when,
        } => (key.clone(), Some((value.clone(), *when)), *lease),
        Op::Delete { key, .. } => (key.clone(), None, None),
    };
    if lease.is_some() {
        return Err(refuse(host, &key, "leases are not offered to agents"));
    }
    let current = a.ctx.store.get(&key).await?;
    let guard = Op::Check {
        key: key.clone(),
        when: current.as_ref().map_or(Precondition::Absent, |kv| {
            Precondition::ModRevision(kv.mod_revision)
        }),
    };
    if key == keys::host(host) {
        let (Some(stored), Some((new, when))) = (current.as_ref(), new) else {
            return Err(refuse(
                host,
                &key,
                "a host record is created by joining and never deleted by its host",
            ));
        };
        let stored: Host = serde_json::from_slice(&stored.value).map_err(StoreError::from)?;
        let sent: Host = serde_json::from_slice(&new)
            .map_err(|e| ApiError::BadRequest(format!("not a host record: {e}")))?;
        let record = host_write(stored, sent.status, Utc::now())
            .map_err(|why| refuse(host, &key, &why.0))?;
        return Ok(vec![guard, parsed_put(key, &record, when)?]);
    }
    if key.starts_with(keys::MIGRATIONS) {
        let (Some(stored), Some((new, when))) = (current.as_ref(), new) else {
            return Err(refuse(
                host,
                &key,
                "migrations are started through the API and never deleted by hosts",
            ));
        };
        let stored: Migration = serde_json::from_slice(&stored.value).map_err(StoreError::from)?;
        let sent: Migration = serde_json::from_slice(&new)
            .map_err(|e| ApiError::BadRequest(format!("not a migration: {e}")))?;
        migration_step(&stored, &sent, host).map_err(|why| refuse(host, &key, why))?;
        // Completed only with the handover of the VM to the target (checked on the VM's write).
        let vm_key = keys::vm_of_migration(&key).unwrap_or_default();
        let hands_over = txn.iter().any(|o| match o {
            Op::Put { key: k, value, .. } if *k == vm_key => serde_json::from_slice::<Vm>(value)
                .is_ok_and(|v| v.status.host.as_deref() == Some(stored.target.as_str())),
            _ => false,
        });
        if sent.phase == MigrationPhase::Completed && !hands_over {
            return Err(refuse(
                host,
                &key,
                "a migration completes only together with the handover of its VM",
            ));
        }
        return Ok(vec![guard, parsed_put(key, &sent, when)?]);
    }
    if !key.starts_with(keys::VMS) {
        return Err(forbidden(host, &key));
    }
    let Some(stored) = current.as_ref() else {
        return Err(refuse(host, &key, "VMs are created through the API"));
    };
    let stored: Vm = serde_json::from_slice(&stored.value).map_err(StoreError::from)?;
    if stored.status.host.as_deref() != Some(host) {
        return Err(refuse(host, &key, "the VM is not placed on this host"));
    }
    match new {
        None if stored.meta.deletion_requested_at.is_some() => Ok(vec![guard, op]),
        None => Err(refuse(host, &key, "nobody asked to delete the VM")),
        Some((new, when)) => {
            let sent: Vm = serde_json::from_slice(&new)
                .map_err(|e| ApiError::BadRequest(format!("not a VM: {e}")))?;
            let put = parsed_put(key.clone(), &sent, when)?;
            let mut expected = stored.clone();
            if sent.spec.power != stored.spec.power {
                // The one change of intent a host reports: its guest powered itself off.
                if sent.spec.power != corral_api::PowerState::Stopped
                    || sent.meta.generation != stored.meta.generation + 1
                {
                    return Err(refuse(
                        host,
                        &key,
                        "a host may only record that the guest powered off",
                    ));
                }
                expected.spec.power = sent.spec.power;
                expected.meta.generation = sent.meta.generation;
                expected.meta.updated_at = sent.meta.updated_at;
            }
            if sent.meta != expected.meta || sent.spec != expected.spec {
                return Err(refuse(
                    host,
                    &key,
                    "a host changes only the status of its VMs",
                ));
            }
            if sent.status.host.as_deref() == Some(host) {
                return Ok(vec![guard, put]);
            }
            // A handover: only to the target of this VM's migration, in the transaction that
            // completes it.
            let mig_key = keys::migration_of_vm(&key).unwrap_or_default();
            let mig = get_json::<Migration>(&*a.ctx.store, &mig_key).await?;
            // ... and to exactly the copy the target prepared.
            let valid = mig.as_ref().is_some_and(|m| {
                let m = &m.value;
                m.vm_uid == stored.meta.uid
                    && m.source == host
                    && m.phase == MigrationPhase::Transferring
                    && sent.status.host.as_deref() == Some(m.target.as_str())
                    && sent.status.pid == m.target_pid
                    && sent.status.run_dir == m.target_run_dir
                    && sent.status.disk.as_ref().map(|d| &d.path) == m.target_disk.as_ref()
            });
            let completes = txn.iter().any(|o| match o {
                Op::Put { key: k, value, .. } if *k == mig_key => {
                    serde_json::from_slice::<Migration>(value)
                        .is_ok_and(|m| m.phase == MigrationPhase::Completed)
                }
                _ => false,
            });
            match mig {
                Some(m) if valid && completes => Ok(vec![
                    guard,
                    Op::Check {
                        key: mig_key,
                        when: Precondition::ModRevision(m.revision),
                    },
                    put,
                ]),
                _ => Err(refuse(
                    host,
                    &key,
                    "a VM moves to another host only with the migration that completes",
                )),
            }
        }
    }
}

/// The write of what a host sent, as parsed: fields the record does not have never reach
/// another host.
fn parsed_put<T: Serialize>(key: String, value: &T, when: Precondition) -> Result<Op, ApiError> {
    Ok(Op::Put {
        key,
        value: serde_json::to_vec(value).map_err(StoreError::from)?,
        when,
        lease: None,
    })
}

/// The host record after its own agent reported `sent`: only the status changes; the heartbeat
/// time is the controller's clock; the first registration's capacity becomes the approved one,
/// and a later claim beyond the approved capacity is not believed (the record keeps the approved
/// figures and says what was claimed). A capacity no machine has, or an address no host can have,
/// is refused with a sentence.
fn host_write(
    mut stored: Host,
    sent: HostStatus,
    now: DateTime<Utc>,
) -> Result<Host, corral_api::ValidationError> {
    let claimed = sent.capacity();
    claimed.check()?;
    if let Some(ip) = sent.address {
        corral_api::check_fabric_address(ip)?;
    }
    let approved = *stored.approved.get_or_insert(claimed);
    let (believed, refused) = if claimed.exceeds(&approved) {
        let why = format!(
            "the agent reported {claimed}, more than the {approved} approved for this host: \
             approve the new capacity through PUT /api/v1/hosts/{}/capacity",
            stored.name
        );
        let believed = corral_api::Capacity {
            cpus: claimed.cpus.min(approved.cpus),
            memory_bytes: claimed.memory_bytes.min(approved.memory_bytes),
        };
        (believed, Some(why))
    } else {
        (claimed, None)
    };
    Ok(Host {
        status: HostStatus {
            cpus: believed.cpus,
            memory_bytes: believed.memory_bytes,
            last_heartbeat: now,
            capacity_refused: refused,
            ..sent
        },
        ..stored
    })
}

/// Whether `host` may turn the migration record `stored` into `sent`. The controller's fields never
/// change; the target prepares (Preparing -> TargetReady, its own fields); the source transfers
/// (TargetReady -> Transferring, progress, Completed); either side may end it as failed, and the
/// source as cancelled.
fn migration_step(stored: &Migration, sent: &Migration, host: &str) -> Result<(), &'static str> {
    use MigrationPhase as P;
    if sent.identity() != stored.identity() || sent.cancel_requested != stored.cancel_requested {
        return Err("hosts change only the state of a migration, not what it moves where");
    }
    if stored.phase.is_finished() {
        return Err("the migration already ended");
    }
    let is_source = stored.source == host;
    let is_target = stored.target == host;
    let target_fields_kept = sent.target_port == stored.target_port
        && sent.disk_port == stored.disk_port
        && sent.target_pid == stored.target_pid
        && sent.target_run_dir == stored.target_run_dir
        && sent.target_disk == stored.target_disk;
    let ok = match (stored.phase, sent.phase) {
        // What the target recorded stays as it recorded it (it removes its copy by it).
        (_, P::Failed) => (is_source || is_target) && target_fields_kept,
        (_, P::Cancelled) => is_source && target_fields_kept,
        (P::Preparing, P::TargetReady) => {
            // The ports of what this kind of move needs, and nothing else: the source builds
            // the addresses from the target's record (`Migration::stream_to`).
            let ports = sent.target_port.is_some_and(|p| p > 0)
                && sent.disk_port.is_some_and(|p| p > 0) != stored.shared_storage;
            if is_target && !ports {
                return Err("a target that is ready records the port of its migration stream, and of its disk export exactly when the storage is not shared");
            }
            is_target
        }
        (P::TargetReady | P::Transferring, P::Transferring) => is_source && target_fields_kept,
        // Only together with the handover of the VM (checked on the VM's write).
        (P::Transferring, P::Completed) => is_source && target_fields_kept,
        _ => false,
    };
    if ok {
        Ok(())
    } else if !is_source && !is_target {
        Err("the host is neither the source nor the target of this migration")
    } else {
        Err("this host may not take the migration to that phase")
    }
}

async fn txn(
    State(a): State<AgentCtx>,
    Extension(peer): Extension<Peer>,
    ApiJson(ops): ApiJson<Vec<Op>>,
) -> Result<Json<Revision>, ApiError> {
    let host = host_of(&a, &peer).await?;
    // A write proves the host alive (HA's failover judges that again before it acts); a read
    // does not: a simulated fleet reads for all its hosts with one host's certificate.
    a.ctx.ha.seen(&host);
    let mut checked = Vec::with_capacity(ops.len() * 2);
    for op in ops.iter().cloned() {
        checked.extend(authorize(&a, &host, op, &ops).await?);
    }
    match a.ctx.store.txn(checked).await {
        Ok(rev) => Ok(Json(rev)),
        // The agent's store client turns these back into the store's own errors.
        Err(StoreError::Conflict { key }) => Err(ApiError::Conflict(format!("conflict:{key}"))),
        Err(StoreError::NotFound { key }) => Err(ApiError::NotFound(format!("not-found:{key}"))),
        Err(e) => Err(e.into()),
    }
}

/// Long poll: waits up to 20 s for events under the prefix from revision `from`, then returns what
/// has arrived and the revision to ask from next. A page ends with the last event of a revision, so
/// a revision is never split across pages.
async fn watch(
    State(a): State<AgentCtx>,
    Extension(peer): Extension<Peer>,
    ApiQuery(q): ApiQuery<PrefixQuery>,
) -> Result<Json<WatchPage>, ApiError> {
    let host = host_of(&a, &peer).await?;
    if !may_list(&q.prefix) {
        return Err(forbidden(&host, &q.prefix));
    }
    let from = q.from.max(1);
    let open = |from| {
        let store = a.ctx.store.clone();
        let prefix = q.prefix.clone();
        async move {
            match store.watch(&prefix, from).await {
                Ok(w) => Ok(w),
                Err(e @ StoreError::Compacted { .. }) => Err(ApiError::Gone(e.to_string())),
                Err(e) => Err(ApiError::from(e)),
            }
        }
    };
    let mut w = open(from).await?;
    let mut events: Vec<corral_store::Event> = Vec::new();
    if let Ok(Some(first)) = tokio::time::timeout(Duration::from_secs(20), w.recv()).await {
        events.push(first.map_err(|e| ApiError::Gone(e.to_string()))?);
        // Take what has arrived, and end the page on a revision boundary: the rest of a
        // transaction's events are on their way.
        loop {
            while let Ok(Ok(e)) = w.try_recv() {
                events.push(e);
            }
            if events.last().is_some_and(|e| e.last_in_revision) {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(5), w.recv()).await {
                Ok(Some(Ok(e))) => events.push(e),
                _ => {
                    return Err(ApiError::Gone(
                        "the watch ended in the middle of a revision: list again".into(),
                    ))
                }
            }
        }
    }
    let Some(last) = events.last().map(|e| e.kv.mod_revision) else {
        return Ok(Json(WatchPage { events, next: from }));
    };
    Ok(Json(WatchPage {
        events,
        next: last + 1,
    }))
}

fn router(a: AgentCtx) -> Router {
    Router::new()
        .route("/agent/v1/ca", get(ca_pem))
        .route("/agent/v1/join", post(join))
        .route("/agent/v1/get", get(kv_get))
        .route("/agent/v1/list", get(kv_list))
        .route("/agent/v1/revision", get(revision))
        .route("/agent/v1/txn", post(txn))
        .route("/agent/v1/watch", get(watch))
        .route("/agent/v1/ha", post(ha_report))
        .with_state(a)
}

/// Serves the agent endpoint on `listener`, with a server certificate for `names` (the addresses
/// agents use to reach it), until the task is dropped.
pub async fn serve(
    ctx: Ctx,
    names: Vec<String>,
    listener: tokio::net::TcpListener,
) -> Result<(), ApiError> {
    let ca = ctx.ca.clone();
    let server: Identity = ca
        .issue_server(&names)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let config = corral_pki::server_config(ca.cert_pem(), &server)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = router(AgentCtx { ctx, ca });
    loop {
        let (tcp, addr): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // E.g. out of file descriptors: give connections time to close.
                tracing::warn!(error = %e, "accepting an agent connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // Anyone may connect (joining hosts have no certificate yet): a handshake gets 10 s.
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::info!(%addr, error = %e, "refused a TLS connection");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
            let peer = Peer(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| corral_pki::fingerprint(c.as_ref())),
            );
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let io = hyper_util::rt::TokioIo::new(tls);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder.serve_connection(io, service).await {
                tracing::debug!(%addr, error = %e, "agent connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: MigrationPhase) -> Migration {
        let m = Migration::new(
            "default",
            "web",
            uuid::Uuid::new_v4(),
            ("h1", "h2"),
            true,
            "requested",
        );
        Migration { phase, ..m }
    }

    fn to(m: &Migration, phase: MigrationPhase) -> Migration {
        Migration { phase, ..m.clone() }
    }

    fn joined(name: &str) -> Host {
        Host {
            name: name.into(),
            maintenance: false,
            standby: false,
            approved: None,
            status: HostStatus::unregistered(),
        }
    }

    fn report(cpus: u32, memory_bytes: u64) -> HostStatus {
        HostStatus {
            cpus,
            memory_bytes,
            hypervisor: "QEMU".into(),
            address: Some("10.0.0.12".parse().expect("ip")),
            // A host cannot set the time it was heard from.
            last_heartbeat: DateTime::<Utc>::MAX_UTC,
            ..HostStatus::unregistered()
        }
    }

    #[test]
    fn a_hosts_first_registration_is_its_approved_capacity_and_later_claims_beyond_it_are_not_believed(
    ) {
        let now = Utc::now();
        let first = host_write(joined("h1"), report(8, 16 << 30), now).expect("registers");
        assert_eq!(first.status.last_heartbeat, now, "the controller's clock");
        assert_eq!(
            first.approved,
            Some(corral_api::Capacity {
                cpus: 8,
                memory_bytes: 16 << 30
            })
        );
        assert_eq!(first.status.capacity_refused, None);

        // Smaller is believed at once (a failed DIMM); more is not.
        let less = host_write(first.clone(), report(4, 8 << 30), now).expect("write");
        assert_eq!((less.status.cpus, less.status.capacity_refused), (4, None));
        let claim = host_write(first.clone(), report(100_000, 1 << 60), now);
        let err = claim.expect_err("100,000 CPUs is no machine");
        assert!(
            err.0.contains("100000 CPUs is not a machine's capacity"),
            "{err}"
        );
        let more = host_write(first.clone(), report(64, 16 << 30), now).expect("write");
        assert_eq!(
            (more.status.cpus, more.status.memory_bytes),
            (8, 16 << 30),
            "the scheduler sees the approved capacity"
        );
        let why = more.status.capacity_refused.clone().expect("flagged");
        assert!(
            why.contains("reported 64 CPUs") && why.contains("/api/v1/hosts/h1/capacity"),
            "{why}"
        );

        // Once an operator approves more, it is believed.
        let mut approved = more;
        approved.approved = Some(corral_api::Capacity {
            cpus: 64,
            memory_bytes: 16 << 30,
        });
        let believed = host_write(approved, report(64, 16 << 30), now).expect("write");
        assert_eq!(
            (believed.status.cpus, believed.status.capacity_refused),
            (64, None)
        );

        // Nothing but the status changes, and no address no host can have.
        let mut operator = first.clone();
        operator.maintenance = true;
        let kept = host_write(operator, report(8, 16 << 30), now).expect("write");
        assert!(kept.maintenance);
        for bad in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::"] {
            let mut r = report(8, 16 << 30);
            r.address = Some(bad.parse().expect("ip"));
            let err = host_write(first.clone(), r, now).expect_err(bad);
            assert!(err.0.contains("not an address"), "{err}");
        }
        assert!(host_write(joined("h1"), report(0, 16 << 30), now).is_err());
        assert!(host_write(joined("h1"), report(8, 0), now).is_err());
    }

    #[test]
    fn a_ready_target_records_ports_only_as_the_move_needs() {
        use MigrationPhase as P;
        let preparing = record(P::Preparing);
        let mut no_port = to(&preparing, P::TargetReady);
        no_port.target_port = None;
        let err = migration_step(&preparing, &no_port, "h2").expect_err("no port");
        assert!(err.contains("records the port"), "{err}");
        let mut with_disk = to(&preparing, P::TargetReady);
        with_disk.target_port = Some(4000);
        with_disk.disk_port = Some(4001);
        assert!(
            migration_step(&preparing, &with_disk, "h2").is_err(),
            "no disk export on shared storage"
        );
        let mut unshared = preparing.clone();
        unshared.shared_storage = false;
        let mut memory_only = to(&unshared, P::TargetReady);
        memory_only.target_port = Some(4000);
        assert!(
            migration_step(&unshared, &memory_only, "h2").is_err(),
            "a shared-nothing move needs the disk export"
        );
        memory_only.disk_port = Some(4001);
        assert!(migration_step(&unshared, &memory_only, "h2").is_ok());
    }

    #[test]
    fn each_side_takes_only_its_own_steps_of_a_migration() {
        use MigrationPhase as P;
        let preparing = record(P::Preparing);
        let mut ready = to(&preparing, P::TargetReady);
        ready.target_port = Some(4000);
        assert!(migration_step(&preparing, &ready, "h2").is_ok());
        assert!(
            migration_step(&preparing, &ready, "h1").is_err(),
            "the source does not prepare"
        );
        assert!(
            migration_step(&preparing, &ready, "h3").is_err(),
            "a stranger"
        );

        let ready = to(&ready, P::TargetReady);
        let sending = to(&ready, P::Transferring);
        assert!(migration_step(&ready, &sending, "h1").is_ok());
        assert!(
            migration_step(&ready, &sending, "h2").is_err(),
            "the target does not send"
        );
        let mut redirected = sending.clone();
        redirected.target_port = Some(4001);
        assert!(
            migration_step(&ready, &redirected, "h1").is_err(),
            "the source cannot redirect"
        );

        let done = to(&sending, P::Completed);
        assert!(migration_step(&sending, &done, "h1").is_ok());
        assert!(migration_step(&sending, &done, "h2").is_err());
        assert!(
            migration_step(&preparing, &done, "h1").is_err(),
            "no skipping to the end"
        );

        for host in ["h1", "h2"] {
            assert!(migration_step(&sending, &to(&sending, P::Failed), host).is_ok());
        }
        let mut elsewhere_disk = to(&sending, P::Failed);
        elsewhere_disk.target_disk = Some("/etc".into());
        assert!(
            migration_step(&sending, &elsewhere_disk, "h1").is_err(),
            "the source cannot point the target's clean-up elsewhere"
        );
        assert!(migration_step(&sending, &to(&sending, P::Cancelled), "h2").is_err());
        assert!(
            migration_step(&done, &to(&done, P::Failed), "h1").is_err(),
            "ended for good"
        );

        let mut elsewhere = to(&sending, P::Transferring);
        elsewhere.target = "h3".into();
        assert!(
            migration_step(&sending, &elsewhere, "h1").is_err(),
            "what moves where is the controller's"
        );
        let mut uncancelled = to(&sending, P::Transferring);
        uncancelled.cancel_requested = true;
        assert!(migration_step(&sending, &uncancelled, "h1").is_err());
    }
}
