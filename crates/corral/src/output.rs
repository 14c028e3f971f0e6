//! How the CLI prints: a table for people, or JSON whose fields are the API's (documented in the
//! OpenAPI document), for scripts.

use anyhow::Result;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use corral_api::{
    format_bytes, ClusterEvent, ClusterSettings, Datastore, DatastoreDetail, DrsPlan, HostInfo,
    HostState, Image, Migration, Network, SecurityGroup, Segment, Task, Vm, VmGroup,
};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

fn json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    println!("{t}");
}

/// One object (`single`) prints as one JSON object, a listing as an array.
fn json_items<T: Serialize>(items: &[T], single: bool) -> Result<()> {
    match (single, items.first()) {
        (true, Some(one)) => json(one),
        _ => json(&items),
    }
}

pub fn vms(fmt: Format, vms: &[Vm], single: bool) -> Result<()> {
    if fmt == Format::Json {
        return json_items(vms, single);
    }
    table(
        &[
            "NAME", "PHASE", "HOST", "CPUS", "MEMORY", "DISK", "IMAGE", "PID", "REASON",
        ],
        vms.iter()
            .map(|v| {
                let reason = v
                    .status
                    .conditions
                    .iter()
                    .max_by_key(|c| c.last_transition)
                    .map(|c| {
                        if c.message.is_empty() {
                            c.reason.clone()
                        } else {
                            format!("{}: {}", c.reason, c.message)
                        }
                    })
                    .unwrap_or_default();
                vec![
                    v.meta.name.clone(),
                    v.status.phase.to_string(),
                    v.status.host.clone().unwrap_or_default(),
                    v.spec.cpus.to_string(),
                    format_bytes(v.spec.memory_bytes),
                    format_bytes(v.spec.disk_bytes),
                    v.spec.image.clone(),
                    v.status.pid.map(|p| p.to_string()).unwrap_or_default(),
                    reason,
                ]
            })
            .collect(),
    );
    if let [vm] = vms {
        if let Some(ha) = vm.ha.as_ref().filter(|_| single) {
            let verdict = if ha.protected {
                "protected"
            } else {
                "not protected"
            };
            println!("HA: {verdict}: {}", ha.reason);
        }
        if single {
            for (i, nic) in vm.spec.nics.iter().enumerate() {
                println!(
                    "eth{i}: network {}  mac {}  ip {}",
                    nic.network, nic.mac, nic.ip
                );
            }
            if !vm.spec.security_groups.is_empty() {
                println!("security groups: {}", vm.spec.security_groups.join(", "));
            }
        }
        if single && !vm.status.events.is_empty() {
            println!("events:");
            for e in &vm.status.events {
                println!(
                    "  {}  {}  {}",
                    e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                    e.reason,
                    e.message
                );
            }
        }
    }
    Ok(())
}

pub fn migration(fmt: Format, m: &Migration) -> Result<()> {
    if fmt == Format::Json {
        return json(m);
    }
    table(
        &["VM", "FROM", "TO", "PHASE", "STORAGE", "SINCE", "STATUS"],
        vec![vec![
            m.vm.clone(),
            m.source.clone(),
            m.target.clone(),
            format!("{:?}", m.phase).to_lowercase(),
            if m.shared_storage { "shared" } else { "copied" }.into(),
            m.created_at.format("%H:%M:%S").to_string(),
            m.summary(),
        ]],
    );
    Ok(())
}

pub fn images(fmt: Format, images: &[Image], single: bool) -> Result<()> {
    if fmt == Format::Json {
        return json_items(images, single);
    }
    table(
        &[
            "NAME", "PHASE", "FORMAT", "SIZE", "ON DISK", "BOOT", "MESSAGE",
        ],
        images
            .iter()
            .map(|i| {
                vec![
                    i.meta.name.clone(),
                    format!("{:?}", i.status.phase).to_lowercase(),
                    i.status
                        .format
                        .map(|f| f.as_str().to_string())
                        .unwrap_or_default(),
                    format_bytes(i.status.virtual_bytes),
                    format_bytes(i.status.actual_bytes),
                    if i.status.boot.is_some() {
                        "kernel".into()
                    } else {
                        "disk".into()
                    },
                    i.status.message.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn hosts(fmt: Format, hosts: &[HostInfo], single: bool) -> Result<()> {
    if fmt == Format::Json {
        return json_items(hosts, single);
    }
    table(
        &[
            "NAME",
            "STATE",
            "CPUS (USED/ALLOC/TOTAL)",
            "MEMORY (USED/ALLOC/TOTAL)",
            "VMS",
            "ACCEL",
            "LAST HEARTBEAT",
        ],
        hosts
            .iter()
            .map(|h| {
                let state = match (h.state, h.not_responding_since) {
                    (_, Some(t)) => format!("not responding since {}", t.format("%H:%M:%S")),
                    // Joined, but its agent has not recorded the host yet.
                    (HostState::NotResponding, None) => {
                        "not responding (its agent has not registered yet)".into()
                    }
                    (s, None) => format!("{s:?}").to_lowercase(),
                };
                vec![
                    h.host.name.clone(),
                    state,
                    format!(
                        "{}/{}/{}",
                        h.used_cpus, h.allocated_cpus, h.host.status.cpus
                    ),
                    format!(
                        "{}/{}/{}",
                        format_bytes(h.used_memory_bytes),
                        format_bytes(h.allocated_memory_bytes),
                        format_bytes(h.host.status.memory_bytes)
                    ),
                    if single {
                        h.vms.join(", ")
                    } else {
                        h.vms.len().to_string()
                    },
                    h.host.status.accel.to_string(),
                    if !h.host.status.registered() {
                        "never".into()
                    } else {
                        h.host.status.last_heartbeat.to_rfc3339()
                    },
                ]
            })
            .collect(),
    );
    if let [h] = hosts {
        if let Some(ha) = h.ha.as_ref().filter(|_| single) {
            println!("HA: {ha}");
        }
        if let Some(r) = h.isolation_response.filter(|_| single) {
            println!(
                "isolation response applied: {}",
                serde_json::to_value(r)?.as_str().unwrap_or("?")
            );
        }
        if let Some(a) = h.host.approved.filter(|_| single) {
            println!("Approved capacity: {a}");
        }
        if let Some(why) = h.host.status.capacity_refused.as_ref().filter(|_| single) {
            println!(
                "Capacity not believed: {why} (`corral host set-capacity {}`)",
                h.host.name
            );
        }
    }
    Ok(())
}

/// Events as a table, or as JSON: an array, or one object per line while following.
pub fn events(fmt: Format, events: &[ClusterEvent], following: bool) -> Result<()> {
    if fmt == Format::Json && !following {
        return json(&events);
    }
    if fmt == Format::Json {
        for e in events {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(());
    }
    for e in events {
        println!(
            "{}  {:<18} {:<24} {}",
            e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            e.reason,
            e.subject,
            e.message
        );
    }
    Ok(())
}

pub fn groups(fmt: Format, groups: &[VmGroup], single: bool) -> Result<()> {
    if fmt == Format::Json {
        return json_items(groups, single);
    }
    table(
        &["NAME", "RULE", "STRENGTH", "MEMBERS"],
        groups
            .iter()
            .map(|g| {
                vec![
                    g.meta.name.clone(),
                    serde_json::to_value(g.rule)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    serde_json::to_value(g.strength)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    g.members.join(", "),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn networks(fmt: Format, items: &[Network], single: bool) -> Result<()> {
    if fmt == Format::Json {
        return json_items(items, single);
    }
    table(
        &["NAME", "CIDR", "GATEWAY", "SEGMENT", "MTU"],
        items
            .iter()
            .map(|n| {
                let gw = n.cidr().gateway();
                vec![
                    n.meta.name.clone(),
                    n.spec.cidr.clone(),
                    if n.spec.gateway {
                        format!("{gw} (NAT)")
                    } else {
                        format!("{gw} (DHCP only)")
                    },
                    match n.spec.segment {
                        Segment::Vxlan { vni } => format!("vxlan {vni}"),
                        Segment::Vlan { id } => format!("vlan {id}"),
                    },
                    n.mtu().to_string(),
                ]
            })
            .collect(),
    );
    if let ([n], true) = (items, single) {
        for a in n.attached.iter().flatten() {
            println!("{}: mac {}  ip {}", a.vm, a.mac, a.ip);
        }
    }
    Ok(())
}

pub fn security_groups(fmt: Format, items: &[SecurityGroup], single: bool) -> Result<()> {
    if fmt == Format::Json {
        return json_items(items, single);
    }
    if let ([g], true) = (items, single) {
        table(
            &["#", "RULE"],
            g.rules
                .iter()
                .enumerate()
                .map(|(i, r)| vec![(i + 1).to_string(), r.to_string()])
                .collect(),
        );
        return Ok(());
    }
    table(
        &["NAME", "RULES"],
        items
            .iter()
            .map(|g| vec![g.meta.name.clone(), g.rules.len().to_string()])
            .collect(),
    );
    Ok(())
}

/// Where a datastore's disks are: its path, or its pool and monitors.
fn datastore_location(d: &Datastore) -> String {
    match &d.rbd {
        Some(r) => format!("rbd:{} ({})", r.pool, r.monitors.join(",")),
        None => d.path.clone(),
    }
}

pub fn datastores(fmt: Format, items: &[Datastore], single: bool) -> Result<()> {
    if fmt == Format::Json {
        return json_items(items, single);
    }
    table(
        &["NAME", "TYPE", "LOCATION", "SHARED"],
        items
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    format!("{:?}", d.kind).to_lowercase(),
                    datastore_location(d),
                    d.shared.to_string(),
                ]
            })
            .collect(),
    );
    Ok(())
}

/// One datastore with its space: capacity, used, provisioned (thin) and the overcommit ratio.
pub fn datastore(fmt: Format, d: &DatastoreDetail) -> Result<()> {
    if fmt == Format::Json {
        return json(d);
    }
    let ds = &d.datastore;
    let (capacity, used, provisioned, overcommit) = match &d.usage {
        Some(u) => (
            format_bytes(u.capacity_bytes),
            format_bytes(u.used_bytes),
            format_bytes(u.provisioned_bytes),
            format!("{:.2}", u.overcommit),
        ),
        None => {
            let why = d.usage_error.clone().unwrap_or_else(|| "-".into());
            (why, "-".into(), "-".into(), "-".into())
        }
    };
    table(
        &[
            "NAME",
            "TYPE",
            "LOCATION",
            "SHARED",
            "CAPACITY",
            "USED",
            "PROVISIONED",
            "OVERCOMMIT",
        ],
        vec![vec![
            ds.name.clone(),
            format!("{:?}", ds.kind).to_lowercase(),
            datastore_location(ds),
            ds.shared.to_string(),
            capacity,
            used,
            provisioned,
            overcommit,
        ]],
    );
    Ok(())
}

pub fn cluster(fmt: Format, c: &ClusterSettings) -> Result<()> {
    if fmt == Format::Json {
        return json(c);
    }
    table(
        &[
            "PLACEMENT",
            "CPU OVERCOMMIT",
            "MEMORY OVERCOMMIT",
            "MIGRATION BANDWIDTH",
            "MIGRATION DOWNTIME",
            "AUTO-CONVERGE",
            "HA FAILURES TOLERATED",
            "HA ISOLATION RESPONSE",
            "DRS",
        ],
        vec![vec![
            format!("{:?}", c.placement).to_lowercase(),
            c.cpu_overcommit.to_string(),
            c.memory_overcommit.to_string(),
            c.migration_bandwidth_bytes
                .map_or("no cap".into(), |b| format!("{}/s", format_bytes(b))),
            format!("{} ms", c.migration_downtime_limit_ms),
            if c.migration_auto_converge {
                "on"
            } else {
                "off"
            }
            .into(),
            c.ha_host_failures_to_tolerate.to_string(),
            serde_json::to_value(c.ha_isolation_response)?
                .as_str()
                .unwrap_or_default()
                .to_string(),
            format!(
                "{} (aggressiveness {})",
                serde_json::to_value(c.drs_mode)?
                    .as_str()
                    .unwrap_or_default(),
                c.drs_aggressiveness
            ),
        ]],
    );
    Ok(())
}

pub fn drs_plan(fmt: Format, p: &DrsPlan) -> Result<()> {
    if fmt == Format::Json {
        return json(p);
    }
    println!("plan {}", p.id);
    let pct = |x: f64| format!("{:.0}%", x * 100.0);
    table(
        &["HOST", "LOAD NOW", "CPU", "MEMORY", "AFTER THE PLAN"],
        p.before
            .iter()
            .map(|b| {
                let after = p.after.iter().find(|a| a.host == b.host);
                vec![
                    b.host.clone(),
                    pct(b.load),
                    pct(b.cpu),
                    pct(b.memory),
                    after.map(|a| pct(a.load)).unwrap_or_default(),
                ]
            })
            .collect(),
    );
    println!(
        "imbalance {:.3} -> {:.3} (tolerated: {:.3})",
        p.imbalance_before, p.imbalance_after, p.threshold
    );
    if !p.moves.is_empty() {
        table(
            &["VM", "FROM", "TO", "WHY"],
            p.moves
                .iter()
                .map(|m| vec![m.vm.clone(), m.from.clone(), m.to.clone(), m.reason.clone()])
                .collect(),
        );
    }
    if !p.note.is_empty() {
        println!("{}", p.note);
    }
    for a in &p.power {
        println!(
            "power: {} (reported only: Corral cannot power hosts yet)",
            a.reason
        );
        for m in &a.moves {
            println!("  {} -> {}", m.vm, m.to);
        }
    }
    Ok(())
}

pub fn tasks(fmt: Format, tasks: &[Task]) -> Result<()> {
    if fmt == Format::Json {
        return json(&tasks);
    }
    table(
        &["ID", "KIND", "TARGET", "STATE", "PROGRESS", "MESSAGE"],
        tasks
            .iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.kind.clone(),
                    t.target.clone(),
                    format!("{:?}", t.state).to_lowercase(),
                    format!("{}%", t.progress),
                    t.error.clone().unwrap_or_else(|| t.message.clone()),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn task(fmt: Format, t: &Task) -> Result<()> {
    if fmt == Format::Json {
        return json(t);
    }
    tasks(fmt, std::slice::from_ref(t))
}

pub fn done(fmt: Format, message: &str) -> Result<()> {
    if fmt == Format::Json {
        return json(&serde_json::json!({ "ok": true, "message": message }));
    }
    println!("{message}");
    Ok(())
}
