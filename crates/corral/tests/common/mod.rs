//! A throwaway all-in-one datacenter for tests and benchmarks: its own data dir, config dir and port,
//! a real `corral up` process, and the real CLI. Dropping it stops Corral and kills every QEMU that
//! belongs to its data dir, also when the test failed.
#![allow(dead_code)]

pub mod ceph;
pub mod lifecycle;
pub mod netlab;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_corral");
pub const READY: &str = corral_jeos::READY_MARKER;

pub struct Lab {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Port of the agent endpoint, for labs whose hosts join as separate agents.
    pub agent_port: Option<u16>,
    server: Option<Child>,
    agents: Vec<(String, Child)>,
    /// More arguments for the controller, and its environment.
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Lab {
    /// Starts `corral up` in a fresh directory (under /tmp: socket paths must stay short).
    pub fn start() -> Lab {
        Lab::launch(None, Vec::new(), Vec::new())
    }

    /// Starts `corral controller` with an agent endpoint and no host; hosts come with `join`.
    pub fn controller() -> Lab {
        Lab::controller_with(&[], &[])
    }

    /// A controller lab with more arguments (e.g. simulated hosts) and environment variables.
    pub fn controller_with(args: &[&str], env: &[(&str, &str)]) -> Lab {
        let extra = args.iter().map(|s| s.to_string()).collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Lab::launch(Some(free_port()), extra, env)
    }

    fn launch(agent_port: Option<u16>, extra: Vec<String>, env: Vec<(String, String)>) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("corral-test-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut lab = Lab {
            dir,
            port: free_port(),
            agent_port,
            server: None,
            agents: vec![],
            extra,
            env,
        };
        lab.up();
        lab
    }

    pub fn agent_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.agent_port.expect("a controller lab")
        )
    }

    /// Starts a host agent process that joins this lab's controller as `host`.
    pub fn join(&mut self, host: &str) {
        let token = self.cli(&["host", "join-token"]).trim().to_string();
        self.start_agent(host, Some(&token));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.try_cli(&["host", "show", host, "-o", "json"]);
            let state = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .map(|h| h["state"].clone());
            if state.is_some_and(|s| s == "connected") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "host {host} did not connect:\n{}",
                self.agent_log(host)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts (or restarts) the agent of `host`; without a token it uses the credentials it has.
    pub fn start_agent(&mut self, host: &str, token: Option<&str>) {
        let dir = self.dir.path().join("hosts").join(host);
        std::fs::create_dir_all(&dir).expect("host dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .expect("log");
        let mut cmd = Command::new(BIN);
        cmd.args([
            "agent",
            "--accel",
            "tcg",
            "--stop-timeout",
            "15",
            "--host-name",
            host,
            "--join",
            &self.agent_url(),
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        self.agents
            .push((host.to_string(), cmd.spawn().expect("corral agent starts")));
    }

    /// Starts one `corral agent --simulate` process running `n` simulated hosts PREFIX-1..n, each
    /// joining with its own token.
    pub fn start_sim_agents(&mut self, prefix: &str, n: u32, extra: &[&str]) {
        let tokens: Vec<String> = (0..n)
            .map(|_| self.cli(&["host", "join-token"]).trim().to_string())
            .collect();
        let dir = self.dir.path().join("hosts").join(prefix);
        std::fs::create_dir_all(&dir).expect("sim dir");
        let log = std::fs::File::create(dir.join("agent.log")).expect("log");
        let child = Command::new(BIN)
            .args(["agent", "--simulate", "--sim-prefix", prefix, "--join"])
            .arg(self.agent_url())
            .arg("--sim-hosts")
            .arg(n.to_string())
            .arg("--token")
            .arg(tokens.join(","))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("corral agent --simulate starts");
        self.agents.push((prefix.to_string(), child));
    }

    /// Waits until `hosts` are connected.
    pub fn wait_connected(&self, hosts: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = self.json(&["host", "list"]);
            let connected = |h: &&str| {
                list.as_array().is_some_and(|l| {
                    l.iter()
                        .any(|i| i["name"] == *h && i["state"] == "connected")
                })
            };
            if hosts.iter().all(connected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hosts {hosts:?} did not connect: {list}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills the agent process of `host` (its VMs stay).
    pub fn kill_agent(&mut self, host: &str) {
        for (h, c) in self.agents.iter_mut().filter(|(h, _)| h == host) {
            let _ = c.kill();
            let _ = c.wait();
            let _ = h;
        }
        self.agents.retain(|(h, _)| h != host);
    }

    pub fn agent_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("hosts").join(host).join("agent.log"))
            .unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// (Re)starts the `corral up` process and waits for the API.
    pub fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .expect("log");
        let mut cmd = Command::new(BIN);
        match self.agent_port {
            None => cmd.args([
                "up",
                "--accel",
                "tcg",
                "--host-name",
                "test-host",
                "--stop-timeout",
                "15",
            ]),
            Some(p) => cmd
                .args(["controller", "--agent-listen"])
                .arg(format!("127.0.0.1:{p}")),
        };
        let child = cmd
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("XDG_CONFIG_HOME", self.config_home())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("corral up starts");
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.try_cli(&["host", "list"]).status.success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "corral up did not come up in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the `corral up` process the hard way (as a crash or power loss of the control plane).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops `corral up` as Ctrl-C does.
    pub fn interrupt(&mut self) {
        if let Some(mut c) = self.server.take() {
            signal(c.id(), libc::SIGINT);
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// Runs the CLI against this lab.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("XDG_CONFIG_HOME", self.config_home())
            .env_remove("CORRAL_URL")
            .env_remove("CORRAL_TOKEN")
            .output()
            .expect("corral runs")
    }

    /// Runs the CLI and insists it succeeds.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "corral {} failed:\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A 64M image `tiny` and a shared datastore `nfs`: all a simulated VM needs.
    pub fn tiny_image_and_shared_datastore(&self) {
        let img = self.blank_qcow2("tiny.qcow2", "64M");
        self.cli(&["image", "import", "tiny", img.to_str().expect("utf-8")]);
        let ds = self.dir.path().join("shared");
        std::fs::create_dir_all(&ds).expect("datastore dir");
        let ds = ds.to_str().expect("utf-8");
        self.cli(&["datastore", "create", "nfs", "--path", ds, "--shared"]);
    }

    /// An empty qcow2 disk of `size` (e.g. "16M") in the lab's directory.
    pub fn blank_qcow2(&self, name: &str, size: &str) -> PathBuf {
        let img = self.dir.path().join(name);
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg(size)
            .status()
            .expect("qemu-img runs (scripts/setup.sh installs it)");
        assert!(made.success(), "qemu-img create {}", img.display());
        img
    }

    /// The controller's (or `corral up`'s) process id while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// GETs an API path (e.g. "/api/v1/hosts") with the admin token: the status and the JSON body.
    pub fn api_get(&self, path: &str) -> (u16, Value) {
        let token = std::fs::read_to_string(self.data_dir().join("admin-token")).expect("token");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut res = agent
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .header("Authorization", format!("Bearer {}", token.trim()))
            .call()
            .expect("the API answers");
        let body = res.body_mut().read_json().unwrap_or(Value::Null);
        (res.status().as_u16(), body)
    }

    /// Runs the CLI with `-o json` and parses what it printed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.cli(&a)).expect("valid JSON")
    }

    /// Runs the CLI, insists it fails, and returns its error message.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            !out.status.success(),
            "corral {} should have failed",
            args.join(" ")
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn build_jeos(&self) {
        self.cli(&["image", "build-jeos"]);
    }

    pub fn vm(&self, name: &str) -> Value {
        self.json(&["vm", "show", name])
    }

    pub fn console(&self, name: &str) -> String {
        self.cli(&["vm", "console", name])
    }

    /// Waits until the VM's console holds `marker` `count` times.
    pub fn wait_console(
        &self,
        name: &str,
        marker: &str,
        count: usize,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console(name);
            if text.matches(marker).count() >= count {
                return text;
            }
            assert!(Instant::now() < deadline, "VM {name}: {marker:?} x{count} not on the console after {timeout:?}; console:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deletes a VM (with `extra` flags) and waits until it is gone.
    pub fn delete_vm(&self, name: &str, extra: &[&str]) {
        let mut args = vec!["vm", "delete", name];
        args.extend(extra);
        self.cli(&args);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_cli(&["vm", "show", name]).status.success() {
            assert!(Instant::now() < deadline, "VM {name} was not deleted");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn run_dir(&self, name: &str) -> PathBuf {
        let vm = self.vm(name);
        PathBuf::from(vm["status"]["run_dir"].as_str().expect("run dir"))
    }

    /// Types a command on the guest's serial console and returns the value it prints as `KEY=value`.
    pub fn guest_value(&self, name: &str, key: &str, command: &str) -> String {
        let sock = corral_hypervisor::serial_socket(&self.run_dir(name));
        let before = self.console(name).len();
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("serial socket");
        writeln!(s, "echo {key}=$({command})").expect("type");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.console(name);
            let fresh = text.get(before..).unwrap_or("");
            let found = fresh
                .lines()
                .filter_map(|l| l.split_once(&format!("{key}=")))
                .map(|(_, v)| v.trim())
                .find(|v| !v.is_empty() && !v.starts_with("$("));
            if let Some(v) = found {
                return v.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not answer {command:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// QEMU processes whose command line mentions this lab's directory (its hosts' data dirs too).
    pub fn qemu_pids(&self) -> Vec<u32> {
        pids_matching(&self.dir.path().display().to_string())
    }
}

/// The message of a VM's `Scheduled` condition: why it waits, or where it was placed.
pub fn scheduled_reason(vm: &Value) -> String {
    vm["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Scheduled"))
        .and_then(|c| c["message"].as_str())
        .unwrap_or("")
        .to_string()
}

pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(needle) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

pub use corral_hypervisor::process_alive as alive;

/// A client of the agent endpoint with a host's certificate, making raw calls as any host (a
/// compromised one too) can.
pub struct HostClient {
    pub url: String,
    agent: ureq::Agent,
}

impl HostClient {
    /// A client for the endpoint at `url` with the host's certificate and key and the cluster CA.
    pub fn new(url: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> HostClient {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[
                ureq::tls::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"),
            ]))
            .client_cert(Some(ureq::tls::ClientCert::new_with_certs(
                &[ureq::tls::Certificate::from_pem(cert_pem.as_bytes()).expect("cert")],
                ureq::tls::PrivateKey::from_pem(key_pem.as_bytes()).expect("key"),
            )))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        HostClient {
            url: url.to_string(),
            agent,
        }
    }

    /// The status a GET of `path` answers.
    pub fn status(&self, path: &str) -> u16 {
        self.agent
            .get(format!("{}{path}", self.url))
            .call()
            .expect("call")
            .status()
            .as_u16()
    }

    /// A stored object and its revision.
    pub fn get(&self, key: &str) -> (Value, u64) {
        let kv: Value = self
            .agent
            .get(format!("{}/agent/v1/get?key={key}", self.url))
            .call()
            .expect("get")
            .body_mut()
            .read_json()
            .expect("kv");
        let bytes: Vec<u8> = serde_json::from_value(kv["value"].clone()).expect("bytes");
        (
            serde_json::from_slice(&bytes).expect("json"),
            kv["mod_revision"].as_u64().expect("rev"),
        )
    }

    /// POSTs `body` to `path`: the status and what the endpoint said.
    pub fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let mut res = self
            .agent
            .post(format!("{}{path}", self.url))
            .send_json(body)
            .expect("post");
        let body = res.body_mut().read_to_string().unwrap_or_default();
        (res.status().as_u16(), body)
    }

    /// Sends a write of the host protocol (`HostWrite` as JSON).
    pub fn write(&self, write: &Value) -> (u16, String) {
        self.post("/agent/v1/write", write)
    }

    /// Reports `status` as the observed status of VM `name` (project default), read at `rev`.
    pub fn vm_status(&self, name: &str, rev: u64, status: &Value) -> (u16, String) {
        self.write(&serde_json::json!({
            "kind": "vm_status", "vm": { "project": "default", "name": name },
            "revision": rev, "status": status,
        }))
    }
}

/// Waits until `cond` holds, or fails saying it gave up waiting for `what`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client of the agent endpoint without a certificate, that does not check the controller's
/// either: what a stranger (or a host before it joins) has.
pub fn insecure_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .disable_verification(true)
                .build(),
        )
        .http_status_as_error(false)
        .build()
        .into()
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with plain integers.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.crash();
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.qemu_pids() {
            signal(pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.qemu_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        corral_hypervisor::remove_socket_dirs(self.dir.path());
    }
}
