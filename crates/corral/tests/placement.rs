//! Placement and live migration across hosts, through the real API and store, with in-process host
//! agents on the fake driver (the real-guest lab tests live with the binary).

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_agent::{Agent, AgentConfig};
use corral_api::Accel;
use corral_hypervisor::fake::FakeDriver;
use corral_store::{RedbStore, Store};
use serde_json::{json, Value};

/// Polls a condition (an expression that may `.await`) for up to 20 s.
macro_rules! wait_until {
    ($cond:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(20);
        while !$cond {
            assert!(
                Instant::now() < deadline,
                "not true within 20 s: {}",
                stringify!($cond)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

struct Cluster {
    _dir: tempfile::TempDir,
    base: String,
    token: String,
    drivers: Vec<(String, Arc<FakeDriver>)>,
}

impl Cluster {
    async fn start(hosts: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("store.redb")).expect("store"));
        let token = corral_controller::new_token();
        let images = Arc::new(corral::HostImages {
            data_dir: dir.path().to_path_buf(),
        });
        let ctx = corral_controller::init(store.clone(), dir.path().to_path_buf(), images, &token)
            .await
            .expect("init");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}/api/v1", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, corral_controller::router(ctx)).await });
        let mut drivers = Vec::new();
        for h in hosts {
            let cfg = AgentConfig {
                host: h.to_string(),
                data_dir: dir.path().join(h),
                accel: Accel::Tcg,
                hypervisor: "fake".into(),
                stop_timeout: Duration::from_secs(5),
                resync: Duration::from_secs(1),
                address: std::net::Ipv4Addr::LOCALHOST.into(),
                ha: Default::default(),
                network: Arc::new(corral_network::LinuxNet::new(
                    dir.path().join(h).join("net"),
                    std::net::Ipv4Addr::LOCALHOST.into(),
                )),
            };
            let driver = Arc::new(FakeDriver::default());
            drivers.push((h.to_string(), driver.clone()));
            let local = corral_controller::LocalHost::register(store.clone(), h)
                .await
                .expect("register");
            let agent = Agent::new(Arc::new(local), driver, cfg, None);
            tokio::spawn(agent.run());
        }
        let c = Cluster {
            _dir: dir,
            base,
            token,
            drivers,
        };
        wait_until!(c.get("/hosts").await.as_array().map(Vec::len) == Some(hosts.len()));
        // An image to clone (a small qcow2 made by qemu-img, imported through the API).
        let img = c._dir.path().join("base.qcow2");
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M")
            .status();
        assert!(ok.expect("qemu-img").success());
        let (status, body) = c
            .call(
                "PUT",
                "/projects/default/images/base",
                Some(std::fs::read(&img).expect("read").into()),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        c
    }

    async fn call(&self, method: &str, path: &str, body: Option<Body>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let method = method.to_string();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let req = ureq::http::Request::builder()
                .method(method.as_str())
                .uri(url)
                .header("Authorization", auth);
            let mut res = match body {
                Some(Body::Json(v)) => agent
                    .run(
                        req.header("Content-Type", "application/json")
                            .body(v.to_string())
                            .expect("req"),
                    )
                    .expect("call"),
                Some(Body::Bytes(b)) => agent.run(req.body(b).expect("req")).expect("call"),
                None => agent.run(req.body(()).expect("req")).expect("call"),
            };
            let text = res.body_mut().read_to_string().unwrap_or_default();
            (
                res.status().as_u16(),
                serde_json::from_str(&text).unwrap_or(Value::Null),
            )
        })
        .await
        .expect("join")
    }

    fn driver(&self, host: &str) -> &FakeDriver {
        &self
            .drivers
            .iter()
            .find(|(h, _)| h == host)
            .expect("host")
            .1
    }

    /// Waits until a task ends and returns it.
    async fn task_end(&self, task: &Value) -> Value {
        let path = format!("/tasks/{}", task["id"].as_str().expect("task id"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = self.get(&path).await;
            if t["state"] != "running" {
                return t;
            }
            assert!(Instant::now() < deadline, "task did not end: {t}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn migrate(&self, vm: &str, to: Option<&str>) -> (u16, Value) {
        let path = format!("/projects/default/vms/{vm}/migrate");
        self.call("POST", &path, Some(Body::Json(json!({ "to": to }))))
            .await
    }

    /// Where the VM runs, checked on the hosts' drivers too: exactly one of them runs it.
    async fn runs_on(&self, vm: &str) -> String {
        let v = self.get(&format!("/projects/default/vms/{vm}")).await;
        let host = v["status"]["host"].as_str().expect("placed").to_string();
        let run_dir = std::path::PathBuf::from(v["status"]["run_dir"].as_str().expect("run dir"));
        let uid = run_dir.file_name().expect("uid").to_owned();
        let running: Vec<&str> = self
            .drivers
            .iter()
            .filter(|(h, d)| d.is_running(&self._dir.path().join(h).join("vms").join(&uid)))
            .map(|(h, _)| h.as_str())
            .collect();
        assert_eq!(
            running,
            [host.as_str()],
            "{vm} runs once, where its status says"
        );
        assert_eq!(v["status"]["phase"], "running", "{v}");
        host
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn create(&self, name: &str, memory: &str) -> (u16, Value) {
        let body =
            json!({"name": name, "image": "base", "memory": memory, "cpus": 1, "start": true});
        self.call("POST", "/projects/default/vms", Some(Body::Json(body)))
            .await
    }

    /// Where each VM landed: name -> host (None while pending).
    async fn placement(&self) -> Vec<(String, Option<String>)> {
        let vms = self.get("/projects/default/vms").await;
        vms.as_array()
            .expect("list")
            .iter()
            .map(|v| {
                (
                    v["meta"]["name"].as_str().unwrap_or("").to_string(),
                    v["status"]["host"].as_str().map(String::from),
                )
            })
            .collect()
    }

    async fn per_host(&self) -> Vec<(String, usize)> {
        let hosts = self.get("/hosts").await;
        hosts
            .as_array()
            .expect("hosts")
            .iter()
            .map(|h| {
                (
                    h["name"].as_str().unwrap_or("").to_string(),
                    h["vms"].as_array().map_or(0, Vec::len),
                )
            })
            .collect()
    }
}

enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Body::Bytes(b)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_puts_two_of_six_on_each_host_and_they_run_there() {
    let c = Cluster::start(&["host-a", "host-b", "host-c"]).await;
    for i in 0..6 {
        let (status, body) = c.create(&format!("vm-{i}"), "256M").await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(
        c.per_host().await,
        [
            ("host-a".into(), 2),
            ("host-b".into(), 2),
            ("host-c".into(), 2)
        ]
    );
    // Each host's own agent runs what was placed on it.
    wait_until!(c
        .get("/projects/default/vms")
        .await
        .as_array()
        .expect("list")
        .iter()
        .all(|v| v["status"]["phase"] == "running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_anti_affinity_spreads_a_group_and_the_fourth_member_waits_with_a_reason() {
    let c = Cluster::start(&["host-a", "host-b", "host-c"]).await;
    // Under pack all would stack on one host; only the rule spreads them.
    let settings = json!({"placement": "pack", "cpu_overcommit": 4.0, "memory_overcommit": 1.0});
    assert_eq!(
        c.call("PUT", "/cluster", Some(Body::Json(settings)))
            .await
            .0,
        200
    );
    let group = json!({"name": "db", "rule": "anti-affinity", "strength": "must", "members": ["db1", "db2", "db3", "db4"]});
    let (status, body) = c
        .call("POST", "/projects/default/groups", Some(Body::Json(group)))
        .await;
    assert_eq!(status, 201, "{body}");
    for name in ["db1", "db2", "db3"] {
        assert_eq!(c.create(name, "128M").await.0, 202);
    }
    let mut hosts: Vec<Option<String>> = c.placement().await.into_iter().map(|(_, h)| h).collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "three members on three hosts");
    let (status, _) = c.create("db4", "128M").await;
    assert_eq!(status, 202, "the VM is accepted, and waits");
    let vm = c.get("/projects/default/vms/db4").await;
    assert_eq!(vm["status"]["phase"], "pending");
    assert!(vm["status"]["host"].is_null());
    let cond = vm["status"]["conditions"]
        .as_array()
        .expect("conds")
        .iter()
        .find(|c| c["type"] == "Scheduled")
        .expect("Scheduled")
        .clone();
    assert!(
        cond["message"]
            .as_str()
            .expect("msg")
            .contains("anti-affinity group db"),
        "{cond}"
    );
    // Deleting a pending VM needs no host.
    let (status, _) = c.call("DELETE", "/projects/default/vms/db4", None).await;
    assert_eq!(status, 202);
    wait_until!(c.call("GET", "/projects/default/vms/db4", None).await.0 == 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_fills_a_host_first_and_maintenance_hosts_get_nothing() {
    let c = Cluster::start(&["host-a", "host-b", "host-c"]).await;
    let cpus = c.get("/hosts/host-a").await["status"]["cpus"]
        .as_u64()
        .expect("cpus");
    let settings = json!({"placement": "pack", "cpu_overcommit": 1.0, "memory_overcommit": 1.0});
    assert_eq!(
        c.call("PUT", "/cluster", Some(Body::Json(settings)))
            .await
            .0,
        200
    );
    let (status, info) = c
        .call(
            "PUT",
            "/hosts/host-a/maintenance",
            Some(Body::Json(json!({"maintenance": true}))),
        )
        .await;
    assert_eq!(
        (status, info["host"]["state"].as_str()),
        (200, Some("maintenance"))
    );
    for i in 0..=cpus {
        assert_eq!(c.create(&format!("p{i}"), "128M").await.0, 202);
    }
    let counts = c.per_host().await;
    assert_eq!(
        counts[0],
        ("host-a".into(), 0),
        "maintenance host skipped: {counts:?}"
    );
    assert_eq!(
        counts[1],
        ("host-b".into(), cpus as usize),
        "host-b filled to its CPUs first: {counts:?}"
    );
    assert_eq!(counts[2], ("host-c".into(), 1), "{counts:?}");

    // Back in service, host-a is empty: pack still prefers the fullest host that fits (host-c).
    c.call(
        "PUT",
        "/hosts/host-a/maintenance",
        Some(Body::Json(json!({"maintenance": false}))),
    )
    .await;
    assert_eq!(c.create("next", "128M").await.0, 202);
    let next = c.get("/projects/default/vms/next").await;
    assert_eq!(next["status"]["host"], "host-c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_too_big_for_the_free_memory_waits_and_says_how_much_is_free() {
    let c = Cluster::start(&["host-a", "host-b"]).await;
    let mem = c.get("/hosts/host-a").await["status"]["memory_bytes"]
        .as_u64()
        .expect("mem");
    let big = format!("{}M", (mem >> 20) * 3 / 4);
    assert_eq!(c.create("big-1", &big).await.0, 202);
    assert_eq!(c.create("big-2", &big).await.0, 202);
    let (status, body) = c.create("big-3", &big).await;
    assert_eq!(status, 202, "{body}");
    let vm = c.get("/projects/default/vms/big-3").await;
    let cond = vm["status"]["conditions"]
        .as_array()
        .expect("conds")
        .iter()
        .find(|c| c["type"] == "Scheduled")
        .expect("cond")
        .clone();
    let msg = cond["message"].as_str().expect("msg");
    assert!(msg.contains("of memory free; largest free is"), "{msg}");
    // Free a host: the placer puts the waiting VM there.
    assert_eq!(
        c.call("DELETE", "/projects/default/vms/big-1?force=true", None)
            .await
            .0,
        202
    );
    wait_until!(c.get("/projects/default/vms/big-3").await["status"]["host"].is_string());
    // A pin to an unknown host is refused outright.
    let body = json!({"name": "pinned", "image": "base", "memory": "128M", "host": "host-z"});
    let (status, err) = c
        .call("POST", "/projects/default/vms", Some(Body::Json(body)))
        .await;
    assert_eq!(status, 400);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("host host-z does not exist"),
        "{err}"
    );
}

/// Capacity is held by the VMs that run: stopped VMs are placed on full hosts and take nothing
/// there; a start is admitted against what is free at that moment, moves a VM whose disk every
/// host reaches to a host with room, and refuses, with a sentence and changing nothing, a VM whose
/// disk only its full host reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_vms_hold_no_room_and_a_start_is_admitted_against_what_is_free_then() {
    let c = Cluster::start(&["host-a", "host-b"]).await;
    let cpus = c.get("/hosts/host-a").await["status"]["cpus"]
        .as_u64()
        .expect("cpus");
    let pack = json!({"placement": "pack", "cpu_overcommit": 1.0, "memory_overcommit": 1.0});
    assert_eq!(
        c.call("PUT", "/cluster", Some(Body::Json(pack))).await.0,
        200
    );
    let shared = c._dir.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let ds = json!({"name": "shared", "path": shared, "shared": true});
    let (status, body) = c.call("POST", "/datastores", Some(Body::Json(ds))).await;
    assert_eq!(status, 201, "{body}");
    let create_stopped = async |name: &str, datastore: &str| {
        let body = json!({"name": name, "image": "base", "memory": "128M", "cpus": 1,
            "datastore": datastore});
        let (status, task) = c
            .call("POST", "/projects/default/vms", Some(Body::Json(body)))
            .await;
        assert_eq!(status, 202, "{task}");
        assert_eq!(c.task_end(&task).await["state"], "succeeded", "{name}");
    };
    let start = async |name: &str| {
        c.call("POST", &format!("/projects/default/vms/{name}/start"), None)
            .await
    };
    // Pack puts everything on host-a: two stopped VMs, then as many running ones as it has CPUs.
    create_stopped("roamer", "shared").await;
    create_stopped("homebody", "local").await;
    for i in 0..cpus {
        let (status, task) = c.create(&format!("run-{i}"), "128M").await;
        assert_eq!(status, 202, "{task}");
        assert_eq!(c.task_end(&task).await["state"], "succeeded");
        assert_eq!(c.runs_on(&format!("run-{i}")).await, "host-a");
    }
    let a = c.get("/hosts/host-a").await;
    assert_eq!(a["allocated_cpus"], cpus, "only running VMs hold CPUs: {a}");
    assert_eq!(a["vms"].as_array().map(Vec::len), Some(cpus as usize + 2));
    // A full host still takes a VM created stopped: it holds only its disk.
    create_stopped("late", "local").await;
    let late = c.get("/projects/default/vms/late").await;
    assert_eq!(late["status"]["phase"], "stopped", "{late}");

    // host-a has no room: a VM whose disk only host-a reaches cannot start, and is left as it was.
    let (status, err) = start("homebody").await;
    assert_eq!(status, 409, "{err}");
    let msg = err["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("host host-a has 0 vCPUs")
            && msg.contains("only host-a reaches")
            && msg.contains("stop a VM on host-a"),
        "{msg}"
    );
    let homebody = c.get("/projects/default/vms/homebody").await;
    assert_eq!(homebody["spec"]["power"], "stopped", "{homebody}");
    assert_eq!(homebody["status"]["host"], "host-a", "{homebody}");
    // A VM whose disk every host reaches starts where there is room, and says why it moved.
    let (status, task) = start("roamer").await;
    assert_eq!(status, 202, "{task}");
    assert_eq!(c.task_end(&task).await["state"], "succeeded", "{task}");
    assert_eq!(c.runs_on("roamer").await, "host-b");
    let roamer = c.get("/projects/default/vms/roamer").await;
    assert!(
        roamer["status"]["events"]
            .to_string()
            .contains("host-a has no room to run it now: moved to host-b"),
        "{roamer}"
    );
    // Room made on host-a: the same start goes through there.
    let (status, task) = c
        .call(
            "POST",
            "/projects/default/vms/run-0/stop",
            Some(Body::Json(json!({"force": true}))),
        )
        .await;
    assert_eq!(status, 202, "{task}");
    assert_eq!(c.task_end(&task).await["state"], "succeeded", "{task}");
    let (status, task) = start("homebody").await;
    assert_eq!(status, 202, "{task}");
    assert_eq!(c.task_end(&task).await["state"], "succeeded", "{task}");
    assert_eq!(c.runs_on("homebody").await, "host-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_and_maintenance_empties_its_host() {
    let c = Cluster::start(&["host-a", "host-b", "host-c"]).await;
    let pack = json!({"placement": "pack", "cpu_overcommit": 4.0, "memory_overcommit": 1.0});
    assert_eq!(
        c.call("PUT", "/cluster", Some(Body::Json(pack))).await.0,
        200
    );
    for name in ["m1", "m2", "m3"] {
        let (status, task) = c.create(name, "128M").await;
        assert_eq!(status, 202);
        assert_eq!(c.task_end(&task).await["state"], "succeeded");
    }
    let home = c.runs_on("m1").await;
    assert_eq!(c.runs_on("m2").await, home);
    let other = if home == "host-a" { "host-b" } else { "host-a" };

    let (status, task) = c.migrate("m1", Some(other)).await;
    assert_eq!(status, 202, "{task}");
    let done = c.task_end(&task).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        done["message"].as_str().unwrap_or("").contains("migrated"),
        "{done}"
    );
    assert_eq!(c.runs_on("m1").await, other);
    let m1 = c.get("/projects/default/vms/m1").await;
    assert!(
        m1["status"]["events"].to_string().contains("Migrated"),
        "{m1}"
    );
    let m = c.get("/projects/default/vms/m1/migration").await;
    assert_eq!(
        (m["phase"].as_str(), m["source"].as_str()),
        (Some("completed"), Some(home.as_str()))
    );

    // Bad requests: a sentence, and nothing changes.
    let (status, body) = c.migrate("m1", Some(other)).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("already runs on"),
        "{body}"
    );
    let (status, body) = c.migrate("m1", Some("host-z")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["message"], "there is no host host-z", "{body}");
    let (status, _) = c.migrate("nope", None).await;
    assert_eq!(status, 404);
    assert_eq!(c.runs_on("m1").await, other);

    // Maintenance moves every running VM off the host, two at a time.
    let (status, r) = c
        .call(
            "PUT",
            &format!("/hosts/{home}/maintenance"),
            Some(Body::Json(json!({"maintenance": true}))),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let done = c.task_end(&r["task"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(c.get(&format!("/hosts/{home}")).await["vms"], json!([]));
    for name in ["m1", "m2", "m3"] {
        assert_ne!(c.runs_on(name).await, home);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_cancelled_migrations_leave_the_vm_running_on_its_source() {
    let c = Cluster::start(&["host-a", "host-b"]).await;
    let (_, task) = c.create("f1", "128M").await;
    assert_eq!(c.task_end(&task).await["state"], "succeeded");
    let home = c.runs_on("f1").await;
    let other = if home == "host-a" { "host-b" } else { "host-a" };

    // The cluster's migration policy reaches QEMU.
    let policy = json!({"placement": "spread", "cpu_overcommit": 4.0, "memory_overcommit": 1.0,
        "migration_auto_converge": false, "migration_downtime_limit_ms": 30});
    assert_eq!(
        c.call("PUT", "/cluster", Some(Body::Json(policy))).await.0,
        200
    );
    c.driver(&home)
        .fail_next_migration("connection reset by peer");
    let (_, task) = c.migrate("f1", None).await;
    let done = c.task_end(&task).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap_or("")
            .contains("connection reset"),
        "{done}"
    );
    wait_until!(c.runs_on("f1").await == home);
    let f1 = c.get("/projects/default/vms/f1").await;
    assert!(
        f1["status"]["events"]
            .to_string()
            .contains("MigrationFailed"),
        "{f1}"
    );
    let sent = c.driver(&home).calls();
    assert!(
        sent.iter()
            .any(|c| c.ends_with("auto-converge=false downtime=30ms")),
        "{sent:?}"
    );

    c.driver(&home).hold_migrations(true);
    let (_, task) = c.migrate("f1", Some(other)).await;
    wait_until!(c.get("/projects/default/vms/f1/migration").await["phase"] == "transferring");
    let id = task["id"].as_str().expect("id");
    let (status, _) = c.call("POST", &format!("/tasks/{id}/cancel"), None).await;
    assert_eq!(status, 202);
    let done = c.task_end(&task).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    c.driver(&home).hold_migrations(false);
    assert_eq!(c.runs_on("f1").await, home);
    let (status, body) = c.call("POST", &format!("/tasks/{id}/cancel"), None).await;
    assert_eq!(status, 409, "a finished task: {body}");

    // A VM that does not run cannot be live-migrated.
    let (_, stop) = c
        .call(
            "POST",
            "/projects/default/vms/f1/stop",
            Some(Body::Json(json!({"force": true}))),
        )
        .await;
    c.task_end(&stop).await;
    let (status, body) = c.migrate("f1", None).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("not running"),
        "{body}"
    );
}
