//! `corral`: the one binary. `up` runs an all-in-one datacenter (controller, host agent and embedded
//! store in one process); `controller` runs the control plane alone; the other subcommands are the
//! client, talking to the REST API.

mod client;
mod lab;
mod output;
mod serve;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use corral_api::{ApplyDrsRequest, ApplyDrsResponse, DrsMode, DrsPlan, PowerManagement};
use corral_api::{
    BuildJeosRequest, ClusterEvent, ClusterSettings, ConsoleChunk, CreateDatastoreRequest,
    CreateGroupRequest, CreateVmRequest, Datastore, GroupRule, GroupStrength, HaPolicy, HaPriority,
    HostInfo, Image, IsolationResponse, MaintenanceResponse, MigrateVmRequest, Migration,
    MoveStorageRequest, PlacementPolicy, StopVmRequest, Task, Vm, VmGroup,
};
use corral_api::{
    CreateNetworkRequest, CreateProjectRequest, CreateSecurityGroupRequest, Network, NicRequest,
    SecurityGroup, SecurityRule, SetRulesRequest,
};

use client::Client;
use output::Format;

#[derive(Parser, Debug)]
#[command(
    name = "corral",
    version,
    about = "Corral: an open virtual datacenter OS"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// API address (default: the config written by `corral up`, else http://127.0.0.1:7480).
    #[arg(long, env = "CORRAL_URL", global = true)]
    url: Option<String>,
    /// API token (default: the config written by `corral up`).
    #[arg(long, env = "CORRAL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Project (tenant) to act in.
    #[arg(long, env = "CORRAL_PROJECT", global = true, default_value = "default")]
    project: String,
    /// Output format: a readable table, or JSON with the API's documented fields.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Seconds a command follows a task that makes no progress before it gives up and says where
    /// the task stands (the task goes on).
    #[arg(
        long,
        env = "CORRAL_WAIT_TIMEOUT",
        global = true,
        default_value_t = 300
    )]
    wait_timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an all-in-one datacenter on this machine: controller, host agent and embedded store.
    Up(serve::UpArgs),
    /// Run the control plane alone (API and store), without a local host agent.
    Controller(serve::ControllerArgs),
    /// Run a host agent that joins a controller (`corral host join-token` makes the token).
    Agent(serve::AgentArgs),
    /// A multi-host lab on this machine: hosts in network namespaces on a fabric bridge.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// Images VMs are created from.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Hypervisor hosts.
    #[command(subcommand)]
    Host(HostCmd),
    /// Cluster-wide placement settings.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// VM groups with affinity and anti-affinity rules.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Where VM disks live: a directory on each host, or a path mounted on every host.
    #[command(subcommand)]
    Datastore(DatastoreCmd),
    /// Networks defined once for the cluster (a distributed virtual switch), with address management.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Firewall rules for VM NICs (allow rules; replies to allowed traffic pass).
    #[command(subcommand, name = "security-group", alias = "sg")]
    SecurityGroup(SecurityGroupCmd),
    /// Projects (tenants): each has its own VMs, images, networks and security groups.
    #[command(subcommand)]
    Project(ProjectCmd),
    /// DRS: balance the hosts' measured load by live migration.
    #[command(subcommand)]
    Drs(DrsCmd),
    /// Long operations.
    #[command(subcommand)]
    Task(TaskCmd),
    /// What happened in the cluster: host failures, failover decisions, VMs restarted elsewhere.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Build the default guest image from Debian packages (cached; --rebuild to build again).
    BuildJeos {
        #[arg(long, default_value = "jeos")]
        name: String,
        #[arg(long)]
        rebuild: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Import a qcow2 or raw disk image.
    Import {
        name: String,
        file: PathBuf,
    },
    /// Delete an image (refused while VMs use it).
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Create a VM whose disk is a thin linked clone of an image.
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory, e.g. 256M or 2G.
        #[arg(long)]
        memory: String,
        /// Disk size, e.g. 1G (default: the image's size).
        #[arg(long)]
        disk: Option<String>,
        /// Start it once created.
        #[arg(long)]
        start: bool,
        /// Run it on this host instead of where the scheduler would place it.
        #[arg(long)]
        host: Option<String>,
        /// Datastore for its disk (default: local, each host's data dir).
        #[arg(long)]
        datastore: Option<String>,
        /// restart: run it again on another host when its host fails (needs a shared datastore).
        #[arg(long, value_enum, default_value = "off")]
        ha: HaArg,
        /// Which VMs of a failed host run again first.
        #[arg(long, value_enum, default_value = "medium")]
        ha_priority: PriorityArg,
        /// VMs that must run again before this one after a host failure (comma-separated).
        #[arg(long, value_delimiter = ',')]
        ha_after: Vec<String>,
        /// A NIC: NETWORK[,ip=A.B.C.D][,mac=52:54:00:..]; repeat for more (eth0 first).
        #[arg(long = "nic", value_parser = parse_nic)]
        nics: Vec<NicRequest>,
        /// Security groups for its NICs (comma-separated; default: the project's `default`).
        #[arg(long = "security-group", value_delimiter = ',')]
        security_groups: Vec<String>,
    },
    List,
    Show {
        name: String,
    },
    Start {
        name: String,
    },
    /// Ask the guest to shut down (ACPI); power off after the timeout, or at once with --force.
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Reset the VM.
    Reboot {
        name: String,
    },
    /// Delete the VM and its disk (a running VM needs --force).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Move a running VM to another host while the guest runs (live migration).
    Migrate {
        name: String,
        /// The host to move to (default: the scheduler picks one).
        #[arg(long)]
        to: Option<String>,
        /// Print the task and return instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move a VM's disk to another datastore; a running VM keeps running.
    MoveStorage {
        name: String,
        #[arg(long)]
        datastore: String,
    },
    /// Show the VM's current or last migration.
    Migration {
        name: String,
    },
    /// Print the serial console log.
    Console {
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    List,
    Show {
        name: String,
    },
    /// Remove a host without VMs from the cluster; its certificate stops working.
    Remove {
        name: String,
    },
    /// Make a single-use token a new host joins with (`corral agent --join URL --token TOKEN`).
    JoinToken {
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Take a host out of service (no new VMs) or return it.
    /// Entering evacuates the host: its running VMs move to other hosts by live migration.
    Maintenance {
        #[arg(value_enum)]
        action: MaintenanceAction,
        name: String,
        /// Return once maintenance is set, without following the evacuation.
        #[arg(long)]
        no_wait: bool,
    },
    /// Approve a host's capacity (after adding CPUs or memory): its agent's reports are believed
    /// up to it. A joined host's first registration sets it; a later claim beyond it is not
    /// believed, and `host show` says what was claimed.
    SetCapacity {
        name: String,
        #[arg(long)]
        cpus: u32,
        /// E.g. 256G.
        #[arg(long)]
        memory: String,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MaintenanceAction {
    Enter,
    Exit,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    Show,
    /// Change placement settings; options left out keep their value.
    Set {
        #[arg(long, value_enum)]
        placement: Option<PolicyArg>,
        /// vCPUs per host CPU that may be allocated.
        #[arg(long)]
        cpu_overcommit: Option<f64>,
        /// Memory per byte of host memory that may be allocated.
        #[arg(long)]
        memory_overcommit: Option<f64>,
        /// Cap on each live migration's stream per second, e.g. 100M; "none" for no cap.
        #[arg(long)]
        migration_bandwidth: Option<String>,
        /// Longest pause of a guest at a live migration's switchover, in milliseconds.
        #[arg(long)]
        migration_downtime_ms: Option<u64>,
        /// Slow down the vCPUs of a guest that dirties memory faster than a migration sends it.
        #[arg(long)]
        migration_auto_converge: Option<bool>,
        /// HA admission control: keep room to restart every protected VM after this many hosts fail.
        #[arg(long)]
        ha_failures_to_tolerate: Option<u32>,
        /// What a host cut off from the controller and all its peers does with its protected VMs.
        #[arg(long, value_enum)]
        ha_isolation_response: Option<IsolationArg>,
        /// DRS: off, manual (`corral drs apply`) or auto (the controller moves VMs itself).
        #[arg(long, value_enum)]
        drs: Option<DrsArg>,
        /// How much imbalance DRS tolerates: 1 (only gross) to 5 (evens out small differences).
        #[arg(long)]
        drs_aggressiveness: Option<u8>,
        /// DPM: auto has DRS plans name the hosts that could go to standby (reported only:
        /// Corral cannot power hosts yet).
        #[arg(long, value_enum)]
        power_management: Option<PowerArg>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum HaArg {
    Restart,
    Off,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PriorityArg {
    High,
    Medium,
    Low,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum IsolationArg {
    PowerOff,
    LeaveRunning,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PowerArg {
    Off,
    Auto,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DrsArg {
    Off,
    Manual,
    Auto,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PolicyArg {
    Spread,
    Pack,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RuleArg {
    Affinity,
    AntiAffinity,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StrengthArg {
    Must,
    Should,
}

#[derive(Subcommand, Debug)]
enum DatastoreCmd {
    /// Add a datastore: PATH must exist on the hosts (mounted on every host with --shared).
    Create {
        name: String,
        #[arg(long)]
        path: String,
        /// Every host sees the same files at PATH (NFS, CephFS...).
        #[arg(long)]
        shared: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Remove a datastore no VM disk lives on (its files are left in place).
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Create a group: its members run together (affinity) or apart (anti-affinity).
    Create {
        name: String,
        #[arg(long, value_enum)]
        rule: RuleArg,
        /// must: never broken (the VM waits); should: followed when possible.
        #[arg(long, value_enum)]
        strength: StrengthArg,
        /// VM names, comma-separated; they may be created later.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCmd {
    /// Create a network; its first address is the hosts' side (DHCP server, gateway).
    Create {
        name: String,
        /// IPv4 network, e.g. 10.10.0.0/24.
        #[arg(long)]
        cidr: String,
        /// Route the network's outbound traffic out of each host, with NAT.
        #[arg(long)]
        gateway: bool,
        /// Carry it on this VLAN of the hosts' fabric instead of a VXLAN overlay.
        #[arg(long)]
        vlan: Option<u16>,
    },
    List,
    /// Show a network and the VM NICs on it.
    Show {
        name: String,
    },
    /// Delete a network no VM is attached to.
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum SecurityGroupCmd {
    /// Create a group. It allows all outbound traffic and anything from its own members, plus
    /// the rules given here.
    Create {
        name: String,
        /// An allow rule, e.g. "in tcp 22 from 0.0.0.0/0" or "in icmp from group:web"; repeatable.
        #[arg(long = "rule", value_parser = parse_rule)]
        rules: Vec<SecurityRule>,
    },
    List,
    Show {
        name: String,
    },
    /// Add an allow rule: `in|out tcp|udp|icmp|any [PORT[-PORT]] from|to CIDR|group:NAME`.
    AddRule {
        name: String,
        #[arg(value_parser = parse_rule)]
        rule: SecurityRule,
    },
    /// Remove a rule by its number in `security-group show` (1 is the first).
    RemoveRule {
        name: String,
        number: usize,
    },
    /// Delete a group no VM is in.
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum DrsCmd {
    /// Show the moves DRS recommends now, each host's load before and after, and why each move
    /// pays for itself.
    Plan,
    /// Carry out a plan (the latest one `drs plan` showed, by its id) or, without an id, a fresh
    /// one. Needs DRS manual or auto (`corral cluster set --drs manual`).
    Apply {
        plan: Option<uuid::Uuid>,
        /// Return once the migrations are started, without following them.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ProjectCmd {
    Create { name: String },
    List,
}

fn parse_nic(s: &str) -> Result<NicRequest, String> {
    NicRequest::parse(s).map_err(|e| e.0)
}

fn parse_rule(s: &str) -> Result<SecurityRule, String> {
    SecurityRule::parse(s).map_err(|e| e.0)
}

#[derive(Subcommand, Debug)]
enum TaskCmd {
    /// The newest tasks first (finished ones are kept for 7 days).
    List {
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    Show {
        id: uuid::Uuid,
    },
    /// Stop a task that is still running (migrations).
    Cancel {
        id: uuid::Uuid,
    },
}

/// Everything a list endpoint (`path`, VMs or hosts) holds, a page at a time; `name` gives the
/// name a page ends with.
fn all_pages<T: serde::de::DeserializeOwned>(
    c: &Client,
    path: &str,
    name: impl Fn(&T) -> &str,
) -> Result<Vec<T>> {
    let mut all: Vec<T> = Vec::new();
    loop {
        let after = all
            .last()
            .map(|v| format!("&after={}", name(v)))
            .unwrap_or_default();
        let page: Vec<T> = c.get(&format!(
            "{path}?limit={}{after}",
            corral_controller::MAX_PAGE
        ))?;
        let full = page.len() == corral_controller::MAX_PAGE;
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => serve::up(args),
        Command::Controller(args) => serve::controller(args),
        Command::Agent(args) => serve::agent(args),
        Command::Lab(cmd) => lab::run(cmd),
        other => client_command(&cli.global, other),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn client_command(g: &Global, cmd: Command) -> Result<()> {
    let c = Client::new(g.url.clone(), g.token.clone())
        .stall_after(std::time::Duration::from_secs(g.wait_timeout.max(1)));
    let p = format!("/projects/{}", g.project);
    let fmt = g.output;
    let show_progress = fmt == Format::Table;
    // Follows a task to its end, then prints the object it acted on (or the task).
    let finish_vm = |task: Task, name: &str| -> Result<()> {
        let task = c.wait(task, show_progress)?;
        match c.get::<Vm>(&format!("{p}/vms/{name}")) {
            Ok(vm) => output::vms(fmt, &[vm], true),
            Err(_) => output::task(fmt, &task),
        }
    };
    match cmd {
        Command::Image(cmd) => match cmd {
            ImageCmd::BuildJeos { name, rebuild } => {
                let task: Task = c.post(
                    &format!("{p}/images/build-jeos"),
                    &BuildJeosRequest {
                        name: Some(name.clone()),
                        rebuild,
                    },
                )?;
                c.wait(task, show_progress)?;
                output::images(fmt, &[c.get::<Image>(&format!("{p}/images/{name}"))?], true)
            }
            ImageCmd::List => {
                output::images(fmt, &c.get::<Vec<Image>>(&format!("{p}/images"))?, false)
            }
            ImageCmd::Show { name } => {
                output::images(fmt, &[c.get::<Image>(&format!("{p}/images/{name}"))?], true)
            }
            ImageCmd::Import { name, file } => {
                let image: Image = c.put_file(&format!("{p}/images/{name}"), &file)?;
                output::images(fmt, &[image], true)
            }
            ImageCmd::Delete { name } => {
                c.delete::<serde_json::Value>(&format!("{p}/images/{name}"))?;
                output::done(fmt, &format!("image {name} deleted"))
            }
        },
        Command::Vm(cmd) => match cmd {
            VmCmd::Create {
                name,
                image,
                cpus,
                memory,
                disk,
                start,
                host,
                datastore,
                ha,
                ha_priority,
                ha_after,
                nics,
                security_groups,
            } => {
                let req = CreateVmRequest {
                    name: name.clone(),
                    image,
                    cpus,
                    memory,
                    disk,
                    start,
                    host,
                    datastore,
                    ha: match ha {
                        HaArg::Restart => HaPolicy::Restart,
                        HaArg::Off => HaPolicy::Off,
                    },
                    ha_priority: match ha_priority {
                        PriorityArg::High => HaPriority::High,
                        PriorityArg::Medium => HaPriority::Medium,
                        PriorityArg::Low => HaPriority::Low,
                    },
                    ha_after,
                    nics,
                    security_groups,
                };
                let task: Task = c.post(&format!("{p}/vms"), &req)?;
                finish_vm(task, &name)
            }
            VmCmd::List => {
                let vms = all_pages(&c, &format!("{p}/vms"), |v: &Vm| &v.meta.name)?;
                output::vms(fmt, &vms, false)
            }
            VmCmd::Show { name } => {
                output::vms(fmt, &[c.get::<Vm>(&format!("{p}/vms/{name}"))?], true)
            }
            VmCmd::Start { name } => finish_vm(
                c.post(&format!("{p}/vms/{name}/start"), &serde_json::json!({}))?,
                &name,
            ),
            VmCmd::Stop { name, force } => finish_vm(
                c.post(&format!("{p}/vms/{name}/stop"), &StopVmRequest { force })?,
                &name,
            ),
            VmCmd::Reboot { name } => finish_vm(
                c.post(&format!("{p}/vms/{name}/reboot"), &serde_json::json!({}))?,
                &name,
            ),
            VmCmd::Delete { name, force } => {
                let task: Task = c.delete(&format!("{p}/vms/{name}?force={force}"))?;
                let task = c.wait(task, show_progress)?;
                output::task(fmt, &task)
            }
            VmCmd::Migrate { name, to, no_wait } => {
                let task: Task =
                    c.post(&format!("{p}/vms/{name}/migrate"), &MigrateVmRequest { to })?;
                if no_wait {
                    return output::task(fmt, &task);
                }
                finish_vm(task, &name)
            }
            VmCmd::MoveStorage { name, datastore } => finish_vm(
                c.post(
                    &format!("{p}/vms/{name}/move-storage"),
                    &MoveStorageRequest { datastore },
                )?,
                &name,
            ),
            VmCmd::Migration { name } => output::migration(
                fmt,
                &c.get::<Migration>(&format!("{p}/vms/{name}/migration"))?,
            ),
            VmCmd::Console { name, follow } => console(&c, &p, &name, follow, fmt),
        },
        Command::Host(cmd) => match cmd {
            HostCmd::List => {
                let hosts = all_pages(&c, "/hosts", |h: &HostInfo| &h.host.name)?;
                output::hosts(fmt, &hosts, false)
            }
            HostCmd::Show { name } => {
                output::hosts(fmt, &[c.get::<HostInfo>(&format!("/hosts/{name}"))?], true)
            }
            HostCmd::Remove { name } => {
                c.delete::<serde_json::Value>(&format!("/hosts/{name}"))?;
                output::done(fmt, &format!("host {name} removed"))
            }
            HostCmd::JoinToken { ttl } => {
                let t: corral_controller::agents::JoinToken = c.post(
                    "/hosts/join-tokens",
                    &serde_json::json!({ "ttl_seconds": ttl }),
                )?;
                if fmt == Format::Json {
                    println!("{}", serde_json::to_string_pretty(&t)?);
                } else {
                    println!("{}", t.token);
                    eprintln!("valid until {}; on the new host: corral agent --join https://CONTROLLER:PORT --token TOKEN", t.expires_at.to_rfc3339());
                }
                Ok(())
            }
            HostCmd::Maintenance {
                action,
                name,
                no_wait,
            } => {
                let maintenance = matches!(action, MaintenanceAction::Enter);
                let body = serde_json::json!({ "maintenance": maintenance });
                let r: MaintenanceResponse =
                    c.put_json(&format!("/hosts/{name}/maintenance"), &body)?;
                match r.task {
                    Some(task) if !no_wait => {
                        c.wait(task, show_progress)?;
                        output::hosts(fmt, &[c.get::<HostInfo>(&format!("/hosts/{name}"))?], true)
                    }
                    _ => output::hosts(fmt, &[r.host], true),
                }
            }
            HostCmd::SetCapacity { name, cpus, memory } => {
                let body = corral_api::Capacity {
                    cpus,
                    memory_bytes: corral_api::parse_size("--memory", &memory)?,
                };
                let h: HostInfo = c.put_json(&format!("/hosts/{name}/capacity"), &body)?;
                output::hosts(fmt, &[h], true)
            }
        },
        Command::Network(cmd) => match cmd {
            NetworkCmd::Create {
                name,
                cidr,
                gateway,
                vlan,
            } => {
                let n: Network = c.post(
                    &format!("{p}/networks"),
                    &CreateNetworkRequest {
                        name,
                        cidr,
                        gateway,
                        vlan,
                    },
                )?;
                output::networks(fmt, &[n], true)
            }
            NetworkCmd::List => output::networks(
                fmt,
                &c.get::<Vec<Network>>(&format!("{p}/networks"))?,
                false,
            ),
            NetworkCmd::Show { name } => output::networks(
                fmt,
                &[c.get::<Network>(&format!("{p}/networks/{name}"))?],
                true,
            ),
            NetworkCmd::Delete { name } => {
                c.delete::<serde_json::Value>(&format!("{p}/networks/{name}"))?;
                output::done(fmt, &format!("network {name} deleted"))
            }
        },
        Command::SecurityGroup(cmd) => {
            let path = |name: &str| format!("{p}/security-groups/{name}");
            match cmd {
                SecurityGroupCmd::Create { name, rules } => {
                    let g: SecurityGroup = c.post(
                        &format!("{p}/security-groups"),
                        &CreateSecurityGroupRequest { name, rules },
                    )?;
                    output::security_groups(fmt, &[g], true)
                }
                SecurityGroupCmd::List => output::security_groups(
                    fmt,
                    &c.get::<Vec<SecurityGroup>>(&format!("{p}/security-groups"))?,
                    false,
                ),
                SecurityGroupCmd::Show { name } => {
                    output::security_groups(fmt, &[c.get::<SecurityGroup>(&path(&name))?], true)
                }
                SecurityGroupCmd::AddRule { name, rule } => {
                    let mut g: SecurityGroup = c.get(&path(&name))?;
                    g.rules.push(rule);
                    let body = SetRulesRequest {
                        rules: g.rules,
                        generation: Some(g.meta.generation),
                    };
                    let g: SecurityGroup = c.put_json(&path(&name), &body)?;
                    output::security_groups(fmt, &[g], true)
                }
                SecurityGroupCmd::RemoveRule { name, number } => {
                    let mut g: SecurityGroup = c.get(&path(&name))?;
                    if number == 0 || number > g.rules.len() {
                        anyhow::bail!(
                            "group {name} has rules 1 to {}: see `corral security-group show {name}`",
                            g.rules.len()
                        );
                    }
                    g.rules.remove(number - 1);
                    let body = SetRulesRequest {
                        rules: g.rules,
                        generation: Some(g.meta.generation),
                    };
                    let g: SecurityGroup = c.put_json(&path(&name), &body)?;
                    output::security_groups(fmt, &[g], true)
                }
                SecurityGroupCmd::Delete { name } => {
                    c.delete::<serde_json::Value>(&path(&name))?;
                    output::done(fmt, &format!("security group {name} deleted"))
                }
            }
        }
        Command::Project(ProjectCmd::Create { name }) => {
            let created: Vec<String> =
                c.post("/projects", &CreateProjectRequest { name: name.clone() })?;
            output::done(
                fmt,
                &format!("project {name} created ({} projects)", created.len()),
            )
        }
        Command::Project(ProjectCmd::List) => {
            let projects: Vec<String> = c.get("/projects")?;
            if fmt == Format::Json {
                println!("{}", serde_json::to_string_pretty(&projects)?);
            } else {
                projects.iter().for_each(|p| println!("{p}"));
            }
            Ok(())
        }
        Command::Cluster(ClusterCmd::Show) => {
            output::cluster(fmt, &c.get::<ClusterSettings>("/cluster")?)
        }
        Command::Cluster(ClusterCmd::Set {
            placement,
            cpu_overcommit,
            memory_overcommit,
            migration_bandwidth,
            migration_downtime_ms,
            migration_auto_converge,
            ha_failures_to_tolerate,
            ha_isolation_response,
            drs,
            drs_aggressiveness,
            power_management,
        }) => {
            let mut s: ClusterSettings = c.get("/cluster")?;
            if let Some(p) = placement {
                s.placement = match p {
                    PolicyArg::Spread => PlacementPolicy::Spread,
                    PolicyArg::Pack => PlacementPolicy::Pack,
                };
            }
            s.cpu_overcommit = cpu_overcommit.unwrap_or(s.cpu_overcommit);
            s.memory_overcommit = memory_overcommit.unwrap_or(s.memory_overcommit);
            match migration_bandwidth.as_deref() {
                None => {}
                Some("none") => s.migration_bandwidth_bytes = None,
                Some(b) => {
                    s.migration_bandwidth_bytes = Some(
                        corral_api::parse_size("--migration-bandwidth", b)
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    )
                }
            }
            s.migration_downtime_limit_ms =
                migration_downtime_ms.unwrap_or(s.migration_downtime_limit_ms);
            s.migration_auto_converge =
                migration_auto_converge.unwrap_or(s.migration_auto_converge);
            s.ha_host_failures_to_tolerate =
                ha_failures_to_tolerate.unwrap_or(s.ha_host_failures_to_tolerate);
            if let Some(r) = ha_isolation_response {
                s.ha_isolation_response = match r {
                    IsolationArg::PowerOff => IsolationResponse::PowerOff,
                    IsolationArg::LeaveRunning => IsolationResponse::LeaveRunning,
                };
            }
            if let Some(d) = drs {
                s.drs_mode = match d {
                    DrsArg::Off => DrsMode::Off,
                    DrsArg::Manual => DrsMode::Manual,
                    DrsArg::Auto => DrsMode::Auto,
                };
            }
            s.drs_aggressiveness = drs_aggressiveness.unwrap_or(s.drs_aggressiveness);
            if let Some(p) = power_management {
                s.power_management = match p {
                    PowerArg::Off => PowerManagement::Off,
                    PowerArg::Auto => PowerManagement::Auto,
                };
            }
            output::cluster(fmt, &c.put_json::<ClusterSettings>("/cluster", &s)?)
        }
        Command::Drs(DrsCmd::Plan) => output::drs_plan(fmt, &c.get::<DrsPlan>("/drs/plan")?),
        Command::Drs(DrsCmd::Apply { plan, no_wait }) => {
            let r: ApplyDrsResponse = c.post("/drs/apply", &ApplyDrsRequest { plan })?;
            for s in &r.skipped {
                eprintln!("skipped: {s}");
            }
            if !no_wait {
                for t in &r.tasks {
                    c.wait(t.clone(), show_progress)?;
                }
            }
            if fmt == Format::Json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            output::drs_plan(fmt, &r.plan)?;
            println!("{} migration(s) started", r.tasks.len());
            Ok(())
        }
        Command::Datastore(cmd) => match cmd {
            DatastoreCmd::Create { name, path, shared } => {
                let req = CreateDatastoreRequest { name, path, shared };
                output::datastores(fmt, &[c.post::<Datastore>("/datastores", &req)?], true)
            }
            DatastoreCmd::List => {
                output::datastores(fmt, &c.get::<Vec<Datastore>>("/datastores")?, false)
            }
            DatastoreCmd::Show { name } => output::datastores(
                fmt,
                &[c.get::<Datastore>(&format!("/datastores/{name}"))?],
                true,
            ),
            DatastoreCmd::Delete { name } => {
                c.delete::<serde_json::Value>(&format!("/datastores/{name}"))?;
                output::done(fmt, &format!("datastore {name} deleted"))
            }
        },
        Command::Group(cmd) => match cmd {
            GroupCmd::Create {
                name,
                rule,
                strength,
                members,
            } => {
                let req = CreateGroupRequest {
                    name,
                    rule: match rule {
                        RuleArg::Affinity => GroupRule::Affinity,
                        RuleArg::AntiAffinity => GroupRule::AntiAffinity,
                    },
                    strength: match strength {
                        StrengthArg::Must => GroupStrength::Must,
                        StrengthArg::Should => GroupStrength::Should,
                    },
                    members,
                };
                output::groups(
                    fmt,
                    &[c.post::<VmGroup>(&format!("{p}/groups"), &req)?],
                    true,
                )
            }
            GroupCmd::List => {
                output::groups(fmt, &c.get::<Vec<VmGroup>>(&format!("{p}/groups"))?, false)
            }
            GroupCmd::Show { name } => output::groups(
                fmt,
                &[c.get::<VmGroup>(&format!("{p}/groups/{name}"))?],
                true,
            ),
            GroupCmd::Delete { name } => {
                c.delete::<serde_json::Value>(&format!("{p}/groups/{name}"))?;
                output::done(fmt, &format!("group {name} deleted"))
            }
        },
        Command::Events { follow } => events(&c, follow, fmt),
        Command::Task(TaskCmd::List { limit }) => {
            output::tasks(fmt, &c.get::<Vec<Task>>(&format!("/tasks?limit={limit}"))?)
        }
        Command::Task(TaskCmd::Show { id }) => {
            output::task(fmt, &c.get::<Task>(&format!("/tasks/{id}"))?)
        }
        Command::Task(TaskCmd::Cancel { id }) => output::task(
            fmt,
            &c.post::<Task>(&format!("/tasks/{id}/cancel"), &serde_json::json!({}))?,
        ),
        Command::Up(_) | Command::Controller(_) | Command::Agent(_) | Command::Lab(_) => {
            unreachable!("handled in main")
        }
    }
}

fn events(c: &Client, follow: bool, fmt: Format) -> Result<()> {
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/events?after={a}"),
            None => "/events".to_string(),
        };
        let events: Vec<ClusterEvent> = c.get(&path)?;
        if !follow {
            return output::events(fmt, &events, false);
        }
        if !events.is_empty() {
            output::events(fmt, &events, true)?;
        }
        if let Some(last) = events.last() {
            after = Some(last.id.clone());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn console(c: &Client, p: &str, name: &str, follow: bool, fmt: Format) -> Result<()> {
    use std::io::Write;
    let mut offset = 0;
    loop {
        let chunk: ConsoleChunk = c.get(&format!("{p}/vms/{name}/console?offset={offset}"))?;
        if fmt == Format::Json && !follow {
            println!("{}", serde_json::to_string_pretty(&chunk)?);
            return Ok(());
        }
        print!("{}", chunk.data);
        std::io::stdout().flush()?;
        let got = chunk.next_offset != offset;
        offset = chunk.next_offset;
        if !follow && !got {
            return Ok(());
        }
        if !got {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_vm_create_and_global_flags() {
        let cli = Cli::try_parse_from([
            "corral", "vm", "create", "web", "--image", "jeos", "--cpus", "2", "--memory", "256M",
            "--start", "-o", "json",
        ])
        .expect("parses");
        assert_eq!(cli.global.output, Format::Json);
        match cli.command {
            Command::Vm(VmCmd::Create {
                name,
                cpus,
                memory,
                start,
                disk,
                ..
            }) => {
                assert_eq!(
                    (name.as_str(), cpus, memory.as_str(), start, disk),
                    ("web", 2, "256M", true, None)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_unknown_flags_and_missing_arguments() {
        assert!(
            Cli::try_parse_from(["corral", "vm", "create", "web", "--memory", "1G"]).is_err(),
            "--image is required"
        );
        assert!(Cli::try_parse_from(["corral", "vm", "stop", "web", "--hard"]).is_err());
        assert!(Cli::try_parse_from(["corral", "up", "--accel", "xen"]).is_err());
    }
}
