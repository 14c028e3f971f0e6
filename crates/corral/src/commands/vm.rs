//! `corral vm`: virtual machines, their power, moves and consoles.

use anyhow::Result;
use clap::Subcommand;

use super::Cx;
use crate::output::{self, Format};
use corral_api::{
    ConsoleChunk, CreateVmRequest, HaPolicy, HaPriority, MigrateVmRequest, Migration,
    MoveStorageRequest, NicRequest, StopVmRequest, Task, Vm,
};

use super::all_pages;
use crate::client::Client;

#[derive(Subcommand, Debug)]
pub(crate) enum VmCmd {
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

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum HaArg {
    Restart,
    Off,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum PriorityArg {
    High,
    Medium,
    Low,
}

pub(crate) fn parse_nic(s: &str) -> Result<NicRequest, String> {
    NicRequest::parse(s).map_err(|e| e.0)
}

pub(crate) fn run(cx: &Cx, cmd: VmCmd) -> Result<()> {
    let (c, p, fmt, show_progress) = (cx.client, &cx.project, cx.fmt, cx.show_progress);
    // Follows a task to its end, then prints the object it acted on (or the task).
    let finish_vm = |task: Task, name: &str| -> Result<()> {
        let task = c.wait(task, show_progress)?;
        match c.get::<Vm>(&format!("{p}/vms/{name}")) {
            Ok(vm) => output::vms(fmt, &[vm], true),
            Err(_) => output::task(fmt, &task),
        }
    };
    match cmd {
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
            let vms = all_pages(c, &format!("{p}/vms"), |v: &Vm| &v.meta.name)?;
            output::vms(fmt, &vms, false)
        }
        VmCmd::Show { name } => output::vms(fmt, &[c.get::<Vm>(&format!("{p}/vms/{name}"))?], true),
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
        VmCmd::Console { name, follow } => console(c, p, &name, follow, fmt),
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
