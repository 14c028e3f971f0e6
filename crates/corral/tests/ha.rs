//! HA in a lab of namespace hosts with real guests on a shared datastore: a host killed (agent,
//! guests and link) has its protected VMs run again elsewhere in priority order, also with the
//! controller restarted in the middle; the dead host returns without resurrecting anything; a host
//! cut off from the controller only keeps its VMs; a host cut off from everything keeps them under
//! the leave-running isolation response, and under power-off fences itself and its VMs run again
//! elsewhere. Throughout, every host's QEMU processes are sampled: no VM ever
//! runs twice. A protected VM on an RBD datastore (a real Ceph on the lab fabric) runs again
//! elsewhere once its old copy is cut off the storage.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ceph::Ceph;
use common::netlab::{guest_value, TestLab};
use common::{pids_matching, READY};
use serde_json::Value;

const VMS: [(&str, &str, &str); 4] = [
    ("db", "high", ""),
    ("web", "medium", "db"),
    ("app1", "low", ""),
    ("app2", "low", ""),
];

fn vm(lab: &TestLab, name: &str) -> Value {
    lab.json(&["vm", "show", name])
}

fn host_of(lab: &TestLab, name: &str) -> String {
    vm(lab, name)["status"]["host"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn uid(lab: &TestLab, name: &str) -> String {
    vm(lab, name)["meta"]["uid"]
        .as_str()
        .expect("uid")
        .replace('-', "")
}

/// Waits until `cond` holds, or fails with `what` and what the lab shows: VMs, events, the ends
/// of the controller's and agents' logs.
fn wait_for(lab: &TestLab, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            let root = lab.dir.path().join(&lab.name);
            let mut logs = String::new();
            for log in [
                "controller.log",
                "hosts/host-1/agent.log",
                "hosts/host-2/agent.log",
                "hosts/host-3/agent.log",
            ] {
                let text = std::fs::read_to_string(root.join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                logs += &format!(
                    "--- {log}\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            panic!(
                "timed out waiting for {what}\nVMs:\n{}\nevents:\n{}\n{logs}",
                String::from_utf8_lossy(&lab.corral(&["vm", "list"]).stdout),
                String::from_utf8_lossy(&lab.corral(&["events"]).stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn running_on(lab: &TestLab, name: &str, not: &str) -> bool {
    let v = vm(lab, name);
    v["status"]["phase"] == "running" && v["status"]["host"] != not
}

/// Whether the guest's console (on its current host: a VM restarted elsewhere starts a new one)
/// says it reached userspace.
fn booted(lab: &TestLab, name: &str) -> bool {
    let out = lab.corral(&["vm", "console", name]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(READY)
}

/// Waits until every host's agent reports applying the isolation `response`.
fn applied_everywhere(lab: &TestLab, response: &str) {
    let line = format!("isolation response applied: {response}");
    for host in ["host-1", "host-2", "host-3"] {
        wait_for(
            lab,
            &format!("{host} to apply the isolation response {response}"),
            Duration::from_secs(30),
            || lab.ok(&["host", "show", host]).contains(&line),
        );
    }
}

fn events(lab: &TestLab) -> String {
    lab.ok(&["events"])
}

/// Samples every QEMU of the lab for each VM, and remembers the most copies seen at once.
struct Sampler {
    stop: Arc<AtomicBool>,
    most: Arc<Mutex<HashMap<String, usize>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(uids: Vec<(String, String)>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(Mutex::new(HashMap::new()));
        let (s, m) = (stop.clone(), most.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for (name, uid) in &uids {
                    // Hosts with a QEMU of the VM (QEMU's -daemonize briefly shows two processes
                    // of one start on one host: that is one copy).
                    let hosts: std::collections::HashSet<String> = pids_matching(uid)
                        .into_iter()
                        .filter_map(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
                        .filter_map(|c| {
                            let c = String::from_utf8_lossy(&c).into_owned();
                            let (_, rest) = c.split_once("/hosts/")?;
                            rest.split('/').next().map(str::to_string)
                        })
                        .collect();
                    let mut most = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let e = most.entry(name.clone()).or_insert(0);
                    *e = (*e).max(hosts.len());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            stop,
            most,
            thread: Some(thread),
        }
    }

    fn check(&self) {
        let most = self
            .most
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, n) in most.iter() {
            assert!(*n <= 1, "{name} ran on {n} hosts at once");
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn protected_vms_of_a_failed_host_run_again_elsewhere_once_and_never_twice() {
    let lab = TestLab::up(3);
    lab.ok(&["image", "build-jeos"]);
    let shared = lab.dir.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let path = shared.to_str().expect("path");
    lab.ok(&["datastore", "create", "nfs", "--path", path, "--shared"]);

    // Admission control: tolerating two failures of three hosts, protected VMs must fit on one
    // (here 12 GiB, with memory overcommit 0.5).
    let out = lab.corral(&["cluster", "set", "--ha-failures-to-tolerate", "3"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaves no host"));
    lab.ok(&[
        "cluster",
        "set",
        "--ha-failures-to-tolerate",
        "2",
        "--memory-overcommit",
        "0.5",
    ]);
    // It counts the VMs that run: one too big for what would be left is created stopped (it holds
    // no room), but neither a create that starts it nor its start gets through.
    let huge = [
        "vm",
        "create",
        "huge",
        "--image",
        "jeos",
        "--memory",
        "16G",
        "--ha",
        "restart",
        "--datastore",
        "nfs",
    ];
    let out = lab.corral(&[&huge[..], &["--start"]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admission control"), "{err}");
    assert!(!lab.corral(&["vm", "show", "huge"]).status.success());
    lab.ok(&huge);
    let out = lab.corral(&["vm", "start", "huge"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("admission control"),
        "{err}"
    );
    assert_eq!(
        lab.json(&["vm", "show", "huge"])["spec"]["power"],
        "stopped"
    );
    lab.ok(&["vm", "delete", "huge"]);
    lab.ok(&[
        "cluster",
        "set",
        "--ha-failures-to-tolerate",
        "1",
        "--memory-overcommit",
        "1",
    ]);

    // Four protected VMs, all on host-1 (the others in maintenance while they are placed).
    lab.ok(&["host", "maintenance", "enter", "host-2"]);
    lab.ok(&["host", "maintenance", "enter", "host-3"]);
    for (name, prio, after) in VMS {
        let mut args = vec![
            "vm",
            "create",
            name,
            "--image",
            "jeos",
            "--memory",
            "128M",
            "--datastore",
            "nfs",
            "--ha",
            "restart",
            "--ha-priority",
            prio,
            "--start",
        ];
        if !after.is_empty() {
            args.extend(["--ha-after", after]);
        }
        lab.ok(&args);
    }
    lab.ok(&[
        "vm", "create", "local", "--image", "jeos", "--memory", "128M", "--ha", "restart",
        "--start",
    ]);
    lab.ok(&["host", "maintenance", "exit", "host-2"]);
    lab.ok(&["host", "maintenance", "exit", "host-3"]);
    let shown = lab.ok(&["vm", "show", "local"]);
    assert!(
        shown.contains("HA: not protected") && shown.contains("local datastore"),
        "{shown}"
    );
    assert!(lab.ok(&["vm", "show", "db"]).contains("HA: protected"));
    for (name, ..) in VMS {
        assert_eq!(host_of(&lab, name), "host-1");
        wait_for(
            &lab,
            &format!("{name} to boot"),
            Duration::from_secs(120),
            || booted(&lab, name),
        );
    }
    let uids: Vec<(String, String)> = VMS
        .iter()
        .map(|(n, ..)| (n.to_string(), uid(&lab, n)))
        .collect();
    let sampler = Sampler::start(uids.clone());

    // Host-1 dies; the controller is restarted as soon as the first restart is under way.
    let killed = Instant::now();
    lab.ok(&["lab", "fault", "host-1", "kill"]);
    wait_for(&lab, "the first restart", Duration::from_secs(30), || {
        events(&lab).contains("VmRestarting")
    });
    let detected = killed.elapsed();
    lab.ok(&["lab", "restart-controller"]);
    for (name, ..) in VMS {
        wait_for(
            &lab,
            &format!("{name} to run elsewhere"),
            Duration::from_secs(120),
            || {
                lab.corral(&["vm", "show", name]).status.success()
                    && running_on(&lab, name, "host-1")
            },
        );
    }
    for (name, ..) in VMS {
        wait_for(
            &lab,
            &format!("{name} to boot again"),
            Duration::from_secs(120),
            || booted(&lab, name),
        );
    }
    eprintln!(
        "host-1 killed: first restart decided after {:.1} s, all four back in userspace after {:.1} s",
        detected.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    // In priority order, web after db; each restarted once.
    let started = |n: &str| {
        let v = vm(&lab, n);
        serde_json::from_value::<chrono::DateTime<chrono::Utc>>(v["status"]["started_at"].clone())
            .unwrap_or_else(|e| panic!("{n} has no start time ({e}): {v}"))
    };
    assert!(started("db") <= started("web"), "db before web");
    assert!(started("web") <= started("app1") && started("web") <= started("app2"));
    for (name, ..) in VMS {
        let v = vm(&lab, name);
        let restarts = v["status"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["reason"] == "RestartedElsewhere")
            .count();
        assert_eq!(restarts, 1, "{name}: {v}");
    }
    let log = events(&lab);
    assert!(
        log.contains("HostFailed") && log.contains("host/host-1"),
        "{log}"
    );
    wait_for(
        &lab,
        "every VmRestarted event",
        Duration::from_secs(30),
        || events(&lab).matches("VmRestarted").count() >= 4,
    );
    // The VM on the dead host's local disk is not restarted.
    assert_eq!(host_of(&lab, "local"), "host-1");

    // The dead host returns: nothing it ran comes back there.
    lab.ok(&["lab", "fault", "host-1", "heal"]);
    wait_for(&lab, "host-1 to be live", Duration::from_secs(60), || {
        lab.ok(&["host", "show", "host-1"]).contains("HA: live")
    });
    std::thread::sleep(Duration::from_secs(5));
    let host1 = lab.dir.path().join(&lab.name).join("hosts/host-1");
    for (name, uid) in &uids {
        let there = pids_matching(uid)
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*host1.to_string_lossy()))
            })
            .count();
        assert_eq!(there, 0, "{name} came back on host-1");
    }
    sampler.check();

    // A host cut off from the controller only: its peers see it, nothing restarts.
    let vm_on_cut = "db";
    let cut = host_of(&lab, vm_on_cut);
    let pid = vm(&lab, vm_on_cut)["status"]["pid"].as_u64().expect("pid");
    let up0: f64 = guest_value(&lab, vm_on_cut, "UP", "read v x < /proc/uptime")
        .parse()
        .expect("uptime");
    lab.ok(&["lab", "fault", &cut, "cut-controller"]);
    wait_for(&lab, "the cut to be seen", Duration::from_secs(20), || {
        lab.ok(&["host", "show", &cut])
            .contains("cut off from the controller")
    });
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(host_of(&lab, vm_on_cut), cut);
    assert!(common::alive(pid as u32), "{vm_on_cut} still runs");
    lab.ok(&["lab", "fault", &cut, "heal"]);
    let up1: f64 = guest_value(&lab, vm_on_cut, "UP", "read v x < /proc/uptime")
        .parse()
        .expect("uptime");
    assert!(up1 > up0 + 8.0, "{vm_on_cut} kept running: {up0} -> {up1}");
    assert_eq!(vm(&lab, vm_on_cut)["status"]["pid"].as_u64(), Some(pid));
    sampler.check();

    // Under leave-running, a host cut off from everything keeps its VMs and renews their leases:
    // nothing restarts them elsewhere.
    lab.ok(&["cluster", "set", "--ha-isolation-response", "leave-running"]);
    let kept = host_of(&lab, "app1");
    let kept_pid = vm(&lab, "app1")["status"]["pid"].as_u64().expect("pid");
    // Every agent learns the response from the answers to its reports, and says it applies it.
    applied_everywhere(&lab, "leave-running");
    lab.ok(&["lab", "fault", &kept, "isolate"]);
    wait_for(
        &lab,
        "the isolation to be seen",
        Duration::from_secs(30),
        || lab.ok(&["host", "show", &kept]).contains("HA: isolated;"),
    );
    std::thread::sleep(Duration::from_secs(8));
    assert!(common::alive(kept_pid as u32), "app1 still runs on {kept}");
    assert_eq!(host_of(&lab, "app1"), kept);
    lab.ok(&["lab", "fault", &kept, "heal"]);
    wait_for(
        &lab,
        "the host to be live again",
        Duration::from_secs(60),
        || lab.ok(&["host", "show", &kept]).contains("HA: live"),
    );
    assert_eq!(vm(&lab, "app1")["status"]["pid"].as_u64(), Some(kept_pid));
    lab.ok(&["cluster", "set", "--ha-isolation-response", "power-off"]);
    applied_everywhere(&lab, "power-off");
    sampler.check();

    // Under power-off, a host cut off from everything fences itself; its VMs run again on
    // connected hosts.
    let isolated = host_of(&lab, "web");
    let moved: Vec<&str> = VMS
        .iter()
        .map(|(n, ..)| *n)
        .filter(|n| host_of(&lab, n) == isolated)
        .collect();
    lab.ok(&["lab", "fault", &isolated, "isolate"]);
    for name in &moved {
        wait_for(
            &lab,
            &format!("{name} to leave {isolated}"),
            Duration::from_secs(90),
            || running_on(&lab, name, &isolated),
        );
        wait_for(
            &lab,
            &format!("{name} to boot on its new host"),
            Duration::from_secs(120),
            || booted(&lab, name),
        );
    }
    lab.ok(&["lab", "fault", &isolated, "heal"]);
    std::thread::sleep(Duration::from_secs(5));
    for (name, uid) in &uids {
        assert_eq!(pids_matching(uid).len(), 1, "{name} runs exactly once");
    }
    sampler.check();
}

#[test]
fn a_protected_vm_on_rbd_runs_again_elsewhere_once_its_old_copy_is_cut_off_the_storage() {
    let lab = TestLab::up(2);
    lab.ok(&["image", "build-jeos"]);
    let ceph = Ceph::for_lab(&lab);
    lab.ok(&[
        "vm",
        "create",
        "rbd-db",
        "--image",
        "jeos",
        "--memory",
        "256M",
        "--datastore",
        "ceph",
        "--ha",
        "restart",
        "--start",
    ]);
    assert!(lab.ok(&["vm", "show", "rbd-db"]).contains("HA: protected"));
    wait_for(&lab, "rbd-db to boot", Duration::from_secs(120), || {
        booted(&lab, "rbd-db")
    });
    let wrote = guest_value(
        &lab,
        "rbd-db",
        "W",
        "echo kept > /root/ha-mark; sync; read v < /root/ha-mark",
    );
    assert_eq!(wrote, "kept");
    let home = host_of(&lab, "rbd-db");
    let home_addr = lab.address(&home);
    let sampler = Sampler::start(vec![("rbd-db".into(), uid(&lab, "rbd-db"))]);

    lab.ok(&["lab", "fault", &home, "kill"]);
    wait_for(
        &lab,
        "rbd-db to run elsewhere",
        Duration::from_secs(120),
        || running_on(&lab, "rbd-db", &home),
    );
    wait_for(
        &lab,
        "rbd-db to boot again",
        Duration::from_secs(120),
        || booted(&lab, "rbd-db"),
    );
    // Its old copy was cut off the cluster before it ran elsewhere, and the new one has the data.
    let log = events(&lab);
    assert!(
        log.contains("StorageFenced") && log.contains(&home_addr),
        "{log}"
    );
    let blocklist = ceph.admin("ceph", &["osd", "blocklist", "ls"]);
    assert!(blocklist.contains(&home_addr), "{blocklist}");
    let read = guest_value(&lab, "rbd-db", "R", "read v < /root/ha-mark");
    assert_eq!(read, "kept", "the file written before the failure");
    sampler.check();
    drop(sampler);

    lab.ok(&["vm", "delete", "rbd-db", "--force"]);
    wait_for(
        &lab,
        "rbd-db to be deleted",
        Duration::from_secs(60),
        || !lab.corral(&["vm", "show", "rbd-db"]).status.success(),
    );
    lab.ok(&["datastore", "delete", "ceph"]);
    assert_eq!(ceph.images(), Vec::<String>::new());
}
