//! A VM's life as a user sees it through the CLI, in steps that every kind of host must pass the
//! same way: the real agent with QEMU (tests/vm_lifecycle.rs) and simulated hosts (tests/sim.rs).
//! Each test adds what only its kind of host can show (a guest's console, QEMU processes) between
//! the steps.

use serde_json::Value;

use super::Lab;

/// The reason of the VM's Running condition.
pub fn running_reason(vm: &Value) -> String {
    vm["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Running"))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// `vm create NAME ARGS --start` returns once the VM runs, started on a linked clone.
pub fn create_started(lab: &Lab, name: &str, args: &[&str]) -> Value {
    let mut cmd = vec!["vm", "create", name];
    cmd.extend(args);
    cmd.push("--start");
    let vm = lab.json(&cmd);
    assert_eq!(vm["status"]["phase"], "running", "{vm}");
    assert_eq!(running_reason(&vm), "Started", "{vm}");
    let disk = vm["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DiskReady"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (disk["status"].as_bool(), disk["reason"].as_str()),
        (Some(true), Some("Cloned")),
        "{vm}"
    );
    assert!(vm["status"]["pid"].as_u64().is_some(), "{vm}");
    vm
}

/// A graceful stop asks the guest, which shuts down: not a forced power-off.
pub fn stop_gracefully(lab: &Lab, name: &str) -> Value {
    let vm = lab.json(&["vm", "stop", name]);
    assert_eq!(vm["status"]["phase"], "stopped", "{vm}");
    assert_eq!(
        running_reason(&vm),
        "ShutDown",
        "ACPI shutdown, not a forced power-off: {vm}"
    );
    assert!(vm["status"]["pid"].is_null(), "{vm}");
    vm
}

/// A stopped VM starts again.
pub fn start(lab: &Lab, name: &str) -> Value {
    let vm = lab.json(&["vm", "start", name]);
    assert_eq!(vm["status"]["phase"], "running", "{vm}");
    vm
}

/// A reboot resets the guest in the same process; `up` waits for the guest's second boot.
pub fn reboot(lab: &Lab, name: &str, up: impl Fn()) {
    let pid = lab.vm(name)["status"]["pid"].as_u64().expect("pid");
    lab.cli(&["vm", "reboot", name]);
    up();
    super::wait_for(
        "the reboot to be recorded",
        std::time::Duration::from_secs(30),
        || lab.vm(name)["status"]["reboots"] == 1,
    );
    let vm = lab.vm(name);
    assert_eq!(
        vm["status"]["pid"].as_u64(),
        Some(pid),
        "a reboot keeps the process: {vm}"
    );
    assert_eq!(running_reason(&vm), "Rebooted", "{vm}");
}

/// A running VM is deleted only with --force (a refusal changes nothing); then it is gone, with
/// its run directory. Returns the pid it had.
pub fn delete_running(lab: &Lab, name: &str) -> u64 {
    let vm = lab.vm(name);
    let pid = vm["status"]["pid"].as_u64().expect("pid");
    let run_dir = lab.run_dir(name);
    assert!(run_dir.exists(), "{}", run_dir.display());
    let err = lab.fails(&["vm", "delete", name]);
    assert!(
        err.contains("is running") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        lab.vm(name)["status"]["phase"],
        "running",
        "a refused delete changes nothing"
    );
    lab.cli(&["vm", "delete", name, "--force"]);
    assert!(lab.fails(&["vm", "show", name]).contains("does not exist"));
    assert!(
        !run_dir.exists(),
        "disk and run directory removed: {}",
        run_dir.display()
    );
    pid
}
