use corral_api::{
    Host, HostStatus, Migration, Network, NetworkSpec, Nic, ObjectMeta, SecurityGroup,
    SecurityRule, Segment, Vm, VmSpec, VmStatus,
};

use super::*;

fn host(name: &str, ip: &str) -> Host {
    Host {
        name: name.into(),
        maintenance: false,
        standby: false,
        approved: None,
        status: HostStatus {
            cpus: 2,
            memory_bytes: 1 << 30,
            accel: corral_api::Accel::Tcg,
            hypervisor: String::new(),
            last_heartbeat: chrono::Utc::now(),
            gossip: None,
            address: Some(ip.parse().unwrap()),
            power_control: false,
            standby: false,
            capacity_refused: None,
        },
    }
}

fn network(project: &str, name: &str, vni: u32, gateway: bool) -> Network {
    Network {
        meta: ObjectMeta::new(project, name),
        spec: NetworkSpec {
            cidr: "10.10.0.0/24".into(),
            gateway,
            segment: Segment::Vxlan { vni },
        },
        attached: None,
    }
}

fn vm(project: &str, name: &str, on: &str, nics: &[(&str, &str, &str)], groups: &[&str]) -> Vm {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "image": "jeos", "cpus": 1, "memory_bytes": 1 << 28, "disk_bytes": 1 << 30,
        "power": "running",
    }))
    .unwrap();
    Vm {
        meta: ObjectMeta::new(project, name),
        spec: VmSpec {
            nics: nics
                .iter()
                .map(|(n, mac, ip)| Nic {
                    network: n.to_string(),
                    mac: mac.to_string(),
                    ip: ip.to_string(),
                })
                .collect(),
            security_groups: groups.iter().map(|g| g.to_string()).collect(),
            ..spec
        },
        status: VmStatus {
            host: Some(on.into()),
            ..VmStatus::default()
        },
        ha: None,
    }
}

fn migration(vm: &Vm, source: &str, target: &str) -> Migration {
    serde_json::from_value(serde_json::json!({
        "id": uuid::Uuid::new_v4(), "project": vm.meta.project, "vm": vm.meta.name,
        "vm_uid": vm.meta.uid, "source": source, "target": target, "shared_storage": true,
        "reason": "requested", "phase": "transferring",
        "created_at": chrono::Utc::now(), "updated_at": chrono::Utc::now(),
    }))
    .unwrap()
}

struct World {
    vms: Vec<Vm>,
    migrations: Vec<Migration>,
    networks: Vec<Network>,
    groups: Vec<SecurityGroup>,
    hosts: Vec<Host>,
}

impl World {
    fn plan(&self, host: &str) -> HostPlan {
        plan(&Cluster {
            host,
            vms: &self.vms,
            migrations: &self.migrations,
            networks: &self.networks,
            groups: &self.groups,
            hosts: &self.hosts,
        })
    }
}

fn world() -> World {
    let a = vm(
        "p",
        "a",
        "h1",
        &[("net", "52:54:00:00:00:0a", "10.10.0.2")],
        &["default"],
    );
    let b = vm(
        "p",
        "b",
        "h2",
        &[("net", "52:54:00:00:00:0b", "10.10.0.3")],
        &["default"],
    );
    let c = vm(
        "p",
        "c",
        "h2",
        &[("net", "52:54:00:00:00:0c", "10.10.0.4")],
        &["web"],
    );
    let moving = migration(&c, "h2", "h3");
    let mut web = SecurityGroup {
        meta: ObjectMeta::new("p", "web"),
        rules: SecurityGroup::new_rules("web"),
    };
    web.rules
        .push(SecurityRule::parse("in tcp 8080 from 0.0.0.0/0").unwrap());
    web.rules
        .push(SecurityRule::parse("in udp 53 from group:nobody").unwrap());
    World {
        vms: vec![a, b, c],
        migrations: vec![moving],
        networks: vec![
            network("p", "net", 100, true),
            network("q", "net", 101, false),
        ],
        groups: vec![web],
        hosts: vec![
            host("h1", "10.0.0.1"),
            host("h2", "10.0.0.2"),
            host("h3", "10.0.0.3"),
        ],
    }
}

#[test]
fn a_host_carries_the_networks_of_its_vms_and_knows_where_the_others_run() {
    let w = world();
    let p = w.plan("h1");
    assert_eq!(p.networks.len(), 1, "only the network with a VM here");
    let n = &p.networks[0];
    assert_eq!(n.bridge, "crbx100");
    assert_eq!(
        n.uplink,
        Uplink::Vxlan {
            dev: "cvx100".into(),
            vni: 100
        }
    );
    assert_eq!(n.gateway.to_string(), "10.10.0.1");
    assert_eq!(n.mtu, 1450);
    let flood: Vec<String> = n.flood.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        flood,
        ["10.0.0.2", "10.0.0.3"],
        "b's host, and c's both ends while it moves"
    );
    assert_eq!(
        n.macs
            .iter()
            .map(|(m, a)| format!("{m}@{a}"))
            .collect::<Vec<_>>(),
        ["52:54:00:00:00:0b@10.0.0.2"],
        "a moving VM has no entry: its frames flood to both ends"
    );
    assert_eq!(n.dhcp.len(), 3, "DHCP knows every VM of the network");
    assert_eq!(p.ports.len(), 1);
    assert_eq!(p.ports[0].tap, tap_name(w.vms[0].meta.uid, 0));
    assert!(p.ports[0].tap.len() <= 15, "an interface name");
    assert!(p.forwarding, "the network has a gateway");
}

#[test]
fn an_arriving_vm_gets_its_port_and_a_host_without_vms_carries_nothing() {
    let mut w = world();
    let h3 = w.plan("h3");
    assert_eq!(
        h3.ports.len(),
        1,
        "c arrives: its tap is ready before the handover"
    );
    assert_eq!(h3.ports[0].ip.to_string(), "10.10.0.4");
    w.migrations.clear();
    w.vms[0].spec.power = corral_api::PowerState::Stopped;
    assert!(w.plan("h1").is_empty(), "a stopped VM needs no port");
    w.vms[0].spec.power = corral_api::PowerState::Running;
    let h3 = w.plan("h3");
    assert!(h3.is_empty(), "no VM here: {h3:?}");
    assert!(h3.ruleset.is_empty());
    let h1 = w.plan("h1");
    assert!(
        h1.networks[0].macs.contains_key("52:54:00:00:00:0c"),
        "once the move is over, c's MAC points at its host"
    );
}

#[test]
fn the_ruleset_holds_each_nics_rules_with_groups_resolved() {
    let w = world();
    let h2 = w.plan("h2");
    let b = tap_name(w.vms[1].meta.uid, 0);
    let c = tap_name(w.vms[2].meta.uid, 0);
    let r = &h2.ruleset;
    assert!(r.contains(&format!("iifname \"{b}\" jump port_{b}")), "{r}");
    assert!(
        r.contains(&format!(
            "oifname \"crbx100\" ip daddr 10.10.0.4 jump in_{c}"
        )),
        "{r}"
    );
    let chain = |name: &str| {
        let start = r.find(&format!("chain {name} {{")).expect(name);
        r[start..start + r[start..].find("  }").unwrap()].to_string()
    };
    let in_c = chain(&format!("in_{c}"));
    assert!(in_c.contains("tcp dport 8080 accept"), "{in_c}");
    assert!(
        in_c.contains("ip saddr { 10.10.0.4 } accept"),
        "same group: {in_c}"
    );
    assert!(
        !in_c.contains("udp dport 53"),
        "a group without members allows nothing: {in_c}"
    );
    assert!(in_c.trim_end().ends_with("drop"));
    let in_b = chain(&format!("in_{b}"));
    assert!(
        in_b.contains("ip saddr { 10.10.0.2, 10.10.0.3 } accept"),
        "{in_b}"
    );
    let out_b = chain(&format!("out_{b}"));
    assert!(out_b.contains("return"), "{out_b}");
    let port_b = chain(&format!("port_{b}"));
    assert!(
        port_b.contains("ether saddr != 52:54:00:00:00:0b drop"),
        "{port_b}"
    );
    assert!(port_b.contains("ip saddr 10.10.0.3 accept"), "{port_b}");
    assert!(
        r.contains("ip saddr 10.10.0.0/24 oifname != \"crb*\" masquerade"),
        "{r}"
    );
    let isolation = r
        .find("oifname \"crbx100\" iifname != \"crbx100\" drop")
        .unwrap();
    assert!(
        isolation < r.find("jump in_").unwrap(),
        "isolation comes before the VMs' rules"
    );
}

#[test]
fn planning_is_deterministic() {
    let w = world();
    assert_eq!(w.plan("h2"), w.plan("h2"));
}
