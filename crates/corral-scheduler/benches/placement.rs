//! Placement decision latency: `cargo bench -p corral-scheduler --bench placement`.
//!
//! For 10, 100, 1,000 and 10,000 hosts holding 10 VMs each (a tenth of them in an anti-affinity
//! group), times `place` for a stream of new VMs, each decision applied before the next, and reports
//! decisions per second and the median and p99 latency. A naive first-fit (first connected host with
//! room, no rules) runs on the same cluster in the same run, as the floor.

use std::time::Instant;

use corral_scheduler::{
    place, Decision, Group, HostState, HostView, Policy, Request, Rule, Strength,
};

const GIB: u64 = 1 << 30;

fn cluster(n: usize) -> (Vec<HostView>, Vec<Group>) {
    let mut members = Vec::new();
    let hosts = (0..n)
        .map(|i| {
            let vms: Vec<String> = (0..10).map(|j| format!("vm-{i}-{j}")).collect();
            if i % 10 == 0 {
                members.push(vms[0].clone());
            }
            HostView {
                name: format!("host-{i:05}").into(),
                state: if i % 50 == 7 {
                    HostState::Maintenance
                } else {
                    HostState::Connected
                },
                cpus: 64,
                memory_bytes: 512 * GIB,
                allocated_cpus: 10 * 2,
                allocated_memory: 10 * 4 * GIB,
                stopped_cpus: 0,
                stopped_memory: 0,
                vms,
            }
        })
        .collect();
    let groups = vec![Group {
        name: "db".into(),
        rule: Rule::AntiAffinity,
        strength: Strength::Must,
        members,
    }];
    (hosts, groups)
}

fn first_fit(policy: &Policy, hosts: &[HostView], req: &Request) -> Option<usize> {
    hosts.iter().position(|h| {
        let (c, m) = corral_scheduler::free(policy, h);
        h.state == HostState::Connected && c >= req.cpus as u64 && m >= req.memory_bytes
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Places `decisions` new VMs on a fresh cluster of `n` hosts with `decide`, applying each decision
/// before the next; returns decisions per second and the sorted latencies in ms.
fn run(
    n: usize,
    decisions: usize,
    decide: impl Fn(&[HostView], &[Group], &Request) -> Option<String>,
) -> (f64, Vec<f64>) {
    let (mut hosts, groups) = cluster(n);
    let mut lat = Vec::with_capacity(decisions);
    let start = Instant::now();
    for k in 0..decisions {
        let req = Request {
            vm: format!("new-{k}"),
            cpus: 2,
            memory_bytes: 4 * GIB,
            host: None,
            reserve: true,
        };
        let t = Instant::now();
        let chosen = decide(&hosts, &groups, &req);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(i) = chosen.and_then(|name| hosts.iter().position(|h| *h.name == *name)) {
            hosts[i].allocated_cpus += 2;
            hosts[i].allocated_memory += 4 * GIB;
            hosts[i].vms.push(req.vm);
        }
    }
    let rate = decisions as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (rate, lat)
}

fn main() {
    let policy = Policy::default();
    println!("| hosts | VMs placed | Corral decisions/s | median | p99 | first-fit decisions/s | first-fit median |");
    println!("|---|---|---|---|---|---|---|");
    for n in [10usize, 100, 1_000, 10_000] {
        let decisions = if n >= 10_000 { 5_000 } else { 2_000 };
        let (rate, lat) = run(n, decisions, |hosts, groups, req| {
            match place(&policy, hosts, groups, req) {
                Decision::Place { host } => Some(host),
                Decision::Pending { .. } => None,
            }
        });
        let (ff_rate, ff_lat) = run(n, decisions, |hosts, _, req| {
            first_fit(&policy, hosts, req).map(|i| hosts[i].name.to_string())
        });
        println!(
            "| {n} | {decisions} | {rate:.0} | {:.3} ms | {:.3} ms | {ff_rate:.0} | {:.4} ms |",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&ff_lat, 0.5),
        );
    }
}
