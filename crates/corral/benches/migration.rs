//! Live migration benchmark recorded in docs/BENCHMARKS.md: `cargo bench -p corral --bench migration`.
//!
//! A two-host lab (network namespaces on a fabric bridge). For 256 MiB, 512 MiB and 1 GiB guests,
//! idle and dirtying memory (a loop rewriting 4 MiB in the guest's tmpfs), on a shared datastore:
//! - Corral: `corral vm migrate` back and forth; the wall time of the command (until the guest runs
//!   on the target) and the downtime QEMU measured;
//! - plain QEMU driven by hand in the same run, in the same namespaces, with Corral's command line
//!   and tuning: start the target with `-incoming`, `migrate`, wait, `cont` the target;
//! - the bound: the bytes QEMU sent divided by the fabric's TCP throughput (busybox nc, measured).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netlab::{tcp_throughput, TestLab};
use corral_hypervisor::qmp::Qmp;
use serde_json::{json, Value};

const RUNS: usize = 5;
const DIRTY_LOOP: &str =
    "(while :; do dd if=/dev/zero of=/tmp/d bs=64k count=64 conv=notrunc 2>/dev/null; done) >/dev/null 2>&1 &";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn wait_marker(log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(log).is_ok_and(|t| t.contains(common::READY)) {
        assert!(Instant::now() < deadline, "no boot in {}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn type_line(sock: &Path, line: &str) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("serial");
    for chunk in format!("{line}\n").as_bytes().chunks(4) {
        s.write_all(chunk).expect("type");
        std::thread::sleep(Duration::from_millis(40));
    }
}

/// One migration: wall seconds, QEMU's downtime (ms), bytes sent, and the guest's whole pause (ms):
/// QEMU's downtime plus the time from the copy's completion to the guest running on the target.
type Run = (f64, f64, f64, f64);

fn time_of(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().and_then(|t| t.parse().ok()).expect("timestamp")
}

/// Migrates a VM through Corral `RUNS` times.
fn corral_runs(lab: &TestLab, name: &str) -> Vec<Run> {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            lab.ok(&["vm", "migrate", name]);
            let wall = t.elapsed().as_secs_f64();
            let m = lab.json(&["vm", "migration", name]);
            let r = &m["result"];
            let vm = lab.json(&["vm", "show", name]);
            let running = vm["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Running")
                .map(|c| time_of(&c["last_transition"]))
                .expect("running since");
            let handover = (running - time_of(&r["completed_at"]))
                .num_microseconds()
                .unwrap_or(0);
            let downtime = r["downtime_ms"].as_f64().unwrap_or(f64::NAN);
            (
                wall,
                downtime,
                r["memory_bytes"].as_f64().unwrap_or(f64::NAN),
                downtime + handover as f64 / 1000.0,
            )
        })
        .collect()
}

/// A QEMU started by hand in a host's namespace, with Corral's command line (its run directory
/// and its socket directory) moved to `dir`.
fn plain_qemu(lab: &TestLab, host: &str, argv: &[String], from: &str, dir: &Path, extra: &[&str]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let d = dir.display().to_string();
    let sockets = corral_hypervisor::socket_dir(Path::new(from))
        .display()
        .to_string();
    let st = Command::new("ip")
        .args(["netns", "exec", &lab.netns(host)])
        .args(
            argv.iter()
                .map(|a| a.replace(&sockets, &d).replace(from, &d)),
        )
        .args(extra)
        .status()
        .expect("qemu");
    assert!(st.success(), "plain QEMU did not start");
}

async fn qmp(dir: &Path) -> Qmp {
    Qmp::connect(&dir.join("qmp.sock")).await.expect("qmp")
}

/// Migrates a plain QEMU back and forth between the namespaces `RUNS` times, the way Corral tunes
/// it; the wall time runs from starting the target to `cont`.
async fn plain_runs(
    lab: &TestLab,
    argv: &[String],
    from: &str,
    root: &Path,
    dirty: bool,
) -> Vec<Run> {
    let hosts = [("host-1", root.join("a")), ("host-2", root.join("b"))];
    plain_qemu(lab, hosts[0].0, argv, from, &hosts[0].1, &[]);
    wait_marker(&hosts[0].1.join("console.log"));
    if dirty {
        type_line(&hosts[0].1.join("serial.sock"), DIRTY_LOOP);
    }
    let mut out = Vec::new();
    for i in 0..RUNS {
        let (src, dst) = (&hosts[i % 2], &hosts[(i + 1) % 2]);
        let address = lab.address(dst.0);
        let t = Instant::now();
        plain_qemu(
            lab,
            dst.0,
            argv,
            from,
            &dst.1,
            &["-S", "-incoming", &format!("tcp:{address}:5998")],
        );
        let mut s = qmp(&src.1).await;
        s.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "auto-converge", "state": true}]})),
        )
        .await
        .expect("caps");
        s.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 10u64 << 30, "downtime-limit": 50})),
        )
        .await
        .expect("params");
        s.execute(
            "migrate",
            Some(json!({"uri": format!("tcp:{address}:5998")})),
        )
        .await
        .expect("migrate");
        let (done, seen): (Value, Instant) = loop {
            let m = s.execute("query-migrate", None).await.expect("query");
            match m["status"].as_str() {
                Some("completed") => break (m, Instant::now()),
                Some("failed" | "cancelled") => panic!("plain migration failed: {m}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        qmp(&dst.1).await.execute("cont", None).await.expect("cont");
        let wall = t.elapsed().as_secs_f64();
        let handover = seen.elapsed().as_secs_f64() * 1000.0;
        let _ = s.execute("quit", None).await;
        let downtime = done["downtime"].as_f64().unwrap_or(f64::NAN);
        out.push((
            wall,
            downtime,
            done["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
            downtime + handover,
        ));
    }
    for (_, dir) in &hosts {
        for pid in common::pids_matching(&dir.display().to_string()) {
            common::signal(pid, libc::SIGKILL);
        }
    }
    out
}

fn main() {
    let lab = TestLab::up(2);
    lab.jeos_and_shared_datastore();
    let shared = lab.dir.path().join("shared");
    let link = tcp_throughput(
        &lab.netns("host-1"),
        &lab.netns("host-2"),
        &lab.address("host-2"),
    );
    println!(
        "fabric TCP throughput between the namespaces: {:.0} MiB/s",
        link / (1u64 << 20) as f64
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("| guest | load | Corral downtime / guest pause | plain QEMU downtime / guest pause | Corral total | plain QEMU total | ratio | bound (sent / link) |");
    println!("|---|---|---|---|---|---|---|---|");
    for mem in ["256M", "512M", "1G"] {
        for dirty in [false, true] {
            let name = format!(
                "m{}-{}",
                mem.to_lowercase(),
                if dirty { "dirty" } else { "idle" }
            );
            lab.ok(&[
                "vm",
                "create",
                &name,
                "--image",
                "jeos",
                "--memory",
                mem,
                "--datastore",
                "nfs",
                "--start",
            ]);
            let vm = lab.json(&["vm", "show", &name]);
            let run_dir = vm["status"]["run_dir"]
                .as_str()
                .expect("run dir")
                .to_string();
            wait_marker(&Path::new(&run_dir).join("console.log"));
            if dirty {
                type_line(
                    &corral_hypervisor::serial_socket(Path::new(&run_dir)),
                    DIRTY_LOOP,
                );
                std::thread::sleep(Duration::from_secs(2));
            }
            let corral = corral_runs(&lab, &name);
            // Corral's command line, from the QEMU it runs now.
            let vm = lab.json(&["vm", "show", &name]);
            let pid = vm["status"]["pid"].as_u64().expect("pid");
            let run_dir = vm["status"]["run_dir"]
                .as_str()
                .expect("run dir")
                .to_string();
            let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
                .expect("cmdline")
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let disk = vm["status"]["disk"]["path"]
                .as_str()
                .expect("disk")
                .to_string();
            eprintln!("  corral runs (wall s, downtime ms, bytes): {corral:.3?}");
            lab.ok(&["vm", "delete", &name, "--force"]);
            // The plain runs get a linked clone of their own, on the same shared directory.
            let plain_disk = shared.join("plain.qcow2");
            let _ = std::fs::remove_file(&plain_disk);
            let image = lab.json(&["image", "show", "jeos"])["status"]["path"]
                .as_str()
                .expect("image")
                .to_string();
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &image])
                .arg(&plain_disk)
                .status()
                .expect("qemu-img");
            assert!(st.success());
            // The QEMU Corral runs now was started as a migration target: drop `-S -incoming defer`.
            let mut argv: Vec<String> = argv
                .iter()
                .map(|a| a.replace(&disk, &plain_disk.display().to_string()))
                .collect();
            if let Some(i) = argv.iter().position(|a| a == "-S") {
                argv.drain(i..i + 3);
            }
            let plain_root = lab.dir.path().join("plain");
            let plain = rt.block_on(plain_runs(&lab, &argv, &run_dir, &plain_root, dirty));
            let col = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
            let (cw, cd, cb, cp) = (
                col(&corral, |r| r.0),
                col(&corral, |r| r.1),
                col(&corral, |r| r.2),
                col(&corral, |r| r.3),
            );
            let (pw, pd, pp) = (
                col(&plain, |r| r.0),
                col(&plain, |r| r.1),
                col(&plain, |r| r.3),
            );
            println!(
                "| {mem} | {} | {cd:.0} ms / {cp:.0} ms | {pd:.0} ms / {pp:.0} ms | {cw:.3} s | {pw:.3} s | {:.2} | {:.3} s |",
                if dirty { "dirtying" } else { "idle" },
                cw / pw,
                cb / link
            );
            eprintln!("  plain runs: {plain:.3?}");
        }
    }
}
