//! The cluster's event log (`corral events`): host failures and returns, failover decisions, VMs
//! restarted elsewhere. Each event is a key under `/corral/events/` named by its time, so a list is
//! in order; the oldest beyond [`KEEP`] are pruned.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use corral_api::{keys, ClusterEvent};
use corral_store::{list_json, Op, Precondition, Store, StoreError};
use serde::Deserialize;

use crate::{ApiError, ApiQuery, Ctx};

/// Events kept.
const KEEP: usize = 1000;

/// Records an event (and logs it). An event that cannot be written is logged only: it never stops
/// the decision it reports. A decision that must not be recorded without its event (or the other
/// way round) commits [`op`] in its own transaction instead.
pub(crate) async fn record(store: &dyn Store, reason: &str, subject: &str, message: &str) {
    log(reason, subject, message);
    let put = match op(reason, subject, message) {
        Ok(op) => store.txn(vec![op]).await,
        Err(e) => Err(e),
    };
    if let Err(e) = put {
        tracing::warn!(error = %e, "could not record an event");
    }
}

/// Logs an event (once its transaction committed, for one written with [`op`]).
pub(crate) fn log(reason: &str, subject: &str, message: &str) {
    tracing::info!(%reason, %subject, "{message}");
}

/// The write of an event, for a transaction that also writes what it reports.
pub(crate) fn op(reason: &str, subject: &str, message: &str) -> Result<Op, StoreError> {
    let at = Utc::now();
    let nanos = at.timestamp_nanos_opt().unwrap_or_default();
    let id = format!(
        "{nanos:020}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let event = ClusterEvent {
        id: id.clone(),
        at,
        reason: reason.to_string(),
        subject: subject.to_string(),
        message: message.to_string(),
    };
    Ok(Op::Put {
        key: keys::event(&id),
        value: serde_json::to_vec(&event)?,
        when: Precondition::Absent,
        lease: None,
    })
}

/// Removes the oldest events beyond [`KEEP`].
pub(crate) async fn prune(store: &dyn Store) -> Result<(), StoreError> {
    let (kvs, _) = store.list(keys::EVENTS).await?;
    for kv in kvs.iter().take(kvs.len().saturating_sub(KEEP)) {
        match store
            .delete(&kv.key, Precondition::ModRevision(kv.mod_revision))
            .await
        {
            Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events after the one with this id (for following).
    #[serde(default)]
    pub after: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, description = "oldest first", body = [ClusterEvent])), security(("bearer" = [])))]
pub async fn list(
    State(ctx): State<Ctx>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<Vec<ClusterEvent>>, ApiError> {
    let (mut events, _) = list_json::<ClusterEvent>(&*ctx.store, keys::EVENTS).await?;
    events.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(after) = &q.after {
        events.retain(|e| e.id > *after);
    }
    Ok(Json(events))
}
