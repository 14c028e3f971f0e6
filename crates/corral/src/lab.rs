//! `corral lab`: a multi-host cluster on one machine. Each host is a Linux network namespace with its
//! own address on a lab fabric bridge, running a real `corral agent` joined (over mutually
//! authenticated TLS, across the fabric) to a `corral controller` in the root namespace. It is how
//! tests run multi-host scenarios and how a newcomer tries the cluster on one laptop.
//!
//! Everything it creates is named after the lab and recorded in `lab.json` in the lab's directory,
//! so `corral lab down` removes exactly that, also after a crash.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use corral_hypervisor::process_alive as alive;

use crate::client::{config_path, ClientConfig};

#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Build a lab: a controller and N hosts, each a network namespace on a fabric bridge.
    Up(UpArgs),
    /// Show the lab's hosts: namespace, agent process, and state as the controller sees it.
    Status(LabRef),
    /// Remove everything the lab created: processes, VMs, namespaces, links, its directory.
    Down(LabRef),
    /// Break a host on purpose, to watch HA at work (and mend it with `heal`).
    Fault(FaultArgs),
    /// Kill the lab's controller and start it again (its store survives; agents reconnect).
    RestartController(LabRef),
}

#[derive(Args, Debug)]
pub struct FaultArgs {
    #[command(flatten)]
    lab: LabRef,
    /// The host, e.g. host-1.
    host: String,
    #[arg(value_enum)]
    kind: FaultKind,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum FaultKind {
    /// The host dies: its agent and all its guests are killed and its fabric link goes down.
    Kill,
    /// The host's fabric link goes down: it loses the controller and every peer.
    Isolate,
    /// Only the path to the controller is cut; its peers still reach it.
    CutController,
    /// Undo the faults: link up, route back, the agent started again if it was killed.
    Heal,
}

#[derive(Args, Debug)]
pub struct LabRef {
    /// Lab name: 1 to 6 lowercase letters or digits.
    #[arg(long, default_value = "lab")]
    name: String,
    /// Where labs keep their state (default: $XDG_DATA_HOME/corral-labs or ~/.local/share/corral-labs).
    #[arg(long, env = "CORRAL_LAB_DIR")]
    dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    lab: LabRef,
    /// Number of hosts.
    #[arg(long, default_value_t = 3)]
    hosts: u8,
    /// Third octet of the fabric network 10.77.X.0/24 (labs side by side need different ones).
    #[arg(long, default_value_t = 0)]
    net: u8,
    /// Port of the controller's API on 127.0.0.1.
    #[arg(long, default_value_t = 7480)]
    port: u16,
    /// Accelerator for the hosts' guests.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Simulated hosts besides the real ones (sim-1 .. sim-N, up to 10,000): one `corral agent
    /// --simulate` process whose hosts join over TLS like real ones, each with its own certificate.
    #[arg(long, default_value_t = 0)]
    sim_hosts: u32,
    /// CPU demand of the simulated VMs (see `corral agent --help`, --sim-load).
    #[arg(long, default_value = "")]
    sim_load: String,
}

/// Simulated hosts live in this file's directory; `corral lab fault` kills them through it.
const SIM_FAULTS: &str = "sim-faults";

/// What a lab created, so that `down` can remove it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LabState {
    name: String,
    bridge: String,
    api: String,
    controller_pid: Option<u32>,
    /// How the controller was started, to start it again.
    #[serde(default)]
    controller_args: Vec<String>,
    hosts: Vec<LabHost>,
    /// The simulated hosts' agent process, and how many hosts it runs.
    #[serde(default)]
    sim_pid: Option<u32>,
    #[serde(default)]
    sim_hosts: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct LabHost {
    name: String,
    netns: String,
    veth: String,
    address: String,
    agent_pid: Option<u32>,
    /// How its agent was started (without the join token), to start it again.
    #[serde(default)]
    agent_args: Vec<String>,
}

impl LabRef {
    fn root(&self) -> Result<PathBuf> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 6
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            bail!("invalid lab name {:?}: use 1 to 6 lowercase letters or digits (it becomes part of interface names)", self.name);
        }
        let base = self.dir.clone().unwrap_or_else(|| {
            std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                        .join(".local/share")
                })
                .join("corral-labs")
        });
        Ok(base.join(&self.name))
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts a long-running process detached from this one (its own session), logging to `log`.
fn spawn_detached(
    netns: Option<&str>,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> Result<u32> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "setsid"]);
            c
        }
        None => Command::new("setsid"),
    };
    let exe = std::env::current_exe().context("finding the corral binary")?;
    let child = cmd
        .arg(exe)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("starting a lab process (needs `setsid` from util-linux)")?;
    Ok(child.id())
}

/// Whether `pid` is a process of this lab: its command line names the lab's directory.
fn of_lab(pid: u32, root: &Path) -> bool {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmd).contains(&format!("{}/", root.display()))
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
        // Gone before `lab down` says it is done (a killed process lets go of its files last).
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn save(root: &Path, state: &LabState) -> Result<()> {
    std::fs::write(root.join("lab.json"), serde_json::to_vec_pretty(state)?)
        .context("writing lab.json")
}

fn load(root: &Path) -> Result<LabState> {
    let bytes = std::fs::read(root.join("lab.json"))
        .with_context(|| format!("no lab at {} (is it up?)", root.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

pub fn run(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up(args) => up(args),
        LabCmd::Status(r) => status(&r),
        LabCmd::Down(r) => down(&r),
        LabCmd::Fault(f) => fault(&f),
        LabCmd::RestartController(r) => restart_controller(&r),
    }
}

/// Kills with SIGKILL: a failure, not a shutdown.
fn kill_now(pid: u32) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status();
}

fn fault(f: &FaultArgs) -> Result<()> {
    let root = f.lab.root()?;
    let mut state = load(&root)?;
    if let Some(n) = f
        .host
        .strip_prefix("sim-")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| (1..=state.sim_hosts).contains(n))
    {
        return sim_fault(&root, &format!("sim-{n}"), f.kind);
    }
    // The controller listens on the fabric's .1.
    let controller = state
        .hosts
        .first()
        .and_then(|h| h.address.rsplit_once('.'))
        .map(|(prefix, _)| format!("{prefix}.1/32"))
        .context("lab.json has no hosts")?;
    let Some(i) = state.hosts.iter().position(|h| h.name == f.host) else {
        bail!(
            "lab {} has no host {}: see `corral lab status`",
            state.name,
            f.host
        );
    };
    let h = &state.hosts[i];
    match f.kind {
        FaultKind::Kill => {
            if let Some(pid) = h.agent_pid.filter(|p| of_lab(*p, &root)) {
                kill_now(pid);
            }
            let needle = format!("{}/", root.join("hosts").join(&h.name).display());
            for pid in qemu_pids(&needle) {
                kill_now(pid);
            }
            ip(&["link", "set", &h.veth, "down"])?;
            state.hosts[i].agent_pid = None;
            save(&root, &state)?;
        }
        FaultKind::Isolate => ip(&["link", "set", &h.veth, "down"])?,
        FaultKind::CutController => ip(&["-n", &h.netns, "route", "add", "prohibit", &controller])?,
        FaultKind::Heal => {
            let _ = ip(&["-n", &h.netns, "route", "del", "prohibit", &controller]);
            ip(&["link", "set", &h.veth, "up"])?;
            if !h.agent_pid.is_some_and(|p| of_lab(p, &root)) {
                let host_dir = root.join("hosts").join(&h.name);
                let pid = spawn_detached(
                    Some(&h.netns),
                    &h.agent_args,
                    &[],
                    &host_dir.join("agent.log"),
                )?;
                state.hosts[i].agent_pid = Some(pid);
                save(&root, &state)?;
            }
        }
    }
    println!("{}: {:?}", f.host, f.kind);
    Ok(())
}

/// A fault of a simulated host: it dies (stops heartbeating, reporting and acting) or comes back.
fn sim_fault(root: &Path, host: &str, kind: FaultKind) -> Result<()> {
    let file = root.join(SIM_FAULTS);
    let mut dead: Vec<String> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l != host)
        .map(str::to_string)
        .collect();
    match kind {
        FaultKind::Kill => dead.push(host.to_string()),
        FaultKind::Heal => {}
        FaultKind::Isolate | FaultKind::CutController => bail!(
            "simulated hosts have no network of their own: they can be killed and healed only"
        ),
    }
    let body: String = dead.iter().map(|h| format!("{h}\n")).collect();
    let tmp = file.with_extension("part");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, &file)?;
    println!("{host}: {kind:?}");
    Ok(())
}

/// Starts the lab's controller as recorded in `state`, and records its pid.
fn start_controller(root: &Path, state: &mut LabState) -> Result<u32> {
    let log = root.join("controller.log");
    let pid = spawn_detached(None, &state.controller_args, &[], &log)?;
    state.controller_pid = Some(pid);
    save(root, state)?;
    Ok(pid)
}

fn restart_controller(r: &LabRef) -> Result<()> {
    let root = r.root()?;
    let mut state = load(&root)?;
    if let Some(pid) = state.controller_pid.filter(|p| of_lab(*p, &root)) {
        kill_now(pid);
        while alive(pid) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let pid = start_controller(&root, &mut state)?;
    println!("controller restarted (pid {pid})");
    Ok(())
}

/// QEMU processes whose command line holds `needle` (a directory of the lab).
fn qemu_pids(needle: &str) -> Vec<u32> {
    pids_of("qemu-system", needle)
}

/// Processes of `program` whose command line holds `needle`.
fn pids_of(program: &str, needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.starts_with(program) && cmd.contains(needle)).then_some(pid)
        })
        .collect()
}

fn up(args: UpArgs) -> Result<()> {
    let root = args.lab.root()?;
    let name = &args.lab.name;
    if root.join("lab.json").exists() {
        bail!("lab {name} is already up: `corral lab down --name {name}` first");
    }
    if args.hosts > 50 || args.sim_hosts > 10_000 || args.hosts as u32 + args.sim_hosts == 0 {
        bail!("--hosts must be 0 to 50 and --sim-hosts 0 to 10000, with at least one host in all");
    }
    // Names another lab (or anything else) uses are not ours to create, nor to remove later.
    let bridge = format!("clab-{name}");
    if Path::new("/sys/class/net").join(&bridge).exists() {
        bail!("the link {bridge} already exists: another lab named {name} runs here; pick another --name");
    }
    for i in 1..=args.hosts {
        let ns = format!("corral-{name}-host-{i}");
        if Path::new("/run/netns").join(&ns).exists() {
            bail!("the network namespace {ns} already exists: pick another --name");
        }
    }
    let result = build(&args);
    if result.is_err() && root.join("lab.json").exists() {
        // Leave nothing half built behind.
        if let Err(e) = down(&args.lab) {
            eprintln!("cleaning up the failed lab: {e:#}");
        }
    }
    result
}

fn build(args: &UpArgs) -> Result<()> {
    let root = args.lab.root()?;
    std::fs::create_dir_all(&root)?;
    let name = &args.lab.name;
    let prefix = format!("10.77.{}", args.net);
    let mut state = LabState {
        name: name.clone(),
        bridge: format!("clab-{name}"),
        api: format!("http://127.0.0.1:{}", args.port),
        ..Default::default()
    };
    save(&root, &state)?;
    // From here on, a failure leaves a lab.json that `lab down` can clean up after.
    ip(&["link", "add", &state.bridge, "type", "bridge"])?;
    ip(&[
        "addr",
        "add",
        &format!("{prefix}.1/24"),
        "dev",
        &state.bridge,
    ])?;
    ip(&["link", "set", &state.bridge, "up"])?;
    for i in 1..=args.hosts {
        let host = LabHost {
            name: format!("host-{i}"),
            netns: format!("corral-{name}-host-{i}"),
            veth: format!("cl{name}-{i}"),
            address: format!("{prefix}.{}", 10 + i as u32),
            agent_pid: None,
            agent_args: Vec::new(),
        };
        state.hosts.push(host);
        save(&root, &state)?;
        let h = state.hosts.last().context("host")?;
        ip(&["netns", "add", &h.netns])?;
        ip(&[
            "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.netns,
        ])?;
        ip(&["link", "set", &h.veth, "master", &state.bridge, "up"])?;
        ip(&[
            "-n",
            &h.netns,
            "addr",
            "add",
            &format!("{}/24", h.address),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &h.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
    }
    let controller_dir = root.join("controller");
    let agent_url = format!("https://{prefix}.1:7443");
    state.controller_args = vec![
        "controller".into(),
        "--data-dir".into(),
        controller_dir.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{}", args.port),
        "--agent-listen".into(),
        format!("{prefix}.1:7443"),
    ];
    let pid = start_controller(&root, &mut state)?;
    // The controller writes the client config when it is up.
    let token_file = controller_dir.join("admin-token");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        if let Ok(t) = std::fs::read_to_string(&token_file) {
            let c = crate::client::Client::new(Some(state.api.clone()), Some(t.trim().to_string()));
            if c.get::<serde_json::Value>("/hosts").is_ok() {
                break c;
            }
        }
        if !alive(pid) || Instant::now() > deadline {
            bail!(
                "the lab controller did not start; see {}",
                root.join("controller.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for i in 0..state.hosts.len() {
        let token: corral_controller::agents::JoinToken =
            client.post("/hosts/join-tokens", &serde_json::json!({}))?;
        let h = &state.hosts[i];
        let host_dir = root.join("hosts").join(&h.name);
        std::fs::create_dir_all(&host_dir)?;
        let agent_args: Vec<String> = vec![
            "agent".into(),
            "--join".into(),
            agent_url.clone(),
            "--host-name".into(),
            h.name.clone(),
            "--data-dir".into(),
            host_dir.join("data").display().to_string(),
            "--accel".into(),
            args.accel.clone(),
            "--address".into(),
            h.address.clone(),
        ];
        let pid = spawn_detached(
            Some(&h.netns),
            &agent_args,
            // In the environment, not on the command line where every local user could read it.
            &[("CORRAL_JOIN_TOKEN", token.token.as_str())],
            &host_dir.join("agent.log"),
        )?;
        state.hosts[i].agent_args = agent_args;
        state.hosts[i].agent_pid = Some(pid);
        save(&root, &state)?;
    }
    if args.sim_hosts > 0 {
        start_sim(args, &root, &mut state, &client, &agent_url)?;
    }
    let all = state.hosts.len() + state.sim_hosts as usize;
    // Joining takes a key pair and a certificate per host: allow for many simulated ones.
    let deadline = Instant::now() + Duration::from_secs(60 + u64::from(state.sim_hosts) / 20);
    loop {
        let hosts: Vec<corral_api::HostInfo> = client.get("/hosts")?;
        let connected = hosts
            .iter()
            .filter(|h| h.state == corral_api::HostState::Connected)
            .count();
        if connected == all {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {connected} of {all} hosts connected; see the agent logs under {}",
                root.join("hosts").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(root.join("sim").join("tokens"));
    let cfg = std::fs::read(config_path())
        .ok()
        .and_then(|b| serde_json::from_slice::<ClientConfig>(&b).ok());
    println!(
        "lab {name} is up: controller {} (agents join at {agent_url}), {} hosts:",
        state.api,
        state.hosts.len()
    );
    for h in &state.hosts {
        println!("  {}  {}  netns {}", h.name, h.address, h.netns);
    }
    if state.sim_hosts > 0 {
        println!(
            "  sim-1 .. sim-{}  simulated (`corral lab fault sim-N kill|heal`)",
            state.sim_hosts
        );
    }
    if cfg.is_some_and(|c| c.url == state.api) {
        println!(
            "client commands now talk to this lab ({}).",
            config_path().display()
        );
    }
    println!("`corral lab down --name {name}` removes it.");
    Ok(())
}

/// Starts the simulated hosts' agent, with a join token per host in a private file.
fn start_sim(
    args: &UpArgs,
    root: &Path,
    state: &mut LabState,
    client: &crate::client::Client,
    agent_url: &str,
) -> Result<()> {
    let dir = root.join("sim");
    std::fs::create_dir_all(&dir)?;
    let mut tokens = String::new();
    for _ in 0..args.sim_hosts {
        let t: corral_controller::agents::JoinToken =
            client.post("/hosts/join-tokens", &serde_json::json!({}))?;
        tokens.push_str(&t.token);
        tokens.push('\n');
    }
    let token_file = dir.join("tokens");
    crate::client::write_private(&token_file, tokens.as_bytes())?;
    let mut sim_args: Vec<String> = vec![
        "agent".into(),
        "--simulate".into(),
        "--join".into(),
        agent_url.to_string(),
        "--sim-hosts".into(),
        args.sim_hosts.to_string(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--sim-faults".into(),
        root.join(SIM_FAULTS).display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
    ];
    if !args.sim_load.is_empty() {
        sim_args.extend(["--sim-load".into(), args.sim_load.clone()]);
    }
    let pid = spawn_detached(None, &sim_args, &[], &dir.join("agent.log"))?;
    state.sim_pid = Some(pid);
    state.sim_hosts = args.sim_hosts;
    save(root, state)
}

fn status(r: &LabRef) -> Result<()> {
    let root = r.root()?;
    let state = load(&root)?;
    let token = std::fs::read_to_string(root.join("controller/admin-token")).unwrap_or_default();
    let client =
        crate::client::Client::new(Some(state.api.clone()), Some(token.trim().to_string()));
    let hosts: Vec<corral_api::HostInfo> = client.get("/hosts").unwrap_or_default();
    let ctl = state.controller_pid.is_some_and(alive);
    println!(
        "lab {}: controller {} ({})",
        state.name,
        state.api,
        if ctl { "running" } else { "not running" }
    );
    if state.sim_hosts > 0 {
        let connected = hosts
            .iter()
            .filter(|h| h.host.status.hypervisor == corral_sim::HYPERVISOR)
            .filter(|h| h.state == corral_api::HostState::Connected)
            .count();
        println!(
            "  sim-1 .. sim-{}  simulated, agent {}, {connected} connected",
            state.sim_hosts,
            if state.sim_pid.is_some_and(alive) {
                "running"
            } else {
                "not running"
            }
        );
    }
    for h in &state.hosts {
        let ns = Path::new("/run/netns").join(&h.netns).exists();
        let agent = h.agent_pid.is_some_and(alive);
        let seen = hosts
            .iter()
            .find(|i| i.host.name == h.name)
            .map(|i| format!("{:?}", i.state).to_lowercase())
            .unwrap_or_else(|| "unknown".into());
        println!(
            "  {}  {}  netns {}  agent {}  {}  VMs: {}",
            h.name,
            h.address,
            if ns { "present" } else { "missing" },
            if agent { "running" } else { "not running" },
            seen,
            hosts
                .iter()
                .find(|i| i.host.name == h.name)
                .map_or(0, |i| i.vms.len())
        );
    }
    Ok(())
}

fn down(r: &LabRef) -> Result<()> {
    let root = r.root()?;
    let state = load(&root)?;
    // Recorded pids are checked first: after a reboot they may belong to someone else.
    let pids = state
        .hosts
        .iter()
        .filter_map(|h| h.agent_pid)
        .chain(state.sim_pid)
        .chain(state.controller_pid);
    for pid in pids.filter(|p| of_lab(*p, &root)) {
        kill(pid);
    }
    // Guests and DHCP servers of the lab's hosts: their command lines name the lab directory.
    let needle = format!("{}/", root.display());
    for pid in qemu_pids(&needle)
        .into_iter()
        .chain(pids_of("dnsmasq", &needle))
    {
        kill(pid);
    }
    for h in &state.hosts {
        let _ = ip(&["link", "del", &h.veth]);
        let _ = ip(&["netns", "del", &h.netns]);
    }
    let _ = ip(&["link", "del", &state.bridge]);
    corral_hypervisor::remove_socket_dirs(&root);
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    println!("lab {} removed", state.name);
    Ok(())
}
