//! `corral`: the one binary. `up` runs an all-in-one datacenter (controller, host agent and embedded
//! store in one process); `controller` runs the control plane alone; the other subcommands are the
//! client, talking to the REST API.

mod client;
mod commands;
mod lab;
mod output;
mod serve;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use client::Client;
use commands::cluster::{ClusterCmd, DrsCmd};
use commands::host::HostCmd;
use commands::image::ImageCmd;
use commands::inventory::{DatastoreCmd, GroupCmd, ProjectCmd};
use commands::network::{NetworkCmd, SecurityGroupCmd};
use commands::task::TaskCmd;
use commands::vm::VmCmd;
use commands::{cluster, host, image, inventory, network, task, vm};
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
    let client = Client::new(g.url.clone(), g.token.clone())
        .stall_after(std::time::Duration::from_secs(g.wait_timeout.max(1)));
    let cx = commands::Cx {
        client: &client,
        project: format!("/projects/{}", g.project),
        fmt: g.output,
        show_progress: g.output == Format::Table,
    };
    match cmd {
        Command::Image(cmd) => image::run(&cx, cmd),
        Command::Vm(cmd) => vm::run(&cx, cmd),
        Command::Host(cmd) => host::run(&cx, cmd),
        Command::Network(cmd) => network::run(&cx, cmd),
        Command::SecurityGroup(cmd) => network::run_security_group(&cx, cmd),
        Command::Project(cmd) => inventory::run_project(&cx, cmd),
        Command::Cluster(cmd) => cluster::run(&cx, cmd),
        Command::Drs(cmd) => cluster::run_drs(&cx, cmd),
        Command::Datastore(cmd) => inventory::run_datastore(&cx, cmd),
        Command::Group(cmd) => inventory::run_group(&cx, cmd),
        Command::Events { follow } => task::events(&client, follow, cx.fmt),
        Command::Task(cmd) => task::run(&cx, cmd),
        Command::Up(_) | Command::Controller(_) | Command::Agent(_) | Command::Lab(_) => {
            unreachable!("handled in main")
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
