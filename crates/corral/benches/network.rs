//! Network benchmark recorded in docs/BENCHMARKS.md: `cargo bench -p corral --bench network`.
//!
//! A two-host lab and one network. A server guest `srv` on host-2; a client `near` on the same host
//! (the network's local bridge only) and a client `far` on host-1 (across the VXLAN overlay), run
//! side by side, alternating:
//! - throughput: 16 MiB of zeros through busybox nc, timed by the sending guest's own clock;
//! - latency: the average of 20 pings 0.2 s apart;
//! - packets lost while `srv` live-migrates between the hosts: `far` pings it every 0.1 s.
//!
//! Guests run under TCG here: absolute figures are the emulated CPU's, the ratio overlay / bridge
//! is what the network adds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::netlab::{guest_value, type_line, TestLab};

const RUNS: usize = 5;
const MIB: u64 = 16;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn wait_address(lab: &TestLab, name: &str) {
    for _ in 0..480 {
        if lab
            .ok(&["vm", "console", name])
            .contains("corral-jeos: eth0 has ")
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{name} got no address");
}

fn ip_of(lab: &TestLab, name: &str) -> String {
    lab.json(&["vm", "show", name])["spec"]["nics"][0]["ip"]
        .as_str()
        .expect("ip")
        .to_string()
}

/// MiB/s from `client` to `srv` (a fresh listener for each run).
fn throughput(lab: &TestLab, client: &str, srv: &str) -> f64 {
    type_line(lab, "srv", "nc -l -p 5001 > /dev/null &");
    std::thread::sleep(Duration::from_millis(500));
    let count = MIB * 16;
    let v = guest_value(
        lab,
        client,
        "SECS",
        &format!(
            "read a x < /proc/uptime; dd if=/dev/zero bs=64k count={count} 2>/dev/null | nc {srv} 5001; read b x < /proc/uptime; v=$a/$b"
        ),
    );
    let (a, b) = v.split_once('/').expect("a/b");
    let secs = b.parse::<f64>().expect("b") - a.parse::<f64>().expect("a");
    MIB as f64 / secs.max(0.01)
}

/// Average round trip in ms of 20 pings.
fn latency(lab: &TestLab, client: &str, srv: &str) -> f64 {
    let v = guest_value(
        lab,
        client,
        "RTT",
        &format!(
            "ping -c 20 -i 0.2 {srv} > /tmp/p; grep round-trip /tmp/p > /tmp/r; read a b c d v rest < /tmp/r"
        ),
    );
    // "min/avg/max" values as "0.5/1.2/3.4"
    v.split('/').nth(1).expect("avg").parse().expect("ms")
}

fn main() {
    let lab = TestLab::up(2);
    lab.jeos_and_shared_datastore();
    lab.ok(&["network", "create", "net", "--cidr", "10.10.0.0/24"]);
    // srv is placed by the scheduler (a pinned VM cannot move): host-2, with host-1 in maintenance.
    lab.ok(&["host", "maintenance", "enter", "host-1"]);
    lab.ok(&[
        "vm",
        "create",
        "srv",
        "--image",
        "jeos",
        "--memory",
        "256M",
        "--nic",
        "net",
        "--datastore",
        "nfs",
        "--start",
    ]);
    lab.ok(&["host", "maintenance", "exit", "host-1"]);
    for (name, host) in [("near", "host-2"), ("far", "host-1")] {
        lab.ok(&[
            "vm", "create", name, "--image", "jeos", "--memory", "256M", "--nic", "net", "--host",
            host, "--start",
        ]);
    }
    for name in ["srv", "near", "far"] {
        wait_address(&lab, name);
    }
    let srv = ip_of(&lab, "srv");
    let (mut tn, mut tf, mut ln, mut lf) = (vec![], vec![], vec![], vec![]);
    for run in 0..RUNS {
        tn.push(throughput(&lab, "near", &srv));
        tf.push(throughput(&lab, "far", &srv));
        ln.push(latency(&lab, "near", &srv));
        lf.push(latency(&lab, "far", &srv));
        println!(
            "run {run}: throughput bridge {:.1} MiB/s, overlay {:.1} MiB/s; latency bridge {:.2} ms, overlay {:.2} ms",
            tn[run], tf[run], ln[run], lf[run]
        );
    }
    let (tn, tf, ln, lf) = (median(tn), median(tf), median(ln), median(lf));
    println!(
        "throughput (median of {RUNS}, {MIB} MiB): same-host bridge {tn:.1} MiB/s, across hosts on the overlay {tf:.1} MiB/s (ratio {:.2})",
        tf / tn
    );
    println!(
        "latency (median of {RUNS} averages of 20 pings): bridge {ln:.2} ms, overlay {lf:.2} ms (ratio {:.2})",
        lf / ln
    );

    // Packets lost while srv moves: far pings it every 0.1 s across each move.
    let mut lost = Vec::new();
    for (i, to) in ["host-1", "host-2", "host-1"].iter().enumerate() {
        type_line(
            &lab,
            "far",
            &format!("ping -i 0.1 -c 100 {srv} > /tmp/m{i} 2>&1 &"),
        );
        std::thread::sleep(Duration::from_secs(2));
        lab.ok(&["vm", "migrate", "srv", "--to", to]);
        let m = lab.json(&["vm", "migration", "srv"]);
        std::thread::sleep(Duration::from_secs(10));
        let v = guest_value(
            &lab,
            "far",
            "STATS",
            &format!(
                "grep transmitted /tmp/m{i} > /tmp/s; read tx a b rx rest < /tmp/s; v=$tx/$rx"
            ),
        );
        let (tx, rx) = v.split_once('/').expect("tx/rx");
        let n = tx.parse::<u32>().expect("tx") - rx.parse::<u32>().expect("rx");
        println!(
            "migration {i} to {to}: {n} of {tx} pings lost (0.1 s apart); QEMU downtime {} ms",
            m["result"]["downtime_ms"]
        );
        lost.push(n as f64);
    }
    println!(
        "pings lost across a live migration: median {} (max {}) of 100 sent 0.1 s apart",
        median(lost.clone()),
        lost.iter().copied().fold(0.0, f64::max)
    );
}
