//! The writes of the host protocol ([`HostWrite`]): the only way a host changes the store.
//!
//! A host is trusted with nothing but its own: its host record's status, the observed status of
//! the VMs placed on it, its side's steps of a migration it takes part in, and the handover of a
//! VM it migrates away. [`decide`] turns a request into store operations from the stored objects,
//! the host's identity (its certificate) and the request alone, and is pure; [`apply`] reads what
//! it needs, decides and commits, guarded by the revisions it read. What one host records that
//! another acts on is what the controller built: a handover gives the VM exactly the copy its
//! target recorded, and a migration record holds only ports (the source builds addresses from
//! the target's registered fabric address).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use corral_api::host_protocol::{
    HostLink, HostWrite, LinkError, MigrationStep, VmRef, Written, RESUMING,
};
use corral_api::{
    keys, ConditionType, Host, HostStatus, Migration, MigrationPhase, MigrationResult, PowerState,
    ValidationError, Vm, VmEvent, VmPhase,
};
use corral_store::{
    get_json, KeyValue, Op, Precondition, ReadStore, Revision, Store, StoreError, Versioned,
    WatchStream,
};
use serde::Serialize;

use crate::ApiError;

/// The stored objects a write is decided on (each as read, with its revision).
#[derive(Debug, Default)]
pub(crate) struct Stored {
    pub(crate) host: Option<Versioned<Host>>,
    pub(crate) vm: Option<Versioned<Vm>>,
    pub(crate) migration: Option<Versioned<Migration>>,
}

/// What becomes of a write.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// These operations, all or none (each guarded by the revision it was decided on).
    Commit(Vec<Op>),
    /// What the host read has changed: nothing is written, the host reads again.
    Stale,
}

/// The longest reason a host may give for a migration's end.
const MAX_ERROR: usize = 2000;

fn refuse(host: &str, what: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::Forbidden(format!("host {host} may not {what}: {why}"))
}

fn put<T: Serialize>(key: String, value: &T, revision: u64) -> Result<Op, ApiError> {
    Ok(Op::Put {
        key,
        value: serde_json::to_vec(value).map_err(StoreError::from)?,
        when: Precondition::ModRevision(revision),
        lease: None,
    })
}

/// Decides `write` by `host` on the objects it concerns, as `stored` holds them, at `now`.
pub(crate) fn decide(
    host: &str,
    write: &HostWrite,
    stored: &Stored,
    now: DateTime<Utc>,
) -> Result<Decision, ApiError> {
    match write {
        HostWrite::Heartbeat { status } => {
            let Some(h) = &stored.host else {
                return Err(ApiError::Unauthorized(format!(
                    "host {host} is no longer in the cluster: join it again with a new join token"
                )));
            };
            let record = host_write(h.value.clone(), status.clone(), now)
                .map_err(|why| refuse(host, "report that status", why))?;
            Ok(Decision::Commit(vec![put(
                keys::host(host),
                &record,
                h.revision,
            )?]))
        }
        HostWrite::VmStatus {
            vm,
            revision,
            status,
        }
        | HostWrite::GuestPoweredOff {
            vm,
            revision,
            status,
        } => {
            let Some(stored) = own_vm(host, vm, *revision, stored)? else {
                return Ok(Decision::Stale);
            };
            if status.host.as_deref() != Some(host) {
                return Err(refuse(
                    host,
                    &format!("report VM {vm} elsewhere"),
                    "a VM moves to another host only by the handover of its migration",
                ));
            }
            let mut next = stored.value.clone();
            next.status = status.clone();
            if matches!(write, HostWrite::GuestPoweredOff { .. })
                && next.spec.power != PowerState::Stopped
            {
                next.spec.power = PowerState::Stopped;
                next.meta.bump();
            }
            let key = keys::vm(&vm.project, &vm.name);
            Ok(Decision::Commit(vec![put(key, &next, stored.revision)?]))
        }
        HostWrite::VmReleased { vm, revision } => {
            let Some(stored) = own_vm(host, vm, *revision, stored)? else {
                return Ok(Decision::Stale);
            };
            if stored.value.meta.deletion_requested_at.is_none() {
                return Err(refuse(
                    host,
                    &format!("release VM {vm}"),
                    "nobody asked to delete it",
                ));
            }
            Ok(Decision::Commit(vec![Op::Delete {
                key: keys::vm(&vm.project, &vm.name),
                when: Precondition::ModRevision(stored.revision),
            }]))
        }
        HostWrite::Migration { vm, revision, step } => {
            let Some(m) = stored
                .migration
                .as_ref()
                .filter(|m| m.revision == *revision)
            else {
                return Ok(Decision::Stale);
            };
            let next = migration_step(&m.value, step, host, now)
                .map_err(|why| refuse(host, &format!("take the migration of {vm} there"), why))?;
            let key = keys::migration(&vm.project, &vm.name);
            Ok(Decision::Commit(vec![put(key, &next, m.revision)?]))
        }
        HostWrite::Handover {
            vm,
            vm_revision,
            migration_revision,
            result,
        } => {
            let (Some(v), Some(m)) = (
                own_vm(host, vm, *vm_revision, stored)?,
                stored
                    .migration
                    .as_ref()
                    .filter(|m| m.revision == *migration_revision),
            ) else {
                return Ok(Decision::Stale);
            };
            let (v2, m2) = handover(&v.value, &m.value, host, result.clone(), now)
                .map_err(|why| refuse(host, &format!("hand VM {vm} over"), why))?;
            Ok(Decision::Commit(vec![
                put(keys::vm(&vm.project, &vm.name), &v2, v.revision)?,
                put(keys::migration(&vm.project, &vm.name), &m2, m.revision)?,
            ]))
        }
    }
}

/// The stored VM `vm` if it is as the host read it (else `None`: stale) and placed on `host`.
fn own_vm<'a>(
    host: &str,
    vm: &VmRef,
    revision: u64,
    stored: &'a Stored,
) -> Result<Option<&'a Versioned<Vm>>, ApiError> {
    let Some(v) = stored.vm.as_ref().filter(|v| v.revision == revision) else {
        return Ok(None);
    };
    if v.value.status.host.as_deref() != Some(host) {
        return Err(refuse(
            host,
            &format!("write VM {vm}"),
            "it is not placed on this host: a host reports only its own VMs",
        ));
    }
    Ok(Some(v))
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
) -> Result<Host, ValidationError> {
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

/// A path a target records for its own copy: absolute, plain, and nothing QEMU would read as
/// options.
fn check_own_path(what: &str, path: &str) -> Result<(), ValidationError> {
    // An RBD disk is named `rbd:POOL/IMAGE`, in Ceph's plain characters.
    if let Some((pool, image)) = path.strip_prefix("rbd:").and_then(|r| r.split_once('/')) {
        let ceph = |n: &str| {
            !n.is_empty()
                && n.len() <= 128
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        };
        if ceph(pool) && ceph(image) {
            return Ok(());
        }
    }
    let plain = path.starts_with('/')
        && path.len() < 4096
        && !path.contains(',')
        && !path.chars().any(char::is_control)
        && !path.split('/').any(|c| c == "..");
    if plain {
        Ok(())
    } else {
        Err(ValidationError::new(format!(
            "{what} {path:?} is not a plain absolute path (no commas, no '..') or rbd:POOL/IMAGE"
        )))
    }
}

/// The migration record after `host` took `step` on `stored`. The controller's fields never
/// change; the target prepares (Preparing -> TargetReady, its own fields); the source transfers
/// (TargetReady -> Transferring, progress); either side may end it as failed, and the source as
/// cancelled. Completion comes only with the handover ([`handover`]).
fn migration_step(
    stored: &Migration,
    step: &MigrationStep,
    host: &str,
    now: DateTime<Utc>,
) -> Result<Migration, ValidationError> {
    use MigrationPhase as P;
    let is_source = stored.source == host;
    let is_target = stored.target == host;
    if !is_source && !is_target {
        return Err(ValidationError::new(
            "the host is neither the source nor the target of this migration",
        ));
    }
    if stored.phase.is_finished() {
        return Err(ValidationError::new("the migration already ended"));
    }
    let mut next = stored.clone();
    next.updated_at = now;
    match step {
        MigrationStep::TargetReady {
            target_port,
            disk_port,
            target_pid,
            target_run_dir,
            target_disk,
        } => {
            if !is_target || stored.phase != P::Preparing {
                return Err(ValidationError::new(
                    "only the target readies a migration, once, while it prepares",
                ));
            }
            // The ports of what this kind of move needs, and nothing else: the source builds the
            // addresses from the target's record (`Migration::stream_to`).
            let ports =
                *target_port > 0 && disk_port.is_some_and(|p| p > 0) != stored.shared_storage;
            if !ports {
                return Err(ValidationError::new("a target that is ready records the port of its migration stream, and of its disk export exactly when the storage is not shared"));
            }
            check_own_path("the run directory", target_run_dir)?;
            check_own_path("the disk", target_disk)?;
            next.phase = P::TargetReady;
            next.target_port = Some(*target_port);
            next.disk_port = *disk_port;
            next.target_pid = Some(*target_pid);
            next.target_run_dir = Some(target_run_dir.clone());
            next.target_disk = Some(target_disk.clone());
        }
        MigrationStep::Transferring { progress } => {
            if !is_source || !matches!(stored.phase, P::TargetReady | P::Transferring) {
                return Err(ValidationError::new(
                    "only the source transfers, once the target is ready",
                ));
            }
            next.phase = P::Transferring;
            next.progress = progress.clone();
        }
        MigrationStep::Failed { error } | MigrationStep::Cancelled { error } => {
            let cancel = matches!(step, MigrationStep::Cancelled { .. });
            if cancel && !is_source {
                return Err(ValidationError::new("only the source cancels a migration"));
            }
            if error.len() > MAX_ERROR {
                return Err(ValidationError::new(format!(
                    "a reason is at most {MAX_ERROR} bytes"
                )));
            }
            next.phase = if cancel { P::Cancelled } else { P::Failed };
            next.error = Some(error.clone());
        }
    }
    Ok(next)
}

/// The handover of `vm` by its migration's source `host`: the VM becomes the copy its target
/// recorded (its worker there resumes the guest and marks the `Running` condition true), and the
/// migration completes.
fn handover(
    vm: &Vm,
    m: &Migration,
    host: &str,
    result: MigrationResult,
    now: DateTime<Utc>,
) -> Result<(Vm, Migration), ValidationError> {
    if m.source != host || m.vm_uid != vm.meta.uid {
        return Err(ValidationError::new(
            "the host is not the source of this VM's migration",
        ));
    }
    if m.phase != MigrationPhase::Transferring {
        return Err(ValidationError::new(
            "a migration completes only from transferring",
        ));
    }
    let mut m = m.clone();
    m.phase = MigrationPhase::Completed;
    m.progress.stage = "done".into();
    m.progress.percent = 100;
    m.result = Some(result);
    m.updated_at = now;
    let mut v = vm.clone();
    v.status.host = Some(m.target.clone());
    v.status.pid = m.target_pid;
    v.status.run_dir = m.target_run_dir.clone();
    if let (Some(path), Some(d)) = (&m.target_disk, v.status.disk.as_mut()) {
        d.path = path.clone();
    }
    v.status.phase = VmPhase::Running;
    v.status.set_condition(
        ConditionType::Running,
        false,
        RESUMING,
        &format!("live-migrated from {}", m.source),
    );
    v.status.push_event(VmEvent::new("Migrated", m.summary()));
    Ok((v, m))
}

/// Reads what `write` concerns, decides it and commits it. A heartbeat that lost a race with an
/// operator's change is decided again; any other lost race is [`Written::Stale`].
pub async fn apply(store: &dyn Store, host: &str, write: HostWrite) -> Result<Written, ApiError> {
    loop {
        let mut stored = Stored::default();
        match &write {
            HostWrite::Heartbeat { .. } => {
                stored.host = get_json(store, &keys::host(host)).await?;
            }
            HostWrite::VmStatus { vm, .. }
            | HostWrite::GuestPoweredOff { vm, .. }
            | HostWrite::VmReleased { vm, .. } => {
                stored.vm = get_json(store, &keys::vm(&vm.project, &vm.name)).await?;
            }
            HostWrite::Migration { vm, .. } => {
                stored.migration = get_json(store, &keys::migration(&vm.project, &vm.name)).await?;
            }
            HostWrite::Handover { vm, .. } => {
                stored.vm = get_json(store, &keys::vm(&vm.project, &vm.name)).await?;
                stored.migration = get_json(store, &keys::migration(&vm.project, &vm.name)).await?;
            }
        }
        let ops = match decide(host, &write, &stored, Utc::now())? {
            Decision::Commit(ops) => ops,
            Decision::Stale => return Ok(Written::Stale),
        };
        match store.txn(ops).await {
            Ok(revision) => return Ok(Written::Applied { revision }),
            Err(StoreError::Conflict { .. }) if matches!(write, HostWrite::Heartbeat { .. }) => {
                continue
            }
            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                return Ok(Written::Stale)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests;

/// A host in the controller's own process (the host of an all-in-one datacenter, or simulated
/// hosts on the embedded store): it reads the store directly, and its writes are decided here
/// exactly as the agent endpoint decides a remote host's.
pub struct LocalHost {
    store: Arc<dyn Store>,
    host: String,
}

impl LocalHost {
    /// The link of `host`, registered first if it is not yet (as a join registers a host).
    pub async fn register(store: Arc<dyn Store>, host: &str) -> Result<LocalHost, ApiError> {
        corral_api::validate_name("host", host)?;
        let record = serde_json::to_vec(&Host::joined(host)).map_err(StoreError::from)?;
        match store
            .put(&keys::host(host), record, Precondition::Absent)
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(LocalHost {
            store,
            host: host.to_string(),
        })
    }
}

#[async_trait]
impl ReadStore for LocalHost {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.store.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.store.list(prefix).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        self.store.watch(prefix, from).await
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.store.current_revision().await
    }
}

#[async_trait]
impl HostLink for LocalHost {
    async fn write(&self, write: HostWrite) -> Result<Written, LinkError> {
        match apply(&*self.store, &self.host, write).await {
            Ok(w) => Ok(w),
            Err(e @ (ApiError::Forbidden(_) | ApiError::Unauthorized(_))) => {
                Err(LinkError::Refused(e.to_string()))
            }
            Err(e) => Err(LinkError::Unavailable(e.to_string())),
        }
    }
}
