//! The agent endpoint: how host agents on other machines reach the control plane, over mutually
//! authenticated TLS on its own port.
//!
//! A new host joins with a join token (single use, expiring, stored as a hash) and gets a host
//! certificate from the cluster CA; the token also carries the CA's fingerprint, so the agent knows
//! it talks to the right controller before it sends the token. From then on the host is known by its
//! certificate's fingerprint. The agent reads what it needs (VMs, images, datastores, migrations,
//! networks, hosts) and writes only through the typed host protocol ([`HostWrite`], decided in
//! [`crate::host_writes`]). Everything else, and everything without a certificate of this
//! cluster, is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use corral_api::host_protocol::{HaReply, HaReport, HostWrite, JoinRequest, JoinResponse, Written};
use corral_api::{keys, validate_name, Host};
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
    let host = Host::joined(&req.host);
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

/// Keys a host may read: what it may list, the cluster settings, and the Ceph keys of RBD
/// datastores (any host may run a VM whose disk is in the pool).
fn may_read(key: &str) -> bool {
    may_list(key) || key == keys::CLUSTER || key.starts_with(keys::DATASTORE_SECRETS)
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

/// `POST /agent/v1/write`: the one way a host changes the store (see [`crate::host_writes`]).
async fn write(
    State(a): State<AgentCtx>,
    Extension(peer): Extension<Peer>,
    ApiJson(w): ApiJson<HostWrite>,
) -> Result<Json<Written>, ApiError> {
    let host = host_of(&a, &peer).await?;
    // A write proves the host alive (HA's failover judges that again before it acts); a read
    // does not: a simulated fleet reads for all its hosts with one host's certificate.
    a.ctx.ha.seen(&host);
    Ok(Json(
        crate::host_writes::apply(&*a.ctx.store, &host, w).await?,
    ))
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
        .route("/agent/v1/write", post(write))
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
