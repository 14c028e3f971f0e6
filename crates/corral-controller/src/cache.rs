//! The controller's in-memory copy of what placement, HA, DRS and the list endpoints read: hosts,
//! VMs, groups, migrations and the cluster settings, kept current by one watch of the store (an
//! informer, as Kubernetes controllers keep). Without it every placement decision would read and
//! parse every VM in the store, which at 100,000 VMs takes longer than the decision may.
//!
//! Reads stay linearizable: [`Cache::read`] first waits until the copy has applied every revision
//! the store had when it was called, so a handler sees its own and everyone's earlier writes (the
//! VM it just created, the host an agent just registered), exactly as a read from the store would.
//! Writes still go to the store, guarded by revisions; the copy never decides anything alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use corral_api::{keys, ClusterSettings, Host, Migration, Vm, VmGroup};
use corral_store::{EventKind, KeyValue, Revision, Store, StoreError};
use serde::de::DeserializeOwned;

use crate::ApiError;

/// Everything the store holds lives under this prefix.
const ALL: &str = "/corral/";
/// How long a read waits for the copy to catch up before it gives up.
const CATCH_UP: Duration = Duration::from_secs(10);

/// A stored object as parsed, with the revision it was last written at.
#[derive(Debug)]
pub struct Entry<T> {
    pub value: Arc<T>,
    pub revision: Revision,
}

impl<T> Clone for Entry<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            revision: self.revision,
        }
    }
}

/// What the VMs placed on a host take of it: those that run (or should) hold CPU and memory there;
/// the stopped ones hold none, and are counted apart for placement's balance.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Alloc {
    pub cpus: u64,
    pub memory: u64,
    pub stopped_cpus: u64,
    pub stopped_memory: u64,
}

impl Alloc {
    pub fn add(&mut self, vm: &Vm, sign: i64) {
        let apply = |v: &mut u64, d: u64| {
            *v = if sign > 0 {
                v.saturating_add(d)
            } else {
                v.saturating_sub(d)
            }
        };
        let (cpus, memory) = match vm.holds_capacity() {
            true => (&mut self.cpus, &mut self.memory),
            false => (&mut self.stopped_cpus, &mut self.stopped_memory),
        };
        apply(cpus, u64::from(vm.spec.cpus));
        apply(memory, vm.spec.memory_bytes);
    }
}

/// A host as the copy keeps it: its record, its name ready to hand out without copying, and what
/// the VMs placed there take, kept as VMs change so that a placement decision need not add up
/// every VM of the cluster, nor look each host up.
#[derive(Clone, Debug)]
pub struct HostEntry {
    pub value: Arc<Host>,
    pub revision: Revision,
    pub name: Arc<str>,
    pub alloc: Alloc,
}

/// The copy, by store key.
#[derive(Debug, Default)]
pub struct Objects {
    /// The last revision applied.
    pub revision: Revision,
    pub hosts: BTreeMap<String, HostEntry>,
    pub vms: BTreeMap<String, Entry<Vm>>,
    pub groups: BTreeMap<String, Entry<VmGroup>>,
    pub migrations: BTreeMap<String, Entry<Migration>>,
    pub settings: Option<ClusterSettings>,
    /// Per host name, the keys of the VMs placed there (with or without a host record), so that a
    /// host's page or a joining host costs its own VMs, not a pass over all of them.
    pub placed: HashMap<String, BTreeSet<String>>,
}

fn parse<T: DeserializeOwned>(kv: &KeyValue) -> Option<Entry<T>> {
    match serde_json::from_slice::<T>(&kv.value) {
        Ok(v) => Some(Entry {
            value: Arc::new(v),
            revision: kv.mod_revision,
        }),
        Err(e) => {
            // A record that does not parse is left out (and reported), not allowed to stop all.
            tracing::warn!(key = %kv.key, error = %e, "skipping a record that does not parse");
            None
        }
    }
}

fn apply<T: DeserializeOwned>(
    map: &mut BTreeMap<String, Entry<T>>,
    kind: EventKind,
    kv: &KeyValue,
) {
    match (kind, parse(kv)) {
        (EventKind::Put, Some(e)) => {
            map.insert(kv.key.clone(), e);
        }
        _ => {
            map.remove(&kv.key);
        }
    }
}

impl Objects {
    fn apply(&mut self, kind: EventKind, kv: &KeyValue) {
        let k = kv.key.as_str();
        if k.starts_with(keys::VMS) {
            let old = self.vms.get(k).map(|e| e.value.clone());
            apply(&mut self.vms, kind, kv);
            let new = self.vms.get(k).map(|e| e.value.clone());
            for (vm, sign) in [(old, -1), (new, 1)] {
                if let Some((vm, host)) =
                    vm.as_ref().and_then(|v| Some((v, v.status.host.as_ref()?)))
                {
                    // A VM on a host without a record counts once the record comes (below).
                    if let Some(h) = self.hosts.get_mut(&keys::host(host)) {
                        h.alloc.add(vm, sign);
                    }
                    if sign > 0 {
                        self.placed
                            .entry(host.clone())
                            .or_default()
                            .insert(kv.key.clone());
                    } else if let Some(on) = self.placed.get_mut(host) {
                        on.remove(k);
                        if on.is_empty() {
                            self.placed.remove(host);
                        }
                    }
                }
            }
        } else if k.starts_with(keys::HOSTS) {
            match (kind, parse::<Host>(kv)) {
                (EventKind::Put, Some(e)) => match self.hosts.get_mut(k) {
                    Some(h) => {
                        h.value = e.value;
                        h.revision = e.revision;
                    }
                    None => {
                        // A new host (or one back): whatever already names it counts.
                        let mut alloc = Alloc::default();
                        for v in self.placed_on(&e.value.name) {
                            alloc.add(&v.value, 1);
                        }
                        let name = Arc::from(e.value.name.as_str());
                        self.hosts.insert(
                            kv.key.clone(),
                            HostEntry {
                                value: e.value,
                                revision: e.revision,
                                name,
                                alloc,
                            },
                        );
                    }
                },
                _ => {
                    self.hosts.remove(k);
                }
            }
        } else if k.starts_with(keys::MIGRATIONS) {
            apply(&mut self.migrations, kind, kv);
        } else if k.starts_with(keys::GROUPS) {
            apply(&mut self.groups, kind, kv);
        } else if k == keys::CLUSTER {
            self.settings = match kind {
                EventKind::Put => serde_json::from_slice(&kv.value).ok(),
                EventKind::Delete => None,
            };
        }
    }

    /// The VMs placed on `host`, in key order.
    pub fn placed_on<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a Entry<Vm>> + 'a {
        self.placed
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|k| self.vms.get(k))
    }

    /// The VMs whose keys start with `prefix` (a project's), in key order, after the VM named `after`.
    pub fn vms_in<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&str>,
    ) -> impl Iterator<Item = &'a Entry<Vm>> + 'a {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(format!("{prefix}{a}")),
            None => std::ops::Bound::Included(prefix.to_string()),
        };
        self.vms
            .range((start, std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
    }
}

/// The copy and the revision it has applied.
pub struct Cache {
    objects: RwLock<Objects>,
    applied: tokio::sync::watch::Sender<Revision>,
}

impl Cache {
    /// Loads the copy and keeps it current in the background.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Cache>, StoreError> {
        let cache = Arc::new(Cache {
            objects: RwLock::default(),
            applied: tokio::sync::watch::channel(0).0,
        });
        let from = cache.load(&*store).await?;
        let me = cache.clone();
        tokio::spawn(async move {
            let mut from = from;
            loop {
                match me.follow(&*store, from).await {
                    Ok(()) => tracing::info!("the cache's watch ended; loading again"),
                    Err(e) => tracing::warn!(error = %e, "the cache's watch failed; loading again"),
                }
                loop {
                    match me.load(&*store).await {
                        Ok(r) => {
                            from = r;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "loading the cache failed; trying again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        });
        Ok(cache)
    }

    /// Reads everything afresh; returns the revision to watch from.
    async fn load(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let (kvs, rev) = store.list(ALL).await?;
        let mut fresh = Objects {
            revision: rev,
            ..Default::default()
        };
        for kv in &kvs {
            fresh.apply(EventKind::Put, kv);
        }
        *self.objects.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.applied.send_replace(rev);
        Ok(rev + 1)
    }

    /// Applies changes as they come, a whole revision at a time, until the watch ends.
    async fn follow(&self, store: &dyn Store, from: Revision) -> Result<(), StoreError> {
        let mut watch = store.watch(ALL, from).await?;
        let mut batch = Vec::new();
        while let Some(ev) = watch.recv().await {
            batch.push(ev?);
            // Take what has arrived too: one lock for many events.
            while let Ok(ev) = watch.try_recv() {
                batch.push(ev?);
            }
            // Publish only whole revisions, so no reader sees half a transaction.
            let upto = batch
                .iter()
                .rposition(|e| e.last_in_revision)
                .map_or(0, |i| i + 1);
            if upto == 0 {
                continue;
            }
            let rev = batch[upto - 1].kv.mod_revision;
            {
                let mut o = self.objects.write().unwrap_or_else(|e| e.into_inner());
                for e in batch.drain(..upto) {
                    o.apply(e.kind, &e.kv);
                }
                o.revision = rev;
            }
            self.applied.send_replace(rev);
        }
        Ok(())
    }

    /// The copy once it has applied everything the store held when this was called.
    pub async fn read(&self, store: &dyn Store) -> Result<RwLockReadGuard<'_, Objects>, ApiError> {
        let rev = store.current_revision().await?;
        let mut applied = self.applied.subscribe();
        let caught_up = tokio::time::timeout(CATCH_UP, applied.wait_for(|r| *r >= rev))
            .await
            .is_ok_and(|r| r.is_ok());
        if !caught_up {
            return Err(ApiError::Unavailable(format!(
                "the controller's view of the cluster is behind the store (revision {} of {rev}): try again in a moment",
                *applied.borrow()
            )));
        }
        Ok(self.objects.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The names of `project`'s VMs that `pred` takes, in name order (what a delete that must not
    /// leave a VM without its image, network or group names).
    pub async fn vms_where(
        &self,
        store: &dyn Store,
        project: &str,
        pred: impl Fn(&Vm) -> bool,
    ) -> Result<Vec<String>, ApiError> {
        let o = self.read(store).await?;
        Ok(o.vms_in(&keys::vms(project), None)
            .filter(|e| pred(&e.value))
            .map(|e| e.value.meta.name.clone())
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use corral_store::{Op, Precondition, RedbStore};

    /// A running VM `project/name` (unplaced) for tests.
    pub(crate) fn vm(project: &str, name: &str) -> Vm {
        Vm {
            meta: corral_api::ObjectMeta::new(project, name),
            spec: serde_json::from_value(serde_json::json!({
                "image": "i", "cpus": 1, "memory_bytes": 1u64 << 30, "disk_bytes": 0,
                "power": "running", "datastore": "local"
            }))
            .expect("spec"),
            status: Default::default(),
            ha: None,
        }
    }

    fn host_record(name: &str) -> Vec<u8> {
        let host: Host = serde_json::from_value(serde_json::json!({
            "name": name, "status": {"cpus": 4, "memory_bytes": 1u64 << 34, "accel": "tcg",
                "hypervisor": "sim", "last_heartbeat": "2026-01-01T00:00:00Z"}
        }))
        .expect("host");
        serde_json::to_vec(&host).expect("json")
    }

    #[tokio::test]
    async fn reads_see_every_earlier_write_and_pages_stay_in_their_project() {
        let dir = tempfile::tempdir().expect("dir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let cache = Cache::start(store.clone()).await.expect("cache");
        for (p, n) in [("a", "x1"), ("a", "x2"), ("a", "x3"), ("b", "x0")] {
            let put = Op::Put {
                key: keys::vm(p, n),
                value: serde_json::to_vec(&vm(p, n)).expect("json"),
                when: Precondition::Absent,
                lease: None,
            };
            store.txn(vec![put]).await.expect("txn");
            // Read right after the write: the copy has it.
            let o = cache.read(&*store).await.expect("read");
            assert!(o.vms.contains_key(&keys::vm(p, n)));
        }
        {
            let o = cache.read(&*store).await.expect("read");
            let prefix = keys::vms("a");
            let names = |after| -> Vec<String> {
                o.vms_in(&prefix, after)
                    .map(|e| e.value.meta.name.clone())
                    .collect()
            };
            assert_eq!(names(None), ["x1", "x2", "x3"]);
            assert_eq!(names(Some("x1")), ["x2", "x3"]);
            assert!(names(Some("x3")).is_empty());
        }
        store
            .delete(&keys::vm("a", "x2"), Precondition::Any)
            .await
            .expect("delete");
        {
            let o = cache.read(&*store).await.expect("read");
            assert!(!o.vms.contains_key(&keys::vm("a", "x2")));
            assert_eq!(o.vms.len(), 3);
        }

        // What each host was given follows the VMs as they are placed, move and go.
        for name in ["h1", "h2"] {
            store
                .put(&keys::host(name), host_record(name), Precondition::Absent)
                .await
                .expect("put");
        }
        let mut v = vm("a", "x1");
        v.spec.power = corral_api::PowerState::Running;
        for host in ["h1", "h2"] {
            v.status.host = Some(host.into());
            let bytes = serde_json::to_vec(&v).expect("json");
            store
                .put(&keys::vm("a", "x1"), bytes, Precondition::Any)
                .await
                .expect("put");
            let o = cache.read(&*store).await.expect("read");
            let on = |h: &str| o.hosts[&keys::host(h)].alloc;
            assert_eq!(
                on(host),
                Alloc {
                    cpus: 1,
                    memory: 1 << 30,
                    ..Alloc::default()
                }
            );
            assert_eq!(on(if host == "h1" { "h2" } else { "h1" }), Alloc::default());
            let names = |h: &str| -> Vec<String> {
                o.placed_on(h).map(|e| e.value.meta.name.clone()).collect()
            };
            assert_eq!(names(host), ["x1"]);
            assert!(names(if host == "h1" { "h2" } else { "h1" }).is_empty());
        }
        store
            .delete(&keys::vm("a", "x1"), Precondition::Any)
            .await
            .expect("delete");
        {
            let o = cache.read(&*store).await.expect("read");
            assert_eq!(o.hosts[&keys::host("h2")].alloc, Alloc::default());
            assert!(o.placed.is_empty(), "{:?}", o.placed);
        }

        // A VM that names a host before the host's record exists counts once the record comes.
        let mut early = vm("b", "x0");
        early.status.host = Some("h3".into());
        store
            .put(
                &keys::vm("b", "x0"),
                serde_json::to_vec(&early).expect("json"),
                Precondition::Any,
            )
            .await
            .expect("put");
        store
            .put(&keys::host("h3"), host_record("h3"), Precondition::Absent)
            .await
            .expect("put");
        let o = cache.read(&*store).await.expect("read");
        assert_eq!(o.hosts[&keys::host("h3")].alloc.cpus, 1);
        assert_eq!(o.placed_on("h3").count(), 1);
    }
}
