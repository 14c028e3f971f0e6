//! The distributed virtual switch with real guests on a three-host lab: DHCP hands each guest the
//! address `vm show` names, guests on one network reach each other across hosts over the VXLAN
//! overlay, networks and projects are isolated, a security group opens one port and only that, the
//! gateway NATs to the fabric but no guest reaches a host, hosts carry only the networks of their VMs, and a live migration keeps
//! MAC, address and a running ping (the packets it lost are printed).

mod common;

use std::time::{Duration, Instant};

use common::netlab::{guest_value, start_in_guest, TestLab};
use serde_json::Value;

fn vm(lab: &TestLab, name: &str, project: &str) -> Value {
    lab.json(&["vm", "show", name, "--project", project])
}

fn ip_of(lab: &TestLab, name: &str, project: &str) -> String {
    vm(lab, name, project)["spec"]["nics"][0]["ip"]
        .as_str()
        .expect("an address")
        .to_string()
}

/// Waits until the guest says DHCP configured its eth0 (the marker of the guest's udhcpc script).
fn wait_address(lab: &TestLab, name: &str, project: &str) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let out = lab.ok(&["vm", "console", name, "--project", project]);
        if out.contains("corral-jeos: eth0 has ") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{project}/{name} got no address by DHCP; VM: {}\nconsole:\n{out}",
            vm(lab, name, project)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether `from` gets an answer to ping from `to` (exit status of busybox ping, 0 on a reply).
fn pings(lab: &TestLab, from: &str, to: &str) -> bool {
    let v = guest_value(
        lab,
        from,
        "PING",
        &format!("ping -c 3 -W 2 {to} >/dev/null 2>&1; v=$?"),
    );
    v == "0"
}

/// The links of a host whose names start with `prefix`.
fn links(lab: &TestLab, host: &str, prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", &lab.netns(host), "-o", "link", "show"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Runs `f` with the CLI acting in project `other` (nextest runs each test in a process of its
/// own, so the environment is this test's alone).
fn in_other<T>(f: impl FnOnce() -> T) -> T {
    std::env::set_var("CORRAL_PROJECT", "other");
    let out = f();
    std::env::remove_var("CORRAL_PROJECT");
    out
}

fn create(lab: &TestLab, name: &str, host: &str, extra: &[&str]) {
    let mut args = vec![
        "vm", "create", name, "--image", "jeos", "--memory", "128M", "--host", host, "--start",
    ];
    args.extend(extra);
    lab.ok(&args);
}

#[test]
fn guests_reach_their_network_across_hosts_and_nothing_else() {
    let lab = TestLab::up(3);
    lab.jeos_and_shared_datastore();
    // net-a has no gateway, so another project may use its addresses too; net-b has one.
    lab.ok(&["network", "create", "net-a", "--cidr", "10.10.0.0/24"]);
    lab.ok(&[
        "network",
        "create",
        "net-b",
        "--cidr",
        "10.20.0.0/24",
        "--gateway",
    ]);
    lab.ok(&[
        "security-group",
        "create",
        "web",
        "--rule",
        "in tcp 8080 from 0.0.0.0/0",
    ]);
    // Another project, with a network of the same addresses.
    lab.ok(&["project", "create", "other"]);
    lab.ok(&["image", "build-jeos", "--project", "other"]);
    lab.ok(&[
        "network",
        "create",
        "net-a",
        "--cidr",
        "10.10.0.0/24",
        "--project",
        "other",
    ]);

    // a2 will move, so the scheduler places it (a pinned VM stays put): on host-2, the only
    // host not in maintenance at that moment.
    for h in ["host-1", "host-3"] {
        lab.ok(&["host", "maintenance", "enter", h]);
    }
    lab.ok(&[
        "vm",
        "create",
        "a2",
        "--image",
        "jeos",
        "--memory",
        "128M",
        "--nic",
        "net-a",
        "--datastore",
        "nfs",
        "--start",
    ]);
    for h in ["host-1", "host-3"] {
        lab.ok(&["host", "maintenance", "exit", h]);
    }
    assert_eq!(vm(&lab, "a2", "default")["status"]["host"], "host-2");
    create(&lab, "a1", "host-1", &["--nic", "net-a"]);
    create(
        &lab,
        "w1",
        "host-2",
        &["--nic", "net-a", "--security-group", "web"],
    );
    create(&lab, "b1", "host-1", &["--nic", "net-b"]);
    create(
        &lab,
        "o1",
        "host-2",
        &["--nic", "net-a,ip=10.10.0.50", "--project", "other"],
    );
    assert!(
        links(&lab, "host-3", "crb").is_empty(),
        "host-3 runs no VM: it carries no network"
    );
    for (name, project) in [
        ("a1", "default"),
        ("a2", "default"),
        ("w1", "default"),
        ("b1", "default"),
        ("o1", "other"),
    ] {
        wait_address(&lab, name, project);
    }
    let (a1, a2, w1, b1) = (
        ip_of(&lab, "a1", "default"),
        ip_of(&lab, "a2", "default"),
        ip_of(&lab, "w1", "default"),
        ip_of(&lab, "b1", "default"),
    );
    assert_eq!(ip_of(&lab, "o1", "other"), "10.10.0.50");

    // DHCP handed out what `vm show` says, with the overlay's MTU.
    let cmd = "ip -4 -o addr show eth0 > /tmp/a; read n d f v rest < /tmp/a";
    assert_eq!(guest_value(&lab, "a1", "ADDR", cmd), format!("{a1}/24"));
    assert_eq!(guest_value(&lab, "a2", "ADDR", cmd), format!("{a2}/24"));
    let mtu = guest_value(&lab, "a1", "MTU", "read v < /sys/class/net/eth0/mtu");
    assert_eq!(mtu, "1450", "VXLAN takes 50 bytes of the fabric's 1500");

    // One network across two hosts.
    assert!(pings(&lab, "a1", &a2), "a1 (host-1) pings a2 (host-2)");
    assert!(pings(&lab, "a2", &a1), "and back");
    // Another network of the project, even on the same host and with a gateway: nothing routes.
    assert!(
        !pings(&lab, "b1", &a1),
        "b1 (net-b) reaches nothing on net-a"
    );
    assert!(!pings(&lab, "a1", &b1), "a1 reaches nothing on net-b");
    // Another project: same addresses, different segment.
    assert!(!pings(&lab, "a1", "10.10.0.50"), "o1 is in another project");
    assert!(
        !in_other(|| pings(&lab, "o1", &a2)),
        "o1 does not reach project default's a2"
    );
    // net-b's gateway NATs to the fabric (the lab's bridge in the root namespace), but no guest
    // reaches a host's own fabric address.
    let fabric = lab.address("host-1");
    let fabric_gw = format!("{}.1", fabric.rsplit_once('.').expect("ipv4").0);
    assert!(
        pings(&lab, "b1", &fabric_gw),
        "b1 reaches {fabric_gw} through the gateway"
    );
    assert!(
        !pings(&lab, "b1", &lab.address("host-2")),
        "hosts' fabric addresses are out of the guests' reach"
    );

    // Security group web: tcp 8080 from anywhere, nothing else from outside the group.
    start_in_guest(
        &lab,
        "w1",
        "nc -ll -p 8080 -e echo open8080 & nc -ll -p 8081 -e echo open8081 &",
        "nc -w 2 127.0.0.1 8080 > /tmp/o; read a < /tmp/o; test $a = open8080; v=$?",
    );
    let local = guest_value(
        &lab,
        "w1",
        "LOCAL",
        "nc -w 2 127.0.0.1 8081 > /tmp/o; read v < /tmp/o",
    );
    assert_eq!(local, "open8081", "w1 does listen on 8081");
    let open = guest_value(
        &lab,
        "a1",
        "OPEN",
        &format!("nc -w 3 {w1} 8080 > /tmp/o; read v < /tmp/o"),
    );
    assert_eq!(open, "open8080", "the rule opens 8080");
    let closed = guest_value(
        &lab,
        "a1",
        "CLOSED",
        &format!("nc -w 3 {w1} 8081 > /tmp/o; v=$?; read x < /tmp/o || x=nothing; v=$v$x"),
    );
    assert_eq!(
        closed, "1nothing",
        "8081 stays closed from outside the group"
    );
    assert!(!pings(&lab, "a1", &w1), "and so does ICMP");

    // A VLAN network needs 802.1Q in the hosts' kernel: where it is missing, the VM says so.
    lab.ok(&[
        "network",
        "create",
        "vl",
        "--cidr",
        "10.30.0.0/24",
        "--vlan",
        "42",
    ]);
    let vlan_ok = std::process::Command::new("ip")
        .args([
            "-n",
            &lab.netns("host-3"),
            "link",
            "add",
            "link",
            "eth0",
            "name",
            "vprobe",
        ])
        .args(["type", "vlan", "id", "9"])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("ip")
        .success();
    let out = lab.corral(&[
        "vm", "create", "v1", "--image", "jeos", "--memory", "128M", "--host", "host-3", "--start",
        "--nic", "vl",
    ]);
    if vlan_ok {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_address(&lab, "v1", "default");
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("no 802.1Q support"),
            "v1 should fail saying VLANs are missing: {err}"
        );
    }
    lab.ok(&["vm", "delete", "v1", "--force"]);

    // A live migration keeps MAC, address and the conversation: a1 pings a2 five times a second
    // while a2 moves from host-2 to host-3.
    let before = vm(&lab, "a2", "default")["spec"]["nics"][0].clone();
    start_in_guest(
        &lab,
        "a1",
        &format!("ping -i 0.2 -c 100 {a2} > /tmp/ping 2>&1 &"),
        "test -s /tmp/ping; v=$?",
    );
    std::thread::sleep(Duration::from_secs(3));
    lab.ok(&["vm", "migrate", "a2", "--to", "host-3"]);
    let after = vm(&lab, "a2", "default");
    assert_eq!(after["status"]["host"], "host-3");
    assert_eq!(after["spec"]["nics"][0], before, "same MAC and address");
    assert!(
        !links(&lab, "host-3", "crbx").is_empty(),
        "host-3 now carries net-a"
    );
    // Wait for the 100 pings (20 s, more on a loaded machine), then read the summary line.
    let deadline = Instant::now() + Duration::from_secs(90);
    while guest_value(&lab, "a1", "DONE", "grep -q transmitted /tmp/ping; v=$?") != "0" {
        assert!(Instant::now() < deadline, "ping did not finish in 90 s");
        std::thread::sleep(Duration::from_secs(2));
    }
    let stats = guest_value(
        &lab,
        "a1",
        "STATS",
        "grep transmitted /tmp/ping > /tmp/s; read tx w1 w2 rx rest < /tmp/s; v=$tx/$rx",
    );
    let (tx, rx) = stats.split_once('/').expect("tx/rx");
    let (tx, rx): (u32, u32) = (tx.parse().expect("tx"), rx.parse().expect("rx"));
    eprintln!(
        "ping across the live migration: {tx} sent, {rx} answered, {} lost",
        tx - rx
    );
    assert_eq!(tx, 100, "{stats}");
    assert!(
        tx - rx <= 5,
        "at most a few packets lost across the move: {stats}"
    );
    assert!(pings(&lab, "a1", &a2), "a1 still reaches a2 on host-3");
    let addr = guest_value(&lab, "a2", "ADDR", cmd);
    assert_eq!(addr, format!("{a2}/24"), "a2 kept its address");
}
