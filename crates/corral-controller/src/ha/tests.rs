use super::*;
use corral_api::{HaPriority, ObjectMeta, VmSpec, VmStatus, LOCAL_DATASTORE};

#[test]
fn a_peers_claim_alone_never_keeps_a_host_from_failing() {
    use LeaseSeen as L;
    // (reports to the controller, a peer sees it, its lease)
    assert_eq!(judge(true, false, L::Stale), HostHa::Live);
    assert_eq!(judge(false, true, L::Fresh), HostHa::Partitioned);
    assert_eq!(judge(false, false, L::Fresh), HostHa::Isolated);
    assert_eq!(judge(false, false, L::Stale), HostHa::Failed);
    assert_eq!(
        judge(false, true, L::Stale),
        HostHa::Failed,
        "a silent host that no longer renews its lease has fenced itself, whatever a peer says"
    );
    // Without a lease the controller reads nothing can be restarted; the peers' word is shown.
    assert_eq!(judge(false, true, L::None), HostHa::Partitioned);
    assert_eq!(judge(false, false, L::None), HostHa::Failed);
}

fn vm(name: &str, p: HaPriority, after: &[&str]) -> Vm {
    Vm {
        meta: ObjectMeta::new("default", name),
        spec: VmSpec {
            image: "jeos".into(),
            cpus: 1,
            memory_bytes: 128 << 20,
            disk_bytes: 0,
            power: PowerState::Running,
            force_stop: false,
            reboots: 0,
            host: None,
            datastore: "nfs".into(),
            ha: HaPolicy::Restart,
            ha_priority: p,
            ha_after: after.iter().map(|s| s.to_string()).collect(),
            nics: Vec::new(),
            security_groups: Vec::new(),
        },
        status: VmStatus::default(),
        ha: None,
    }
}

fn names(v: Vec<&Vm>) -> Vec<&str> {
    v.iter().map(|v| v.meta.name.as_str()).collect()
}

#[test]
fn restarts_go_by_priority_and_wait_for_what_they_need() {
    let db = vm("db", HaPriority::High, &[]);
    let cache = vm("cache", HaPriority::High, &[]);
    let web = vm("web", HaPriority::Medium, &["db"]);
    let api = vm("api", HaPriority::Medium, &["web"]);
    let batch = vm("batch", HaPriority::Low, &[]);
    let all = [&db, &cache, &web, &api, &batch];
    // The high tier first, by name.
    assert_eq!(names(restart_order(&all, &[])), ["cache", "db"]);
    // While db still starts, the medium tier waits.
    assert!(restart_order(&[&web, &api, &batch], &[&db]).is_empty());
    // Once it runs: web, but not api, which waits for web.
    assert_eq!(names(restart_order(&[&web, &api, &batch], &[])), ["web"]);
    assert!(restart_order(&[&api, &batch], &[&web]).is_empty());
    assert_eq!(names(restart_order(&[&api, &batch], &[])), ["api"]);
    assert_eq!(names(restart_order(&[&batch], &[])), ["batch"]);
    // A cycle does not block for ever.
    let a = vm("a", HaPriority::Medium, &["b"]);
    let b = vm("b", HaPriority::Medium, &["a"]);
    assert_eq!(names(restart_order(&[&a, &b], &[])), ["a", "b"]);
    assert!(restart_order(&[], &[&db]).is_empty());
}

#[test]
fn only_running_vms_with_ha_on_a_shared_datastore_unpinned_are_protected() {
    let mut ceph = dir_datastore("ceph", "", true);
    ceph.kind = corral_api::DatastoreKind::Rbd;
    let ds = vec![
        dir_datastore("nfs", "/mnt/nfs", true),
        dir_datastore("disk2", "/mnt/disk2", false),
        ceph,
    ];
    let ok = vm("web", HaPriority::High, &[]);
    assert!(protection(&ok, &ds).protected);
    let mut on_rbd = ok.clone();
    on_rbd.spec.datastore = "ceph".into();
    assert!(
        protection(&on_rbd, &ds).protected,
        "RBD is reachable from every host"
    );
    let mut v = ok.clone();
    v.spec.ha = HaPolicy::Off;
    assert!(protection(&v, &ds).reason.contains("ha: restart"));
    let mut v = ok.clone();
    v.spec.datastore = LOCAL_DATASTORE.into();
    assert!(protection(&v, &ds).reason.contains("local datastore"));
    let mut v = ok.clone();
    v.spec.datastore = "disk2".into();
    assert!(protection(&v, &ds).reason.contains("not shared"));
    let mut v = ok.clone();
    v.spec.host = Some("host-1".into());
    assert!(protection(&v, &ds).reason.contains("pinned"));
    let mut v = ok;
    v.spec.power = PowerState::Stopped;
    assert!(!protection(&v, &ds).protected);
}

fn hosts(names: &[&str]) -> Vec<std::sync::Arc<Host>> {
    names
        .iter()
        .map(|n| std::sync::Arc::new(Host::joined(n)))
        .collect()
}

fn lease_files(ds: &str, files: &[(&str, &str)]) -> LeaseFiles {
    let files = files
        .iter()
        .map(|(h, c)| (h.to_string(), c.as_bytes().to_vec()))
        .collect();
    vec![(ds.to_string(), Some(files))]
}

#[test]
fn a_lease_counts_as_renewed_only_when_its_content_changes() {
    let t0 = Instant::now();
    let mut inner = Inner::default();
    inner.observe_leases(lease_files("nfs", &[("h1", "1")]), t0);
    let later = t0 + timing::LEASE_STALE_AFTER + Duration::from_millis(1);
    assert_eq!(inner.lease_seen("h1", t0), LeaseSeen::Fresh);
    // Read again unchanged: as old as when it last changed.
    inner.observe_leases(lease_files("nfs", &[("h1", "1")]), later);
    assert_eq!(inner.lease_seen("h1", later), LeaseSeen::Stale);
    inner.observe_leases(lease_files("nfs", &[("h1", "2")]), later);
    assert_eq!(inner.lease_seen("h1", later), LeaseSeen::Fresh);
    let expiry = later + timing::LEASE_EXPIRES_AFTER;
    assert!(!inner.lease_expired("nfs", "h1", expiry - Duration::from_millis(1)));
    assert!(inner.lease_expired("nfs", "h1", expiry));
    // A file that vanished is no lease, and its vanishing restarts the expiry.
    let gone = expiry + Duration::from_secs(1);
    inner.observe_leases(lease_files("nfs", &[]), gone);
    assert_eq!(inner.lease_seen("h1", gone), LeaseSeen::None);
    assert!(!inner.lease_expired("nfs", "h1", gone));
    // A datastore the controller cannot read is no evidence either way.
    inner.observe_leases(vec![("nfs".to_string(), None)], gone);
    assert!(!inner.lease_expired("nfs", "h1", gone + timing::LEASE_EXPIRES_AFTER));
    // A host that never wrote one counts from when the datastore could first be read.
    inner.observe_leases(lease_files("nfs", &[]), gone);
    assert!(inner.lease_expired("nfs", "h9", gone + timing::LEASE_EXPIRES_AFTER));
}

#[test]
fn the_detector_fails_a_silent_host_whatever_a_peer_claims_and_reports_each_change_once() {
    let t0 = Instant::now();
    let mut inner = Inner::default();
    let all = hosts(&["h1", "h2", "h3"]);
    for h in ["h1", "h2", "h3"] {
        inner.seen.insert(h.into(), t0);
    }
    inner.observe_leases(lease_files("nfs", &[("h1", "1"), ("h2", "1")]), t0);
    let first = inner.judge(&all, t0, t0);
    assert!(
        first.transitions.is_empty(),
        "hosts first seen live are no news"
    );
    assert!(first.failed.is_empty() && first.quiet.is_empty());
    // h1 goes silent while its lease is fresh, and h2 (reporting) still sees it.
    let t1 = t0 + timing::SILENT_AFTER + Duration::from_millis(1);
    for h in ["h2", "h3"] {
        inner.seen.insert(h.into(), t1);
    }
    inner
        .reports
        .insert("h2".into(), (t1, vec!["h1".into(), "h2".into()]));
    inner.observe_leases(lease_files("nfs", &[("h1", "2"), ("h2", "2")]), t1);
    let partitioned = inner.judge(&all, t0, t1);
    assert_eq!(
        partitioned.transitions,
        [("h1".to_string(), HostHa::Partitioned)]
    );
    assert!(partitioned.failed.is_empty());
    assert!(
        inner.judge(&all, t0, t1).transitions.is_empty(),
        "reported once"
    );
    // Its lease stops: failed, though h2 keeps claiming it alive.
    let t2 = t1 + timing::LEASE_STALE_AFTER + Duration::from_millis(1);
    for h in ["h2", "h3"] {
        inner.seen.insert(h.into(), t2);
    }
    inner.reports.insert("h2".into(), (t2, vec!["h1".into()]));
    inner.observe_leases(lease_files("nfs", &[("h1", "2"), ("h2", "3")]), t2);
    let failed = inner.judge(&all, t0, t2);
    assert_eq!(failed.transitions, [("h1".to_string(), HostHa::Failed)]);
    assert_eq!(failed.failed, HashSet::from(["h1".to_string()]));
    // Removed from the cluster: judged no more, and no longer HA's business.
    let gone = inner.judge(&hosts(&["h2", "h3"]), t0, t2);
    assert!(gone.failed.is_empty());
    assert!(!inner.states.contains_key("h1"));
}

/// Places every VM on the first host of `room` with a slot left.
struct Slots(Vec<(String, usize)>);

impl RestartPlacement for Slots {
    fn place(&self, _vm: &Vm) -> Result<(String, u64), String> {
        self.0
            .iter()
            .find(|(_, n)| *n > 0)
            .map(|(h, _)| (h.clone(), 7))
            .ok_or_else(|| "no host has room".to_string())
    }

    fn placed(&mut self, vm: Vm) {
        let host = vm.status.host.unwrap_or_default();
        if let Some((_, n)) = self.0.iter_mut().find(|(h, _)| *h == host) {
            *n -= 1;
        }
    }
}

fn on(host: &str, v: Vm) -> (String, u64, Vm) {
    let mut v = v;
    v.status.host = Some(host.into());
    v.status.phase = VmPhase::Running;
    (keys::vm("default", &v.meta.name.clone()), 3, v)
}

fn dir_datastore(name: &str, path: &str, shared: bool) -> Datastore {
    Datastore {
        name: name.into(),
        kind: corral_api::DatastoreKind::Dir,
        path: path.into(),
        shared,
        rbd: None,
        created_at: chrono::Utc::now(),
        deleting: false,
    }
}

fn nfs() -> Vec<Datastore> {
    vec![dir_datastore("nfs", "/mnt/nfs", true)]
}

#[test]
fn restarts_are_planned_only_once_the_lease_expired_and_count_where_they_go() {
    let failed = HashSet::from(["h1".to_string()]);
    let mut unprotected = vm("scratch", HaPriority::High, &[]);
    unprotected.spec.ha = HaPolicy::Off;
    let mut deleting = vm("old", HaPriority::High, &[]);
    deleting.meta.deletion_requested_at = Some(chrono::Utc::now());
    let vms = vec![
        on("h1", vm("db", HaPriority::High, &[])),
        on("h1", vm("cache", HaPriority::High, &[])),
        on("h1", unprotected),
        on("h1", deleting),
        on("h2", vm("web", HaPriority::High, &[])),
    ];
    let now = chrono::Utc::now();
    let mut room = Slots(vec![("h2".into(), 1), ("h3".into(), 0)]);
    let none = plan_restarts(&failed, &nfs(), &vms, |_, _| false, &mut room, now);
    assert!(
        none.is_empty(),
        "nothing moves before the failed host's lease expired"
    );
    let plan = plan_restarts(&failed, &nfs(), &vms, |_, h| h == "h1", &mut room, now);
    let [Restart::Move {
        vm: cache,
        target,
        revision: 3,
        target_revision: 7,
        from,
        ..
    }, Restart::Blocked { message, .. }] = plan.as_slice()
    else {
        panic!("expected cache moved and db blocked, got {plan:?}");
    };
    assert_eq!(
        (cache.meta.name.as_str(), target.as_str(), from.as_str()),
        ("cache", "h2", "h1")
    );
    assert_eq!(cache.status.host.as_deref(), Some("h2"));
    assert_eq!(cache.status.phase, VmPhase::Pending);
    assert!(
        restarted_at(cache).is_some(),
        "the move says it was a restart"
    );
    assert_eq!(message, "db cannot run again yet: no host has room");
}
