//! A controller and host agents as separate processes, joined over mutually authenticated TLS on
//! loopback, running real guests.

mod common;

use std::time::{Duration, Instant};

use common::{alive, Lab, READY};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(120);

fn host_of(lab: &Lab, vm: &str) -> String {
    lab.vm(vm)["status"]["host"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn joined_hosts_run_an_anti_affine_pair_apart_and_survive_a_controller_restart() {
    let mut lab = Lab::controller();
    lab.join("host-a");
    lab.join("host-b");
    lab.build_jeos();
    // Under pack both would land on one host; only the rule keeps them apart.
    lab.cli(&["cluster", "set", "--placement", "pack"]);
    lab.cli(&[
        "group",
        "create",
        "pair",
        "--rule",
        "anti-affinity",
        "--strength",
        "must",
        "--members",
        "web-1,web-2",
    ]);
    lab.cli(&[
        "vm", "create", "web-1", "--image", "jeos", "--memory", "128M", "--start",
    ]);
    lab.cli(&[
        "vm", "create", "web-2", "--image", "jeos", "--memory", "128M", "--start",
    ]);
    lab.wait_console("web-1", READY, 1, BOOT);
    lab.wait_console("web-2", READY, 1, BOOT);
    let (a, b) = (host_of(&lab, "web-1"), host_of(&lab, "web-2"));
    assert!(
        a != b && [&a, &b].iter().all(|h| h.starts_with("host-")),
        "apart: {a} and {b}"
    );
    // Each guest runs under the agent of its own host (its run directory is in that host's data dir).
    for vm in ["web-1", "web-2"] {
        let dir = lab.run_dir(vm).display().to_string();
        assert!(
            dir.contains(&format!("/hosts/{}/", host_of(&lab, vm))),
            "{vm} runs from {dir}"
        );
    }
    let pids: Vec<u64> = ["web-1", "web-2"]
        .iter()
        .map(|v| lab.vm(v)["status"]["pid"].as_u64().expect("pid"))
        .collect();

    // The controller dies hard and comes back: nothing is lost, nothing restarts, agents reconnect.
    lab.crash();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        pids.iter().all(|p| alive(*p as u32)),
        "guests run on while the controller is down"
    );
    lab.up();
    // Once the agents are back, a resync (5 s) on each: a guest restarted on reconnect would
    // show a new pid and a second boot.
    lab.wait_connected(&["host-a", "host-b"]);
    std::thread::sleep(Duration::from_secs(6));
    for (vm, pid) in ["web-1", "web-2"].iter().zip(&pids) {
        let v = lab.vm(vm);
        assert_eq!(
            (v["status"]["phase"].as_str(), v["status"]["pid"].as_u64()),
            (Some("running"), Some(*pid))
        );
    }
    assert_eq!(lab.console("web-1").matches(READY).count(), 1, "no reboot");
    // The agents are back: a new VM is placed and started by one of them.
    lab.cli(&[
        "vm", "create", "after", "--image", "jeos", "--memory", "128M", "--start",
    ]);
    lab.wait_console("after", READY, 1, BOOT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab
        .json(&["host", "list"])
        .as_array()
        .expect("hosts")
        .iter()
        .any(|h| h["state"] != "connected")
    {
        assert!(Instant::now() < deadline, "hosts did not reconnect");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn join_tokens_are_single_use_and_names_unique_and_strangers_are_refused() {
    let mut lab = Lab::controller();
    lab.join("host-a");
    let token = lab.cli(&["host", "join-token"]).trim().to_string();
    let (url, root) = (lab.agent_url(), lab.dir.path().to_path_buf());
    let run = |host: &str, token: &str, dir: &str| {
        std::process::Command::new(common::BIN)
            .args([
                "agent",
                "--accel",
                "tcg",
                "--host-name",
                host,
                "--join",
                &url,
                "--token",
                token,
            ])
            .arg("--data-dir")
            .arg(root.join(dir))
            .output()
            .expect("run")
    };
    let dup = run("host-a", &token, "dup");
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr)
        .contains("host named host-a is already in the cluster"));
    let forged = format!("{}x", &token[..token.len() - 1]);
    let bad = run("host-x", &forged, "forged");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("join token is not valid"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    lab.start_agent("host-b", Some(&token));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.try_cli(&["host", "show", "host-b"]).status.success() {
        assert!(Instant::now() < deadline, "host-b did not join");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.wait_connected(&["host-b"]);
    let reused = run("host-c", &token, "reused");
    assert!(
        String::from_utf8_lossy(&reused.stderr).contains("already used"),
        "a token joins one host only"
    );

    // A host with a valid certificate is confined to its own records.
    lab.build_jeos();
    lab.cli(&[
        "vm", "create", "mine", "--image", "jeos", "--memory", "64M", "--host", "host-a",
    ]);
    lab.cli(&[
        "vm", "create", "theirs", "--image", "jeos", "--memory", "64M", "--host", "host-b",
    ]);
    let creds = root.join("hosts/host-a/data/agent");
    let read = |f: &str| std::fs::read_to_string(creds.join(f)).expect("credential");
    let host_a =
        common::HostClient::new(&url, &read("ca.crt"), &read("host.crt"), &read("host.key"));
    let get = |path: &str| host_a.status(path);
    assert_eq!(
        get("/agent/v1/list?prefix=/corral/vms/"),
        200,
        "its own reads work"
    );
    assert_eq!(
        get("/agent/v1/get?key=/corral/auth/admin-token-sha256"),
        403
    );
    assert_eq!(
        get("/agent/v1/list?prefix=/corral/hosts/"),
        200,
        "peers' fabric addresses are readable (overlay tunnels)"
    );
    assert_eq!(get("/agent/v1/list?prefix=/corral/tasks/"), 403);
    assert_eq!(get("/agent/v1/list?prefix=/corral/ips/"), 403);
    assert_eq!(get("/agent/v1/watch?prefix=/corral/&from=1"), 403);
    let store_vm = |name: &str| host_a.get(&format!("/corral/vms/default/{name}"));
    let (mine, rev) = store_vm("mine");
    let (theirs, their_rev) = store_vm("theirs");
    // Hosts write no raw keys: the key-value transaction is gone.
    let raw = json!([{ "Put": { "key": "/corral/vms/default/mine", "value": [], "when": "Any",
        "lease": null } }]);
    assert_eq!(host_a.post("/agent/v1/txn", &raw).0, 404);
    assert_eq!(
        host_a.write(&raw).0,
        400,
        "not a write of the host protocol"
    );
    let mut moved = mine["status"].clone();
    moved["host"] = json!("host-b");
    let (status, why) = host_a.vm_status("mine", rev, &moved);
    assert_eq!(status, 403, "its VM moves only by a migration: {why}");
    let mut stolen = theirs["status"].clone();
    stolen["host"] = json!("host-a");
    let (status, why) = host_a.vm_status("theirs", their_rev, &stolen);
    assert_eq!(status, 403, "not another host's VM: {why}");
    assert!(why.contains("not placed on this host"), "{why}");
    let (status, why) = host_a.vm_status("sneaky", rev, &mine["status"]);
    assert_eq!(
        (status, why.contains("stale")),
        (200, true),
        "no VM is made: {why}"
    );
    let mut status_only = mine["status"].clone();
    status_only["conditions"] = json!([]);
    let (status, why) = host_a.vm_status("mine", rev, &status_only);
    assert_eq!(status, 200, "status of its own VM: {why}");
    assert!(why.contains("applied"), "{why}");
    // Nothing above changed the VMs.
    assert_eq!(lab.vm("mine")["spec"]["memory_bytes"], 64u64 << 20);
    assert_eq!(lab.vm("theirs")["status"]["host"], "host-b");
    assert!(!lab.try_cli(&["vm", "show", "sneaky"]).status.success());

    // Removing a host: refused while VMs are placed on it; afterwards its certificate opens nothing.
    let err = lab.fails(&["host", "remove", "host-a"]);
    assert!(err.contains("still has VMs default/mine"), "{err}");
    lab.delete_vm("mine", &[]);
    let refused_before = lab.agent_log("host-a").matches("401").count();
    lab.cli(&["host", "remove", "host-a"]);
    assert!(lab
        .fails(&["host", "show", "host-a"])
        .contains("does not exist"));
    assert_eq!(
        get("/agent/v1/revision"),
        401,
        "a removed host's certificate is refused"
    );
    // Its agent goes on calling (watches, reports, heartbeats) and is refused.
    common::wait_for(
        "host-a's agent to be refused",
        Duration::from_secs(30),
        || lab.agent_log("host-a").matches("401").count() > refused_before,
    );
    assert!(
        lab.fails(&["host", "show", "host-a"])
            .contains("does not exist"),
        "its agent cannot bring the record back"
    );

    // Without a certificate: refused by every agent call.
    let insecure = common::insecure_agent();
    for path in [
        "/agent/v1/list?prefix=/corral/vms/",
        "/agent/v1/get?key=/corral/auth/admin-token-sha256",
        "/agent/v1/revision",
    ] {
        let res = insecure
            .get(format!("{}{path}", lab.agent_url()))
            .call()
            .expect("call");
        assert_eq!(res.status(), 401, "{path}");
    }
    // A host that has joined but whose agent has not registered it yet is not connected (its
    // capacity is unknown), stays so across the failure detector's ticks, and gets no VM.
    let token = lab.cli(&["host", "join-token"]).trim().to_string();
    let joined = insecure
        .post(format!("{}/agent/v1/join", lab.agent_url()))
        .send_json(json!({ "token": token, "host": "host-q" }))
        .expect("join");
    assert_eq!(joined.status(), 200);
    for _ in 0..5 {
        let q = lab.json(&["host", "show", "host-q"]);
        assert_eq!(q["state"], "not_responding", "{q}");
        assert!(q["not_responding_since"].is_null(), "{q}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let shown = lab.cli(&["host", "show", "host-q"]);
    assert!(
        shown.contains("not responding (its agent has not registered yet)"),
        "{shown}"
    );
    lab.cli(&[
        "vm", "create", "early", "--image", "jeos", "--memory", "64M", "--host", "host-q",
    ]);
    let early = lab.vm("early");
    assert!(early["status"]["host"].is_null(), "{early}");
    let why = common::scheduled_reason(&early);
    assert!(why.contains("not responding"), "{why}");
    lab.delete_vm("early", &[]);
    lab.cli(&["host", "remove", "host-q"]);
    // With a certificate from another CA: the TLS handshake fails.
    let other = tempfile::tempdir().expect("dir");
    let rogue_ca = corral_pki::Ca::load_or_create(other.path()).expect("ca");
    let id = rogue_ca.issue_host("host-a").expect("cert");
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(true)
        .client_cert(Some(ureq::tls::ClientCert::new_with_certs(
            &[ureq::tls::Certificate::from_pem(id.cert_pem.as_bytes()).expect("cert")],
            ureq::tls::PrivateKey::from_pem(id.key_pem.as_bytes()).expect("key"),
        )))
        .build();
    let rogue: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into();
    let res = rogue
        .get(format!("{}/agent/v1/revision", lab.agent_url()))
        .call();
    assert!(
        res.is_err(),
        "a certificate of another CA must not get through: {:?}",
        res.map(|r| r.status())
    );
}

#[test]
fn a_silent_host_is_shown_as_not_responding_and_its_vms_are_left_alone() {
    let mut lab = Lab::controller();
    lab.join("host-a");
    lab.build_jeos();
    lab.cli(&[
        "vm", "create", "quiet", "--image", "jeos", "--memory", "128M", "--start",
    ]);
    lab.wait_console("quiet", READY, 1, BOOT);
    let pid = lab.vm("quiet")["status"]["pid"].as_u64().expect("pid") as u32;
    lab.kill_agent("host-a");
    let deadline = Instant::now() + Duration::from_secs(40);
    let host = loop {
        let h = lab.json(&["host", "show", "host-a"]);
        if h["state"] == "not_responding" {
            break h;
        }
        assert!(Instant::now() < deadline, "host not marked: {h}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(host["not_responding_since"].is_string(), "{host}");
    assert!(alive(pid), "the VM is left alone");
    // No new VM goes to a silent host.
    lab.cli(&[
        "vm", "create", "later", "--image", "jeos", "--memory", "128M",
    ]);
    let later = lab.vm("later");
    assert!(later["status"]["host"].is_null(), "{later}");
    let why = common::scheduled_reason(&later);
    assert!(why.contains("not responding"), "{why}");
    // The agent comes back (with the certificate it has) and adopts its guest.
    lab.start_agent("host-a", None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.json(&["host", "show", "host-a"])["state"] != "connected" {
        assert!(
            Instant::now() < deadline,
            "host did not come back:\n{}",
            lab.agent_log("host-a")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lab.vm("quiet")["status"]["pid"].as_u64(), Some(pid as u64));
}
