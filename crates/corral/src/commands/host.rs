//! `corral host`: hypervisor hosts, joining, maintenance, capacity.

use anyhow::Result;
use clap::Subcommand;

use super::Cx;
use crate::output::{self, Format};
use corral_api::{HostInfo, MaintenanceResponse};

use super::all_pages;

#[derive(Subcommand, Debug)]
pub(crate) enum HostCmd {
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
        /// How long the token is valid, in seconds (60 to 604800, 7 days).
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
pub(crate) enum MaintenanceAction {
    Enter,
    Exit,
}

pub(crate) fn run(cx: &Cx, cmd: HostCmd) -> Result<()> {
    let (c, fmt, show_progress) = (cx.client, cx.fmt, cx.show_progress);
    match cmd {
        HostCmd::List => {
            let hosts = all_pages(c, "/hosts", |h: &HostInfo| &h.host.name)?;
            output::hosts(fmt, &hosts, false)
        }
        HostCmd::Show { name } => {
            output::hosts(fmt, &[c.get::<HostInfo>(&format!("/hosts/{name}"))?], true)
        }
        HostCmd::Remove { name } => super::delete(
            cx,
            &format!("/hosts/{name}"),
            &format!("host {name}"),
            "removed",
        ),
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
    }
}
