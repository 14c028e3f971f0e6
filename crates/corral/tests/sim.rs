//! Simulated hosts against a real controller: they take VMs through their lives and live
//! migrations (also over the agent endpoint, each with its own certificate), faults injected into
//! them show up as a user would see them, automatic DRS on them converges and stops moving, and
//! DPM puts them in standby and wakes them.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::netlab::TestLab;
use common::{lifecycle, Lab};
use serde_json::Value;

fn create(lab: &Lab, name: &str, cpus: &str, memory: &str, extra: &[&str]) {
    let mut args = vec![
        "vm",
        "create",
        name,
        "--image",
        "tiny",
        "--cpus",
        cpus,
        "--memory",
        memory,
        "--datastore",
        "nfs",
        "--start",
    ];
    args.extend(extra);
    lab.cli(&args);
}

/// Waits until `check` holds for the VM list, or fails with `what` and the list.
fn wait_vms(lab: &Lab, secs: u64, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let vms = lab.json(&["vm", "list"]);
        let vms = vms.as_array().expect("a list").clone();
        if check(&vms) {
            return vms;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {secs} s: {vms:#?}\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn all_running(vms: &[Value]) -> bool {
    !vms.is_empty() && vms.iter().all(|v| v["status"]["phase"] == "running")
}

fn host_of(v: &Value) -> String {
    v["status"]["host"].as_str().unwrap_or_default().to_string()
}

fn events(lab: &Lab) -> Vec<Value> {
    lab.json(&["events"]).as_array().expect("events").clone()
}

/// The same steps as the real guest's life in tests/vm_lifecycle.rs: a simulated host is the
/// real agent, so it passes them alike.
#[test]
fn a_simulated_host_takes_a_vm_through_the_same_life_as_a_real_one() {
    let lab = Lab::controller_with(&["--sim-hosts", "1", "--sim-boot-ms", "100"], &[]);
    lab.wait_connected(&["sim-1"]);
    lab.tiny_image_and_shared_datastore();
    let args = ["--image", "tiny", "--cpus", "1", "--memory", "256M"];
    let vm = lifecycle::create_started(&lab, "web", &args);
    assert_eq!(host_of(&vm), "sim-1");
    lifecycle::stop_gracefully(&lab, "web");
    lifecycle::start(&lab, "web");
    lifecycle::reboot(&lab, "web", || {});
    lifecycle::delete_running(&lab, "web");
}

#[test]
fn simulated_hosts_join_over_tls_run_and_migrate_vms() {
    let mut lab = Lab::controller();
    lab.start_sim_agents("rsim", 2, &["--sim-boot-ms", "100"]);
    lab.wait_connected(&["rsim-1", "rsim-2"]);
    let host = lab.json(&["host", "show", "rsim-1"]);
    assert_eq!(host["status"]["hypervisor"], "corral-sim (simulated host)");
    assert_eq!(host["status"]["cpus"], 32);
    lab.tiny_image_and_shared_datastore();
    create(&lab, "web", "2", "1G", &[]);
    create(&lab, "db", "2", "1G", &[]);
    wait_vms(&lab, 30, "both VMs run", all_running);
    // Measured as a real agent measures its QEMUs: every few seconds.
    wait_vms(&lab, 15, "web reports its usage", |vms| {
        vms.iter().any(|v| {
            v["meta"]["name"] == "web" && v["status"]["usage"]["cpu_cores"].as_f64().is_some()
        })
    });
    let web = lab.json(&["vm", "show", "web"]);
    let other = if host_of(&web) == "rsim-1" {
        "rsim-2"
    } else {
        "rsim-1"
    };

    // A live migration through the agent endpoint, each side as its own host.
    lab.cli(&["vm", "migrate", "web", "--to", other]);
    wait_vms(&lab, 30, "web moves", |vms| {
        vms.iter()
            .any(|v| v["meta"]["name"] == "web" && host_of(v) == other)
    });
    let web = lab.json(&["vm", "show", "web"]);
    assert_eq!(web["status"]["phase"], "running");
    let reasons: Vec<&str> = web["status"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"Migrated"), "{web}");

    // Stop and delete go through the simulated host as through a real one.
    lab.cli(&["vm", "stop", "db"]);
    wait_vms(&lab, 30, "db stops", |vms| {
        vms.iter()
            .any(|v| v["meta"]["name"] == "db" && v["status"]["phase"] == "stopped")
    });
    lab.cli(&["vm", "delete", "db"]);
    wait_vms(&lab, 30, "db is gone", |vms| {
        vms.len() == 1 && vms[0]["meta"]["name"] == "web"
    });
}

#[test]
fn vm_and_host_lists_come_in_pages_in_name_order_and_bad_limits_are_refused() {
    let lab = Lab::controller_with(&["--sim-hosts", "3", "--sim-boot-ms", "0"], &[]);
    lab.wait_connected(&["sim-1", "sim-2", "sim-3"]);
    lab.tiny_image_and_shared_datastore();
    for name in ["e", "b", "d", "a", "c"] {
        create(&lab, name, "1", "256M", &[]);
    }
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|v| v["meta"]["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let base = "/api/v1/projects/default/vms";
    let (status, page) = lab.api_get(&format!("{base}?limit=2"));
    assert_eq!((status, names(&page)), (200, vec!["a".into(), "b".into()]));
    let (_, page) = lab.api_get(&format!("{base}?limit=2&after=b"));
    assert_eq!(names(&page), ["c", "d"]);
    let (_, page) = lab.api_get(&format!("{base}?limit=2&after=d"));
    assert_eq!(names(&page), ["e"]);
    let (_, all) = lab.api_get(base);
    assert_eq!(names(&all), ["a", "b", "c", "d", "e"]);
    // Hosts page the same way, each with the VMs placed there.
    let hosts = "/api/v1/hosts";
    let host_names = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|h| h["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let placed = |v: &Value| -> usize {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|h| h["vms"].as_array().map_or(0, Vec::len))
            .sum()
    };
    let (status, first) = lab.api_get(&format!("{hosts}?limit=2"));
    assert_eq!(
        (status, host_names(&first)),
        (200, vec!["sim-1".into(), "sim-2".into()])
    );
    let (_, rest) = lab.api_get(&format!("{hosts}?limit=2&after=sim-2"));
    assert_eq!(host_names(&rest), ["sim-3"]);
    assert_eq!(placed(&first) + placed(&rest), 5, "{first} {rest}");
    let (status, one) = lab.api_get(&format!("{hosts}/sim-3"));
    assert_eq!((status, one["name"].as_str()), (200, Some("sim-3")));
    for bad in ["limit=0", "limit=1001", "limit=x"] {
        for list in [base, hosts] {
            let (status, body) = lab.api_get(&format!("{list}?{bad}"));
            assert_eq!(status, 400, "{list}?{bad}: {body}");
            assert!(
                body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("limit")),
                "{list}?{bad}: {body}"
            );
        }
    }
    // The CLI pages through them all.
    assert_eq!(lab.json(&["vm", "list"]).as_array().map(Vec::len), Some(5));
    assert_eq!(
        lab.json(&["host", "list"]).as_array().map(Vec::len),
        Some(3)
    );
}

#[test]
fn faults_injected_into_simulated_hosts_show_as_a_user_sees_them() {
    let faults = tempfile::NamedTempFile::new().expect("faults file");
    let path = faults.path().to_str().expect("utf-8").to_string();
    let lab = Lab::controller_with(
        &[
            "--sim-hosts",
            "3",
            "--sim-boot-ms",
            "100",
            "--sim-faults",
            &path,
        ],
        &[],
    );
    lab.wait_connected(&["sim-1", "sim-2", "sim-3"]);
    lab.tiny_image_and_shared_datastore();
    create(&lab, "guarded", "2", "1G", &["--ha", "restart"]);
    wait_vms(&lab, 30, "the VM runs", all_running);
    let first = host_of(&lab.json(&["vm", "show", "guarded"]));

    // Its host dies: it goes silent, HA sees it fail and restarts the VM elsewhere.
    std::fs::write(faults.path(), format!("{first}\n")).expect("write faults");
    let vms = wait_vms(&lab, 60, "the VM runs again on another host", |vms| {
        vms.iter().any(|v| {
            v["meta"]["name"] == "guarded"
                && v["status"]["phase"] == "running"
                && host_of(v) != first
        })
    });
    assert_ne!(host_of(&vms[0]), first);
    let reasons: Vec<String> = events(&lab)
        .iter()
        .filter(|e| e["subject"] == format!("host/{first}"))
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect();
    assert!(reasons.contains(&"HostFailed".to_string()), "{reasons:?}");
    let host = lab.json(&["host", "show", &first]);
    assert!(
        host["ha"].as_str().is_some_and(|s| s.starts_with("failed")),
        "{host}"
    );

    // Healed, it heartbeats again.
    std::fs::write(faults.path(), "").expect("write faults");
    lab.wait_connected(&[&first]);
}

#[test]
fn a_vm_created_stopped_on_a_simulated_host_is_created_as_on_a_real_one() {
    let lab = Lab::controller_with(&["--sim-hosts", "2", "--sim-boot-ms", "100"], &[]);
    lab.wait_connected(&["sim-1", "sim-2"]);
    lab.tiny_image_and_shared_datastore();
    // Without --start the task ends once the host has the disk: the command returns.
    let vm = lab.json(&[
        "vm",
        "create",
        "idle",
        "--image",
        "tiny",
        "--memory",
        "256M",
        "--datastore",
        "nfs",
        "--wait-timeout",
        "20",
    ]);
    assert_eq!(vm["status"]["phase"], "stopped", "{vm}");
    let disk = vm["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "DiskReady").cloned())
        .unwrap_or_default();
    assert_eq!(disk["status"], true, "{vm}");
}

#[test]
fn a_start_that_fails_is_reported_on_the_vm() {
    let lab = Lab::controller_with(
        &[
            "--sim-hosts",
            "2",
            "--sim-boot-ms",
            "100",
            "--sim-fail-starts",
            "1",
        ],
        &[],
    );
    lab.wait_connected(&["sim-1", "sim-2"]);
    lab.tiny_image_and_shared_datastore();
    let err = lab.fails(&[
        "vm",
        "create",
        "unlucky",
        "--image",
        "tiny",
        "--memory",
        "512M",
        "--datastore",
        "nfs",
        "--start",
    ]);
    assert!(err.contains("simulated start failure"), "{err}");
    let vm = lab.json(&["vm", "show", "unlucky"]);
    assert_eq!(vm["status"]["phase"], "failed", "{vm}");
    assert!(vm["status"]["host"]
        .as_str()
        .is_some_and(|h| h.starts_with("sim-")));
}

#[test]
fn a_migration_that_fails_leaves_the_vm_running_on_its_source() {
    let lab = Lab::controller_with(
        &[
            "--sim-hosts",
            "2",
            "--sim-boot-ms",
            "100",
            "--sim-fail-migrations",
            "1",
        ],
        &[],
    );
    lab.wait_connected(&["sim-1", "sim-2"]);
    lab.tiny_image_and_shared_datastore();
    create(&lab, "stay", "1", "512M", &[]);
    wait_vms(&lab, 30, "the VM runs", all_running);
    let source = host_of(&lab.json(&["vm", "show", "stay"]));
    let target = if source == "sim-1" { "sim-2" } else { "sim-1" };
    lab.cli(&["vm", "migrate", "stay", "--to", target, "--no-wait"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vm = lab.json(&["vm", "show", "stay"]);
        let failed = vm["status"]["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["reason"] == "MigrationFailed"));
        if failed {
            assert_eq!(host_of(&vm), source, "{vm}");
            assert_eq!(vm["status"]["phase"], "running", "{vm}");
            assert!(vm.to_string().contains("fault injection"), "{vm}");
            break;
        }
        assert!(Instant::now() < deadline, "no failed migration: {vm}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Counts each VM's moves from its events.
fn moves(vms: &[Value]) -> HashMap<String, usize> {
    vms.iter()
        .map(|v| {
            let n = v["status"]["events"].as_array().map_or(0, |e| {
                e.iter().filter(|e| e["reason"] == "Migrated").count()
            });
            (
                v["meta"]["name"].as_str().unwrap_or_default().to_string(),
                n,
            )
        })
        .collect()
}

#[test]
fn auto_drs_on_simulated_hosts_converges_and_stops_moving() {
    let lab = Lab::controller_with(
        &[
            "--sim-hosts",
            "4",
            "--sim-boot-ms",
            "50",
            "--sim-load",
            "hot-=0.9,=0.05",
        ],
        &[("CORRAL_DRS_PERIOD_SECS", "2")],
    );
    lab.wait_connected(&["sim-1", "sim-2", "sim-3", "sim-4"]);
    lab.tiny_image_and_shared_datastore();
    // Packed: eight busy VMs on the first host, the others idle.
    lab.cli(&["cluster", "set", "--placement", "pack"]);
    for i in 1..=8 {
        create(&lab, &format!("hot-{i}"), "4", "8G", &[]);
    }
    let vms = wait_vms(&lab, 60, "all VMs run", |v| all_running(v) && v.len() == 8);
    let first = host_of(&vms[0]);
    assert!(vms.iter().all(|v| host_of(v) == first), "{vms:#?}");
    lab.cli(&["cluster", "set", "--placement", "spread", "--drs", "auto"]);

    // DRS spreads them; then, with nothing left worth moving, it stops.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut quiet_since = Instant::now();
    let mut last = moves(&vms);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let vms = lab.json(&["vm", "list"]).as_array().expect("list").clone();
        let now = moves(&vms);
        if now != last {
            quiet_since = Instant::now();
            last = now;
        }
        // Quiet for six DRS periods (a simulated migration here takes about 3 s).
        if quiet_since.elapsed() > Duration::from_secs(12) {
            let per_host = vms
                .iter()
                .fold(HashMap::<String, usize>::new(), |mut m, v| {
                    *m.entry(host_of(v)).or_default() += 1;
                    m
                });
            assert_eq!(per_host.len(), 4, "spread over every host: {per_host:?}");
            assert!(per_host.values().all(|n| *n <= 3), "{per_host:?}");
            assert!(last.values().all(|n| *n <= 1), "a VM moved twice: {last:?}");
            let plan = lab.json(&["drs", "plan"]);
            assert!(
                plan["moves"].as_array().is_some_and(Vec::is_empty),
                "{plan}"
            );
            assert!(
                plan["imbalance_before"].as_f64().unwrap_or(1.0)
                    <= plan["threshold"].as_f64().unwrap_or(0.0),
                "{plan}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "DRS did not settle: moves {last:?}\n{}",
            lab.log()
        );
    }
}

/// Each host's state, "asleep" for a host in standby that powered down.
fn host_states(lab: &Lab) -> HashMap<String, String> {
    lab.json(&["host", "list"])
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            let state = if h["status"]["standby"] == true {
                assert_eq!(h["state"], "standby", "{h}");
                "asleep"
            } else {
                h["state"].as_str().unwrap_or_default()
            };
            (
                h["name"].as_str().unwrap_or_default().to_string(),
                state.to_string(),
            )
        })
        .collect()
}

#[test]
fn dpm_puts_idle_simulated_hosts_in_standby_and_wakes_one_when_room_is_needed() {
    let lab = Lab::controller_with(
        &[
            "--sim-hosts",
            "3",
            "--sim-boot-ms",
            "50",
            "--sim-heartbeat",
            "1",
            "--sim-memory",
            "64G",
        ],
        &[("CORRAL_DRS_PERIOD_SECS", "2")],
    );
    lab.wait_connected(&["sim-1", "sim-2", "sim-3"]);
    lab.tiny_image_and_shared_datastore();
    for i in 1..=3 {
        create(&lab, &format!("idle-{i}"), "1", "4G", &[]);
    }
    wait_vms(&lab, 30, "the VMs run", |v| all_running(v) && v.len() == 3);
    lab.cli(&[
        "cluster",
        "set",
        "--drs",
        "auto",
        "--power-management",
        "auto",
    ]);

    // Two hosts are emptied and go to standby, one after the other; one keeps every VM.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let states = host_states(&lab);
        if states.values().filter(|s| *s == "asleep").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{states:?}\n{}", lab.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let states = host_states(&lab);
    let awake: Vec<&String> = states
        .iter()
        .filter(|(_, s)| *s == "connected")
        .map(|(h, _)| h)
        .collect();
    assert_eq!(awake.len(), 1, "{states:?}");
    let vms = wait_vms(&lab, 30, "every VM runs on the host left on", |v| {
        all_running(v) && v.iter().all(|v| host_of(v) == *awake[0])
    });
    assert_eq!(vms.len(), 3);
    // Silent on purpose: HA does not call a sleeping host failed.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !events(&lab).iter().any(|e| e["reason"] == "HostFailed"),
        "{:#?}",
        events(&lab)
    );

    // A VM that fits nowhere awake (12G of 64G taken): DPM wakes a host and the VM lands there.
    let err = lab.fails(&[
        "vm",
        "create",
        "big",
        "--image",
        "tiny",
        "--cpus",
        "2",
        "--memory",
        "56G",
        "--datastore",
        "nfs",
        "--start",
    ]);
    assert!(err.contains("2 host(s) in standby"), "{err}");
    let vms = wait_vms(&lab, 90, "the big VM runs on a woken host", |v| {
        v.iter()
            .any(|v| v["meta"]["name"] == "big" && v["status"]["phase"] == "running")
    });
    let big = vms
        .iter()
        .find(|v| v["meta"]["name"] == "big")
        .expect("big");
    assert_ne!(host_of(big), *awake[0]);
    assert_eq!(host_states(&lab)[&host_of(big)], "connected");
    let reasons: Vec<String> = events(&lab)
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect();
    assert!(reasons.contains(&"HostStandby".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"HostWaking".to_string()), "{reasons:?}");
}

#[test]
fn a_lab_of_simulated_hosts_comes_up_takes_faults_and_goes_away() {
    let lab = TestLab::up_with(0, &["--sim-hosts", "100"]);
    // Each host's record gets its simulated capacity with the host's first heartbeat.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = lab.ok(&["lab", "status"]);
        if status.contains("sim-1 .. sim-100  simulated, agent running, 100 connected") {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let agent_pid = |lab: &TestLab| -> Option<u32> {
        let state = lab.dir.path().join(&lab.name).join("lab.json");
        let state: Value = serde_json::from_slice(&std::fs::read(state).ok()?).ok()?;
        state["sim_pid"].as_u64().map(|p| p as u32)
    };
    let pid = agent_pid(&lab).expect("the simulated hosts' agent pid");

    // sim-1 is also the host whose certificate the fleet reads VMs with: reads must not keep a
    // dead host alive.
    lab.ok(&["lab", "fault", "sim-1", "kill"]);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let h = lab.json(&["host", "show", "sim-1"]);
        if h["ha"].as_str().is_some_and(|s| s.starts_with("failed"))
            && h["state"] == "not_responding"
        {
            break;
        }
        assert!(Instant::now() < deadline, "sim-1 not seen failed: {h}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // And it stays so (the fleet's watch is renewed every 20 s meanwhile).
    let until = Instant::now() + Duration::from_secs(25);
    while Instant::now() < until {
        let h = lab.json(&["host", "show", "sim-1"]);
        assert_eq!(h["state"], "not_responding", "a dead host came back: {h}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let err = String::from_utf8_lossy(&lab.corral(&["lab", "fault", "sim-1", "isolate"]).stderr)
        .into_owned();
    assert!(err.contains("killed and healed only"), "{err}");
    lab.ok(&["lab", "fault", "sim-1", "heal"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = lab.json(&["host", "show", "sim-1"]);
        if h["ha"] == "live" && h["state"] == "connected" {
            break;
        }
        assert!(Instant::now() < deadline, "sim-1 not back: {h}");
        std::thread::sleep(Duration::from_millis(250));
    }

    lab.ok(&["lab", "down"]);
    assert!(
        !corral_hypervisor::process_alive(pid),
        "the simulated hosts' agent outlived `lab down`"
    );
}
