use proptest::prelude::*;

use super::*;

const GIB: u64 = 1 << 30;

/// A guest: (vCPUs, cores it uses, GiB of memory, movable).
type Guest = (u32, f64, u64, bool);
/// Hosts: (CPUs, guests).
type Spec = Vec<(u32, Vec<Guest>)>;

/// A cluster: hosts with their VMs placed (allocations summed), and the VMs.
fn cluster(spec: &[(u32, Vec<Guest>)]) -> (Vec<HostView>, Vec<DrsVm>) {
    let mut hosts = Vec::new();
    let mut vms = Vec::new();
    for (i, (cpus, guests)) in spec.iter().enumerate() {
        let name = format!("h{i}");
        let mut h = HostView {
            name: name.as_str().into(),
            state: HostState::Connected,
            cpus: *cpus,
            memory_bytes: 64 * GIB,
            allocated_cpus: 0,
            allocated_memory: 0,
            stopped_cpus: 0,
            stopped_memory: 0,
            vms: vec![],
        };
        for (j, (vcpus, cores, mem_gib, movable)) in guests.iter().enumerate() {
            let vm = format!("p/vm-{i}-{j}");
            h.allocated_cpus += vcpus;
            h.allocated_memory += mem_gib * GIB;
            h.vms.push(vm.clone());
            vms.push(DrsVm {
                name: vm,
                host: name.clone(),
                cpus: *vcpus,
                memory_bytes: mem_gib * GIB,
                cpu_demand: *cores,
                memory_demand: mem_gib * GIB / 2,
                movable: *movable,
            });
        }
        hosts.push(h);
    }
    (hosts, vms)
}

/// The cluster after a plan's moves.
fn apply(hosts: &[HostView], vms: &[DrsVm], plan: &Plan) -> (Vec<HostView>, Vec<DrsVm>) {
    let mut hosts = hosts.to_vec();
    let mut vms = vms.to_vec();
    for m in &plan.moves {
        let vm = vms
            .iter_mut()
            .find(|v| v.name == m.vm)
            .expect("planned VM exists");
        assert_eq!(vm.host, m.from, "a move starts where the VM is");
        let from = hosts.iter_mut().find(|h| *h.name == *m.from).expect("from");
        from.allocated_cpus -= vm.cpus;
        from.allocated_memory -= vm.memory_bytes;
        from.vms.retain(|v| *v != vm.name);
        let to = hosts.iter_mut().find(|h| *h.name == *m.to).expect("to");
        to.allocated_cpus += vm.cpus;
        to.allocated_memory += vm.memory_bytes;
        to.vms.push(vm.name.clone());
        vm.host = m.to.clone();
    }
    (hosts, vms)
}

#[test]
fn a_hot_host_gives_a_vm_to_an_idle_one_and_says_why() {
    let (hosts, vms) = cluster(&[
        (
            4,
            vec![(2, 1.9, 2, true), (2, 1.8, 2, true), (2, 0.2, 8, true)],
        ),
        (4, vec![]),
    ]);
    let p = plan(&Policy::default(), &hosts, &[], &vms, 0.10);
    assert!(!p.moves.is_empty(), "{p:?}");
    let m = &p.moves[0];
    assert_eq!((m.from.as_str(), m.to.as_str()), ("h0", "h1"));
    assert_ne!(
        m.vm, "p/vm-0-2",
        "the VM with 8 GiB to copy and little load is the worst buy"
    );
    assert!(
        m.reason.contains("h0 ") && m.reason.contains("to copy"),
        "{}",
        m.reason
    );
    assert!(p.imbalance_after < p.imbalance_before);
    assert!(p.after.iter().any(|l| l.host == "h1" && l.load > 0.0));
}

#[test]
fn hard_rules_capacity_and_pins_hold() {
    let (mut hosts, mut vms) = cluster(&[
        (4, vec![(2, 1.9, 2, true), (2, 1.9, 2, false)]),
        (4, vec![(1, 0.0, 1, true)]),
        (4, vec![]),
    ]);
    // vm-0-0 must stay apart from vm-1-0 (on h1); h2 has no room left for it.
    let groups = vec![Group {
        name: "apart".into(),
        rule: Rule::AntiAffinity,
        strength: Strength::Must,
        members: vec!["p/vm-0-0".into(), "p/vm-1-0".into()],
    }];
    hosts[2].allocated_cpus = 16;
    vms[1].movable = false;
    let p = plan(&Policy::default(), &hosts, &groups, &vms, 0.01);
    assert!(p.moves.is_empty(), "every way out is closed: {p:?}");
    assert!(p.note.contains("no move"), "{}", p.note);
    // Lifting the rule opens h1.
    let p = plan(&Policy::default(), &hosts, &[], &vms, 0.01);
    assert_eq!(p.moves.len(), 1, "{p:?}");
    assert_eq!(p.moves[0].to, "h1");
}

#[test]
fn a_balanced_cluster_gets_no_moves() {
    let (hosts, vms) = cluster(&[
        (4, vec![(2, 1.0, 2, true)]),
        (4, vec![(2, 1.0, 2, true)]),
        (4, vec![(2, 1.0, 2, true)]),
    ]);
    let p = plan(&Policy::default(), &hosts, &[], &vms, 0.02);
    assert!(p.moves.is_empty());
    assert!(p.note.contains("within the threshold"), "{}", p.note);
}

#[test]
fn dpm_names_hosts_that_could_sleep_and_keeps_enough_on() {
    // Three hosts at a tenth of their CPUs each: two could sleep, one must stay on.
    let (hosts, vms) = cluster(&[
        (4, vec![(1, 0.4, 2, true)]),
        (4, vec![(1, 0.4, 2, true)]),
        (4, vec![(1, 0.4, 2, true)]),
    ]);
    let policy = Policy::default();
    let acts = standby(&policy, &hosts, &[], &vms, &[], 1, 0.8);
    assert_eq!(acts.len(), 2, "{acts:?}");
    assert!(acts
        .iter()
        .all(|a| a.action == "standby" && a.moves.len() == 1));
    let stays: Vec<&str> = acts
        .iter()
        .flat_map(|a| a.moves.iter().map(|m| m.to.as_str()))
        .collect();
    assert!(
        stays.iter().all(|h| *h == stays[0]),
        "packed onto one host: {acts:?}"
    );
    assert!(!acts.iter().any(|a| a.host == stays[0]));
    // Keeping two on (one host failure tolerated) leaves one to sleep.
    assert_eq!(standby(&policy, &hosts, &[], &vms, &[], 2, 0.8).len(), 1);
    // Busy hosts stay on: packing would pass the load cap.
    let (hosts, vms) = cluster(&[(4, vec![(2, 2.0, 2, true)]), (4, vec![(2, 2.0, 2, true)])]);
    assert!(standby(&policy, &hosts, &[], &vms, &[], 1, 0.8).is_empty());
    // A host with a VM that may not move stays on.
    let (hosts, vms) = cluster(&[(4, vec![(1, 0.1, 1, false)]), (4, vec![(1, 0.1, 1, false)])]);
    assert!(standby(&policy, &hosts, &[], &vms, &[], 1, 0.8).is_empty());
}

fn arb_cluster() -> impl Strategy<Value = Spec> {
    prop::collection::vec(
        (
            prop_oneof![Just(4u32), Just(8), Just(16)],
            prop::collection::vec(
                (1u32..4, 0.0f64..3.0, 1u64..8, prop::bool::weighted(0.8)),
                0..6,
            ),
        ),
        2..7,
    )
}

proptest! {
    #[test]
    fn no_move_breaks_capacity_or_rules_and_replanning_converges(
        spec in arb_cluster(),
        level in 1u8..=5,
        anti in prop::collection::vec((0usize..7, 0usize..6), 0..3),
    ) {
        let (hosts, vms) = cluster(&spec);
        let policy = Policy { cpu_overcommit: 1.0, ..Policy::default() };
        // Only valid starting clusters: none over capacity.
        prop_assume!(hosts.iter().all(|h| h.allocated_cpus <= h.cpus && h.allocated_memory <= h.memory_bytes));
        let members: Vec<String> = anti
            .iter()
            .map(|(h, v)| format!("p/vm-{h}-{v}"))
            .filter(|m| vms.iter().any(|v| v.name == *m))
            .collect();
        let on: Vec<&str> = members.iter().filter_map(|m| vms.iter().find(|v| v.name == *m)).map(|v| v.host.as_str()).collect();
        let mut distinct = on.clone();
        distinct.sort();
        distinct.dedup();
        prop_assume!(distinct.len() == on.len());
        let groups = vec![Group { name: "g".into(), rule: Rule::AntiAffinity, strength: Strength::Must, members }];
        let threshold = corral_api::drs_threshold(level);
        let mut state = (hosts, vms);
        let mut rounds = 0;
        loop {
            let p = plan(&policy, &state.0, &groups, &state.1, threshold);
            prop_assert!(p.imbalance_after <= p.imbalance_before + 1e-9, "{:?}", p);
            let mut per_host = std::collections::HashMap::new();
            for m in &p.moves {
                prop_assert!(m.gain > 0.0, "every move lowers the imbalance");
                prop_assert!(state.1.iter().any(|v| v.name == m.vm && v.movable), "only movable VMs move");
                *per_host.entry(m.from.clone()).or_insert(0) += 1;
                *per_host.entry(m.to.clone()).or_insert(0) += 1;
            }
            prop_assert!(per_host.values().all(|n| *n <= MOVES_PER_HOST));
            let names: std::collections::HashSet<&str> = p.moves.iter().map(|m| m.vm.as_str()).collect();
            prop_assert_eq!(names.len(), p.moves.len(), "a VM moves once per plan");
            let next = apply(&state.0, &state.1, &p);
            for h in &next.0 {
                prop_assert!(h.allocated_cpus <= h.cpus && h.allocated_memory <= h.memory_bytes, "{} over capacity", h.name);
            }
            let hosts_of: Vec<&str> = groups[0].members.iter().filter_map(|m| next.1.iter().find(|v| v.name == *m)).map(|v| v.host.as_str()).collect();
            let mut d = hosts_of.clone();
            d.sort();
            d.dedup();
            prop_assert_eq!(d.len(), hosts_of.len(), "anti-affinity holds");
            if p.moves.is_empty() {
                break;
            }
            state = next;
            rounds += 1;
            // Every move removes at least MIN_GAIN of a standard deviation that starts below 1.
            prop_assert!(rounds <= 100, "planning again and again must come to rest");
        }
    }
}
