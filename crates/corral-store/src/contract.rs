//! The behaviour every [`Store`] backend must show. Backends call [`run_all`] from their tests with a
//! factory that makes a fresh, empty store; the checks never assume which backend they run against.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{EventKind, Op, Precondition, Store, StoreError};

/// Keeps whatever the factory needs alive (a temporary directory, a server process) for one check.
pub type Guard = Box<dyn std::any::Any + Send>;

/// Runs every check, each against a fresh store from `factory`. Panics on the first violation.
pub async fn run_all<F, Fut>(factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = (Guard, Arc<dyn Store>)>,
{
    let (_g, s) = factory().await;
    put_get_and_versions(&*s).await;
    let (_g, s) = factory().await;
    compare_and_swap(&*s).await;
    let (_g, s) = factory().await;
    transactions_are_all_or_nothing(&*s).await;
    let (_g, s) = factory().await;
    checks_guard_without_writing(&*s).await;
    let (_g, s) = factory().await;
    list_by_prefix(&*s).await;
    let (_g, s) = factory().await;
    watch_replays_then_follows(&*s).await;
    let (_g, s) = factory().await;
    watch_orders_concurrent_writers(s).await;
    let (_g, s) = factory().await;
    concurrent_transactions_stand_alone(s).await;
    let (_g, s) = factory().await;
    ops_see_the_ops_before_them(&*s).await;
    let (_g, s) = factory().await;
    leases_expire_and_can_be_kept(&*s).await;
}

async fn put_get_and_versions(s: &dyn Store) {
    assert!(s.get("/k").await.expect("get").is_none());
    let r1 = s
        .put("/k", b"a".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let r2 = s
        .put("/k", b"b".to_vec(), Precondition::Any)
        .await
        .expect("put");
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    let kv = s.get("/k").await.expect("get").expect("present");
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"b"[..], r1, r2, 2)
    );
    assert_eq!(s.current_revision().await.expect("rev"), r2);
    let r3 = s.delete("/k", Precondition::Any).await.expect("delete");
    assert!(r3 > r2);
    assert!(s.get("/k").await.expect("get").is_none());
    assert!(matches!(
        s.delete("/k", Precondition::Any).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn compare_and_swap(s: &dyn Store) {
    let r1 = s
        .put("/vm", b"v1".to_vec(), Precondition::Absent)
        .await
        .expect("create");
    let dup = s.put("/vm", b"other".to_vec(), Precondition::Absent).await;
    assert!(
        matches!(dup, Err(StoreError::Conflict { .. })),
        "second create must conflict: {dup:?}"
    );
    let r2 = s
        .put("/vm", b"v2".to_vec(), Precondition::ModRevision(r1))
        .await
        .expect("cas");
    // A writer that read at r1 lost the race.
    let stale = s
        .put("/vm", b"v3".to_vec(), Precondition::ModRevision(r1))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "stale CAS must conflict: {stale:?}"
    );
    let stale_del = s.delete("/vm", Precondition::ModRevision(r1)).await;
    assert!(matches!(stale_del, Err(StoreError::Conflict { .. })));
    assert_eq!(
        s.get("/vm").await.expect("get").expect("present").value,
        b"v2"
    );
    s.delete("/vm", Precondition::ModRevision(r2))
        .await
        .expect("cas delete");
    let missing = s
        .put("/vm", b"x".to_vec(), Precondition::ModRevision(r2))
        .await;
    assert!(
        matches!(missing, Err(StoreError::Conflict { .. })),
        "CAS on a missing key conflicts"
    );
}

async fn transactions_are_all_or_nothing(s: &dyn Store) {
    s.put("/a", b"1".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let before = s.current_revision().await.expect("rev");
    let res = s
        .txn(vec![
            Op::Put {
                key: "/b".into(),
                value: b"2".to_vec(),
                when: Precondition::Absent,
                lease: None,
            },
            Op::Put {
                key: "/a".into(),
                value: b"x".to_vec(),
                when: Precondition::Absent,
                lease: None,
            },
        ])
        .await;
    assert!(matches!(res, Err(StoreError::Conflict { .. })));
    assert!(
        s.get("/b").await.expect("get").is_none(),
        "a failed txn writes nothing"
    );
    assert_eq!(
        s.current_revision().await.expect("rev"),
        before,
        "a failed txn takes no revision"
    );
    let rev = s
        .txn(vec![
            Op::Put {
                key: "/b".into(),
                value: b"2".to_vec(),
                when: Precondition::Absent,
                lease: None,
            },
            Op::Delete {
                key: "/a".into(),
                when: Precondition::Any,
            },
        ])
        .await
        .expect("txn");
    assert_eq!(rev, before + 1, "one transaction, one revision");
    assert_eq!(
        s.get("/b").await.expect("get").expect("b").mod_revision,
        rev
    );
    assert!(s.get("/a").await.expect("get").is_none());
}

async fn checks_guard_without_writing(s: &dyn Store) {
    let r1 = s
        .put("/img", b"ready".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let check = |r| Op::Check {
        key: "/img".into(),
        when: Precondition::ModRevision(r),
    };
    let create = |k: &str| Op::Put {
        key: k.into(),
        value: b"x".to_vec(),
        when: Precondition::Absent,
        lease: None,
    };
    s.txn(vec![check(r1), create("/vm")])
        .await
        .expect("check holds");
    assert_eq!(
        s.get("/img").await.expect("get").expect("img").mod_revision,
        r1,
        "a check writes nothing"
    );
    assert!(s.get("/vm").await.expect("get").is_some());
    s.put("/img", b"deleting".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let res = s.txn(vec![check(r1), create("/vm2")]).await;
    assert!(
        matches!(res, Err(StoreError::Conflict { ref key }) if key == "/img"),
        "{res:?}"
    );
    assert!(s.get("/vm2").await.expect("get").is_none());
}

async fn list_by_prefix(s: &dyn Store) {
    for k in ["/vms/p/b", "/vms/p/a", "/vms/q/c", "/vmsx", "/images/p/a"] {
        s.put(k, k.as_bytes().to_vec(), Precondition::Any)
            .await
            .expect("put");
    }
    let (kvs, rev) = s.list("/vms/p/").await.expect("list");
    let keys: Vec<_> = kvs.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["/vms/p/a", "/vms/p/b"]);
    assert_eq!(rev, s.current_revision().await.expect("rev"));
    assert_eq!(s.list("/vms/").await.expect("list").0.len(), 3);
    assert!(s.list("/none/").await.expect("list").0.is_empty());
}

async fn watch_replays_then_follows(s: &dyn Store) {
    let r1 = s
        .put("/w/a", b"1".to_vec(), Precondition::Any)
        .await
        .expect("put");
    s.put("/other", b"x".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let r2 = s
        .put("/w/b", b"2".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let mut w = s.watch("/w/", r1).await.expect("watch");
    let r3 = s.delete("/w/a", Precondition::Any).await.expect("delete");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .expect("event within 5 s")
            .expect("stream open")
            .expect("no error");
        seen.push((e.kind, e.kv.key.clone(), e.kv.mod_revision));
    }
    assert_eq!(
        seen,
        [
            (EventKind::Put, "/w/a".to_string(), r1),
            (EventKind::Put, "/w/b".to_string(), r2),
            (EventKind::Delete, "/w/a".to_string(), r3),
        ]
    );
    // A watch from a future revision gets nothing older than that revision.
    let mut future = s.watch("/w/", r3 + 2).await.expect("watch");
    s.put("/w/c", b"3".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let r5 = s
        .put("/w/d", b"4".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let e = tokio::time::timeout(Duration::from_secs(5), future.recv())
        .await
        .expect("event")
        .expect("open")
        .expect("ok");
    assert_eq!((e.kv.key.as_str(), e.kv.mod_revision), ("/w/d", r5));
    // Watching from a later revision skips what came before.
    let mut w2 = s.watch("/w/", r3).await.expect("watch");
    let e = w2.recv().await.expect("open").expect("ok");
    assert_eq!((e.kind, e.kv.mod_revision), (EventKind::Delete, r3));
}

async fn watch_orders_concurrent_writers(s: Arc<dyn Store>) {
    let start = s.current_revision().await.expect("rev") + 1;
    let mut w = s.watch("/c/", start).await.expect("watch");
    let mut writers = Vec::new();
    for t in 0..4 {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..25 {
                s.put(&format!("/c/{t}/{i}"), vec![t as u8], Precondition::Any)
                    .await
                    .expect("put");
            }
        }));
    }
    for h in writers {
        h.await.expect("writer");
    }
    let mut last = 0;
    for _ in 0..100 {
        let e = tokio::time::timeout(Duration::from_secs(5), w.recv())
            .await
            .expect("event within 5 s")
            .expect("open")
            .expect("ok");
        assert!(
            e.kv.mod_revision > last,
            "revisions strictly increase: {} after {last}",
            e.kv.mod_revision
        );
        last = e.kv.mod_revision;
    }
}

/// Within a transaction, each op's precondition holds against what the ops before it left: a
/// key just written is no longer at its old revision, a key just deleted is absent.
async fn ops_see_the_ops_before_them(s: &dyn Store) {
    let old = s
        .put("/s/k", b"1".to_vec(), Precondition::Absent)
        .await
        .expect("put");
    let put = |when| Op::Put {
        key: "/s/k".into(),
        value: b"2".to_vec(),
        when,
        lease: None,
    };
    let again = s
        .txn(vec![
            put(Precondition::ModRevision(old)),
            Op::Check {
                key: "/s/k".into(),
                when: Precondition::ModRevision(old),
            },
        ])
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "a second op guarded by the revision the first replaced: {again:?}"
    );
    assert_eq!(
        s.get("/s/k")
            .await
            .expect("get")
            .expect("kept")
            .mod_revision,
        old
    );
    let deleted = Op::Delete {
        key: "/s/k".into(),
        when: Precondition::ModRevision(old),
    };
    let rev = s
        .txn(vec![deleted.clone(), put(Precondition::Absent)])
        .await
        .expect("delete, then create again");
    let kv = s.get("/s/k").await.expect("get").expect("created again");
    assert_eq!((kv.mod_revision, kv.value), (rev, b"2".to_vec()));
    let twice = s
        .txn(vec![
            Op::Delete {
                key: "/s/k".into(),
                when: Precondition::Any,
            },
            Op::Delete {
                key: "/s/k".into(),
                when: Precondition::Any,
            },
        ])
        .await;
    assert!(
        matches!(twice, Err(StoreError::NotFound { .. })),
        "deleting a key twice: {twice:?}"
    );
    assert!(s.get("/s/k").await.expect("get").is_some());
}

/// Many transactions at once (a backend may commit them together): exactly one of the racing
/// creates wins, one that fails writes none of its keys, and each that succeeds has a revision of
/// its own.
async fn concurrent_transactions_stand_alone(s: Arc<dyn Store>) {
    let stale = s
        .put("/g/guard", b"0".to_vec(), Precondition::Absent)
        .await
        .expect("put");
    s.put("/g/guard", b"1".to_vec(), Precondition::Any)
        .await
        .expect("put");
    let mut tasks = Vec::new();
    for t in 0..32u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut ops = vec![Op::Put {
                key: format!("/g/own/{t}"),
                value: vec![t],
                when: Precondition::Absent,
                lease: None,
            }];
            match t % 4 {
                // Guarded by a revision that is gone: must fail, and leave /g/own/{t} unwritten.
                0 => ops.push(Op::Check {
                    key: "/g/guard".into(),
                    when: Precondition::ModRevision(stale),
                }),
                // All race to create the same key.
                1 => ops.push(Op::Put {
                    key: "/g/race".into(),
                    value: vec![t],
                    when: Precondition::Absent,
                    lease: None,
                }),
                _ => {}
            }
            (t, s.txn(ops).await)
        }));
    }
    let mut revisions = std::collections::HashSet::new();
    let mut racers_won = Vec::new();
    for h in tasks {
        let (t, res) = h.await.expect("task");
        let own = s.get(&format!("/g/own/{t}")).await.expect("get");
        match (t % 4, res) {
            (0, Err(StoreError::Conflict { key })) => {
                assert_eq!(key, "/g/guard");
                assert!(own.is_none(), "a failed transaction wrote /g/own/{t}");
            }
            (1, Err(StoreError::Conflict { key })) => {
                assert_eq!(key, "/g/race");
                assert!(own.is_none(), "a failed transaction wrote /g/own/{t}");
            }
            (k, Ok(rev)) if k != 0 => {
                assert!(revisions.insert(rev), "revision {rev} given twice");
                assert_eq!(own.expect("written").mod_revision, rev);
                if k == 1 {
                    racers_won.push(t);
                }
            }
            (_, res) => panic!("transaction {t}: unexpected {res:?}"),
        }
    }
    assert_eq!(
        racers_won.len(),
        1,
        "exactly one create wins: {racers_won:?}"
    );
    let race = s.get("/g/race").await.expect("get").expect("present");
    assert_eq!(race.value, vec![racers_won[0]]);
    assert_eq!(
        revisions.len(),
        17,
        "16 plain transactions and one winner of the race"
    );
}

async fn leases_expire_and_can_be_kept(s: &dyn Store) {
    let short = s
        .grant_lease(Duration::from_millis(300))
        .await
        .expect("grant");
    let kept = s
        .grant_lease(Duration::from_millis(300))
        .await
        .expect("grant");
    let from = s.current_revision().await.expect("rev") + 1;
    for (key, lease) in [("/hb/short", short), ("/hb/kept", kept)] {
        s.txn(vec![Op::Put {
            key: key.into(),
            value: b"x".to_vec(),
            when: Precondition::Any,
            lease: Some(lease),
        }])
        .await
        .expect("put with lease");
    }
    let mut w = s.watch("/hb/short", from).await.expect("watch");
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.keep_alive(kept).await.expect("keep alive");
    }
    assert!(
        s.get("/hb/short").await.expect("get").is_none(),
        "key of an expired lease is gone"
    );
    assert!(
        s.get("/hb/kept").await.expect("get").is_some(),
        "key of a kept lease stays"
    );
    assert!(matches!(
        s.keep_alive(short).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    let put = w.recv().await.expect("open").expect("ok");
    let del = w.recv().await.expect("open").expect("ok");
    assert_eq!((put.kind, del.kind), (EventKind::Put, EventKind::Delete));
    s.revoke_lease(kept).await.expect("revoke");
    // The revoke's delete is the latest revision, and the store says so.
    let (_, listed) = s.list("/hb/").await.expect("list");
    assert_eq!(s.current_revision().await.expect("rev"), listed);
    assert!(listed > del.kv.mod_revision);
    assert!(
        s.get("/hb/kept").await.expect("get").is_none(),
        "revoke deletes at once"
    );
    // A key re-put without the lease is not the lease's any more; a deleted one is just gone.
    let l = s.grant_lease(Duration::from_secs(60)).await.expect("grant");
    for key in ["/hb/a", "/hb/b"] {
        let put = Op::Put {
            key: key.into(),
            value: vec![],
            when: Precondition::Any,
            lease: Some(l),
        };
        s.txn(vec![put]).await.expect("put");
    }
    s.put("/hb/a", b"mine".to_vec(), Precondition::Any)
        .await
        .expect("re-put");
    s.delete("/hb/b", Precondition::Any).await.expect("delete");
    s.revoke_lease(l)
        .await
        .expect("revoke with one key gone and one detached");
    assert_eq!(
        s.get("/hb/a").await.expect("get").expect("kept").value,
        b"mine"
    );
    let unknown = s
        .txn(vec![Op::Put {
            key: "/hb/x".into(),
            value: vec![],
            when: Precondition::Any,
            lease: Some(kept),
        }])
        .await;
    assert!(
        matches!(unknown, Err(StoreError::LeaseNotFound(_))),
        "{unknown:?}"
    );
}
