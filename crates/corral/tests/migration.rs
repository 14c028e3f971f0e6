//! Live migration between namespace hosts of a lab, with real guests and the stream over the lab
//! fabric: shared storage and shared-nothing, a guest busy dirtying memory, a cancel and a target
//! killed midway (the VM stays on its source), a host evacuated for maintenance, and a guest on an
//! RBD datastore (a real Ceph cluster whose monitor listens on the lab fabric).

mod common;

use std::time::{Duration, Instant};

use common::ceph::Ceph;
use common::netlab::{guest_value, start_in_guest, wait_booted, TestLab};
use serde_json::Value;

fn vm(lab: &TestLab, name: &str) -> Value {
    lab.json(&["vm", "show", name])
}

fn host_of(lab: &TestLab, name: &str) -> String {
    vm(lab, name)["status"]["host"]
        .as_str()
        .expect("placed")
        .to_string()
}

/// QEMU processes of a VM (by its uid) in each host's data dir: (host, pid).
fn qemus(lab: &TestLab, name: &str) -> Vec<(String, u32)> {
    let uid = vm(lab, name)["meta"]["uid"]
        .as_str()
        .expect("uid")
        .replace('-', "");
    ["host-1", "host-2", "host-3"]
        .iter()
        .flat_map(|h| {
            common::pids_matching(&format!("hosts/{h}/data/vms/{uid}/"))
                .into_iter()
                .map(|p| (h.to_string(), p))
        })
        .collect()
}

fn uptime(lab: &TestLab, name: &str) -> f64 {
    guest_value(lab, name, "UP", "read v x < /proc/uptime")
        .parse()
        .expect("uptime")
}

/// The guest's kernel reported no corruption (an oops after a move means lost memory).
fn healthy(lab: &TestLab, name: &str) {
    let console = lab.ok(&["vm", "console", name]);
    for sign in ["BUG:", "Oops", "general protection", "Kernel panic"] {
        assert!(!console.contains(sign), "{name}'s kernel: {console}");
    }
}

fn counter(lab: &TestLab, name: &str) -> u64 {
    guest_value(lab, name, "COUNT", "read v < /tmp/count")
        .parse()
        .expect("count")
}

/// Waits until the VM's migration reaches `phase`.
fn wait_migration(lab: &TestLab, name: &str, phase: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = lab.json(&["vm", "migration", name]);
        if m["phase"] == phase {
            return m;
        }
        assert!(Instant::now() < deadline, "migration of {name}: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_task(lab: &TestLab, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = lab.json(&["task", "show", id]);
        if t["state"] != "running" {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id}: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The VM runs on exactly one host, the one its status names, as one QEMU (a copy left on
/// another host gets a few seconds to be removed).
fn runs_once_on(lab: &TestLab, name: &str, host: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = qemus(lab, name);
        if running.len() == 1 || Instant::now() > deadline {
            assert_eq!(running.len(), 1, "{name}: QEMUs {running:?}");
            assert_eq!(running[0].0, host, "{name}: QEMUs {running:?}");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(host_of(lab, name), host);
    assert_eq!(vm(lab, name)["status"]["phase"], "running");
}

#[test]
fn running_guests_move_between_hosts_and_failed_moves_leave_them_on_their_source() {
    let lab = TestLab::up(3);
    lab.jeos_and_shared_datastore();
    // Pack: all guests start on one host.
    lab.ok(&["cluster", "set", "--placement", "pack"]);
    lab.ok(&[
        "vm",
        "create",
        "idle",
        "--image",
        "jeos",
        "--memory",
        "256M",
        "--datastore",
        "nfs",
        "--start",
    ]);
    lab.ok(&[
        "vm", "create", "busy", "--image", "jeos", "--memory", "256M", "--start",
    ]);
    lab.ok(&[
        "vm", "create", "third", "--image", "jeos", "--memory", "128M", "--start",
    ]);
    wait_booted(&lab, &["idle", "busy", "third"]);
    let home = host_of(&lab, "idle");
    assert_eq!(host_of(&lab, "busy"), home);
    // A loop that counts in memory (tmpfs) as fast as the guest goes, and a file written through
    // to the disk. (Heavier dirtying, e.g. rewriting megabytes per iteration, trips a memory
    // corruption of QEMU 7.2's TCG across multi-pass migrations: see docs/BENCHMARKS.md.)
    start_in_guest(
        &lab,
        "busy",
        "(i=0; while :; do i=$((i+1)); echo $i > /tmp/c; mv /tmp/c /tmp/count; done) >/dev/null 2>&1 &",
        "test -s /tmp/count; v=$?",
    );
    guest_value(
        &lab,
        "busy",
        "WROTE",
        "echo corral-was-here > /root/mark; sync; v=$?",
    );

    // Shared storage: only memory moves.
    let other = if home == "host-1" { "host-2" } else { "host-1" };
    let up0 = uptime(&lab, "idle");
    let pid0 = vm(&lab, "idle")["status"]["pid"].clone();
    let disk0 = vm(&lab, "idle")["status"]["disk"]["path"].clone();
    let t = Instant::now();
    lab.ok(&["vm", "migrate", "idle", "--to", other]);
    runs_once_on(&lab, "idle", other);
    let up1 = uptime(&lab, "idle");
    assert!(
        up1 > up0 && up1 < up0 + t.elapsed().as_secs_f64() + 5.0,
        "the guest kept its uptime across the move (no reboot): {up0} -> {up1}"
    );
    healthy(&lab, "idle");
    let after = vm(&lab, "idle");
    assert_ne!(after["status"]["pid"], pid0);
    assert_eq!(
        after["status"]["disk"]["path"], disk0,
        "the shared disk stays"
    );
    assert!(std::path::Path::new(disk0.as_str().expect("disk")).exists());
    let m = lab.json(&["vm", "migration", "idle"]);
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["shared_storage"], true);
    assert!(m["result"]["downtime_ms"].as_u64().is_some(), "{m}");
    let events = after["status"]["events"].to_string();
    assert!(events.contains("Migrated"), "{events}");

    // Shared-nothing, a guest dirtying memory, target picked by the scheduler.
    let c0 = counter(&lab, "busy");
    let up0 = uptime(&lab, "busy");
    let disk0 = vm(&lab, "busy")["status"]["disk"]["path"]
        .as_str()
        .expect("disk")
        .to_string();
    lab.ok(&["vm", "migrate", "busy"]);
    let dest = host_of(&lab, "busy");
    assert_ne!(dest, home);
    runs_once_on(&lab, "busy", &dest);
    let c1 = counter(&lab, "busy");
    let up1 = uptime(&lab, "busy");
    assert!(c1 > c0, "the guest's loop went on counting: {c0} -> {c1}");
    healthy(&lab, "busy");
    assert!(up1 > up0, "no reboot: {up0} -> {up1}");
    let disk1 = vm(&lab, "busy")["status"]["disk"]["path"]
        .as_str()
        .expect("disk")
        .to_string();
    assert!(
        disk1.contains(&format!("hosts/{dest}/")),
        "the disk now lives on {dest}: {disk1}"
    );
    assert!(
        !std::path::Path::new(&disk0).exists(),
        "the source's copy of the disk is removed"
    );
    // Read back from the new disk, not the guest's page cache.
    let mark = guest_value(
        &lab,
        "busy",
        "MARK",
        "echo 3 > /proc/sys/vm/drop_caches; read v < /root/mark",
    );
    assert_eq!(mark, "corral-was-here");
    let m = lab.json(&["vm", "migration", "busy"]);
    assert_eq!(m["shared_storage"], false, "{m}");
    assert!(m["result"]["disk_bytes"].as_u64() > Some(0), "{m}");

    // Slow migrations, to cancel one and to kill the target of another midway.
    lab.ok(&["cluster", "set", "--migration-bandwidth", "1M"]);
    let up0 = uptime(&lab, "idle");
    let task = lab.json(&["vm", "migrate", "idle", "--to", &home, "--no-wait"]);
    let id = task["id"].as_str().expect("task id").to_string();
    wait_migration(&lab, "idle", "transferring");
    lab.ok(&["task", "cancel", &id]);
    let t = wait_task(&lab, &id);
    assert_eq!(t["state"], "cancelled", "{t}");
    runs_once_on(&lab, "idle", other);
    assert!(uptime(&lab, "idle") > up0, "still the same guest");
    assert!(
        !lab.dir
            .path()
            .join(&lab.name)
            .join(format!("hosts/{home}/data/vms"))
            .read_dir()
            .map(|mut d| d.any(|e| e.is_ok_and(|e| {
                let uid = vm(&lab, "idle")["meta"]["uid"]
                    .as_str()
                    .unwrap_or("")
                    .replace('-', "");
                e.file_name().to_string_lossy() == uid
            })))
            .unwrap_or(false),
        "the target's run directory is removed"
    );

    let c0 = counter(&lab, "busy");
    let task = lab.json(&["vm", "migrate", "busy", "--to", &home, "--no-wait"]);
    let id = task["id"].as_str().expect("task id").to_string();
    wait_migration(&lab, "busy", "transferring");
    let target_qemu = qemus(&lab, "busy")
        .into_iter()
        .find(|(h, _)| *h == home)
        .expect("the target's waiting QEMU");
    common::signal(target_qemu.1, libc::SIGKILL);
    let t = wait_task(&lab, &id);
    assert_eq!(t["state"], "failed", "{t}");
    runs_once_on(&lab, "busy", &dest);
    assert!(
        counter(&lab, "busy") > c0,
        "the guest runs on at its source"
    );
    let failed = lab.json(&["vm", "migration", "busy"]);
    assert_eq!(failed["phase"], "failed", "{failed}");
    lab.ok(&["cluster", "set", "--migration-bandwidth", "none"]);

    // Bad requests change nothing.
    let out = lab.corral(&["vm", "migrate", "busy", "--to", &dest]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already runs on"));
    let out = lab.corral(&["vm", "migrate", "busy", "--to", "host-9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no host host-9"));

    // Storage migration: the running guest's disk moves from the host's local datastore to the
    // shared one; the guest keeps running and reads back what it wrote before.
    guest_value(
        &lab,
        "third",
        "WROTE",
        "echo moved-with-me > /root/mark; sync; v=$?",
    );
    let up0 = uptime(&lab, "third");
    let local = vm(&lab, "third")["status"]["disk"]["path"]
        .as_str()
        .expect("disk")
        .to_string();
    lab.ok(&["vm", "move-storage", "third", "--datastore", "nfs"]);
    let after = vm(&lab, "third");
    let moved = after["status"]["disk"]["path"].as_str().expect("disk");
    assert!(
        moved.starts_with(lab.dir.path().join("shared").to_str().expect("path")),
        "the disk is on the shared datastore: {moved}"
    );
    assert_eq!(after["status"]["disk"]["datastore"], "nfs");
    assert!(
        !std::path::Path::new(&local).exists(),
        "the local copy is removed"
    );
    assert!(uptime(&lab, "third") > up0, "the guest kept running");
    let mark = guest_value(
        &lab,
        "third",
        "MARK",
        "echo 3 > /proc/sys/vm/drop_caches; read v < /root/mark",
    );
    assert_eq!(mark, "moved-with-me");
    healthy(&lab, "third");
    let out = lab.corral(&["vm", "move-storage", "third", "--datastore", "nfs"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already on datastore nfs"));

    // Maintenance evacuates every running VM of the host, and the host ends up empty.
    let home_vms: Vec<String> = ["idle", "busy", "third"]
        .iter()
        .filter(|n| host_of(&lab, n) == home)
        .map(|n| n.to_string())
        .collect();
    lab.ok(&["vm", "migrate", "idle", "--to", &home]);
    lab.ok(&["vm", "migrate", "busy", "--to", &home]);
    let ups: Vec<f64> = ["idle", "busy", "third"]
        .iter()
        .map(|n| uptime(&lab, n))
        .collect();
    assert!(home_vms.contains(&"third".to_string()), "{home_vms:?}");
    lab.ok(&["host", "maintenance", "enter", &home]);
    let h = lab.json(&["host", "show", &home]);
    assert_eq!(h["vms"], serde_json::json!([]), "{h}");
    for (i, n) in ["idle", "busy", "third"].iter().enumerate() {
        let now_on = host_of(&lab, n);
        assert_ne!(now_on, home);
        runs_once_on(&lab, n, &now_on);
        assert!(uptime(&lab, n) > ups[i], "{n} kept running");
    }
    lab.ok(&["host", "maintenance", "exit", &home]);
}

#[test]
fn a_guest_on_rbd_moves_with_only_its_memory_and_keeps_writing_to_the_same_image() {
    let lab = TestLab::up(2);
    lab.ok(&["image", "build-jeos"]);
    let ceph = Ceph::for_lab(&lab);
    lab.ok(&[
        "vm",
        "create",
        "mover",
        "--image",
        "jeos",
        "--memory",
        "256M",
        "--datastore",
        "ceph",
        "--start",
    ]);
    wait_booted(&lab, &["mover"]);
    let wrote = guest_value(
        &lab,
        "mover",
        "W",
        "echo before > /root/rbd-mark; sync; read v < /root/rbd-mark",
    );
    assert_eq!(wrote, "before");
    let home = host_of(&lab, "mover");
    let other = if home == "host-1" { "host-2" } else { "host-1" };
    let disk0 = vm(&lab, "mover")["status"]["disk"]["path"].clone();
    assert!(
        disk0
            .as_str()
            .is_some_and(|d| d.starts_with("rbd:corral/corral-vm-")),
        "{disk0}"
    );
    let up0 = uptime(&lab, "mover");
    lab.ok(&["vm", "migrate", "mover", "--to", other]);
    runs_once_on(&lab, "mover", other);
    let up1 = uptime(&lab, "mover");
    assert!(up1 > up0, "no reboot: {up0} -> {up1}");
    healthy(&lab, "mover");
    let m = lab.json(&["vm", "migration", "mover"]);
    assert_eq!(
        (m["phase"].as_str(), m["shared_storage"].as_bool()),
        (Some("completed"), Some(true)),
        "{m}"
    );
    assert_eq!(
        m["result"]["disk_bytes"].as_u64(),
        Some(0),
        "only memory moved: {m}"
    );
    assert_eq!(
        vm(&lab, "mover")["status"]["disk"]["path"],
        disk0,
        "the same image"
    );
    // What was written before the move is read from the image (not the page cache), and the
    // guest writes on through the new host's QEMU.
    let read = guest_value(
        &lab,
        "mover",
        "R",
        "echo after > /root/rbd-mark2; sync; echo 3 > /proc/sys/vm/drop_caches; read a < /root/rbd-mark; read b < /root/rbd-mark2; v=$a-$b",
    );
    assert_eq!(read, "before-after");
    lab.ok(&["vm", "delete", "mover", "--force"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab.corral(&["vm", "show", "mover"]).status.success() {
        assert!(Instant::now() < deadline, "mover was not deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.ok(&["datastore", "delete", "ceph"]);
    assert_eq!(
        ceph.images(),
        Vec::<String>::new(),
        "nothing of Corral's is left in the pool"
    );
}
