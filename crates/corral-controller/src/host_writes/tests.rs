use super::*;
use corral_api::VmStatus;

fn at<T>(value: T, revision: u64) -> Option<Versioned<T>> {
    Some(Versioned { value, revision })
}

fn joined(name: &str) -> Host {
    Host::joined(name)
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

/// The VM web, placed on `host`.
fn web_on(host: &str) -> Vm {
    let mut v = crate::cache::tests::vm("default", "web");
    v.status.host = Some(host.into());
    v
}

fn web() -> VmRef {
    VmRef {
        project: "default".into(),
        name: "web".into(),
    }
}

fn migration(phase: MigrationPhase, shared: bool) -> Migration {
    let m = Migration::new(
        "default",
        "web",
        uuid::Uuid::new_v4(),
        ("h1", "h2"),
        shared,
        "requested",
    );
    Migration { phase, ..m }
}

fn ready(port: u16, disk_port: Option<u16>) -> MigrationStep {
    MigrationStep::TargetReady {
        target_port: port,
        disk_port,
        target_pid: 42,
        target_run_dir: "/var/lib/corral/vms/x".into(),
        target_disk: "/var/lib/corral/vms/x/disk.qcow2".into(),
    }
}

fn step(s: MigrationStep) -> HostWrite {
    HostWrite::Migration {
        vm: web(),
        revision: 7,
        step: s,
    }
}

/// The one value a decision writes, decoded.
fn written<T: serde::de::DeserializeOwned>(d: Result<Decision, ApiError>) -> Vec<(String, T)> {
    match d.expect("allowed") {
        Decision::Commit(ops) => ops
            .into_iter()
            .filter_map(|op| match op {
                Op::Put { key, value, .. } => {
                    Some((key, serde_json::from_slice(&value).expect("json")))
                }
                _ => None,
            })
            .collect(),
        Decision::Stale => panic!("stale"),
    }
}

fn refused(d: Result<Decision, ApiError>) -> String {
    match d {
        Err(ApiError::Forbidden(why)) => why,
        other => panic!("not refused: {other:?}"),
    }
}

fn heartbeat(stored: Host, status: HostStatus, now: DateTime<Utc>) -> Result<Host, ApiError> {
    let s = Stored {
        host: at(stored, 3),
        ..Stored::default()
    };
    let d = decide("h1", &HostWrite::Heartbeat { status }, &s, now)?;
    let Decision::Commit(ops) = d else {
        panic!("a heartbeat is never stale")
    };
    let [Op::Put { key, value, .. }] = &ops[..] else {
        panic!("one put: {ops:?}")
    };
    assert_eq!(key, &keys::host("h1"), "its own record only");
    Ok(serde_json::from_slice(value).expect("host"))
}

#[test]
fn a_hosts_first_registration_is_its_approved_capacity_and_later_claims_beyond_it_are_not_believed()
{
    let now = Utc::now();
    let first = heartbeat(joined("h1"), report(8, 16 << 30), now).expect("registers");
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
    let less = heartbeat(first.clone(), report(4, 8 << 30), now).expect("write");
    assert_eq!((less.status.cpus, less.status.capacity_refused), (4, None));
    let err = match heartbeat(first.clone(), report(100_000, 1 << 60), now) {
        Err(ApiError::Forbidden(why)) => why,
        other => panic!("100,000 CPUs is no machine: {other:?}"),
    };
    assert!(
        err.contains("100000 CPUs is not a machine's capacity"),
        "{err}"
    );
    let more = heartbeat(first.clone(), report(64, 16 << 30), now).expect("write");
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
    let believed = heartbeat(approved, report(64, 16 << 30), now).expect("write");
    assert_eq!(
        (believed.status.cpus, believed.status.capacity_refused),
        (64, None)
    );

    // Nothing but the status changes, and no address no host can have.
    let mut operator = first.clone();
    operator.maintenance = true;
    let kept = heartbeat(operator, report(8, 16 << 30), now).expect("write");
    assert!(kept.maintenance);
    for bad in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::"] {
        let mut r = report(8, 16 << 30);
        r.address = Some(bad.parse().expect("ip"));
        let err = format!("{:?}", heartbeat(first.clone(), r, now).expect_err(bad));
        assert!(err.contains("not an address"), "{err}");
    }
    assert!(heartbeat(joined("h1"), report(0, 16 << 30), now).is_err());
    assert!(heartbeat(joined("h1"), report(8, 0), now).is_err());

    // A host that was removed registers nothing.
    let gone = decide(
        "h1",
        &HostWrite::Heartbeat {
            status: report(8, 16 << 30),
        },
        &Stored::default(),
        now,
    );
    assert!(matches!(gone, Err(ApiError::Unauthorized(_))), "{gone:?}");
}

#[test]
fn a_host_reports_only_the_status_of_its_own_vms_and_never_moves_them() {
    let now = Utc::now();
    let stored = Stored {
        vm: at(web_on("h1"), 5),
        ..Stored::default()
    };
    let mut status = VmStatus {
        host: Some("h1".into()),
        pid: Some(99),
        ..VmStatus::default()
    };
    let w = |status: &VmStatus, revision| HostWrite::VmStatus {
        vm: web(),
        revision,
        status: status.clone(),
    };
    let [(key, v)]: [(String, Vm); 1] = written(decide("h1", &w(&status, 5), &stored, now))
        .try_into()
        .expect("one");
    assert_eq!(key, keys::vm("default", "web"));
    assert_eq!(v.status.pid, Some(99));
    assert_eq!(
        v.spec,
        stored.vm.as_ref().expect("vm").value.spec,
        "spec kept"
    );
    assert_eq!(
        v.meta,
        stored.vm.as_ref().expect("vm").value.meta,
        "meta kept"
    );

    // Read at another revision: nothing is written, the host reads again.
    assert_eq!(
        decide("h1", &w(&status, 4), &stored, now).expect("stale"),
        Decision::Stale
    );
    assert_eq!(
        decide("h1", &w(&status, 5), &Stored::default(), now).expect("gone"),
        Decision::Stale
    );
    // Another host's VM.
    let why = refused(decide("h2", &w(&status, 5), &stored, now));
    assert!(why.contains("not placed on this host"), "{why}");
    // Moving it elsewhere (or nowhere) by a status write.
    for elsewhere in [Some("h2"), None] {
        status.host = elsewhere.map(str::to_string);
        let why = refused(decide("h1", &w(&status, 5), &stored, now));
        assert!(why.contains("only by the handover"), "{why}");
    }
}

#[test]
fn a_guest_power_off_stops_the_vm_once_and_a_release_needs_a_deletion_request() {
    let now = Utc::now();
    let stored = Stored {
        vm: at(web_on("h1"), 5),
        ..Stored::default()
    };
    let status = VmStatus {
        host: Some("h1".into()),
        ..VmStatus::default()
    };
    let off = HostWrite::GuestPoweredOff {
        vm: web(),
        revision: 5,
        status,
    };
    let [(_, v)]: [(String, Vm); 1] = written(decide("h1", &off, &stored, now))
        .try_into()
        .expect("one");
    assert_eq!(v.spec.power, PowerState::Stopped);
    let before = &stored.vm.as_ref().expect("vm").value;
    assert_eq!(v.meta.generation, before.meta.generation + 1);
    // Recorded again (a lost race): not a second change of intent.
    let again = Stored {
        vm: at(v.clone(), 6),
        ..Stored::default()
    };
    let off = HostWrite::GuestPoweredOff {
        vm: web(),
        revision: 6,
        status: v.status.clone(),
    };
    let [(_, v2)]: [(String, Vm); 1] = written(decide("h1", &off, &again, now))
        .try_into()
        .expect("one");
    assert_eq!(v2.meta.generation, v.meta.generation);

    let release = HostWrite::VmReleased {
        vm: web(),
        revision: 5,
    };
    let why = refused(decide("h1", &release, &stored, now));
    assert!(why.contains("nobody asked to delete it"), "{why}");
    let mut deleting = web_on("h1");
    deleting.meta.deletion_requested_at = Some(now);
    let deleting = Stored {
        vm: at(deleting, 5),
        ..Stored::default()
    };
    assert!(refused(decide("h2", &release, &deleting, now)).contains("not placed"));
    assert_eq!(
        decide("h1", &release, &deleting, now).expect("released"),
        Decision::Commit(vec![Op::Delete {
            key: keys::vm("default", "web"),
            when: Precondition::ModRevision(5),
        }])
    );
}

#[test]
fn a_ready_target_records_ports_only_as_the_move_needs_and_plain_paths_of_its_own() {
    use MigrationPhase as P;
    let now = Utc::now();
    let on = |m: Migration| Stored {
        migration: at(m, 7),
        ..Stored::default()
    };
    let shared = on(migration(P::Preparing, true));
    let why = refused(decide("h2", &step(ready(0, None)), &shared, now));
    assert!(why.contains("records the port"), "{why}");
    assert!(
        refused(decide("h2", &step(ready(4000, Some(4001))), &shared, now))
            .contains("records the port"),
        "no disk export on shared storage"
    );
    let [(_, m)]: [(String, Migration); 1] =
        written(decide("h2", &step(ready(4000, None)), &shared, now))
            .try_into()
            .expect("one");
    assert_eq!(
        (m.phase, m.target_port, m.target_pid),
        (P::TargetReady, Some(4000), Some(42))
    );

    let unshared = on(migration(P::Preparing, false));
    assert!(
        refused(decide("h2", &step(ready(4000, None)), &unshared, now))
            .contains("records the port"),
        "a shared-nothing move needs the disk export"
    );
    assert!(decide("h2", &step(ready(4000, Some(4001))), &unshared, now).is_ok());

    for (dir, disk) in [
        ("relative/dir", "/d.qcow2"),
        ("/r", "/x/../../etc/passwd"),
        ("/r", "/d.qcow2,file.locking=off"),
        ("/r\n", "/d.qcow2"),
        ("/r", "rbd:pool/img,file.locking=off"),
        ("/r", "rbd:pool/../img"),
    ] {
        let s = MigrationStep::TargetReady {
            target_port: 4000,
            disk_port: Some(4001),
            target_pid: 42,
            target_run_dir: dir.into(),
            target_disk: disk.into(),
        };
        let why = refused(decide("h2", &step(s), &unshared, now));
        assert!(
            why.contains("not a plain absolute path"),
            "{dir} {disk}: {why}"
        );
    }
}

#[test]
fn each_side_takes_only_its_own_steps_of_a_migration() {
    use MigrationPhase as P;
    let now = Utc::now();
    let on = |phase| Stored {
        migration: at(migration(phase, true), 7),
        ..Stored::default()
    };
    let preparing = on(P::Preparing);
    assert!(decide("h2", &step(ready(4000, None)), &preparing, now).is_ok());
    assert!(
        refused(decide("h1", &step(ready(4000, None)), &preparing, now))
            .contains("only the target"),
        "the source does not prepare"
    );
    assert!(
        refused(decide("h3", &step(ready(4000, None)), &preparing, now))
            .contains("neither the source nor the target"),
        "a stranger"
    );
    let sending = MigrationStep::Transferring {
        progress: Default::default(),
    };
    assert!(decide("h1", &step(sending.clone()), &on(P::TargetReady), now).is_ok());
    assert!(
        decide("h2", &step(sending.clone()), &on(P::TargetReady), now).is_err(),
        "the target does not send"
    );
    assert!(
        decide("h1", &step(sending.clone()), &preparing, now).is_err(),
        "not before the target is ready"
    );
    assert!(
        decide("h2", &step(ready(4000, None)), &on(P::Transferring), now).is_err(),
        "the target cannot redirect the stream once ready"
    );
    let failed = MigrationStep::Failed { error: "x".into() };
    let cancelled = MigrationStep::Cancelled { error: "x".into() };
    for host in ["h1", "h2"] {
        let [(_, m)]: [(String, Migration); 1] = written(decide(
            host,
            &step(failed.clone()),
            &on(P::Transferring),
            now,
        ))
        .try_into()
        .expect("one");
        assert_eq!(m.phase, P::Failed);
        assert!(
            m.target_disk.is_none(),
            "the target's fields stay as recorded"
        );
    }
    assert!(decide("h1", &step(cancelled.clone()), &on(P::Transferring), now).is_ok());
    assert!(decide("h2", &step(cancelled), &on(P::Transferring), now).is_err());
    assert!(
        refused(decide("h1", &step(failed.clone()), &on(P::Completed), now))
            .contains("already ended"),
        "ended for good"
    );
    let long = MigrationStep::Failed {
        error: "x".repeat(MAX_ERROR + 1),
    };
    assert!(decide("h1", &step(long), &on(P::Transferring), now).is_err());
    assert_eq!(
        decide(
            "h1",
            &HostWrite::Migration {
                vm: web(),
                revision: 6,
                step: failed
            },
            &on(P::Transferring),
            now
        )
        .expect("stale"),
        Decision::Stale
    );
}

#[test]
fn a_handover_gives_the_vm_exactly_the_copy_its_target_recorded() {
    use MigrationPhase as P;
    let now = Utc::now();
    let vm = web_on("h1");
    let mut m = migration(P::Transferring, false);
    m.vm_uid = vm.meta.uid;
    m.target_pid = Some(42);
    m.target_run_dir = Some("/t/run".into());
    m.target_disk = Some("/t/disk.qcow2".into());
    let mut with_disk = vm.clone();
    with_disk.status.disk = Some(corral_api::DiskStatus {
        path: "/s/disk.qcow2".into(),
        backing: String::new(),
        datastore: "local".into(),
    });
    let stored = |v: Vm, m: Migration| Stored {
        vm: at(v, 5),
        migration: at(m, 7),
        ..Stored::default()
    };
    let result = MigrationResult {
        downtime_ms: 10,
        total_ms: 100,
        memory_bytes: 1,
        disk_bytes: 2,
        completed_at: Some(now),
    };
    let hand = |vm_revision| HostWrite::Handover {
        vm: web(),
        vm_revision,
        migration_revision: 7,
        result: result.clone(),
    };
    let ok = stored(with_disk.clone(), m.clone());
    let d = decide("h1", &hand(5), &ok, now).expect("hands over");
    let Decision::Commit(ops) = d else {
        panic!("stale")
    };
    assert_eq!(ops.len(), 2, "one transaction: the VM and the migration");
    let v: Vm = match &ops[0] {
        Op::Put { value, .. } => serde_json::from_slice(value).expect("vm"),
        other => panic!("{other:?}"),
    };
    let done: Migration = match &ops[1] {
        Op::Put { value, .. } => serde_json::from_slice(value).expect("m"),
        other => panic!("{other:?}"),
    };
    assert_eq!(v.status.host.as_deref(), Some("h2"));
    assert_eq!(v.status.pid, Some(42));
    assert_eq!(v.status.run_dir.as_deref(), Some("/t/run"));
    assert_eq!(v.status.disk.expect("disk").path, "/t/disk.qcow2");
    assert_eq!(done.phase, P::Completed);
    assert_eq!(done.result, Some(result.clone()));

    // Not its source, not while transferring, another VM of the same name, or stale.
    assert!(refused(decide("h2", &hand(5), &ok, now)).contains("not placed"));
    let elsewhere = stored(web_on("h2"), m.clone());
    assert!(refused(decide("h2", &hand(5), &elsewhere, now)).contains("not the source"));
    let early = stored(
        with_disk.clone(),
        Migration {
            phase: P::TargetReady,
            ..m.clone()
        },
    );
    assert!(refused(decide("h1", &hand(5), &early, now)).contains("only from transferring"));
    let other = stored(
        with_disk.clone(),
        Migration {
            vm_uid: uuid::Uuid::new_v4(),
            ..m.clone()
        },
    );
    assert!(refused(decide("h1", &hand(5), &other, now)).contains("not the source"));
    assert_eq!(
        decide("h1", &hand(4), &ok, now).expect("stale"),
        Decision::Stale
    );
}
