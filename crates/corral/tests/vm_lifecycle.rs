//! Real JeOS guests under QEMU, driven through the real CLI and API.

mod common;

use std::time::Duration;

use common::{alive, lifecycle, Lab, READY};

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn a_guest_boots_stops_starts_reboots_and_is_deleted() {
    let lab = Lab::start();
    lab.build_jeos();
    // Built once, cached after: a second build does nothing and says so.
    let again = lab.cli(&["task", "list"]);
    lab.build_jeos();
    assert!(
        lab.cli(&["task", "list"]).contains("already built"),
        "second build must be a no-op; tasks before:\n{again}"
    );

    // The steps simulated hosts pass too (tests/sim.rs), with what only QEMU shows between them.
    lifecycle::create_started(
        &lab,
        "web",
        &[
            "--image", "jeos", "--cpus", "1", "--memory", "256M", "--disk", "1G",
        ],
    );
    lab.wait_console("web", READY, 1, BOOT);
    assert_eq!(
        lab.guest_value("web", "HOST", "hostname"),
        "web",
        "the guest got its name"
    );

    // The disk is a thin linked clone of the image.
    let run_dir = lab.run_dir("web");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(run_dir.join("disk.qcow2"))
        .output()
        .expect("qemu-img");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    let image = lab.json(&["image", "show", "jeos"]);
    assert_eq!(info["backing-filename"], image["status"]["path"]);
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert!(
        info["actual-size"].as_u64().expect("size") < 4 << 20,
        "a fresh clone takes almost no space: {info}"
    );

    // Graceful stop: the guest's own init shuts it down.
    lifecycle::stop_gracefully(&lab, "web");
    assert!(lab.console("web").contains("corral-jeos: shutting down"));
    assert!(lab.qemu_pids().is_empty(), "no QEMU left after stop");

    lifecycle::start(&lab, "web");
    lab.wait_console("web", READY, 1, BOOT);
    lifecycle::reboot(&lab, "web", || {
        lab.wait_console("web", READY, 2, BOOT);
    });
    let pid = lifecycle::delete_running(&lab, "web");
    assert!(!alive(pid as u32) && lab.qemu_pids().is_empty());
    // Once no VM uses it, the image can go.
    lab.cli(&["image", "delete", "jeos"]);
}

#[test]
fn a_restarted_datacenter_adopts_running_guests() {
    let mut lab = Lab::start();
    lab.build_jeos();
    lab.cli(&[
        "vm", "create", "db", "--image", "jeos", "--memory", "256M", "--start",
    ]);
    lab.wait_console("db", READY, 1, BOOT);
    let pid = lab.vm("db")["status"]["pid"].as_u64().expect("pid") as u32;
    let before: f64 = lab
        .guest_value("db", "UP", "cut -d' ' -f1 /proc/uptime")
        .parse()
        .expect("uptime");

    // The control plane dies hard; the guest must not notice.
    lab.crash();
    assert!(alive(pid), "QEMU outlives the agent");
    std::thread::sleep(Duration::from_secs(1));
    lab.up();
    let vm = lab.vm("db");
    assert_eq!(vm["status"]["phase"], "running");
    assert_eq!(
        vm["status"]["pid"].as_u64(),
        Some(pid as u64),
        "adopted, not restarted"
    );
    let after: f64 = lab
        .guest_value("db", "UP", "cut -d' ' -f1 /proc/uptime")
        .parse()
        .expect("uptime");
    assert!(
        after > before + 0.9,
        "the guest's uptime kept growing: {before} then {after}"
    );
    assert_eq!(
        lab.console("db").matches(READY).count(),
        1,
        "no second boot"
    );

    // Ctrl-C (SIGINT) leaves VMs running as well.
    lab.interrupt();
    assert!(alive(pid));
    lab.up();
    assert_eq!(lab.vm("db")["status"]["pid"].as_u64(), Some(pid as u64));
    lab.cli(&["vm", "stop", "db", "--force"]);
    assert!(!alive(pid));
}

#[test]
fn a_guest_that_powers_itself_off_is_recorded_as_stopped() {
    let lab = Lab::start();
    lab.build_jeos();
    lab.cli(&[
        "vm", "create", "app", "--image", "jeos", "--memory", "128M", "--start",
    ]);
    lab.wait_console("app", READY, 1, BOOT);
    let sock = corral_hypervisor::serial_socket(&lab.run_dir("app"));
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("serial");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut typed = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        // The marker comes just before the console's shell starts: a line typed in between is
        // lost, so it is typed again until the guest goes down.
        if typed.elapsed() > Duration::from_secs(5) && lab.vm("app")["status"]["phase"] == "running"
        {
            // The guest may be going down already: its console socket closes with QEMU.
            let _ = std::io::Write::write_all(&mut s, b"poweroff\n");
            typed = std::time::Instant::now();
        }
        let vm = lab.vm("app");
        if vm["status"]["phase"] == "stopped" {
            assert_eq!(
                vm["spec"]["power"], "stopped",
                "the guest's wish becomes the desired state"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not stopped: {vm}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lab.qemu_pids().is_empty());
}

#[test]
fn a_guest_boots_from_a_disk_on_a_shared_datastore() {
    let lab = Lab::start();
    lab.build_jeos();
    let ds = lab.dir.path().join("nfs");
    std::fs::create_dir_all(&ds).expect("dir");
    lab.cli(&[
        "datastore",
        "create",
        "nfs",
        "--path",
        ds.to_str().expect("utf8"),
        "--shared",
    ]);
    lab.cli(&[
        "vm",
        "create",
        "ds",
        "--image",
        "jeos",
        "--memory",
        "128M",
        "--datastore",
        "nfs",
        "--start",
    ]);
    lab.wait_console("ds", READY, 1, BOOT);
    let vm = lab.vm("ds");
    let disk = vm["status"]["disk"]["path"].as_str().expect("disk");
    assert!(disk.starts_with(ds.to_str().expect("utf8")), "{disk}");
    let pid = vm["status"]["pid"].as_u64().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&format!("file={disk},")),
        "QEMU runs the datastore's disk"
    );
    lab.cli(&["vm", "delete", "ds", "--force"]);
}
