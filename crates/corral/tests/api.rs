//! The API and CLI without booting guests: bad input, authentication, the OpenAPI document,
//! imports, and state surviving a hard kill.

mod common;

use std::time::Duration;

use common::Lab;
use serde_json::Value;

fn vm_count(lab: &Lab) -> usize {
    lab.json(&["vm", "list"]).as_array().expect("array").len()
}

#[test]
fn bad_requests_get_a_sentence_and_change_nothing() {
    let lab = Lab::start();
    lab.build_jeos();
    lab.cli(&["vm", "create", "a", "--image", "jeos", "--memory", "256M"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["vm", "create", "a", "--image", "jeos", "--memory", "256M"],
            "already exists",
        ),
        (
            &["vm", "create", "b", "--image", "nope", "--memory", "256M"],
            "image nope does not exist",
        ),
        (
            &["vm", "create", "b", "--image", "jeos", "--memory", "12XB"],
            "malformed memory \"12XB\"",
        ),
        (
            &[
                "vm", "create", "b", "--image", "jeos", "--memory", "256M", "--cpus", "4096",
            ],
            "1 to 255 CPUs",
        ),
        (
            &[
                "vm", "create", "b", "--image", "jeos", "--memory", "256M", "--cpus", "200",
            ],
            "largest host has",
        ),
        (
            &["vm", "create", "b", "--image", "jeos", "--memory", "64T"],
            "largest host has",
        ),
        (
            &[
                "vm", "create", "b", "--image", "jeos", "--memory", "256M", "--disk", "1M",
            ],
            "smaller than image jeos",
        ),
        (
            &["vm", "create", "B_1", "--image", "jeos", "--memory", "256M"],
            "invalid VM name",
        ),
        (&["vm", "start", "ghost"], "VM ghost does not exist"),
        (&["vm", "reboot", "a"], "is not running"),
        (
            &["vm", "show", "a", "--project", "other"],
            "project other does not exist",
        ),
        (&["image", "delete", "jeos"], "in use by VMs a"),
    ];
    for (args, want) in cases {
        let err = lab.fails(args);
        assert!(
            err.contains(want),
            "corral {}: expected {want:?} in {err:?}",
            args.join(" ")
        );
    }
    assert_eq!(vm_count(&lab), 1, "no failed request created anything");
    assert_eq!(
        lab.vm("a")["meta"]["generation"],
        1,
        "no failed request changed the VM"
    );
}

/// Every operation of the OpenAPI document, with its path parameters filled in.
fn operations() -> Vec<(String, String)> {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/openapi.json")).expect("openapi.json");
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{project}", "default")
            .replace("{name}", "x")
            .replace("{id}", "00000000-0000-0000-0000-000000000000");
        for method in item.as_object().expect("item").keys() {
            ops.push((method.to_uppercase(), concrete.clone()));
        }
    }
    ops
}

#[test]
fn every_call_but_health_needs_the_token() {
    let lab = Lab::start();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let base = format!("http://127.0.0.1:{}", lab.port);
    let ops = operations();
    assert!(ops.len() >= 15, "the document lists the API: {ops:?}");
    for (method, path) in ops {
        for token in [None, Some("Bearer nope")] {
            // A connection per request: what is tested is each answer, not connection reuse.
            let mut req = ureq::http::Request::builder()
                .method(method.as_str())
                .uri(format!("{base}{path}"))
                .header("Connection", "close");
            if let Some(t) = token {
                req = req.header("Authorization", t);
            }
            let req = req.body(()).expect("request");
            let mut res = agent.run(req).unwrap_or_else(|e| {
                panic!("{method} {path}: {e}; the server's log:\n{}", lab.log())
            });
            if path == "/api/v1/health" {
                assert_eq!(res.status(), 200);
                continue;
            }
            assert_eq!(res.status(), 401, "{method} {path} with token {token:?}");
            let body: corral_api::ApiErrorBody = res.body_mut().read_json().expect("error body");
            assert!(body.message.contains("token"), "{}", body.message);
        }
    }
    // With the token, malformed input is a 400 with a sentence, not axum's plain text.
    let token = std::fs::read_to_string(lab.data_dir().join("admin-token")).expect("token");
    let mut res = agent
        .post(format!("{base}/api/v1/projects/default/vms"))
        .header("Authorization", format!("Bearer {}", token.trim()))
        .header("Content-Type", "application/json")
        .send("{\"name\": 5}")
        .expect("call");
    assert_eq!(res.status(), 400);
    let body: corral_api::ApiErrorBody = res.body_mut().read_json().expect("error body");
    assert!(
        body.message.contains("request body is not valid"),
        "{}",
        body.message
    );

    // A body over the limit is a 413 with a sentence, refused on its announced length before
    // anything is read (the client need not send it).
    let announce = |method_path: &str, content_type: &str, length: u64| -> String {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", lab.port)).expect("connect");
        write!(
            conn,
            "{method_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n",
            token.trim(),
        )
        .expect("send");
        // The answer comes before the body it refuses was sent: read it (a JSON error), without
        // waiting for the connection to close.
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !(answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}")) {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = announce(
        "POST /api/v1/projects/default/vms",
        "application/json",
        2 << 20,
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than the 1M"), "{answer}");
    // An image upload over its limit likewise, before a byte is stored.
    let answer = announce(
        "PUT /api/v1/projects/default/images/huge",
        "application/octet-stream",
        100 << 30,
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than the 64G"), "{answer}");
    assert!(!lab.try_cli(&["image", "show", "huge"]).status.success());

    let out = std::process::Command::new(common::BIN)
        .args(["vm", "list", "--url", &base, "--token", "wrong"])
        .env("XDG_CONFIG_HOME", lab.dir.path().join("nowhere"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token is not valid"));
    // The token file and the client config are private.
    use std::os::unix::fs::PermissionsExt;
    for f in [
        lab.data_dir().join("admin-token"),
        lab.dir.path().join("config/corral/config.json"),
    ] {
        let mode = std::fs::metadata(&f).expect("file").permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "{} readable by others: {mode:o}",
            f.display()
        );
    }
}

#[test]
fn the_served_openapi_document_is_the_committed_one() {
    let lab = Lab::start();
    let token = std::fs::read_to_string(lab.data_dir().join("admin-token")).expect("token");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut res = agent
        .get(format!("http://127.0.0.1:{}/api/v1/openapi.json", lab.port))
        .header("Authorization", format!("Bearer {}", token.trim()))
        .call()
        .expect("openapi");
    assert_eq!(res.status(), 200);
    let served: serde_json::Value = res.body_mut().read_json().expect("json");
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/openapi.json"))
            .expect("docs/openapi.json is JSON");
    assert!(served == committed, "docs/openapi.json is stale: regenerate it with `cargo run -p corral-controller --example openapi > docs/openapi.json`");
    // The schemas say what the server enforces: names are DNS labels, ratios are in range.
    let schemas = &committed["components"]["schemas"];
    for body in [
        "CreateVmRequest",
        "CreateNetworkRequest",
        "CreateDatastoreRequest",
        "CreateGroupRequest",
        "CreateSecurityGroupRequest",
        "CreateProjectRequest",
    ] {
        let name = &schemas[body]["properties"]["name"];
        assert_eq!(name["minLength"], 1, "{body}: {name}");
        assert!(name["pattern"].is_string(), "{body}: {name}");
    }
    assert!(
        schemas["ClusterSettings"]["properties"]["cpu_overcommit"]["minimum"]
            .as_f64()
            .is_some_and(|m| m > 0.0),
        "cpu_overcommit 0 is refused, so the schema says so"
    );
    // Clients can be generated from it: one operationId per operation, every status documented.
    let mut ids = std::collections::HashSet::new();
    for (path, item) in committed["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            let id = op["operationId"].as_str().expect("an operationId");
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            let responses = op["responses"].as_object().expect("responses");
            if path != "/api/v1/health" {
                assert!(responses.contains_key("401"), "{method} {path}: no 401");
            }
            if op["requestBody"]["content"]
                .get("application/json")
                .is_some()
            {
                assert!(responses.contains_key("413"), "{method} {path}: no 413");
            }
        }
    }
}

#[test]
fn imports_accept_disks_and_refuse_other_files() {
    let lab = Lab::start();
    let dir = lab.dir.path();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a disk\n".repeat(100)).expect("write");
    let err = lab.fails(&["image", "import", "notes", text.to_str().expect("utf8")]);
    assert!(err.contains("not a disk image"), "{err}");
    // A qcow2 whose data lives in another host file would expose that file to guests.
    let sneaky = dir.join("sneaky.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", dir.join("victim.raw").display()))
        .arg(&sneaky)
        .arg("16M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let err = lab.fails(&["image", "import", "sneaky", sneaky.to_str().expect("utf8")]);
    assert!(err.contains("external file"), "{err}");

    // A raw disk with an ext4 file system, and a qcow2 of it.
    let raw = dir.join("data.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(16 << 20))
        .expect("raw");
    assert!(std::process::Command::new("mkfs.ext4")
        .args(["-q"])
        .arg(&raw)
        .status()
        .expect("mkfs")
        .success());
    let qcow = dir.join("data.qcow2");
    assert!(std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .expect("convert")
        .success());
    let a = lab.json(&["image", "import", "rawdisk", raw.to_str().expect("utf8")]);
    assert_eq!(
        (
            a["status"]["format"].as_str(),
            a["status"]["virtual_bytes"].as_u64()
        ),
        (Some("raw"), Some(16 << 20))
    );
    let b = lab.json(&["image", "import", "qdisk", qcow.to_str().expect("utf8")]);
    assert_eq!(b["status"]["format"], "qcow2");
    assert!(lab
        .fails(&["image", "import", "qdisk", qcow.to_str().expect("utf8")])
        .contains("already exists"));
    let names: Vec<String> = lab
        .json(&["image", "list"])
        .as_array()
        .expect("list")
        .iter()
        .map(|i| i["meta"]["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["qdisk", "rawdisk"]);
    // A VM on an imported image gets a clone backed by it.
    lab.cli(&[
        "vm", "create", "v", "--image", "rawdisk", "--memory", "128M", "--disk", "32M",
    ]);
    let vm = lab.vm("v");
    assert_eq!(vm["status"]["disk"]["backing"], a["status"]["path"]);
}

#[test]
fn a_hard_kill_loses_nothing_that_was_acknowledged() {
    let mut lab = Lab::start();
    lab.build_jeos();
    // Room for many small VMs on this one host: placement reserves capacity for each.
    lab.cli(&["cluster", "set", "--cpu-overcommit", "64"]);
    // Create VMs while the control plane is killed at an arbitrary moment.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let acked = acknowledged.clone();
        let cfg = lab.dir.path().join("config");
        let bin = common::BIN;
        std::thread::spawn(move || {
            for i in 0..200 {
                let name = format!("vm-{i}");
                let out = std::process::Command::new(bin)
                    .args(["vm", "create", &name, "--image", "jeos", "--memory", "64M"])
                    .env("XDG_CONFIG_HOME", &cfg)
                    .output()
                    .expect("run");
                if !out.status.success() {
                    break;
                }
                acked.lock().expect("lock").push(name);
            }
        })
    };
    // Kill once a few creates were acknowledged (however slow the machine), mid-way to the next.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().expect("lock").len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no create acknowledged in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    lab.crash();
    writer.join().expect("writer");
    let acked = acknowledged.lock().expect("lock").clone();
    assert!(
        acked.len() >= 2,
        "the kill came too early to test anything: {acked:?}"
    );
    lab.up();
    let vms = lab.json(&["vm", "list"]);
    let names: std::collections::HashSet<String> = vms
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["meta"]["name"].as_str().unwrap_or("").to_string())
        .collect();
    for n in &acked {
        assert!(
            names.contains(n),
            "{n} was acknowledged but is gone after the restart"
        );
    }
    assert!(
        names.len() <= acked.len() + 1,
        "at most the one unacknowledged create may have landed"
    );
    // The store is consistent: every VM settles (disk cloned, stopped).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let vms = lab.json(&["vm", "list"]);
        if vms
            .as_array()
            .expect("list")
            .iter()
            .all(|v| v["status"]["phase"] == "stopped")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VMs did not settle: {vms}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn datastores_hold_vm_disks_and_refuse_bad_paths_and_deletion_in_use() {
    let lab = Lab::start();
    lab.build_jeos();
    let ds = lab.dir.path().join("shared-ds");
    std::fs::create_dir_all(&ds).expect("dir");
    let path = ds.to_str().expect("utf8");
    for (args, want) in [
        (
            vec!["datastore", "create", "x", "--path", "relative"],
            "is not usable",
        ),
        (
            vec!["datastore", "create", "x", "--path", "/srv/../etc"],
            "is not usable",
        ),
        (
            vec!["datastore", "create", "local", "--path", "/srv"],
            "built in",
        ),
        (
            vec![
                "vm",
                "create",
                "v",
                "--image",
                "jeos",
                "--memory",
                "64M",
                "--datastore",
                "nope",
            ],
            "datastore nope does not exist",
        ),
    ] {
        let err = lab.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    lab.cli(&["datastore", "create", "fast", "--path", path, "--shared"]);
    assert!(lab
        .fails(&["datastore", "create", "fast", "--path", path])
        .contains("already exists"));
    lab.cli(&[
        "vm",
        "create",
        "v",
        "--image",
        "jeos",
        "--memory",
        "64M",
        "--datastore",
        "fast",
    ]);
    let vm = lab.vm("v");
    let disk = vm["status"]["disk"]["path"]
        .as_str()
        .expect("disk")
        .to_string();
    assert!(disk.starts_with(&format!("{path}/corral-vms/")), "{disk}");
    assert!(std::path::Path::new(&disk).exists());
    let err = lab.fails(&["datastore", "delete", "fast"]);
    assert!(err.contains("holds the disks of VMs default/v"), "{err}");
    lab.delete_vm("v", &[]);
    assert!(
        !std::path::Path::new(&disk).exists(),
        "the disk left the datastore with its VM"
    );
    lab.cli(&["datastore", "delete", "fast"]);
    assert!(lab
        .json(&["datastore", "list"])
        .as_array()
        .expect("list")
        .is_empty());
}

/// Networks, addresses and security groups through the CLI (no guest runs, so no host networking
/// is made): addresses are handed out lowest first and never twice, bad input is refused with a
/// sentence and changes nothing, what is in use cannot be deleted, projects do not see each other.
#[test]
fn networks_hand_out_addresses_once_and_refuse_bad_input() {
    let lab = Lab::start();
    lab.build_jeos();
    let net = lab.json(&["network", "create", "net-a", "--cidr", "10.10.0.0/24"]);
    assert_eq!(net["spec"]["segment"]["kind"], "vxlan");
    lab.cli(&[
        "security-group",
        "create",
        "web",
        "--rule",
        "in tcp 8080 from 0.0.0.0/0",
    ]);
    let create = |name: &str, nic: &str| -> Vec<String> {
        let mut args = vec!["vm", "create", name, "--image", "jeos", "--memory", "128M"];
        args.extend(["--nic", nic]);
        args.iter().map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| lab.json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let x = run(create("x", "net-a"));
    let nic = &x["spec"]["nics"][0];
    assert_eq!(nic["ip"], "10.10.0.2", "the lowest free address: {x}");
    assert!(nic["mac"]
        .as_str()
        .is_some_and(|m| m.starts_with("52:54:00:")));
    assert_eq!(x["spec"]["security_groups"][0], "default");
    let mut in_web = create("y", "net-a,ip=10.10.0.9,mac=52:54:00:aa:bb:cc");
    in_web.extend(["--security-group".into(), "web".into()]);
    let y = run(in_web);
    assert_eq!(y["spec"]["security_groups"][0], "web");
    assert_eq!(y["spec"]["nics"][0]["ip"], "10.10.0.9");
    assert_eq!(y["spec"]["nics"][0]["mac"], "52:54:00:aa:bb:cc");
    let z = run(create("z", "net-a"));
    assert_eq!(z["spec"]["nics"][0]["ip"], "10.10.0.3");
    let vms_before = vm_count(&lab);
    let fails = |args: Vec<String>, want: &str| {
        let err = lab.fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(err.contains(want), "{args:?}: {err}");
    };
    fails(create("w", "net-a,ip=10.10.0.2"), "taken by VM x");
    fails(create("w", "net-a,ip=10.10.0.1"), "reserved");
    fails(
        create("w", "net-a,ip=10.20.0.5"),
        "not in network 10.10.0.0/24",
    );
    fails(
        create("w", "net-a,mac=52:54:00:aa:bb:cc"),
        "already used on network net-a",
    );
    fails(
        create("w", "net-a,mac=01:00:5e:00:00:01"),
        "not a unicast MAC",
    );
    fails(create("w", "net-zz"), "network net-zz does not exist");
    fails(create("w", "net-a,speed=10G"), "not understood");
    let mut bad_group = create("w", "net-a");
    bad_group.extend(["--security-group".into(), "nope".into()]);
    fails(bad_group, "security group nope does not exist");
    assert_eq!(vm_count(&lab), vms_before, "refused creates made nothing");
    for (args, want) in [
        (
            &["network", "create", "n2", "--cidr", "10.1.0.1/24"][..],
            "host bits set",
        ),
        (
            &["network", "create", "n2", "--cidr", "10.1.0.0/31"],
            "CIDR notation",
        ),
        (
            &[
                "network",
                "create",
                "n2",
                "--cidr",
                "10.1.0.0/24",
                "--vlan",
                "5000",
            ],
            "1 to 4094",
        ),
        (
            &["network", "create", "net-a", "--cidr", "10.1.0.0/24"],
            "already exists",
        ),
        (
            &[
                "network",
                "create",
                "gw",
                "--cidr",
                "10.10.0.0/16",
                "--gateway",
            ],
            "overlaps network default/net-a",
        ),
        (&["network", "delete", "net-a"], "in use by VMs x, y, z"),
        (&["security-group", "delete", "web"], "applies to VMs y"),
        (&["security-group", "delete", "default"], "built in"),
        (
            &[
                "security-group",
                "create",
                "w2",
                "--rule",
                "in tcp 99999 from 0.0.0.0/0",
            ],
            "numbers",
        ),
        (
            &[
                "security-group",
                "create",
                "w2",
                "--rule",
                "in tcp 22 from group:ghost",
            ],
            "ghost, which does not exist",
        ),
        (
            &["security-group", "remove-rule", "web", "9"],
            "has rules 1 to 3",
        ),
    ] {
        let err = lab.fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    lab.cli(&[
        "network",
        "create",
        "vl",
        "--cidr",
        "10.30.0.0/24",
        "--vlan",
        "42",
    ]);
    let err = lab.fails(&[
        "network",
        "create",
        "vl2",
        "--cidr",
        "10.31.0.0/24",
        "--vlan",
        "42",
    ]);
    assert!(err.contains("VLAN 42 already carries"), "{err}");
    // Rules change; what `show` numbers is what `remove-rule` takes.
    lab.cli(&[
        "security-group",
        "add-rule",
        "web",
        "in icmp from group:default",
    ]);
    let web = lab.json(&["security-group", "show", "web"]);
    assert_eq!(web["rules"].as_array().map(Vec::len), Some(4), "{web}");
    lab.cli(&["security-group", "remove-rule", "web", "3"]);
    let web = lab.json(&["security-group", "show", "web"]);
    assert_eq!(web["rules"][2]["protocol"], "icmp", "{web}");
    // The network lists its NICs; a deleted VM's address is free again.
    let shown = lab.json(&["network", "show", "net-a"]);
    assert_eq!(
        shown["attached"].as_array().map(Vec::len),
        Some(3),
        "{shown}"
    );
    lab.delete_vm("x", &[]);
    let again = run(create("again", "net-a"));
    assert_eq!(
        again["spec"]["nics"][0]["ip"], "10.10.0.2",
        "x's address went back to the pool"
    );
    // Another project sees none of this, and cannot use it.
    lab.cli(&["project", "create", "other"]);
    let other = lab.json(&["network", "list", "--project", "other"]);
    assert_eq!(other.as_array().map(Vec::len), Some(0), "{other}");
    lab.cli(&["image", "build-jeos", "--project", "other"]);
    let err = lab.fails(&[
        "vm",
        "create",
        "o1",
        "--image",
        "jeos",
        "--memory",
        "128M",
        "--nic",
        "net-a",
        "--project",
        "other",
    ]);
    assert!(
        err.contains("network net-a does not exist in project other"),
        "{err}"
    );
    lab.cli(&[
        "network",
        "create",
        "net-a",
        "--cidr",
        "10.10.0.0/24",
        "--project",
        "other",
    ]);
    let err = lab.fails(&["project", "create", "other"]);
    assert!(err.contains("already exists"), "{err}");
    for v in ["y", "z", "again"] {
        lab.delete_vm(v, &[]);
    }
    lab.cli(&["network", "delete", "net-a"]);
    let err = lab.fails(&["network", "show", "net-a"]);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn parallel_network_creates_have_exactly_the_right_winners() {
    let lab = Lab::start();
    // 20 at once, in pairs that overlap: one of each pair wins, the other is told why, and no
    // create loses to a race that was not a real conflict.
    let outcomes: Vec<(usize, std::process::Output)> = std::thread::scope(|s| {
        let lab = &lab;
        let runs: Vec<_> = (0..20)
            .map(|i| {
                s.spawn(move || {
                    let name = format!("par-{i}");
                    let cidr = format!("10.{}.0.0/24", 100 + i / 2);
                    let args = ["network", "create", &name, "--cidr", &cidr, "--gateway"];
                    (i, lab.try_cli(&args))
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("thread"))
            .collect()
    });
    let mut won = [0; 10];
    for (i, out) in &outcomes {
        if out.status.success() {
            won[i / 2] += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("overlaps network default/par-"),
                "par-{i} failed for no real conflict: {err}"
            );
        }
    }
    assert_eq!(won, [1; 10], "one winner per pair: {won:?}");
    let nets = lab.json(&["network", "list"]);
    let vnis: std::collections::HashSet<u64> = nets
        .as_array()
        .expect("list")
        .iter()
        .map(|n| n["spec"]["segment"]["vni"].as_u64().expect("a VXLAN id"))
        .collect();
    assert_eq!(vnis.len(), 10, "every network its own VXLAN id: {nets}");

    // Loopback is nobody's tenant network; the hosts' fabric neither (see the hostile-host test).
    let err = lab.fails(&["network", "create", "lo", "--cidr", "127.0.0.0/8"]);
    assert!(err.contains("overlaps loopback"), "{err}");
    // Security-group CIDRs are stored in the form nftables takes.
    lab.cli(&[
        "security-group",
        "create",
        "odd",
        "--rule",
        "in tcp 22 from 10.0.0.0/08",
    ]);
    let sg = lab.json(&["security-group", "show", "odd"]);
    let rules = sg["rules"].to_string();
    assert!(rules.contains("\"10.0.0.0/8\""), "{sg}");
    let err = lab.fails(&[
        "security-group",
        "add-rule",
        "odd",
        "in tcp 22 from 10.0.0.0/+8",
    ]);
    assert!(err.contains("is not an address or network"), "{err}");
}

#[test]
fn tasks_come_newest_first_in_pages() {
    let lab = Lab::start();
    lab.tiny_image_and_shared_datastore();
    for name in ["t1", "t2", "t3"] {
        lab.cli(&["vm", "create", name, "--image", "tiny", "--memory", "64M"]);
    }
    let (status, all) = lab.api_get("/api/v1/tasks");
    assert_eq!(status, 200);
    let targets: Vec<&str> = all
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["target"].as_str())
        .filter(|t| t.starts_with("vm/t"))
        .collect();
    assert_eq!(targets, ["vm/t3", "vm/t2", "vm/t1"], "newest first: {all}");
    let (_, first) = lab.api_get("/api/v1/tasks?limit=2");
    assert_eq!(first.as_array().map(Vec::len), Some(2));
    let last = first[1]["id"].as_str().expect("id");
    let (_, rest) = lab.api_get(&format!("/api/v1/tasks?limit=1000&after={last}"));
    let mut paged: Vec<Value> = first.as_array().expect("page").clone();
    paged.extend(rest.as_array().expect("page").iter().cloned());
    assert_eq!(Value::Array(paged), all, "the pages make the whole list");
    let (status, body) = lab.api_get("/api/v1/tasks?limit=0");
    assert_eq!(status, 400, "{body}");
    let (status, body) = lab.api_get("/api/v1/tasks?after=00000000-0000-0000-0000-000000000000");
    assert_eq!(status, 404, "a task that is not there: {body}");
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.contains("no task")));
    assert!(lab.cli(&["task", "list", "--limit", "1"]).contains("vm/t3"));
}

/// A client generated from docs/openapi.json by a standard generator (progenitor, in the crate
/// corral-client) drives the live API: its typed requests are accepted, and what the server
/// answers (images, tasks, VMs, lists, errors) parses as the document says it is.
#[test]
fn a_client_generated_from_the_document_drives_the_api() {
    use corral_client::types::{CreateNetworkRequest, CreateVmRequest, TaskState, VmPhase};
    use corral_client::Error;

    let lab = Lab::start();
    let token = std::fs::read_to_string(lab.data_dir().join("admin-token")).expect("token");
    let img = lab.blank_qcow2("tiny.qcow2", "16M");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut headers = reqwest::header::HeaderMap::new();
        let bearer = format!("Bearer {}", token.trim()).parse().expect("header");
        headers.insert(reqwest::header::AUTHORIZATION, bearer);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let api =
            corral_client::Client::new_with_client(&format!("http://127.0.0.1:{}", lab.port), http);

        // A raw upload body, to a name the document constrains.
        let bytes = std::fs::read(&img).expect("image");
        let tiny = "tiny".parse().expect("an image name");
        assert!("Tiny"
            .parse::<corral_client::types::ImagesImportName>()
            .is_err());
        let image = api
            .images_import("default", &tiny, bytes)
            .await
            .expect("import");
        assert_eq!(image.meta.name, "tiny");

        // A VM created stopped: its task ends, and the VM reads back typed.
        let create = CreateVmRequest {
            name: "c1".parse().expect("name"),
            image: "tiny".parse().expect("image"),
            memory: "128M".parse().expect("memory"),
            cpus: None,
            datastore: None,
            disk: None,
            ha: None,
            ha_after: Vec::new(),
            ha_priority: None,
            host: None,
            nics: Vec::new(),
            security_groups: Vec::new(),
            start: Some(false),
        };
        let task = api
            .vms_create("default", &create)
            .await
            .expect("create")
            .into_inner();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let done = loop {
            let t = api
                .tasks_get_task(&task.id)
                .await
                .expect("task")
                .into_inner();
            if t.state != TaskState::Running {
                break t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gave up waiting for task {} (vm.create c1): {}% {}",
                t.id,
                t.progress,
                t.message
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
        let vm = api
            .vms_get("default", "c1")
            .await
            .expect("get")
            .into_inner();
        assert_eq!(vm.status.phase, VmPhase::Stopped);
        let listed = api.vms_list("default", None, None).await.expect("list");
        assert_eq!(
            listed
                .iter()
                .map(|v| v.meta.name.as_str())
                .collect::<Vec<_>>(),
            ["c1"]
        );

        // Refusals come as the document's error body, with the sentence.
        match api.vms_get("default", "nope").await {
            Err(Error::ErrorResponse(e)) => {
                assert_eq!(e.status().as_u16(), 404);
                assert_eq!(e.code, "not_found");
                assert!(e.message.contains("nope"), "{}", e.message);
            }
            other => panic!("expected a 404 with an error body, got {other:?}"),
        }
        let net = CreateNetworkRequest {
            name: "n1".parse().expect("name"),
            cidr: "10.20.0.0/24".parse().expect("cidr"),
            gateway: None,
            vlan: None,
        };
        api.networks_create("default", &net).await.expect("network");
        match api.networks_create("default", &net).await {
            Err(Error::ErrorResponse(e)) => assert_eq!(e.status().as_u16(), 409, "{}", e.message),
            other => panic!("expected a 409 for a second n1, got {other:?}"),
        }
        // The generated types check the document's constraints before anything is sent.
        assert!("10.20.0.0/33"
            .parse::<corral_client::types::CreateNetworkRequestCidr>()
            .is_err());
    });
}
