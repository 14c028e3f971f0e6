//! Benchmark recorded in docs/BENCHMARKS.md: `cargo bench -p corral --bench scale`.
//!
//! The control plane at datacenter scale, through the REST API: a real controller with simulated
//! hosts in its process (`corral controller --sim-hosts`), VMs created and started by concurrent
//! clients until the cluster holds them all; latency of create, get and list (a page of 100) as
//! the cluster fills, a full listing paged through, and the controller's resident memory. Sizes
//! come from CORRAL_SCALE_HOSTS, CORRAL_SCALE_VMS and CORRAL_SCALE_CLIENTS (default 10,000 hosts,
//! 100,000 VMs, 8 clients). The anchor is vCenter 8's maximum: 2,500 hosts, 40,000 powered-on VMs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Lab;
use serde_json::{json, Value};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "{name:<28} n={:<7} p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms",
        ms.len(),
        pct(&ms, 0.5),
        pct(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    )
}

struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn new(lab: &Lab) -> Api {
        let token = std::fs::read_to_string(lab.data_dir().join("admin-token")).expect("token");
        Api {
            base: format!("http://127.0.0.1:{}/api/v1", lab.port),
            token: format!("Bearer {}", token.trim()),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(120)))
                .build()
                .into(),
        }
    }

    /// GET or POST; the time it took and the body. Panics on an error status.
    fn call(&self, path: &str, body: Option<&Value>) -> (f64, Value) {
        let url = format!("{}{path}", self.base);
        let t = Instant::now();
        let res = match body {
            Some(b) => self
                .agent
                .post(&url)
                .header("Authorization", &self.token)
                .send_json(b),
            None => self
                .agent
                .get(&url)
                .header("Authorization", &self.token)
                .call(),
        };
        let mut res = res.unwrap_or_else(|e| panic!("{path}: {e}"));
        let v: Value = res.body_mut().read_json().unwrap_or(Value::Null);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        assert!(res.status().is_success(), "{path}: {} {v}", res.status());
        (ms, v)
    }
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn name(i: usize) -> String {
    format!("vm-{i:06}")
}

fn main() {
    let hosts = env("CORRAL_SCALE_HOSTS", 10_000);
    let vms = env("CORRAL_SCALE_VMS", 100_000);
    let clients = env("CORRAL_SCALE_CLIENTS", 8).max(1);
    println!("scale: {hosts} simulated hosts, {vms} VMs, {clients} clients");
    let started = Instant::now();
    let lab = Lab::controller_with(
        &[
            "--sim-hosts",
            &hosts.to_string(),
            "--sim-load",
            "none",
            "--sim-boot-ms",
            "0",
        ],
        &[],
    );
    let pid = lab.server_pid().expect("controller pid");
    let api = Arc::new(Api::new(&lab));
    loop {
        let (_, h) = api.call("/hosts", None);
        let up = h.as_array().map_or(0, |l| {
            l.iter().filter(|h| h["state"] == "connected").count()
        });
        if up == hosts {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{up} of {hosts} hosts connected"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "{hosts} hosts connected after {:.1} s; controller {:.0} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib(pid)
    );
    lab.tiny_image_and_shared_datastore();

    // Creates, by concurrent clients; latencies kept per tenth of the run to show any growth.
    let next = Arc::new(AtomicUsize::new(0));
    let lat: Arc<Mutex<Vec<(usize, f64)>>> = Arc::default();
    let t0 = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (api, next, lat) = (api.clone(), next.clone(), lat.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= vms {
                    return;
                }
                let body = json!({
                    "name": name(i), "image": "tiny", "cpus": 1, "memory": "512M", "start": true
                });
                let (ms, _) = api.call("/projects/default/vms", Some(&body));
                lat.lock().expect("lock").push((i, ms));
                if (i + 1) % (vms / 10).max(1) == 0 {
                    println!(
                        "  {} created, {:.0} s, controller {:.0} MiB",
                        i + 1,
                        t0.elapsed().as_secs_f64(),
                        rss_mib(pid)
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client");
    }
    let create_s = t0.elapsed().as_secs_f64();
    let lat = std::mem::take(&mut *lat.lock().expect("lock"));
    let mut report = vec![format!(
        "created {vms} VMs in {create_s:.0} s: {:.0} creates/s",
        vms as f64 / create_s
    )];
    report.push(summary(
        "create (all)",
        lat.iter().map(|(_, ms)| *ms).collect(),
    ));
    report.push(summary(
        "create (last tenth)",
        lat.iter()
            .filter(|(i, _)| *i >= vms - vms / 10)
            .map(|(_, ms)| *ms)
            .collect(),
    ));

    // Everything runs: page through the whole list (which is itself a figure).
    let t = Instant::now();
    let (running, listed) = loop {
        let (mut running, mut listed, mut after) = (0, 0, String::new());
        loop {
            let (_, page) = api.call(&format!("/projects/default/vms?limit=1000{after}"), None);
            let page = page.as_array().cloned().unwrap_or_default();
            listed += page.len();
            running += page
                .iter()
                .filter(|v| v["status"]["phase"] == "running")
                .count();
            match page.last() {
                Some(v) if page.len() == 1000 => {
                    after = format!("&after={}", v["meta"]["name"].as_str().unwrap_or(""))
                }
                _ => break,
            }
        }
        if running == vms || t.elapsed() > Duration::from_secs(600) {
            break (running, listed);
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let t = Instant::now();
    let mut after = String::new();
    loop {
        let (_, page) = api.call(&format!("/projects/default/vms?limit=1000{after}"), None);
        let page = page.as_array().cloned().unwrap_or_default();
        match page.last() {
            Some(v) if page.len() == 1000 => {
                after = format!("&after={}", v["meta"]["name"].as_str().unwrap_or(""))
            }
            _ => break,
        }
    }
    report.push(format!(
        "{running} of {listed} VMs running; the whole list paged through (1000 a page) in {:.2} s",
        t.elapsed().as_secs_f64()
    ));

    // Reads at full size.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let gets: Vec<f64> = (0..1000)
        .map(|_| {
            api.call(&format!("/projects/default/vms/{}", name(rand(vms))), None)
                .0
        })
        .collect();
    report.push(summary("get", gets));
    let pages: Vec<f64> = (0..300)
        .map(|_| {
            let after = name(rand(vms));
            api.call(
                &format!("/projects/default/vms?limit=100&after={after}"),
                None,
            )
            .0
        })
        .collect();
    report.push(summary("list (a page of 100)", pages));
    // Names sort as text (sim-10 before sim-2): start pages at names in that order, never so
    // near the end that a page comes back short.
    let mut host_names: Vec<String> = (1..=hosts).map(|i| format!("sim-{i}")).collect();
    host_names.sort();
    let host_pages: Vec<f64> = (0..300)
        .map(|_| {
            let after = &host_names[rand(hosts.saturating_sub(100).max(1))];
            api.call(&format!("/hosts?limit=100&after={after}"), None).0
        })
        .collect();
    report.push(summary("list hosts (a page of 100)", host_pages));
    let host_lists: Vec<f64> = (0..5).map(|_| api.call("/hosts", None).0).collect();
    report.push(summary(&format!("list hosts (all {hosts})"), host_lists));
    let store = std::fs::metadata(lab.data_dir().join("store.redb")).map_or(0, |m| m.len());
    report.push(format!(
        "controller resident memory {:.0} MiB; store {:.0} MiB on disk",
        rss_mib(pid),
        store as f64 / (1 << 20) as f64
    ));
    // Stalls have a cause the controller logs: a cache that fell behind reloads everything.
    let log = lab.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    report.push(format!(
        "controller log: {} warnings, {} slow commits, {} cache reloads{}",
        warnings.len(),
        log.matches("a commit took longer").count(),
        log.matches("loading again").count(),
        warnings
            .first()
            .map_or(String::new(), |w| format!("; first: {w}"))
    ));
    println!("\n--- results ({hosts} hosts, {vms} VMs, {clients} clients) ---");
    for line in report {
        println!("{line}");
    }
    println!(
        "anchor: vCenter 8 maximum 2,500 hosts and 40,000 powered-on VMs; target API p99 < 100 ms"
    );
}
