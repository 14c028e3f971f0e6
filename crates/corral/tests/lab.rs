//! `corral lab`: three hosts in network namespaces on a fabric bridge, each running a real agent
//! that joined the controller across the fabric, running real guests.

mod common;

use common::netlab::TestLab;

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn three_namespace_hosts_spread_six_guests_two_each_and_lab_down_removes_everything() {
    let lab = TestLab::up(3);
    let status = lab.ok(&["lab", "status"]);
    assert_eq!(status.matches("connected").count(), 3, "{status}");
    lab.ok(&["image", "build-jeos"]);
    for i in 1..=6 {
        lab.ok(&[
            "vm",
            "create",
            &format!("g{i}"),
            "--image",
            "jeos",
            "--memory",
            "128M",
            "--start",
        ]);
    }
    let hosts = lab.json(&["host", "list"]);
    let counts: Vec<u64> = hosts
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["vms"].as_array().map_or(0, |v| v.len() as u64))
        .collect();
    assert_eq!(counts, [2, 2, 2], "spread: {hosts}");

    // Every guest boots, in the namespace of the host it was placed on.
    let deadline = Instant::now() + Duration::from_secs(240);
    for i in 1..=6 {
        let name = format!("g{i}");
        while !lab.ok(&["vm", "console", &name]).contains(common::READY) {
            assert!(Instant::now() < deadline, "{name} did not boot");
            std::thread::sleep(Duration::from_millis(500));
        }
        let vm = lab.json(&["vm", "show", &name]);
        let pid = vm["status"]["pid"].as_u64().expect("pid");
        let host = vm["status"]["host"].as_str().expect("host");
        let guest_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .expect("guest netns")
            .ino();
        let host_ns = std::fs::metadata(format!("/run/netns/{}", lab.netns(host)))
            .expect("host netns")
            .ino();
        assert_eq!(guest_ns, host_ns, "{name} runs in {host}'s namespace");
    }

    // Placement rules, without booting more guests: a hard anti-affinity group of three lands on
    // three hosts (under pack, which would otherwise stack them), and a fourth member waits with its
    // reason.
    lab.ok(&["cluster", "set", "--placement", "pack"]);
    lab.ok(&[
        "group",
        "create",
        "db",
        "--rule",
        "anti-affinity",
        "--strength",
        "must",
        "--members",
        "db1,db2,db3,db4",
    ]);
    for name in ["db1", "db2", "db3", "db4"] {
        lab.ok(&["vm", "create", name, "--image", "jeos", "--memory", "64M"]);
    }
    let mut on: Vec<String> = ["db1", "db2", "db3"]
        .iter()
        .map(|n| {
            lab.json(&["vm", "show", n])["status"]["host"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    on.sort();
    assert_eq!(on, ["host-1", "host-2", "host-3"]);
    let db4 = lab.json(&["vm", "show", "db4"]);
    assert_eq!(db4["status"]["phase"], "pending");
    let why = common::scheduled_reason(&db4);
    assert!(why.contains("anti-affinity group db"), "{why}");
    lab.ok(&["vm", "delete", "db4"]);
    // Pack fills one host before the others: two new VMs go to the same host.
    for name in ["p1", "p2"] {
        lab.ok(&["vm", "create", name, "--image", "jeos", "--memory", "64M"]);
    }
    let (p1, p2) = (
        lab.json(&["vm", "show", "p1"])["status"]["host"].clone(),
        lab.json(&["vm", "show", "p2"])["status"]["host"].clone(),
    );
    assert!(p1.is_string() && p1 == p2, "pack: {p1} and {p2}");
    lab.ok(&["cluster", "set", "--placement", "spread"]);

    // A host in maintenance gets nothing new.
    lab.ok(&["host", "maintenance", "enter", "host-1", "--no-wait"]);
    lab.ok(&[
        "vm", "create", "g7", "--image", "jeos", "--memory", "128M", "--host", "host-1",
    ]);
    let g7 = lab.json(&["vm", "show", "g7"]);
    assert!(
        g7["status"]["host"].is_null(),
        "pinned to a host in maintenance: waits ({g7})"
    );
    lab.ok(&["vm", "create", "g8", "--image", "jeos", "--memory", "128M"]);
    let g8 = lab.json(&["vm", "show", "g8"])["status"]["host"].clone();
    assert!(g8.is_string() && g8 != "host-1", "{g8}");
    lab.ok(&["host", "maintenance", "exit", "host-1"]);

    let root = lab.dir.path().join(&lab.name);
    lab.ok(&["lab", "down"]);
    for h in ["host-1", "host-2", "host-3"] {
        assert!(
            !std::path::Path::new(&format!("/run/netns/{}", lab.netns(h))).exists(),
            "{h} namespace left behind"
        );
    }
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!("clab-{}", lab.name)),
        "bridge left behind"
    );
    assert!(
        common::pids_matching(&lab.dir.path().display().to_string()).is_empty(),
        "guests left behind"
    );
    assert!(!root.exists(), "lab directory left behind");
}
