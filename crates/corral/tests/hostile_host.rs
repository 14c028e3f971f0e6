//! A host with a valid certificate of the cluster, turned hostile: everything it writes that
//! another host acts on is refused or harmless. Each attack gets a 4xx with a sentence, and
//! nothing runs or is opened on the honest host (a real agent with real QEMU).

mod common;

use std::time::{Duration, Instant};

use common::{pids_matching, wait_for, HostClient, Lab};
use serde_json::{json, Value};

/// The hostile host: nothing but its certificate and hand-made calls to the agent endpoint.
struct Hostile(HostClient);

impl Hostile {
    /// Joins as `name` with a fresh token, the way any new host does.
    fn join(lab: &Lab, name: &str) -> Hostile {
        let token = lab.cli(&["host", "join-token"]).trim().to_string();
        let url = lab.agent_url();
        let joined: Value = common::insecure_agent()
            .post(format!("{url}/agent/v1/join"))
            .send_json(json!({ "token": token, "host": name }))
            .expect("join")
            .body_mut()
            .read_json()
            .expect("credentials");
        let pem = |k: &str| joined[k].as_str().expect("pem").to_string();
        Hostile(HostClient::new(
            &url,
            &pem("ca_pem"),
            &pem("cert_pem"),
            &pem("key_pem"),
        ))
    }

    fn get(&self, key: &str) -> (Value, u64) {
        self.0.get(key)
    }

    /// Reports its own status with this capacity and address.
    fn register(&self, cpus: u64, memory_bytes: u64, address: &str) -> (u16, String) {
        self.0.write(&json!({ "kind": "heartbeat", "status": {
            "cpus": cpus, "memory_bytes": memory_bytes, "accel": "tcg", "hypervisor": "QEMU",
            // Not believed: the heartbeat time is the controller's clock.
            "last_heartbeat": "2030-01-01T00:00:00Z", "address": address,
        }}))
    }

    /// Takes `step` on the migration of `vm`, as it reads now.
    fn step(&self, vm: &str, step: Value) -> (u16, String) {
        let (_, rev) = self.get(&format!("/corral/migrations/default/{vm}"));
        self.0.write(
            &json!({ "kind": "migration", "vm": { "project": "default", "name": vm },
            "revision": rev, "step": step }),
        )
    }

    /// Sends `write` about VM `vm` (`kind`, plus the fields given) at the revision it reads now.
    fn about(&self, vm: &str, kind: &str, fields: Value) -> (u16, String) {
        let (_, rev) = self.get(&format!("/corral/vms/default/{vm}"));
        let mut w = json!({ "kind": kind, "vm": { "project": "default", "name": vm },
            "revision": rev, "vm_revision": rev });
        if let (Some(w), Some(f)) = (w.as_object_mut(), fields.as_object()) {
            w.extend(f.clone());
        }
        self.0.write(&w)
    }
}

/// Waits until the VM's migration record has left `phase` and returns it.
fn migration_after(lab: &Lab, vm: &str, phase: &str) -> Value {
    let mut m = Value::Null;
    wait_for(
        &format!("the migration of {vm} to leave {phase}"),
        Duration::from_secs(90),
        || {
            m = lab.json(&["vm", "migration", vm]);
            m["phase"] != phase
        },
    );
    m
}

#[test]
fn a_hostile_host_cannot_make_another_host_run_or_open_anything() {
    let mut lab = Lab::controller();
    lab.join("host-a");
    lab.tiny_image_and_shared_datastore();
    let hostile = Hostile::join(&lab, "hostile");
    let host = |name: &str| lab.json(&["host", "show", name]);

    // Capacity: absurd claims are refused, the first registration is what is approved, a later
    // claim beyond it is not believed until an operator approves it.
    let (status, why) = hostile.register(100_000, 1 << 60, "127.0.0.2");
    assert_eq!(status, 403, "{why}");
    assert!(
        why.contains("100000 CPUs is not a machine's capacity"),
        "{why}"
    );
    let (status, why) = hostile.register(1, 32 << 20, "0.0.0.0");
    assert_eq!(status, 403, "{why}");
    assert!(why.contains("not an address"), "{why}");
    assert_eq!(hostile.register(1, 32 << 20, "127.0.0.2").0, 200);
    let h = host("hostile");
    assert_eq!(
        h["approved"],
        json!({ "cpus": 1, "memory_bytes": 32u64 << 20 })
    );
    assert!(
        !h["status"]["last_heartbeat"]
            .as_str()
            .expect("time")
            .starts_with("2030"),
        "{h}"
    );
    // Too small for it, so web lands on host-a (and stays movable: no pin).
    lab.cli(&[
        "vm",
        "create",
        "web",
        "--image",
        "tiny",
        "--memory",
        "64M",
        "--datastore",
        "nfs",
        "--start",
    ]);
    let web = lab.vm("web");
    assert_eq!(web["status"]["host"], "host-a", "{web}");
    let pid = web["status"]["pid"].clone();
    assert!(pid.is_u64(), "{web}");
    assert_eq!(hostile.register(64, 4 << 30, "127.0.0.2").0, 200);
    let h = host("hostile");
    assert_eq!(
        (
            h["status"]["cpus"].clone(),
            h["status"]["memory_bytes"].clone()
        ),
        (json!(1), json!(32u64 << 20)),
        "the scheduler sees what was approved"
    );
    let why = h["status"]["capacity_refused"].as_str().unwrap_or_default();
    assert!(why.contains("reported 64 CPUs"), "{h}");
    assert!(lab
        .cli(&["host", "show", "hostile"])
        .contains("Capacity not believed"));
    let err = lab.fails(&[
        "host",
        "set-capacity",
        "hostile",
        "--cpus",
        "0",
        "--memory",
        "4G",
    ]);
    assert!(err.contains("0 CPUs is not a machine's capacity"), "{err}");
    lab.cli(&[
        "host",
        "set-capacity",
        "hostile",
        "--cpus",
        "64",
        "--memory",
        "4G",
    ]);
    assert_eq!(hostile.register(64, 4 << 30, "127.0.0.2").0, 200);
    let h = host("hostile");
    assert_eq!(h["status"]["cpus"], 64);
    assert!(h["status"]["capacity_refused"].is_null(), "{h}");

    // The migration stream: a target records ports only, and the source builds the address from
    // the target's record; QEMU's exec:, file: or unix: transports never reach it.
    // VMs of other hosts: not reported, powered off, released or handed over by this one.
    let status = web["status"].clone();
    for (kind, fields, what) in [
        ("vm_status", json!({ "status": status }), "report"),
        (
            "guest_powered_off",
            json!({ "status": status }),
            "power off",
        ),
        ("vm_released", json!({}), "release"),
        (
            "handover",
            json!({ "migration_revision": 1, "result": { "downtime_ms": 0, "total_ms": 0,
                "memory_bytes": 0, "disk_bytes": 0 } }),
            "hand over",
        ),
    ] {
        let (code, why) = hostile.about("web", kind, fields);
        assert!(
            code == 403 && why.contains("not placed on this host"),
            "{what} host-a's VM: {code} {why}"
        );
    }
    assert_eq!(lab.vm("web")["status"]["pid"], pid);

    lab.cli(&["vm", "migrate", "web", "--to", "hostile", "--no-wait"]);
    let marker = lab.dir.path().join("pwned");
    let key = "/corral/migrations/default/web";
    let ready = |port: u16, run_dir: &str, disk: &str| {
        json!({ "step": "target_ready", "target_port": port, "target_pid": 1,
            "target_run_dir": run_dir, "target_disk": disk,
            // Not fields of the protocol: never stored, never seen by the source.
            "target_uri": format!("exec:touch {}", marker.display()),
            "disk_uri": format!("file:{}", marker.display()) })
    };
    let (status, why) = hostile.step("web", ready(0, "/r", "/d"));
    assert_eq!(status, 403, "{why}");
    assert!(
        why.contains("records the port of its migration stream"),
        "{why}"
    );
    let progress = hostile.get(key).0["progress"].clone();
    let (status, why) = hostile.step(
        "web",
        json!({ "step": "transferring", "progress": progress }),
    );
    assert_eq!(status, 403, "the target does not send: {why}");
    for (dir, disk) in [
        ("/r", "/d,file.locking=off"),
        ("/r/../..", "/d"),
        ("r", "/d"),
    ] {
        let (status, why) = hostile.step("web", ready(1, dir, disk));
        assert_eq!(status, 403, "{dir} {disk}: {why}");
        assert!(why.contains("not a plain absolute path"), "{why}");
    }
    // With a port, the step is taken, but only as the protocol has it.
    let (status, why) = hostile.step("web", ready(1, "/r", "/d"));
    assert_eq!(status, 200, "{why}");
    let (stored, _) = hostile.get(key);
    assert!(stored.get("target_uri").is_none(), "{stored}");
    assert!(stored.get("disk_uri").is_none(), "{stored}");
    let ended = migration_after(&lab, "web", "target_ready");
    let ended = if ended["phase"] == "transferring" {
        migration_after(&lab, "web", "transferring")
    } else {
        ended
    };
    assert_eq!(ended["phase"], "failed", "{ended}");
    let web = lab.vm("web");
    assert_eq!(web["status"]["host"], "host-a", "{web}");
    assert_eq!(web["status"]["pid"], pid, "the guest ran on undisturbed");
    assert!(!marker.exists(), "nothing ran on host-a");

    // Disk paths: what a host records as its VM's disk is never opened or removed by the next
    // host; every host derives the path from the datastore and the VM's uid.
    let precious = lab.dir.path().join("precious");
    std::fs::write(&precious, b"host-a's own file").expect("write");
    // Kept apart from web, so it lands on the hostile host; the rule goes once it is placed.
    lab.cli(&[
        "group",
        "create",
        "apart",
        "--rule",
        "anti-affinity",
        "--strength",
        "must",
        "--members",
        "web,bait",
    ]);
    // Its agent never reports: the CLI gives up after its wait timeout, saying where it stands.
    let t = Instant::now();
    let err = lab.fails(&[
        "vm",
        "create",
        "bait",
        "--image",
        "tiny",
        "--memory",
        "64M",
        "--datastore",
        "nfs",
        "--start",
        "--wait-timeout",
        "3",
    ]);
    assert!(t.elapsed() < Duration::from_secs(60), "a bounded wait");
    assert!(
        err.contains("gave up waiting for vm.create vm/bait: no progress for 3 s"),
        "{err}"
    );
    let key = "/corral/vms/default/bait";
    wait_for(
        "bait to be placed on hostile",
        Duration::from_secs(30),
        || {
            lab.try_cli(&["vm", "show", "bait", "-o", "json"])
                .status
                .success()
                && lab.vm("bait")["status"]["host"] == "hostile"
        },
    );
    lab.cli(&["group", "delete", "apart"]);
    for (path, what) in [
        (
            format!("{},file.locking=off", precious.display()),
            "QEMU options after a comma",
        ),
        (precious.display().to_string(), "a file of host-a"),
    ] {
        let (bait, rev) = hostile.get(key);
        let mut status = bait["status"].clone();
        status["phase"] = json!("running");
        status["pid"] = json!(1);
        status["observed_generation"] = bait["meta"]["generation"].clone();
        status["disk"] = json!({ "path": path, "backing": "", "datastore": "nfs" });
        let (status, why) = hostile.0.vm_status("bait", rev, &status);
        assert_eq!(status, 200, "{what}: {why}");
        lab.cli(&["vm", "migrate", "bait", "--to", "host-a", "--no-wait"]);
        let ended = migration_after(&lab, "bait", "preparing");
        assert_eq!(ended["phase"], "failed", "{what}: {ended}");
        let error = ended["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("corral-vms") && !error.contains("precious"),
            "{what}: host-a looked for the disk where it derives it: {error}"
        );
        assert!(
            pids_matching("precious").is_empty(),
            "{what}: no QEMU opened it"
        );
    }

    // A tenant network cannot take a host's fabric address.
    assert_eq!(hostile.register(64, 4 << 30, "10.99.0.5").0, 200);
    let err = lab.fails(&["network", "create", "fab", "--cidr", "10.99.0.0/24"]);
    assert!(
        err.contains("holds the fabric address 10.99.0.5 of host hostile"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&precious).expect("still there"),
        b"host-a's own file"
    );
}
