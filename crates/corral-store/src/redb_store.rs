//! The embedded backend: one redb file in the data dir, for the all-in-one datacenter.
//!
//! redb gives ACID transactions with one writer; revisions, the event log that watches replay, and
//! leases are built on top here. Every commit is durable before the call returns, so anything a caller
//! was told succeeded survives a crash. Transactions that arrive while a commit is under way wait
//! and are then committed together (group commit): each keeps its own revision and its own
//! all-or-nothing outcome, and they share one sync to disk, which is what bounds a disk's commits
//! per second. Lease deadlines are kept in memory and restart from their full
//! TTL when the store is opened again, as etcd does after a leader change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, TableDefinition,
    WriteTransaction,
};
use tokio::sync::{broadcast, mpsc};

use crate::{
    Event, EventKind, KeyValue, LeaseId, Op, Precondition, ReadStore, Revision, Store, StoreError,
    WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<u64, &str> = MultimapTableDefinition::new("lease_keys");

/// How many revisions of history watches can replay.
const HISTORY: u64 = 10_000;
/// A commit slower than this is logged (etcd warns of applies slower than 100 ms; this store often
/// shares two cores with everything else).
const SLOW_COMMIT: Duration = Duration::from_millis(500);

/// A transaction waiting in the queue, and where its outcome goes.
struct Queued {
    ops: Vec<Op>,
    outcome: Arc<Mutex<Option<Result<Revision, StoreError>>>>,
}

/// Locks `m`; a panic elsewhere while it was held leaves nothing half done that matters here.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The embedded store. Cloning gives another handle to the same database.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Held across commit and publish, so watchers see batches in revision order.
    writer: Mutex<()>,
    /// Transactions waiting for a commit: whoever holds `writer` next commits all of them.
    queue: Mutex<Vec<Queued>>,
    events: broadcast::Sender<Arc<(Revision, Vec<Event>)>>,
    /// Lease id -> (ttl, deadline).
    leases: Mutex<HashMap<LeaseId, (Duration, Instant)>>,
    /// The last committed revision, set before any caller hears of it: asking for it costs no
    /// read transaction and no wait for a thread behind queued writers.
    revision: AtomicU64,
}

impl RedbStore {
    /// Opens (or creates) the store at `path` and starts expiring leases. Needs a tokio runtime.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).be(path)?;
        let txn = db.begin_write().be(path)?;
        txn.open_table(KV).be(path)?;
        txn.open_table(LOG).be(path)?;
        txn.open_multimap_table(LEASE_KEYS).be(path)?;
        let mut leases = HashMap::new();
        {
            let mut meta = txn.open_table(META).be(path)?;
            if meta.get("revision").be(path)?.is_none() {
                meta.insert("revision", 1).be(path)?;
                meta.insert("oldest", 1).be(path)?;
                meta.insert("next_lease", 1).be(path)?;
            }
            let table = txn.open_table(LEASES).be(path)?;
            let now = Instant::now();
            for row in table.iter().be(path)? {
                let (id, ttl_ms) = row.be(path)?;
                let ttl = Duration::from_millis(ttl_ms.value());
                leases.insert(id.value(), (ttl, now + ttl));
            }
        }
        txn.commit().be(path)?;
        let revision = {
            let txn = db.begin_read().be(path)?;
            let meta = txn.open_table(META).be(path)?;
            meta.get("revision").be(path)?.map_or(1, |v| v.value())
        };
        let (events, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            db,
            path: path.to_path_buf(),
            writer: Mutex::new(()),
            queue: Mutex::new(Vec::new()),
            events,
            leases: Mutex::new(leases),
            revision: AtomicU64::new(revision),
        });
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }
}

/// Turns any redb error into a `StoreError` that names the file.
trait OrBackend<T> {
    fn be(self, path: &Path) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> OrBackend<T> for Result<T, E> {
    fn be(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Backend {
            path: path.display().to_string(),
            message: e.into().to_string(),
        })
    }
}

/// Revokes leases whose deadline passed. Stops when the store is dropped.
async fn expire_leases(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let expired: Vec<LeaseId> = {
            let leases = inner.leases.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            leases
                .iter()
                .filter(|(_, (_, d))| *d <= now)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in expired {
            let inner = inner.clone();
            let res = tokio::task::spawn_blocking(move || inner.revoke(id, true)).await;
            if let Ok(Err(e)) = res {
                tracing::warn!(lease = id, error = %e, "could not expire lease");
            }
        }
    }
}

fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn decode_kv(key: &str, b: &[u8]) -> KeyValue {
    let lease = u64_at(b, 24);
    KeyValue {
        key: key.to_string(),
        create_revision: u64_at(b, 0),
        mod_revision: u64_at(b, 8),
        version: u64_at(b, 16),
        lease: (lease != 0).then_some(lease),
        value: b[32..].to_vec(),
    }
}

fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        out.extend_from_slice(&(e.kv.key.len() as u32).to_le_bytes());
        out.extend_from_slice(e.kv.key.as_bytes());
        let kv = encode_kv(&e.kv);
        out.extend_from_slice(&(kv.len() as u32).to_le_bytes());
        out.extend_from_slice(&kv);
    }
    out
}

fn decode_events(mut b: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    let len_at = |b: &[u8], at: usize| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[at..at + 4]);
        u32::from_le_bytes(a) as usize
    };
    while !b.is_empty() {
        let kind = if b[0] == 0 {
            EventKind::Put
        } else {
            EventKind::Delete
        };
        let klen = len_at(b, 1);
        let key = String::from_utf8_lossy(&b[5..5 + klen]).into_owned();
        let vlen = len_at(b, 5 + klen);
        let start = 9 + klen;
        events.push(Event {
            kind,
            kv: decode_kv(&key, &b[start..start + vlen]),
            last_in_revision: false,
        });
        b = &b[start + vlen..];
    }
    events
}

impl Inner {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let txn = self.db.begin_read().be(&self.path)?;
        let table = txn.open_table(KV).be(&self.path)?;
        let v = table.get(key).be(&self.path)?;
        Ok(v.map(|v| decode_kv(key, v.value())))
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let txn = self.db.begin_read().be(&self.path)?;
        let rev = read_revision(&txn, self)?;
        let table = txn.open_table(KV).be(&self.path)?;
        let mut out = Vec::new();
        for row in table.range(prefix..).be(&self.path)? {
            let (k, v) = row.be(&self.path)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(decode_kv(k.value(), v.value()));
        }
        Ok((out, rev))
    }

    /// Commits `ops` as one revision and publishes the events. Preconditions are checked first.
    /// The call queues `ops`; the first caller to get the writer commits everything queued by then.
    fn write(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        let outcome = Arc::new(Mutex::new(None));
        lock(&self.queue).push(Queued {
            ops,
            outcome: outcome.clone(),
        });
        let _guard = lock(&self.writer);
        // Committed by the caller that held the writer before us?
        if let Some(done) = lock(&outcome).take() {
            return done;
        }
        let batch = std::mem::take(&mut *lock(&self.queue));
        let (n, started) = (batch.len(), Instant::now());
        self.commit(batch);
        // Every write, and so the API, waits on a commit: a slow disk should not go unnoticed.
        let took = started.elapsed();
        if took > SLOW_COMMIT {
            tracing::warn!(
                path = %self.path.display(),
                transactions = n,
                ms = took.as_millis() as u64,
                "a commit took longer than {} ms: the disk under the store is slow or busy (writes wait on every commit)",
                SLOW_COMMIT.as_millis()
            );
        }
        let done = lock(&outcome).take();
        done.unwrap_or_else(|| Err(self.backend("the transaction was not committed")))
    }

    /// Commits every transaction of `batch` in one redb transaction, each with its own revision (a
    /// failed precondition fails that one alone), publishes their events in revision order, and
    /// hands each caller its outcome. A backend error fails them all: nothing was committed.
    fn commit(&self, batch: Vec<Queued>) {
        let mut results = Vec::with_capacity(batch.len());
        let mut published = Vec::new();
        let slots: Vec<_> = batch.iter().map(|q| q.outcome.clone()).collect();
        let committed = (|| {
            let txn = self.db.begin_write().be(&self.path)?;
            for q in batch {
                match self.apply(&txn, q.ops) {
                    Ok((rev, events)) => {
                        results.push(Ok(rev));
                        if !events.is_empty() {
                            published.push((rev, events));
                        }
                    }
                    Err(e @ StoreError::Backend { .. }) => return Err(e),
                    Err(e) => results.push(Err(e)),
                }
            }
            if published.is_empty() {
                // Checks alone change nothing.
                return txn.abort().be(&self.path);
            }
            txn.commit().be(&self.path)
        })();
        if let Err(e) = committed {
            let message = match e {
                StoreError::Backend { message, .. } => message,
                other => other.to_string(),
            };
            for slot in &slots {
                *lock(slot) = Some(Err(self.backend(&message)));
            }
            return;
        }
        // Set after the commit (a failed one must not be announced) and before any caller hears
        // of it: an acknowledged write is always within the current revision. (A reader of the
        // database may see a commit for the few microseconds before this line.)
        if let Some((rev, _)) = published.last() {
            self.revision.store(*rev, Ordering::SeqCst);
        }
        // Nobody listening is fine.
        for batch in published {
            let _ = self.events.send(Arc::new(batch));
        }
        for (slot, result) in slots.iter().zip(results) {
            *lock(slot) = Some(result);
        }
    }

    fn backend(&self, message: &str) -> StoreError {
        StoreError::Backend {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Applies `ops` as the next revision, or fails with nothing written: every precondition is
    /// checked (each against the state the ops before it leave) before anything is written, so a
    /// failed transaction leaves nothing behind in the batch it shares. Checks alone get no
    /// revision (as in etcd), so every revision has events and a watcher knows when it has seen
    /// them all: they return the current one and no events.
    fn apply(
        &self,
        txn: &WriteTransaction,
        ops: Vec<Op>,
    ) -> Result<(Revision, Vec<Event>), StoreError> {
        let mut meta = txn.open_table(META).be(&self.path)?;
        let current = meta
            .get("revision")
            .be(&self.path)?
            .map(|v| v.value())
            .unwrap_or(1);
        let mut kv_table = txn.open_table(KV).be(&self.path)?;
        let rev = current + 1;
        // What the ops ahead in this transaction made of a key (its revision, or gone): each op
        // is checked against the state the ops before it leave, as when they are applied.
        let mut ahead: HashMap<&str, Option<Revision>> = HashMap::new();
        for op in &ops {
            let (key, when) = match op {
                Op::Put { key, when, .. } | Op::Delete { key, when } | Op::Check { key, when } => {
                    (key, *when)
                }
            };
            let mod_revision = match ahead.get(key.as_str()) {
                Some(r) => *r,
                None => kv_table
                    .get(key.as_str())
                    .be(&self.path)?
                    .map(|v| decode_kv(key, v.value()).mod_revision),
            };
            let holds = match (when, mod_revision) {
                (Precondition::Any, _) => true,
                (Precondition::Absent, c) => c.is_none(),
                (Precondition::ModRevision(r), Some(c)) => c == r,
                (Precondition::ModRevision(_), None) => false,
            };
            if !holds {
                return Err(StoreError::Conflict { key: key.clone() });
            }
            match op {
                Op::Delete { .. } if mod_revision.is_none() => {
                    return Err(StoreError::NotFound { key: key.clone() });
                }
                Op::Put { lease: Some(l), .. } if !lock(&self.leases).contains_key(l) => {
                    return Err(StoreError::LeaseNotFound(*l));
                }
                Op::Put { .. } => {
                    ahead.insert(key, Some(rev));
                }
                Op::Delete { .. } => {
                    ahead.insert(key, None);
                }
                Op::Check { .. } => {}
            }
        }
        if ops.iter().all(|o| matches!(o, Op::Check { .. })) {
            return Ok((current, Vec::new()));
        }
        let mut lease_keys = txn.open_multimap_table(LEASE_KEYS).be(&self.path)?;
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            let key = match &op {
                Op::Put { key, .. } | Op::Delete { key, .. } => key.clone(),
                Op::Check { .. } => continue,
            };
            let current = kv_table
                .get(key.as_str())
                .be(&self.path)?
                .map(|v| decode_kv(&key, v.value()));
            if let Some(old_lease) = current.as_ref().and_then(|c| c.lease) {
                lease_keys.remove(old_lease, key.as_str()).be(&self.path)?;
            }
            match op {
                Op::Put { value, lease, .. } => {
                    if let Some(l) = lease {
                        lease_keys.insert(l, key.as_str()).be(&self.path)?;
                    }
                    let kv = KeyValue {
                        create_revision: current.as_ref().map_or(rev, |c| c.create_revision),
                        version: current.as_ref().map_or(1, |c| c.version + 1),
                        mod_revision: rev,
                        lease,
                        key: key.clone(),
                        value,
                    };
                    kv_table
                        .insert(key.as_str(), encode_kv(&kv).as_slice())
                        .be(&self.path)?;
                    events.push(Event {
                        kind: EventKind::Put,
                        kv,
                        last_in_revision: false,
                    });
                }
                Op::Check { .. } => {}
                Op::Delete { .. } => {
                    // Checked above: present when its turn comes.
                    let Some(c) = current else { continue };
                    kv_table.remove(key.as_str()).be(&self.path)?;
                    events.push(Event {
                        kind: EventKind::Delete,
                        last_in_revision: false,
                        kv: KeyValue {
                            value: Vec::new(),
                            mod_revision: rev,
                            lease: None,
                            ..c
                        },
                    });
                }
            }
        }
        meta.insert("revision", rev).be(&self.path)?;
        let mut log = txn.open_table(LOG).be(&self.path)?;
        log.insert(rev, encode_events(&events).as_slice())
            .be(&self.path)?;
        if rev % 1000 == 0 && rev > HISTORY {
            let oldest = rev - HISTORY;
            log.retain_in(..oldest, |_, _| false).be(&self.path)?;
            meta.insert("oldest", oldest).be(&self.path)?;
        }
        Ok((rev, events))
    }

    /// Log entries with revision in `from..=to` whose key is under `prefix`, and the oldest kept.
    fn history(&self, prefix: &str, from: Revision) -> Result<(Vec<Event>, Revision), StoreError> {
        let txn = self.db.begin_read().be(&self.path)?;
        let rev = read_revision(&txn, self)?;
        let meta = txn.open_table(META).be(&self.path)?;
        let oldest = meta
            .get("oldest")
            .be(&self.path)?
            .map(|v| v.value())
            .unwrap_or(1);
        if from < oldest {
            return Err(StoreError::Compacted {
                requested: from,
                oldest,
            });
        }
        let log = txn.open_table(LOG).be(&self.path)?;
        let mut out = Vec::new();
        for row in log.range(from..=rev).be(&self.path)? {
            let (_, v) = row.be(&self.path)?;
            out.extend(
                decode_events(v.value())
                    .into_iter()
                    .filter(|e| e.kv.key.starts_with(prefix)),
            );
        }
        Ok((out, rev))
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().be(&self.path)?;
        let id = {
            let mut meta = txn.open_table(META).be(&self.path)?;
            let id = meta
                .get("next_lease")
                .be(&self.path)?
                .map(|v| v.value())
                .unwrap_or(1);
            meta.insert("next_lease", id + 1).be(&self.path)?;
            let mut leases = txn.open_table(LEASES).be(&self.path)?;
            leases.insert(id, ttl.as_millis() as u64).be(&self.path)?;
            id
        };
        txn.commit().be(&self.path)?;
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (ttl, Instant::now() + ttl));
        Ok(id)
    }

    /// Ends lease `id` and deletes its keys, in one transaction. With `only_if_expired`, a lease
    /// renewed since its expiry was noticed is left alone.
    fn revoke(&self, id: LeaseId, only_if_expired: bool) -> Result<(), StoreError> {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            match leases.get(&id) {
                Some((_, deadline)) if only_if_expired && *deadline > Instant::now() => {
                    return Ok(())
                }
                Some(_) => {
                    leases.remove(&id);
                }
                None => return Err(StoreError::LeaseNotFound(id)),
            }
        }
        let txn = self.db.begin_write().be(&self.path)?;
        let keys: Vec<String> = {
            let table = txn.open_multimap_table(LEASE_KEYS).be(&self.path)?;
            let mut keys = Vec::new();
            for k in table.get(id).be(&self.path)? {
                keys.push(k.be(&self.path)?.value().to_string());
            }
            keys
        };
        // The multimap only holds keys still attached to this lease: puts and deletes keep it in step.
        let ops: Vec<Op> = keys
            .into_iter()
            .map(|key| Op::Delete {
                key,
                when: Precondition::Any,
            })
            .collect();
        let published = if ops.is_empty() {
            None
        } else {
            Some(self.apply(&txn, ops)?)
        };
        {
            let mut leases = txn.open_table(LEASES).be(&self.path)?;
            leases.remove(id).be(&self.path)?;
            let mut lk = txn.open_multimap_table(LEASE_KEYS).be(&self.path)?;
            lk.remove_all(id).be(&self.path)?;
        }
        txn.commit().be(&self.path)?;
        if let Some(batch) = published {
            self.revision.store(batch.0, Ordering::SeqCst);
            let _ = self.events.send(Arc::new(batch));
        }
        Ok(())
    }
}

fn read_revision(txn: &redb::ReadTransaction, inner: &Inner) -> Result<Revision, StoreError> {
    let meta = txn.open_table(META).be(&inner.path)?;
    Ok(meta
        .get("revision")
        .be(&inner.path)?
        .map(|v| v.value())
        .unwrap_or(1))
}

impl RedbStore {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend {
                path: self.inner.path.display().to_string(),
                message: e.to_string(),
            })?
    }
}

#[async_trait]
impl ReadStore for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |i| i.get(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        // Subscribe before reading history, so nothing falls between the two.
        let mut live = self.inner.events.subscribe();
        let (mut history, upto) = if from == 0 {
            (Vec::new(), self.current_revision().await?)
        } else {
            let p = prefix.to_string();
            self.blocking(move |i| i.history(&p, from)).await?
        };
        crate::mark_revision_ends(&mut history);
        let (tx, rx) = mpsc::channel(1024);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            for e in history {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                // Stop as soon as the watcher goes away, not at its next matching event.
                let next = tokio::select! {
                    next = live.recv() => next,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(batch) => {
                        if batch.0 <= upto || batch.0 < from {
                            continue;
                        }
                        let mut mine: Vec<Event> = batch
                            .1
                            .iter()
                            .filter(|e| e.kv.key.starts_with(&prefix))
                            .cloned()
                            .collect();
                        crate::mark_revision_ends(&mut mine);
                        for e in mine {
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Err(StoreError::WatchLagged)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.revision.load(Ordering::SeqCst))
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        self.blocking(move |i| i.write(ops)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |i| i.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut leases = self.inner.leases.lock().unwrap_or_else(|p| p.into_inner());
        match leases.get_mut(&lease) {
            Some((ttl, deadline)) => {
                *deadline = Instant::now() + *ttl;
                Ok(())
            }
            None => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |i| i.revoke(lease, false)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;

    fn fresh() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(&dir.path().join("store.redb")).expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn contract_holds() {
        contract::run_all(|| async {
            let (dir, store) = fresh();
            (
                Box::new(dir) as Box<dyn std::any::Any + Send>,
                Arc::new(store) as Arc<dyn Store>,
            )
        })
        .await;
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        let rev = {
            let store = RedbStore::open(&path).expect("open");
            store
                .put("/a", b"1".to_vec(), Precondition::Absent)
                .await
                .expect("put");
            store
                .put("/a", b"2".to_vec(), Precondition::Any)
                .await
                .expect("put")
        };
        // The first handle is gone; wait for its lease task to let go of the database.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let store = RedbStore::open(&path).expect("reopen");
        let kv = store.get("/a").await.expect("get").expect("present");
        assert_eq!(kv.value, b"2");
        assert_eq!(kv.mod_revision, rev);
        assert_eq!(kv.version, 2);
        assert_eq!(store.current_revision().await.expect("rev"), rev);
        // History survives too: a watch from the first write replays both.
        let mut w = store.watch("/a", 1).await.expect("watch");
        assert_eq!(w.recv().await.expect("event").expect("ok").kv.value, b"1");
        assert_eq!(w.recv().await.expect("event").expect("ok").kv.value, b"2");
    }
}
