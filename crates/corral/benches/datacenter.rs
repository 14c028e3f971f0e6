//! Benchmarks recorded in docs/BENCHMARKS.md: `cargo bench -p corral --bench datacenter`.
//!
//! 1. Boot: `corral vm create --start` until the guest prints its userspace marker, against the same
//!    image booted by plain `qemu-system-x86_64` with the same flags (the command line Corral used,
//!    read from /proc), each including its linked-clone creation; runs alternate, medians compared.
//! 2. Linked clones: 50 VMs created through the API until every disk exists; wall time and disk used,
//!    on the local datastore (qcow2 overlays) and on an RBD datastore (RBD clones; a real
//!    single-node Ceph started for the run).
//! 3. Boot from RBD against boot from a local qcow2, both through Corral, runs alternated.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ceph::Ceph;
use common::{Lab, READY};

const RUNS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn wait_file_contains(path: &Path, marker: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(path)
            .map(|t| t.contains(marker))
            .unwrap_or(false)
        {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{marker} not in {} after {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Boots a VM through Corral; returns seconds to the marker and QEMU's argv.
fn corral_boot(lab: &Lab, name: &str, datastore: &str) -> (f64, Vec<String>) {
    let start = Instant::now();
    let out = lab.try_cli(&[
        "vm",
        "create",
        name,
        "--image",
        "jeos",
        "--memory",
        "256M",
        "--datastore",
        datastore,
        "--start",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_dir = lab.run_dir(name);
    let t = wait_file_contains(
        &run_dir.join("console.log"),
        READY,
        Duration::from_secs(120),
    );
    let pid = lab.vm(name)["status"]["pid"].as_u64().expect("pid");
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let argv = argv
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (t.duration_since(start).as_secs_f64(), argv)
}

/// Boots the same image by hand: `qemu-img create` of a linked clone, then QEMU with Corral's flags.
fn plain_boot(argv: &[String], corral_run_dir: &str, image: &str, dir: &Path) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let d = dir.display().to_string();
    // Corral's sockets are in a directory named by a hash of its run directory, gone with its VM.
    let corral_sockets = corral_hypervisor::socket_dir(Path::new(corral_run_dir))
        .display()
        .to_string();
    let sockets = dir.join("sockets");
    std::fs::create_dir_all(&sockets).expect("socket dir");
    let s = sockets.display().to_string();
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| a.replace(&corral_sockets, &s).replace(corral_run_dir, &d))
        .collect();
    let start = Instant::now();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image])
        .arg(dir.join("disk.qcow2"))
        .arg("1G")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let st = Command::new("qemu-system-x86_64")
        .args(&args)
        .status()
        .expect("qemu");
    assert!(st.success());
    let t = wait_file_contains(&dir.join("console.log"), READY, Duration::from_secs(120));
    let secs = t.duration_since(start).as_secs_f64();
    for pid in common::pids_matching(&d) {
        common::signal(pid, libc::SIGKILL);
    }
    secs
}

fn boot_benchmark(lab: &Lab) {
    let image = lab.json(&["image", "show", "jeos"])["status"]["path"]
        .as_str()
        .expect("path")
        .to_string();
    let plain_dir = lab.dir.path().join("plain");
    let (mut corral, mut plain) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let name = format!("boot-{i}");
        let (t, argv) = corral_boot(lab, &name, "local");
        corral.push(t);
        let run_dir = lab.run_dir(&name).display().to_string();
        lab.cli(&["vm", "delete", &name, "--force"]);
        plain.push(plain_boot(&argv, &run_dir, &image, &plain_dir));
        eprintln!("run {i}: corral {t:.3} s, plain QEMU {:.3} s", plain[i]);
    }
    let (c, p) = (median(corral.clone()), median(plain.clone()));
    println!("| boot to guest userspace (TCG, 256 MiB, 1 vCPU), median of {RUNS} | Corral `vm create --start` {c:.3} s | plain QEMU {p:.3} s | ratio {:.3} |", c / p);
    println!("  corral runs: {corral:.3?}\n  plain runs:  {plain:.3?}");
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du")
        .arg("-sb")
        .arg(path)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Creates 50 VMs on `datastore` through the API and waits until every disk exists; returns
/// (seconds until all were accepted, seconds until all disks existed).
fn clone_50(lab: &Lab, datastore: &str, prefix: &str) -> (f64, f64) {
    let token = std::fs::read_to_string(lab.data_dir().join("admin-token")).expect("token");
    let auth = format!("Bearer {}", token.trim());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let base = format!("http://127.0.0.1:{}/api/v1/projects/default", lab.port);
    let start = Instant::now();
    for i in 0..50 {
        let body = serde_json::json!({"name": format!("{prefix}-{i}"), "image": "jeos", "memory": "128M", "disk": "1G", "datastore": datastore});
        let res = agent
            .post(format!("{base}/vms"))
            .header("Authorization", &auth)
            .send_json(&body)
            .expect("post");
        assert_eq!(res.status(), 202);
    }
    let accepted = start.elapsed().as_secs_f64();
    loop {
        let vms: Vec<corral_api::Vm> = agent
            .get(format!("{base}/vms"))
            .header("Authorization", &auth)
            .call()
            .expect("list")
            .body_mut()
            .read_json()
            .expect("json");
        let ready = vms
            .iter()
            .filter(|v| {
                v.meta.name.starts_with(&format!("{prefix}-"))
                    && v.status.phase == corral_api::VmPhase::Stopped
            })
            .count();
        if ready == 50 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "clones on {datastore} not ready: {ready}/50"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (accepted, start.elapsed().as_secs_f64())
}

fn clone_benchmark(lab: &Lab) {
    let vms_dir = lab.data_dir().join("vms");
    let before = du(&vms_dir);
    let (accepted, total) = clone_50(lab, "local", "clone");
    let used = du(&vms_dir) - before;
    let image = lab.json(&["image", "show", "jeos"]);
    let full = image["status"]["actual_bytes"].as_u64().unwrap_or(0) * 50;
    println!(
        "| 50 linked clones through the API | all 50 accepted in {accepted:.3} s, all disks created in {total:.3} s | {:.1} MiB on disk ({:.0} KiB per VM) | full copies would take {:.1} MiB |",
        used as f64 / 1048576.0,
        used as f64 / 50.0 / 1024.0,
        full as f64 / 1048576.0
    );
}

/// Bytes stored in the pool, as Ceph counts them.
fn pool_stored(ceph: &Ceph) -> u64 {
    let df: serde_json::Value =
        serde_json::from_str(&ceph.admin("ceph", &["df", "--format", "json"])).expect("json");
    df["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == ceph.pool.as_str())
        .and_then(|p| p["stats"]["stored"].as_u64())
        .unwrap_or(0)
}

/// The same on an RBD datastore: the image is stored in the pool by the first VM (timed apart),
/// then 50 clones; and boots from RBD against boots from a local qcow2, alternated.
fn rbd_benchmark(lab: &Lab, ceph: &Ceph) {
    let keyring = ceph.user_keyring();
    lab.cli(&[
        "datastore",
        "create",
        "ceph",
        "--type",
        "rbd",
        "--pool",
        &ceph.pool,
        "--monitors",
        &ceph.monitor(),
        "--user",
        "corral",
        "--keyring",
        keyring.to_str().expect("utf-8"),
    ]);
    let t = Instant::now();
    lab.cli(&[
        "vm",
        "create",
        "first",
        "--image",
        "jeos",
        "--memory",
        "128M",
        "--datastore",
        "ceph",
    ]);
    let first = t.elapsed().as_secs_f64();
    lab.cli(&["vm", "delete", "first"]);
    let before = pool_stored(ceph);
    let (accepted, total) = clone_50(lab, "ceph", "rbd-clone");
    // Ceph reports stored bytes a few seconds late.
    std::thread::sleep(Duration::from_secs(10));
    let used = pool_stored(ceph).saturating_sub(before);
    println!(
        "| 50 RBD clones through the API (image already stored; storing it took {first:.3} s with the first VM) | all 50 accepted in {accepted:.3} s, all disks created in {total:.3} s | {:.1} MiB more stored in the pool ({:.0} KiB per VM) | |",
        used as f64 / 1048576.0,
        used as f64 / 50.0 / 1024.0,
    );
    for i in 0..50 {
        lab.cli(&["vm", "delete", &format!("rbd-clone-{i}")]);
    }
    let (mut rbd, mut local) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        for (datastore, times) in [("ceph", &mut rbd), ("local", &mut local)] {
            let name = format!("{datastore}-boot-{i}");
            times.push(corral_boot(lab, &name, datastore).0);
            lab.cli(&["vm", "delete", &name, "--force"]);
        }
        eprintln!(
            "run {i}: RBD {:.3} s, local qcow2 {:.3} s",
            rbd[i], local[i]
        );
    }
    let (r, l) = (median(rbd.clone()), median(local.clone()));
    println!("| boot to guest userspace from RBD vs from a local qcow2 (both `vm create --start`), median of {RUNS} | RBD {r:.3} s | local qcow2 {l:.3} s | ratio {:.3} |", r / l);
    println!("  RBD runs:   {rbd:.3?}\n  local runs: {local:.3?}");
}

fn main() {
    let lab = Lab::start();
    lab.build_jeos();
    boot_benchmark(&lab);
    clone_benchmark(&lab);
    let ceph = Ceph::start("corral");
    rbd_benchmark(&lab, &ceph);
}
