//! `corral cluster` and `corral drs`: cluster-wide settings and load balancing.

use anyhow::Result;
use clap::Subcommand;

use super::Cx;
use crate::output::{self, Format};
use corral_api::{
    ApplyDrsRequest, ApplyDrsResponse, ClusterSettings, DrsMode, DrsPlan, IsolationResponse,
    PlacementPolicy, PowerManagement,
};

#[derive(Subcommand, Debug)]
pub(crate) enum ClusterCmd {
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
pub(crate) enum PolicyArg {
    Spread,
    Pack,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum IsolationArg {
    PowerOff,
    LeaveRunning,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum PowerArg {
    Off,
    Auto,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum DrsArg {
    Off,
    Manual,
    Auto,
}

#[derive(Subcommand, Debug)]
pub(crate) enum DrsCmd {
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

pub(crate) fn run(cx: &Cx, cmd: ClusterCmd) -> Result<()> {
    let (c, fmt) = (cx.client, cx.fmt);
    match cmd {
        ClusterCmd::Show => output::cluster(fmt, &c.get::<ClusterSettings>("/cluster")?),
        ClusterCmd::Set {
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
        } => {
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
    }
}

pub(crate) fn run_drs(cx: &Cx, cmd: DrsCmd) -> Result<()> {
    let (c, fmt, show_progress) = (cx.client, cx.fmt, cx.show_progress);
    match cmd {
        DrsCmd::Plan => output::drs_plan(fmt, &c.get::<DrsPlan>("/drs/plan")?),
        DrsCmd::Apply { plan, no_wait } => {
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
    }
}
