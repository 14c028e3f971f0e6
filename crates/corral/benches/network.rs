//! Network benchmark recorded in docs/BENCHMARKS.md: `cargo bench -p corral --bench network`.
//!
//! A two-host lab and one network. A server guest `srv` on host-2; a client `near` on the same host
//! (the network's local bridge only) and a client `far` on host-1 (across the VXLAN overlay), run
//! side by side, alternating:
//! - throughput: 16 MiB of zeros through busybox nc, timed by the sending guest's own clock;
//! - latency: the average of 20 pings 0.2 s apart;
//! - packets lost while `srv` live-migrates between the hosts: `far` pings it every 0.1 s.
//!
//! Guests run under TCG here, so guest figures are the emulated CPU's. To see what the data path
//! itself costs, namespaces are plugged into the same bridges as guests would be (a veth in place
//! of a tap, the same nftables and br_netfilter path): TCP throughput (1 GiB) and ping latency
//! across hosts on the overlay, within one host's bridge, and on the bare fabric between the hosts.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use std::process::Command;

use common::netlab::{guest_value, tcp_throughput, type_line, TestLab};

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
            "ping -c 20 -i 0.2 {srv} > /tmp/p; grep round-trip /tmp/p > /tmp/r; read a b c v rest < /tmp/r"
        ),
    );
    // "min/avg/max" values as "0.5/1.2/3.4"
    v.split('/').nth(1).expect("avg").parse().expect("ms")
}

fn sh(args: &[&str]) {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("runs")
        .success();
    assert!(ok, "{args:?} failed");
}

/// A namespace plugged into a host's bridge of a network as a guest would be, with an address of
/// the network; removed when dropped.
struct Probe {
    ns: String,
}

impl Probe {
    fn new(lab: &TestLab, host: &str, bridge: &str, name: &str, ip: &str, mtu: u32) -> Probe {
        let ns = format!("cnb-{}-{name}", lab.name);
        sh(&["ip", "netns", "add", &ns]);
        let probe = Probe { ns: ns.clone() };
        let veth = format!("nbp{name}");
        let host_ns = lab.netns(host);
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "link", "set", &veth, "netns", &host_ns]);
        sh(&[
            "ip",
            "-n",
            &host_ns,
            "link",
            "set",
            &veth,
            "master",
            bridge,
            "mtu",
            &mtu.to_string(),
            "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "link",
            "set",
            "eth0",
            "mtu",
            &mtu.to_string(),
            "up",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        probe
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Average round trip in ms of 20 pings from a namespace (busybox ping).
fn ns_latency(ns: &str, to: &str) -> f64 {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "busybox", "ping", "-c", "20", "-i", "0.2", to,
        ])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("round-trip"))
        .expect("summary");
    let nums = line.split('=').nth(1).expect("values").trim();
    nums.split('/').nth(1).expect("avg").parse().expect("ms")
}

/// The data path without guests: probes on the overlay, on one bridge, and the bare fabric.
fn data_path(lab: &TestLab) {
    let net = lab.json(&["network", "show", "net"]);
    let vni = net["spec"]["segment"]["vni"].as_u64().expect("vni");
    let bridge = format!("crbx{vni}");
    let p1 = Probe::new(lab, "host-1", &bridge, "p1", "10.10.0.201", 1450);
    let p2 = Probe::new(lab, "host-2", &bridge, "p2", "10.10.0.202", 1450);
    let p3 = Probe::new(lab, "host-1", &bridge, "p3", "10.10.0.203", 1450);
    let (h1, h2) = (lab.netns("host-1"), lab.netns("host-2"));
    let fabric2 = lab.address("host-2");
    let (mut over, mut local, mut bare) = (vec![], vec![], vec![]);
    let (mut l_over, mut l_local, mut l_bare) = (vec![], vec![], vec![]);
    for run in 0..3 {
        over.push(tcp_throughput(&p1.ns, &p2.ns, "10.10.0.202") / (1 << 20) as f64);
        local.push(tcp_throughput(&p1.ns, &p3.ns, "10.10.0.203") / (1 << 20) as f64);
        bare.push(tcp_throughput(&h1, &h2, &fabric2) / (1 << 20) as f64);
        l_over.push(ns_latency(&p1.ns, "10.10.0.202"));
        l_local.push(ns_latency(&p1.ns, "10.10.0.203"));
        l_bare.push(ns_latency(&h1, &fabric2));
        println!(
            "data path run {run}: overlay {:.0} MiB/s {:.3} ms, one bridge {:.0} MiB/s {:.3} ms, bare fabric {:.0} MiB/s {:.3} ms",
            over[run], l_over[run], local[run], l_local[run], bare[run], l_bare[run]
        );
    }
    let (over, local, bare) = (median(over), median(local), median(bare));
    let (l_over, l_local, l_bare) = (median(l_over), median(l_local), median(l_bare));
    println!(
        "data path throughput (median of 3, 1 GiB): overlay across hosts {over:.0} MiB/s, one host's bridge {local:.0} MiB/s, bare fabric {bare:.0} MiB/s (overlay / fabric {:.2})",
        over / bare
    );
    println!(
        "data path latency (median of 3 averages of 20 pings): overlay {l_over:.3} ms, one bridge {l_local:.3} ms, bare fabric {l_bare:.3} ms"
    );
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

    data_path(&lab);

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
