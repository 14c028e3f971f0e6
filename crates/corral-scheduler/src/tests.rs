use proptest::prelude::*;

use super::*;

const GIB: u64 = 1 << 30;

fn host(name: &str, cpus: u32, mem_gib: u64) -> HostView {
    HostView {
        name: name.into(),
        state: HostState::Connected,
        cpus,
        memory_bytes: mem_gib * GIB,
        allocated_cpus: 0,
        allocated_memory: 0,
        stopped_cpus: 0,
        stopped_memory: 0,
        vms: vec![],
    }
}

fn req(vm: &str, cpus: u32, mem_gib: u64) -> Request {
    Request {
        vm: vm.into(),
        cpus,
        memory_bytes: mem_gib * GIB,
        host: None,
        reserve: true,
    }
}

/// Places the VMs one after another, as the controller does, and returns the final hosts.
fn place_all(
    policy: &Policy,
    mut hosts: Vec<HostView>,
    groups: &[Group],
    reqs: &[Request],
) -> (Vec<HostView>, Vec<Decision>) {
    let mut decisions = Vec::new();
    for r in reqs {
        let d = place(policy, &hosts, groups, r);
        if let Decision::Place { host } = &d {
            let h = hosts
                .iter_mut()
                .find(|h| *h.name == **host)
                .expect("chosen host exists");
            if r.reserve {
                h.allocated_cpus += r.cpus;
                h.allocated_memory += r.memory_bytes;
            } else {
                h.stopped_cpus += r.cpus;
                h.stopped_memory += r.memory_bytes;
            }
            h.vms.push(r.vm.clone());
        }
        decisions.push(d);
    }
    (hosts, decisions)
}

fn three() -> Vec<HostView> {
    vec![
        host("host-a", 4, 8),
        host("host-b", 4, 8),
        host("host-c", 4, 8),
    ]
}

#[test]
fn spread_balances_six_vms_two_per_host() {
    let reqs: Vec<_> = (0..6).map(|i| req(&format!("vm{i}"), 1, 1)).collect();
    let (hosts, _) = place_all(&Policy::default(), three(), &[], &reqs);
    assert!(hosts.iter().all(|h| h.vms.len() == 2), "{hosts:?}");
}

fn stopped(vm: &str, cpus: u32, mem_gib: u64) -> Request {
    Request {
        reserve: false,
        ..req(vm, cpus, mem_gib)
    }
}

#[test]
fn a_stopped_vm_holds_no_room_yet_full_hosts_take_it_and_stopped_vms_spread() {
    let policy = Policy {
        cpu_overcommit: 1.0,
        ..Policy::default()
    };
    // Twelve running one-vCPU VMs fill the three 4-CPU hosts: a thirteenth waits...
    let reqs: Vec<_> = (0..12).map(|i| req(&format!("run{i}"), 1, 1)).collect();
    let (full, decisions) = place_all(&policy, three(), &[], &reqs);
    assert!(decisions
        .iter()
        .all(|d| matches!(d, Decision::Place { .. })));
    assert!(matches!(
        place(&policy, &full, &[], &req("one-more", 1, 1)),
        Decision::Pending { reason } if reason.contains("no host has 1 vCPUs free")
    ));
    // ...but stopped ones are placed, spread as if they ran.
    let reqs: Vec<_> = (0..6).map(|i| stopped(&format!("idle{i}"), 1, 1)).collect();
    let (hosts, decisions) = place_all(&policy, full, &[], &reqs);
    assert!(decisions
        .iter()
        .all(|d| matches!(d, Decision::Place { .. })));
    assert!(
        hosts
            .iter()
            .all(|h| h.vms.len() == 6 && h.stopped_cpus == 2),
        "{hosts:?}"
    );
    // On hosts with room, a running VM goes where fewer stopped VMs wait to start.
    let mut hosts = three();
    hosts[0].stopped_cpus = 3;
    hosts[1].stopped_cpus = 1;
    hosts[2].stopped_cpus = 2;
    assert_eq!(
        place(&policy, &hosts, &[], &req("web", 1, 1)),
        Decision::Place {
            host: "host-b".into()
        }
    );
}

#[test]
fn pack_fills_one_host_first() {
    let policy = Policy {
        placement: Placement::Pack,
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
    };
    let reqs: Vec<_> = (0..5).map(|i| req(&format!("vm{i}"), 1, 1)).collect();
    let (hosts, _) = place_all(&policy, three(), &[], &reqs);
    let counts: Vec<usize> = hosts.iter().map(|h| h.vms.len()).collect();
    assert_eq!(
        counts,
        [4, 1, 0],
        "host-a is filled (4 CPUs) before host-b is used"
    );
}

#[test]
fn anti_affinity_spreads_a_group_and_a_fourth_member_waits_with_a_reason() {
    let group = Group {
        name: "db".into(),
        rule: Rule::AntiAffinity,
        strength: Strength::Must,
        members: (0..4).map(|i| format!("db{i}")).collect(),
    };
    let reqs: Vec<_> = (0..4).map(|i| req(&format!("db{i}"), 1, 1)).collect();
    let (hosts, decisions) = place_all(&Policy::default(), three(), &[group], &reqs);
    assert!(hosts.iter().all(|h| h.vms.len() == 1));
    match &decisions[3] {
        Decision::Pending { reason } => {
            assert!(reason.contains("anti-affinity group db"), "{reason}")
        }
        d => panic!("the 4th member must wait: {d:?}"),
    }
}

#[test]
fn maintenance_hosts_get_nothing_and_the_reason_names_memory() {
    let mut hosts = three();
    hosts[0].state = HostState::Maintenance;
    hosts[1].allocated_memory = 3 * GIB;
    let d = place(&Policy::default(), &hosts, &[], &req("big", 1, 7));
    assert_eq!(
        d,
        Decision::Place {
            host: "host-c".into()
        }
    );
    let d = place(&Policy::default(), &hosts, &[], &req("huge", 1, 9));
    match d {
        Decision::Pending { reason } => {
            assert!(
                reason.contains("no host has 9G of memory free; largest free is 8G on host-c"),
                "{reason}"
            );
            assert!(reason.contains("1 host(s) in maintenance"), "{reason}");
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn pins_and_soft_affinity() {
    let mut r = req("web", 1, 1);
    r.host = Some("host-b".into());
    assert_eq!(
        place(&Policy::default(), &three(), &[], &r),
        Decision::Place {
            host: "host-b".into()
        }
    );
    r.host = Some("nowhere".into());
    assert!(
        matches!(place(&Policy::default(), &three(), &[], &r), Decision::Pending { reason } if reason.contains("pinned to host nowhere"))
    );
    let mut hosts = three();
    hosts[2].vms.push("cache".into());
    hosts[2].allocated_cpus = 3;
    let g = Group {
        name: "app".into(),
        rule: Rule::Affinity,
        strength: Strength::Should,
        members: vec!["cache".into(), "web".into()],
    };
    assert_eq!(
        place(&Policy::default(), &hosts, &[g], &req("web", 1, 1)),
        Decision::Place {
            host: "host-c".into()
        },
        "soft affinity beats spreading"
    );
}

fn arb_cluster() -> impl Strategy<Value = (Vec<HostView>, Vec<Group>, Vec<Request>, Policy)> {
    let hosts = prop::collection::vec((1u32..16, 1u64..32, 0u8..10), 1..8).prop_map(|hs| {
        hs.into_iter()
            .enumerate()
            .map(|(i, (cpus, mem, st))| HostView {
                state: match st {
                    0 => HostState::Maintenance,
                    1 => HostState::NotResponding,
                    _ => HostState::Connected,
                },
                ..host(&format!("h{i}"), cpus, mem)
            })
            .collect::<Vec<_>>()
    });
    // Some VMs are created stopped: they must never push a host's running VMs over capacity.
    let reqs = prop::collection::vec((1u32..8, 1u64..12, 0u8..4), 1..30).prop_map(|rs| {
        rs.into_iter()
            .enumerate()
            .map(|(i, (c, m, s))| Request {
                reserve: s > 0,
                ..req(&format!("v{i}"), c, m)
            })
            .collect::<Vec<_>>()
    });
    let groups = prop::collection::vec(
        (
            prop::bool::ANY,
            prop::bool::ANY,
            prop::collection::vec(0usize..30, 1..6),
        ),
        0..4,
    )
    .prop_map(|gs| {
        gs.into_iter()
            .enumerate()
            .map(|(i, (anti, must, members))| Group {
                name: format!("g{i}"),
                rule: if anti {
                    Rule::AntiAffinity
                } else {
                    Rule::Affinity
                },
                strength: if must {
                    Strength::Must
                } else {
                    Strength::Should
                },
                members: members.into_iter().map(|m| format!("v{m}")).collect(),
            })
            .collect::<Vec<_>>()
    });
    let policy = (prop::bool::ANY, 1u32..4, 1u32..3).prop_map(|(pack, c, m)| Policy {
        placement: if pack {
            Placement::Pack
        } else {
            Placement::Spread
        },
        cpu_overcommit: c as f64,
        memory_overcommit: m as f64,
    });
    (hosts, groups, reqs, policy)
}

proptest! {
    #[test]
    fn invariants_hold_for_any_cluster((hosts, groups, reqs, policy) in arb_cluster()) {
        let (placed, decisions) = place_all(&policy, hosts.clone(), &groups, &reqs);
        for h in &placed {
            prop_assert!(h.allocated_cpus as u64 <= cap(h.cpus as u64, policy.cpu_overcommit), "CPU over capacity on {}", h.name);
            prop_assert!(h.allocated_memory <= cap(h.memory_bytes, policy.memory_overcommit), "memory over capacity on {}", h.name);
            if h.state != HostState::Connected {
                prop_assert!(h.vms.is_empty(), "{} is {:?} but got VMs", h.name, h.state);
            }
        }
        let where_is = |vm: &str| placed.iter().find(|h| h.vms.iter().any(|v| v == vm)).map(|h| h.name.to_string());
        for g in groups.iter().filter(|g| g.strength == Strength::Must) {
            let mut members: Vec<String> = g.members.clone();
            members.sort();
            members.dedup();
            let on: Vec<String> = members.iter().filter_map(|m| where_is(m)).collect();
            match g.rule {
                Rule::AntiAffinity => {
                    let mut uniq = on.clone();
                    uniq.sort();
                    uniq.dedup();
                    prop_assert_eq!(uniq.len(), on.len(), "hard anti-affinity {} broken: {:?}", g.name, on);
                }
                Rule::Affinity => {
                    prop_assert!(on.windows(2).all(|w| w[0] == w[1]), "hard affinity {} broken: {:?}", g.name, on);
                }
            }
        }
        // The plan depends on the hosts, not on the order they are listed in.
        let mut reversed = hosts.clone();
        reversed.reverse();
        let (_, again) = place_all(&policy, reversed, &groups, &reqs);
        prop_assert_eq!(decisions, again);
    }
}
