//! The reconciler against the fake driver and a real store (and real qemu-img for the clones).

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::agent::Agent;
use corral_api::{keys, Accel, Image, ImagePhase};
use corral_api::{ImageSource, ImageSpec, ImageStatus, ObjectMeta};
use corral_hypervisor::fake::FakeDriver;
use corral_hypervisor::LaunchSpec;
use corral_store::{Precondition, RedbStore, Store, StoreError};

struct Fixture {
    _dir: tempfile::TempDir,
    /// The store as the API writes it.
    db: Arc<dyn Store>,
    /// The controller as host h1 reaches it.
    store: Arc<dyn Controller>,
    driver: FakeDriver,
    cfg: AgentConfig,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let db: Arc<dyn Store> =
        Arc::new(RedbStore::open(&dir.path().join("store.redb")).expect("store"));
    let store: Arc<dyn Controller> = Arc::new(
        corral_controller::LocalHost::register(db.clone(), "h1")
            .await
            .expect("register"),
    );
    let base = dir.path().join("base.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .output()
        .expect("qemu-img must be installed (scripts/setup.sh)");
    assert!(out.status.success());
    let image = Image {
        meta: ObjectMeta::new("default", "jeos"),
        spec: ImageSpec {
            source: ImageSource::Import,
        },
        status: ImageStatus {
            phase: ImagePhase::Ready,
            format: Some(corral_api::DiskFormat::Qcow2),
            path: Some(base.display().to_string()),
            virtual_bytes: 64 << 20,
            actual_bytes: 0,
            boot: None,
            message: String::new(),
        },
    };
    db.put(
        &keys::image("default", "jeos"),
        serde_json::to_vec(&image).expect("json"),
        Precondition::Absent,
    )
    .await
    .expect("image");
    let cfg = AgentConfig {
        host: "h1".into(),
        data_dir: dir.path().to_path_buf(),
        accel: Accel::Tcg,
        hypervisor: "fake".into(),
        stop_timeout: Duration::from_secs(30),
        resync: Duration::from_secs(5),
        address: std::net::Ipv4Addr::LOCALHOST.into(),
        ha: Default::default(),
        network: Arc::new(corral_network::LinuxNet::new(
            dir.path().join("net"),
            std::net::Ipv4Addr::LOCALHOST.into(),
        )),
    };
    Fixture {
        _dir: dir,
        db,
        store,
        driver: FakeDriver::default(),
        cfg,
    }
}

impl Fixture {
    async fn create(&self, name: &str, power: PowerState) -> String {
        let mut vm = crate::lifecycle::tests::vm_named(name, power);
        vm.spec.datastore = corral_api::LOCAL_DATASTORE.into();
        vm.status.host = Some("h1".into());
        let key = keys::vm("default", name);
        self.db
            .put(
                &key,
                serde_json::to_vec(&vm).expect("json"),
                Precondition::Absent,
            )
            .await
            .expect("put");
        key
    }

    async fn vm(&self, key: &str) -> Vm {
        get_json::<Vm>(&*self.store, key)
            .await
            .expect("get")
            .expect("exists")
            .value
    }

    async fn edit(&self, key: &str, f: impl Fn(&mut Vm)) {
        corral_store::update_json::<Vm, StoreError>(&*self.db, key, |vm| {
            f(vm);
            vm.meta.bump();
            Ok(true)
        })
        .await
        .expect("update");
    }

    async fn reconcile(&self, key: &str, ws: &mut WorkerState) -> Outcome {
        reconcile(&*self.store, &self.driver, &self.cfg, key, ws)
            .await
            .expect("reconcile")
    }

    fn run_dir(&self, vm: &Vm) -> PathBuf {
        layout::vm_dir(&self.cfg.data_dir, vm.meta.uid)
    }
}

#[tokio::test]
async fn starts_a_vm_on_a_linked_clone_and_is_idempotent() {
    let f = fixture().await;
    let key = f.create("web", PowerState::Running).await;
    let mut ws = WorkerState::default();
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
    let vm = f.vm(&key).await;
    assert_eq!(vm.status.phase, VmPhase::Running);
    assert_eq!(vm.status.host.as_deref(), Some("h1"));
    assert_eq!(vm.status.observed_generation, vm.meta.generation);
    let info =
        corral_hypervisor::disk::info(Path::new(&vm.status.disk.as_ref().expect("disk").path))
            .await
            .expect("info");
    assert_eq!(info.virtual_size, 1 << 30);
    assert!(info
        .backing_filename
        .expect("backed")
        .ends_with("base.qcow2"));

    let rev = f
        .store
        .get(&key)
        .await
        .expect("get")
        .expect("kv")
        .mod_revision;
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
    assert_eq!(
        f.store
            .get(&key)
            .await
            .expect("get")
            .expect("kv")
            .mod_revision,
        rev,
        "second pass writes nothing"
    );
    assert_eq!(
        f.driver
            .calls()
            .iter()
            .filter(|c| c.starts_with("start"))
            .count(),
        1
    );
}

#[tokio::test]
async fn graceful_stop_asks_the_guest_then_records_the_shutdown() {
    let f = fixture().await;
    let key = f.create("db", PowerState::Running).await;
    let mut ws = WorkerState::default();
    f.reconcile(&key, &mut ws).await;
    f.edit(&key, |vm| vm.spec.power = PowerState::Stopped).await;
    assert!(matches!(
        f.reconcile(&key, &mut ws).await,
        Outcome::Requeue(_)
    ));
    assert_eq!(f.vm(&key).await.status.phase, VmPhase::Stopping);
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
    let vm = f.vm(&key).await;
    assert_eq!(vm.status.phase, VmPhase::Stopped);
    assert_eq!(
        vm.status
            .condition(corral_api::ConditionType::Running)
            .expect("cond")
            .reason,
        "ShutDown"
    );
    let calls = f.driver.calls();
    let dir_name = f
        .run_dir(&vm)
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        calls[1..],
        [format!("powerdown {dir_name}"), format!("kill {dir_name}")]
    );
}

#[tokio::test]
async fn a_guest_that_powers_itself_off_stays_off() {
    let f = fixture().await;
    let key = f.create("app", PowerState::Running).await;
    let mut ws = WorkerState::default();
    f.reconcile(&key, &mut ws).await;
    let vm = f.vm(&key).await;
    f.driver.guest_powers_off(&f.run_dir(&vm));
    f.reconcile(&key, &mut ws).await;
    let after = f.vm(&key).await;
    assert_eq!(after.spec.power, PowerState::Stopped);
    assert!(after.meta.generation > vm.meta.generation);
    assert_eq!(
        after
            .status
            .condition(corral_api::ConditionType::Running)
            .expect("cond")
            .reason,
        "GuestPoweredOff"
    );
    assert!(!f.driver.is_running(&f.run_dir(&vm)));
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
    assert_eq!(
        f.driver
            .calls()
            .iter()
            .filter(|c| c.starts_with("start"))
            .count(),
        1,
        "not restarted"
    );
}

#[tokio::test]
async fn a_failed_start_is_reported_and_retried_later() {
    let f = fixture().await;
    let key = f.create("bad", PowerState::Running).await;
    f.driver.fail_next_start("could not allocate memory");
    let mut ws = WorkerState::default();
    assert!(
        matches!(f.reconcile(&key, &mut ws).await, Outcome::Requeue(d) if d >= Duration::from_secs(5))
    );
    let vm = f.vm(&key).await;
    assert_eq!(vm.status.phase, VmPhase::Failed);
    let cond = vm
        .status
        .condition(corral_api::ConditionType::Running)
        .expect("cond");
    assert_eq!(cond.reason, "StartFailed");
    assert!(cond.message.contains("could not allocate memory"));
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
    assert_eq!(f.vm(&key).await.status.phase, VmPhase::Running);
}

#[tokio::test]
async fn a_running_vm_found_by_a_new_agent_is_adopted_not_restarted() {
    let f = fixture().await;
    let key = f.create("keep", PowerState::Running).await;
    f.reconcile(&key, &mut WorkerState::default()).await;
    let started = f.vm(&key).await.status.started_at;
    // A new agent process: fresh worker state, and a status that lost track of the pid.
    f.edit(&key, |vm| vm.status.pid = None).await;
    assert_eq!(
        f.reconcile(&key, &mut WorkerState::default()).await,
        Outcome::Steady
    );
    let vm = f.vm(&key).await;
    assert_eq!(
        vm.status
            .condition(corral_api::ConditionType::Running)
            .expect("cond")
            .reason,
        "Adopted"
    );
    assert_eq!(vm.status.started_at, started);
    assert_eq!(
        f.driver
            .calls()
            .iter()
            .filter(|c| c.starts_with("start"))
            .count(),
        1
    );
}

#[tokio::test]
async fn reboot_resets_once_and_delete_removes_everything() {
    let f = fixture().await;
    let key = f.create("tmp", PowerState::Running).await;
    let mut ws = WorkerState::default();
    f.reconcile(&key, &mut ws).await;
    f.edit(&key, |vm| vm.spec.reboots += 1).await;
    f.reconcile(&key, &mut ws).await;
    f.reconcile(&key, &mut ws).await;
    assert_eq!(
        f.driver
            .calls()
            .iter()
            .filter(|c| c.starts_with("reset"))
            .count(),
        1
    );
    assert_eq!(f.vm(&key).await.status.reboots, 1);

    let vm = f.vm(&key).await;
    f.edit(&key, |vm| vm.meta.deletion_requested_at = Some(Utc::now()))
        .await;
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Gone);
    assert!(f.store.get(&key).await.expect("get").is_none());
    assert!(!f.run_dir(&vm).exists(), "disk and run directory removed");
    assert!(!f.driver.is_running(&f.run_dir(&vm)));
}

#[tokio::test]
async fn a_disk_path_another_host_recorded_is_never_opened_or_removed() {
    let f = fixture().await;
    let key = f.create("moved", PowerState::Running).await;
    // What a compromised host that ran the VM before could have left in its status: a file of
    // this host's, and QEMU options after a comma.
    let victim = f.cfg.data_dir.join("precious");
    std::fs::write(&victim, b"not a disk").expect("write");
    let planted = format!("{},file.locking=off", victim.display());
    for path in [planted, victim.display().to_string()] {
        f.edit(&key, |vm| {
            vm.status.disk = Some(corral_api::DiskStatus {
                path: path.clone(),
                backing: String::new(),
                datastore: corral_api::LOCAL_DATASTORE.into(),
            })
        })
        .await;
        let mut ws = WorkerState::default();
        assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
        let vm = f.vm(&key).await;
        assert_eq!(vm.status.phase, VmPhase::Running);
        let derived = f.run_dir(&vm).join(layout::DISK_FILE);
        assert_eq!(
            vm.status.disk.as_ref().map(|d| d.path.clone()),
            Some(derived.display().to_string()),
            "the disk is where this host derives it"
        );
        assert!(derived.exists());
    }
    let vm = f.vm(&key).await;
    f.edit(&key, |vm| {
        vm.status.disk.as_mut().expect("disk").path = victim.display().to_string();
        vm.meta.deletion_requested_at = Some(Utc::now());
    })
    .await;
    assert_eq!(
        f.reconcile(&key, &mut WorkerState::default()).await,
        Outcome::Gone
    );
    assert!(!f.run_dir(&vm).exists(), "its own disk is removed");
    assert_eq!(
        std::fs::read(&victim).expect("still there"),
        b"not a disk",
        "the recorded path was neither opened as a disk nor removed"
    );
}

#[tokio::test]
async fn a_vm_of_another_host_or_of_none_is_left_alone() {
    let f = fixture().await;
    let key = f.create("other", PowerState::Running).await;
    for host in [Some("h2".to_string()), None] {
        f.edit(&key, |vm| vm.status.host = host.clone()).await;
        let out = f.reconcile(&key, &mut WorkerState::default()).await;
        assert_eq!(out, Outcome::Gone);
    }
    assert!(f.driver.calls().is_empty());
}

#[tokio::test]
async fn a_start_during_our_own_shutdown_runs_the_vm_again() {
    let f = fixture().await;
    let key = f.create("flip", PowerState::Running).await;
    let mut ws = WorkerState::default();
    f.reconcile(&key, &mut ws).await;
    f.edit(&key, |vm| vm.spec.power = PowerState::Stopped).await;
    f.reconcile(&key, &mut ws).await; // ACPI power button sent; the guest goes down
    f.edit(&key, |vm| vm.spec.power = PowerState::Running).await;
    // The guest finishes the shutdown we asked for: that is not the owner's wish.
    let first = f.reconcile(&key, &mut ws).await;
    assert_eq!(first, Outcome::Requeue(Duration::ZERO));
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
    let vm = f.vm(&key).await;
    assert_eq!(
        vm.spec.power,
        PowerState::Running,
        "the start request stands"
    );
    assert_eq!(vm.status.phase, VmPhase::Running);
    assert_eq!(
        f.driver
            .calls()
            .iter()
            .filter(|c| c.starts_with("start"))
            .count(),
        2
    );
}

#[tokio::test]
async fn a_disk_that_cannot_be_made_fails_the_vm_with_the_reason() {
    let f = fixture().await;
    let key = f.create("nodisk", PowerState::Running).await;
    f.edit(&key, |vm| vm.spec.image = "missing".into()).await;
    let out = f.reconcile(&key, &mut WorkerState::default()).await;
    assert!(matches!(out, Outcome::Requeue(_)));
    let vm = f.vm(&key).await;
    assert_eq!(vm.status.phase, VmPhase::Failed);
    let cond = vm
        .status
        .condition(corral_api::ConditionType::DiskReady)
        .expect("cond");
    assert!(
        cond.message.contains("image missing does not exist"),
        "{}",
        cond.message
    );
    assert_eq!(
        vm.status.observed_generation, vm.meta.generation,
        "the failure is an answer"
    );
    assert!(f.driver.calls().is_empty());
}

#[tokio::test]
async fn a_guest_that_ignores_the_power_button_is_powered_off_after_the_timeout() {
    let mut f = fixture().await;
    f.cfg.stop_timeout = Duration::from_millis(100);
    let key = f.create("deaf", PowerState::Running).await;
    let mut ws = WorkerState::default();
    f.reconcile(&key, &mut ws).await;
    f.driver.ignore_powerdown();
    f.edit(&key, |vm| vm.spec.power = PowerState::Stopped).await;
    assert!(matches!(
        f.reconcile(&key, &mut ws).await,
        Outcome::Requeue(_)
    ));
    assert!(
        matches!(f.reconcile(&key, &mut ws).await, Outcome::Requeue(_)),
        "still waiting"
    );
    assert_eq!(f.vm(&key).await.status.phase, VmPhase::Stopping);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(f.reconcile(&key, &mut ws).await, Outcome::Steady);
    let vm = f.vm(&key).await;
    assert_eq!(vm.status.phase, VmPhase::Stopped);
    assert_eq!(
        vm.status
            .condition(corral_api::ConditionType::Running)
            .expect("cond")
            .reason,
        "PoweredOffAfterTimeout"
    );
    let calls = f.driver.calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("powerdown")).count(),
        1,
        "asked once: {calls:?}"
    );
}

#[tokio::test]
async fn leftover_copies_are_swept_but_a_running_guest_is_never_killed() {
    let f = fixture().await;
    let driver = Arc::new(FakeDriver::default());
    let key = f.create("kept", PowerState::Running).await;
    let mut ws = WorkerState::default();
    reconcile(&*f.store, &*driver, &f.cfg, &key, &mut ws)
        .await
        .expect("reconcile");
    let kept = layout::vm_dir(&f.cfg.data_dir, f.vm(&key).await.meta.uid);
    let spec = LaunchSpec {
        name: "x".into(),
        cpus: 1,
        memory_mib: 64,
        disk: kept.join(layout::DISK_FILE).into(),
        direct_boot: None,
        accel: Accel::Tcg,
        nics: Vec::new(),
    };
    // A copy a failed migration left waiting here, and a guest nobody accounts for.
    let waiting = layout::vm_dir(&f.cfg.data_dir, uuid::Uuid::new_v4());
    let stray = layout::vm_dir(&f.cfg.data_dir, uuid::Uuid::new_v4());
    for d in [&waiting, &stray] {
        std::fs::create_dir_all(d).expect("dir");
    }
    driver
        .start_incoming(&waiting, &spec, f.cfg.address, false)
        .await
        .expect("incoming");
    driver.start(&stray, &spec).await.expect("start");

    let agent = Agent::new(f.store.clone(), driver.clone(), f.cfg.clone(), None);
    let (vms, _) = f.store.list(keys::VMS).await.expect("list");
    agent.sweep(&vms, &[]).await;
    assert!(
        !waiting.exists() && !driver.is_running(&waiting),
        "the waiting copy goes"
    );
    assert!(
        stray.exists() && driver.is_running(&stray),
        "a running guest is only reported"
    );
    assert!(
        kept.exists() && driver.is_running(&kept),
        "the VM placed here stays"
    );
}
