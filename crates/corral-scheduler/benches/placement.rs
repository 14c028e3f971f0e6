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
                name: format!("host-{i:05}"),
                state: if i % 50 == 7 {
                    HostState::Maintenance
                } else {
                    HostState::Connected
                },
                cpus: 64,
                memory_bytes: 512 * GIB,
                allocated_cpus: 10 * 2,
                allocated_memory: 10 * 4 * GIB,
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

fn main() {
    let policy = Policy::default();
    println!("| hosts | VMs placed | Corral decisions/s | median | p99 | first-fit decisions/s | first-fit median |");
    println!("|---|---|---|---|---|---|---|");
    for n in [10usize, 100, 1_000, 10_000] {
        let decisions = if n >= 10_000 { 500 } else { 2_000 };
        let (mut hosts, groups) = cluster(n);
        let mut lat = Vec::with_capacity(decisions);
        let start = Instant::now();
        for k in 0..decisions {
            let req = Request {
                vm: format!("new-{k}"),
                cpus: 2,
                memory_bytes: 4 * GIB,
                host: None,
            };
            let t = Instant::now();
            let d = place(&policy, &hosts, &groups, &req);
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            if let Decision::Place { host } = d {
                let h = hosts.iter_mut().find(|h| h.name == host).expect("host");
                h.allocated_cpus += 2;
                h.allocated_memory += 4 * GIB;
                h.vms.push(req.vm);
            }
        }
        let total = start.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.total_cmp(b));

        let (mut ff_hosts, _) = cluster(n);
        let mut ff_lat = Vec::with_capacity(decisions);
        let ff_start = Instant::now();
        for k in 0..decisions {
            let req = Request {
                vm: format!("new-{k}"),
                cpus: 2,
                memory_bytes: 4 * GIB,
                host: None,
            };
            let t = Instant::now();
            let i = first_fit(&policy, &ff_hosts, &req);
            ff_lat.push(t.elapsed().as_secs_f64() * 1e3);
            if let Some(i) = i {
                ff_hosts[i].allocated_cpus += 2;
                ff_hosts[i].allocated_memory += 4 * GIB;
            }
        }
        let ff_total = ff_start.elapsed().as_secs_f64();
        ff_lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {n} | {decisions} | {:.0} | {:.3} ms | {:.3} ms | {:.0} | {:.4} ms |",
            decisions as f64 / total,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            decisions as f64 / ff_total,
            percentile(&ff_lat, 0.5),
        );
    }
}
