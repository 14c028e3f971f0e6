//! DRS and packing quality: `cargo bench -p corral-scheduler --bench drs`.
//!
//! - Generated imbalanced clusters of 100 hosts (16 cores, 128 GiB; a fifth of the hosts carry
//!   three times the VMs of the rest, demands drawn from a fixed seed): the standard deviation of
//!   host loads before and after DRS (plans applied until DRS proposes nothing), the moves made and
//!   the time a plan takes, at aggressiveness 3 and 5.
//! - Small clusters (4 hosts, 8 VMs) against the optimum found by trying every assignment.
//! - Packing density: VMs of mixed sizes placed one by one with the `pack` policy, hosts used against
//!   first-fit-decreasing (which sees all VMs at once) and the lower bound (total demand / capacity).

use std::time::Instant;

use corral_scheduler::drs::{plan, DrsVm};
use corral_scheduler::{place, Decision, HostState, HostView, Placement, Policy, Request};

const GIB: u64 = 1 << 30;

/// A small deterministic generator (xorshift), so every run sees the same clusters.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1_000_000.0
    }
}

fn host(i: usize, cpus: u32, mem: u64) -> HostView {
    HostView {
        name: format!("h{i:03}").into(),
        state: HostState::Connected,
        cpus,
        memory_bytes: mem,
        allocated_cpus: 0,
        allocated_memory: 0,
        stopped_cpus: 0,
        stopped_memory: 0,
        vms: vec![],
    }
}

fn imbalanced(seed: u64) -> (Vec<HostView>, Vec<DrsVm>) {
    let mut rng = Rng(seed);
    let mut hosts: Vec<HostView> = (0..100).map(|i| host(i, 16, 128 * GIB)).collect();
    let mut vms = Vec::new();
    for (i, h) in hosts.iter_mut().enumerate() {
        let count = if i % 5 == 0 { 12 } else { 4 };
        for j in 0..count {
            let cpus = 1 + (rng.next() % 4) as u32;
            let mem = (1 + rng.next() % 8) * GIB;
            let name = format!("p/vm-{i}-{j}");
            h.allocated_cpus += cpus;
            h.allocated_memory += mem;
            h.vms.push(name.clone());
            vms.push(DrsVm {
                name,
                host: h.name.to_string(),
                cpus,
                memory_bytes: mem,
                cpu_demand: f64::from(cpus) * (0.2 + 0.8 * rng.unit()),
                memory_demand: (mem as f64 * (0.3 + 0.7 * rng.unit())) as u64,
                movable: true,
            });
        }
    }
    (hosts, vms)
}

/// Applies plans until DRS proposes nothing: (final imbalance, moves, plans, slowest plan in ms).
fn converge(
    mut hosts: Vec<HostView>,
    mut vms: Vec<DrsVm>,
    threshold: f64,
) -> (f64, f64, usize, usize, f64) {
    let policy = Policy::default();
    let (mut moves, mut plans, mut slowest) = (0, 0, 0.0f64);
    let mut first = None;
    loop {
        let t = Instant::now();
        let p = plan(&policy, &hosts, &[], &vms, threshold);
        slowest = slowest.max(t.elapsed().as_secs_f64() * 1e3);
        first.get_or_insert(p.imbalance_before);
        plans += 1;
        if p.moves.is_empty() {
            return (
                first.unwrap_or(0.0),
                p.imbalance_before,
                moves,
                plans,
                slowest,
            );
        }
        for m in &p.moves {
            let vm = vms.iter_mut().find(|v| v.name == m.vm).expect("vm");
            let from = hosts.iter_mut().find(|h| *h.name == *m.from).expect("from");
            from.allocated_cpus -= vm.cpus;
            from.allocated_memory -= vm.memory_bytes;
            let to = hosts.iter_mut().find(|h| *h.name == *m.to).expect("to");
            to.allocated_cpus += vm.cpus;
            to.allocated_memory += vm.memory_bytes;
            vm.host = m.to.clone();
            moves += 1;
        }
    }
}

fn std_dev(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// The lowest imbalance any capacity-respecting assignment of `vms` to `hosts` reaches.
fn optimum(hosts: &[HostView], vms: &[DrsVm], policy: &Policy) -> f64 {
    let n = hosts.len();
    let mut best = f64::MAX;
    for code in 0..n.pow(vms.len() as u32) {
        let mut c = code;
        let mut cpu = vec![0.0; n];
        let mut mem = vec![0u64; n];
        let mut alloc = vec![(0u64, 0u64); n];
        for vm in vms {
            let h = c % n;
            c /= n;
            cpu[h] += vm.cpu_demand;
            mem[h] += vm.memory_demand;
            alloc[h].0 += u64::from(vm.cpus);
            alloc[h].1 += vm.memory_bytes;
        }
        let fits = (0..n).all(|h| {
            alloc[h].0 as f64 <= f64::from(hosts[h].cpus) * policy.cpu_overcommit
                && alloc[h].1 as f64 <= hosts[h].memory_bytes as f64 * policy.memory_overcommit
        });
        if !fits {
            continue;
        }
        let loads: Vec<f64> = (0..n)
            .map(|h| {
                (cpu[h] / f64::from(hosts[h].cpus))
                    .max(mem[h] as f64 / hosts[h].memory_bytes as f64)
            })
            .collect();
        best = best.min(std_dev(&loads));
    }
    best
}

fn small(seed: u64) -> (Vec<HostView>, Vec<DrsVm>) {
    let mut rng = Rng(seed);
    let mut hosts: Vec<HostView> = (0..4).map(|i| host(i, 8, 32 * GIB)).collect();
    let mut vms = Vec::new();
    for j in 0..8 {
        // Skewed: most VMs start on the first host.
        let i = if j < 5 {
            0
        } else {
            1 + (rng.next() % 3) as usize
        };
        let cpus = 1 + (rng.next() % 2) as u32;
        let mem = (1 + rng.next() % 3) * GIB;
        let name = format!("p/vm-{j}");
        hosts[i].allocated_cpus += cpus;
        hosts[i].allocated_memory += mem;
        hosts[i].vms.push(name.clone());
        vms.push(DrsVm {
            name,
            host: hosts[i].name.to_string(),
            cpus,
            memory_bytes: mem,
            cpu_demand: f64::from(cpus) * (0.3 + 0.7 * rng.unit()),
            memory_demand: mem / 2,
            movable: true,
        });
    }
    (hosts, vms)
}

/// Hosts `pack` uses for the VMs, placed one by one, and first-fit-decreasing's count.
fn packing(seed: u64) -> (usize, usize, f64) {
    let mut rng = Rng(seed);
    let sizes: Vec<(u32, u64)> = (0..400)
        .map(|_| (1 + (rng.next() % 8) as u32, (1 + rng.next() % 16) * GIB))
        .collect();
    let policy = Policy {
        placement: Placement::Pack,
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
    };
    let mut hosts: Vec<HostView> = (0..400).map(|i| host(i, 32, 128 * GIB)).collect();
    for (k, (cpus, mem)) in sizes.iter().enumerate() {
        let req = Request {
            vm: format!("vm-{k}"),
            cpus: *cpus,
            memory_bytes: *mem,
            host: None,
            reserve: true,
        };
        if let Decision::Place { host } = place(&policy, &hosts, &[], &req) {
            let h = hosts.iter_mut().find(|h| *h.name == *host).expect("host");
            h.allocated_cpus += cpus;
            h.allocated_memory += mem;
        }
    }
    let used = hosts.iter().filter(|h| h.allocated_cpus > 0).count();
    // First-fit-decreasing by the larger share of a host.
    let mut sorted = sizes.clone();
    let share = |(c, m): &(u32, u64)| (f64::from(*c) / 32.0).max(*m as f64 / (128 * GIB) as f64);
    sorted.sort_by(|a, b| share(b).total_cmp(&share(a)));
    let mut bins: Vec<(u32, u64)> = Vec::new();
    for (c, m) in sorted {
        match bins
            .iter_mut()
            .find(|(bc, bm)| bc + c <= 32 && bm + m <= 128 * GIB)
        {
            Some(b) => {
                b.0 += c;
                b.1 += m;
            }
            None => bins.push((c, m)),
        }
    }
    let cpu_total: u32 = sizes.iter().map(|s| s.0).sum();
    let mem_total: u64 = sizes.iter().map(|s| s.1).sum();
    let bound = (f64::from(cpu_total) / 32.0).max(mem_total as f64 / (128 * GIB) as f64);
    (used, bins.len(), bound.ceil())
}

fn main() {
    println!("DRS on generated imbalanced clusters of 100 hosts (std dev of host loads):");
    println!("| cluster | aggressiveness | before | after | moves | plans | slowest plan |");
    println!("|---|---|---|---|---|---|---|");
    for seed in [11u64, 22, 33] {
        for level in [3u8, 5] {
            let (hosts, vms) = imbalanced(seed);
            let (before, after, moves, plans, ms) =
                converge(hosts, vms, corral_api::drs_threshold(level));
            println!("| seed {seed} | {level} | {before:.3} | {after:.3} | {moves} | {plans} | {ms:.1} ms |");
        }
    }
    println!("\nSmall clusters (4 hosts, 8 VMs), DRS at aggressiveness 5 against the exhaustive optimum:");
    println!("| cluster | before | DRS | optimum | moves |");
    println!("|---|---|---|---|---|");
    for seed in [1u64, 2, 3, 4, 5] {
        let (hosts, vms) = small(seed);
        let best = optimum(&hosts, &vms, &Policy::default());
        let (before, after, moves, _, _) = converge(hosts, vms, corral_api::drs_threshold(5));
        println!("| seed {seed} | {before:.3} | {after:.3} | {best:.3} | {moves} |");
    }
    println!("\nPacking 400 VMs (1-8 vCPUs, 1-16 GiB) on 32-CPU, 128 GiB hosts:");
    println!("| run | pack, one by one | first-fit-decreasing | lower bound |");
    println!("|---|---|---|---|");
    for seed in [7u64, 8, 9] {
        let (used, ffd, bound) = packing(seed);
        println!("| seed {seed} | {used} hosts | {ffd} hosts | {bound} hosts |");
    }
}
