//! HA benchmark recorded in docs/BENCHMARKS.md: `cargo bench -p corral --bench ha` (needs root: it
//! builds a three-host lab of network namespaces).
//!
//! - Host loss: four protected JeOS guests (128 MiB, TCG, disks on a shared datastore) run on
//!   host-1; `corral lab fault host-1 kill` kills its agent and guests and cuts its link. Measured
//!   from the kill: the controller's `HostFailed` event (detection), its first restart decision,
//!   and each guest's userspace marker on its new host's console. Then host-1 comes back, the VMs
//!   are live-migrated home, and the next run starts. Side by side in the same run: the same four
//!   guests booted at once by hand with Corral's QEMU command lines, the floor any restart pays on
//!   this machine.
//! - Steady state: the cluster under load (every guest spinning its vCPU, a client hammering the
//!   API, a TCP stream across the fabric) for `CORRAL_BENCH_HA_STEADY_SECS` (default 600 s); every
//!   host event and restart in that time is a false alarm.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use common::netlab::{in_netns, type_line, TestLab};
use serde_json::Value;

const RUNS: usize = 3;
const VMS: [(&str, &str); 4] = [
    ("db", "high"),
    ("web", "medium"),
    ("app1", "low"),
    ("app2", "low"),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn events(lab: &TestLab) -> Vec<Value> {
    lab.json(&["events"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn at(e: &Value) -> DateTime<Utc> {
    serde_json::from_value(e["at"].clone()).expect("event time")
}

fn booted(lab: &TestLab, name: &str) -> bool {
    let out = lab.corral(&["vm", "console", name]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(common::READY)
}

fn host_of(lab: &TestLab, name: &str) -> String {
    lab.json(&["vm", "show", name])["status"]["host"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn secs_since(t0: SystemTime, t: DateTime<Utc>) -> f64 {
    let t0: DateTime<Utc> = t0.into();
    (t - t0).num_milliseconds() as f64 / 1000.0
}

struct Loss {
    detected: f64,
    first_decision: f64,
    all_up: f64,
}

/// Kills host-1 and measures until every VM is back in userspace elsewhere.
fn host_loss(lab: &TestLab) -> Loss {
    let seen = events(lab).len();
    let t0 = SystemTime::now();
    lab.ok(&["lab", "fault", "host-1", "kill"]);
    let mut up: Vec<Option<f64>> = vec![None; VMS.len()];
    let deadline = Instant::now() + Duration::from_secs(180);
    while up.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "the VMs did not come back");
        for (i, (name, _)) in VMS.iter().enumerate() {
            if up[i].is_none() && host_of(lab, name) != "host-1" && booted(lab, name) {
                up[i] = Some(t0.elapsed().expect("clock").as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let new: Vec<Value> = events(lab).into_iter().skip(seen).collect();
    let first = |reason: &str| {
        new.iter()
            .find(|e| e["reason"] == reason)
            .map(|e| secs_since(t0, at(e)))
            .unwrap_or_else(|| panic!("no {reason} event: {new:?}"))
    };
    Loss {
        detected: first("HostFailed"),
        first_decision: first("VmRestarting"),
        all_up: up.into_iter().flatten().fold(0.0, f64::max),
    }
}

/// Brings host-1 back and moves the VMs home to it by live migration.
fn restore(lab: &TestLab) {
    lab.ok(&["lab", "fault", "host-1", "heal"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lab.ok(&["host", "show", "host-1"]).contains("HA: live") {
        assert!(Instant::now() < deadline, "host-1 did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (name, _) in VMS {
        lab.ok(&["vm", "migrate", name, "--to", "host-1"]);
    }
}

fn argv_of(pid: u64) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("cmdline")
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Boots the four guests at once by hand, with Corral's command lines (own run directories and
/// fresh linked clones of the image); seconds until the last reaches userspace.
fn plain_boot(argvs: &[(Vec<String>, String, String)], image: &str, dir: &Path) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let start = Instant::now();
    let mut logs = Vec::new();
    for (i, (argv, run_dir, disk)) in argvs.iter().enumerate() {
        let d = dir.join(i.to_string());
        std::fs::create_dir_all(&d).expect("dir");
        let clone = d.join("disk.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image])
            .arg(&clone)
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let ds = d.display().to_string();
        let args: Vec<String> = argv[1..]
            .iter()
            .map(|a| {
                a.replace(disk, &clone.display().to_string())
                    .replace(run_dir, &ds)
            })
            .collect();
        let st = Command::new("qemu-system-x86_64")
            .args(&args)
            .status()
            .expect("qemu");
        assert!(st.success());
        logs.push(d.join("console.log"));
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while !logs
        .iter()
        .all(|l| std::fs::read_to_string(l).is_ok_and(|t| t.contains(common::READY)))
    {
        assert!(Instant::now() < deadline, "plain guests did not boot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    for pid in common::pids_matching(&dir.display().to_string()) {
        common::signal(pid, libc::SIGKILL);
    }
    secs
}

/// Load for the steady phase: a TCP stream from host-2 to host-3 across the fabric, until `stop`.
fn fabric_stream(lab: &TestLab, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    use std::io::{Read, Write};
    let to = lab.address("host-3");
    let (tx, rx) = std::sync::mpsc::channel();
    let s = stop.clone();
    let server = in_netns(&lab.netns("host-3"), move || {
        let listener = std::net::TcpListener::bind((to.as_str(), 0)).expect("listen");
        tx.send(listener.local_addr().expect("addr")).expect("send");
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        while !s.load(Ordering::SeqCst) && conn.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let addr = rx.recv().expect("addr");
    let client = in_netns(&lab.netns("host-2"), move || {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        let buf = vec![0u8; 1 << 16];
        while !stop.load(Ordering::SeqCst) && conn.write_all(&buf).is_ok() {}
    });
    vec![server, client]
}

fn main() {
    let steady = std::env::var("CORRAL_BENCH_HA_STEADY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600u64);
    let lab = TestLab::up(3);
    lab.ok(&["image", "build-jeos"]);
    let shared = lab.dir.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared");
    let path = shared.to_str().expect("path");
    lab.ok(&["datastore", "create", "nfs", "--path", path, "--shared"]);
    lab.ok(&["host", "maintenance", "enter", "host-2"]);
    lab.ok(&["host", "maintenance", "enter", "host-3"]);
    for (name, prio) in VMS {
        lab.ok(&[
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
        ]);
    }
    lab.ok(&["host", "maintenance", "exit", "host-2"]);
    lab.ok(&["host", "maintenance", "exit", "host-3"]);
    for (name, _) in VMS {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !booted(&lab, name) {
            assert!(Instant::now() < deadline, "{name} did not boot");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Corral's command lines, for the plain QEMU comparison.
    let argvs: Vec<(Vec<String>, String, String)> = VMS
        .iter()
        .map(|(name, _)| {
            let v = lab.json(&["vm", "show", name]);
            (
                argv_of(v["status"]["pid"].as_u64().expect("pid")),
                v["status"]["run_dir"]
                    .as_str()
                    .expect("run dir")
                    .to_string(),
                v["status"]["disk"]["path"]
                    .as_str()
                    .expect("disk")
                    .to_string(),
            )
        })
        .collect();
    let image = lab.json(&["image", "show", "jeos"])["status"]["path"]
        .as_str()
        .expect("image")
        .to_string();

    let (mut detected, mut decided, mut all_up, mut plain) = (vec![], vec![], vec![], vec![]);
    for run in 0..RUNS {
        let loss = host_loss(&lab);
        let p = plain_boot(&argvs, &image, &lab.dir.path().join("plain"));
        eprintln!(
            "run {run}: HostFailed {:.2} s, first restart decided {:.2} s, all 4 in userspace {:.2} s; plain QEMU boot of 4 at once {p:.2} s",
            loss.detected, loss.first_decision, loss.all_up
        );
        detected.push(loss.detected);
        decided.push(loss.first_decision);
        all_up.push(loss.all_up);
        plain.push(p);
        restore(&lab);
    }
    let (d, f, a, p) = (
        median(detected),
        median(decided),
        median(all_up),
        median(plain),
    );
    println!("| host loss, 4 protected VMs, median of {RUNS} | detection (HostFailed) {d:.2} s | first restart decided {f:.2} s | all 4 in guest userspace {a:.2} s | plain QEMU boot of the same 4 at once {p:.2} s | restart overhead over a plain boot {:.2} s |", a - p);

    // Steady state under load: nothing may fail over.
    for (name, _) in VMS {
        type_line(&lab, name, "while :; do :; done &");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = fabric_stream(&lab, stop.clone());
    let api = {
        let (stop, dir) = (stop.clone(), lab.dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut calls = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for args in [["vm", "list"], ["host", "list"]] {
                    let _ = Command::new(common::BIN)
                        .args(args)
                        .env("CORRAL_LAB_DIR", &dir)
                        .env("XDG_CONFIG_HOME", dir.join("config"))
                        .output();
                    calls += 1;
                }
            }
            calls
        })
    };
    let seen = events(&lab).len();
    std::thread::sleep(Duration::from_secs(steady));
    stop.store(true, Ordering::SeqCst);
    let calls = api.join().expect("api load");
    for t in load.drain(..) {
        let _ = t.join();
    }
    let alarms: Vec<Value> = events(&lab).into_iter().skip(seen).collect();
    let restarts = alarms
        .iter()
        .filter(|e| e["reason"] == "VmRestarting")
        .count();
    println!(
        "| steady state under load, {steady} s ({calls} API calls, a fabric TCP stream, every vCPU busy) | host events {} | false restarts {restarts} |",
        alarms.len()
    );
    for e in &alarms {
        println!("  {} {} {}", e["reason"], e["subject"], e["message"]);
    }
}
