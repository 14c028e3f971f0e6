//! `corral datastore`, `corral group` and `corral project`: where disks live, VM groups, tenants.

use anyhow::Result;
use clap::Subcommand;

use super::Cx;
use crate::output::{self, Format};
use corral_api::{
    CreateDatastoreRequest, CreateGroupRequest, CreateProjectRequest, Datastore, GroupRule,
    GroupStrength, VmGroup,
};

#[derive(Subcommand, Debug)]
pub(crate) enum DatastoreCmd {
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
pub(crate) enum GroupCmd {
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

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum RuleArg {
    Affinity,
    AntiAffinity,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum StrengthArg {
    Must,
    Should,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ProjectCmd {
    Create { name: String },
    List,
}

pub(crate) fn run_datastore(cx: &Cx, cmd: DatastoreCmd) -> Result<()> {
    let (c, fmt) = (cx.client, cx.fmt);
    match cmd {
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
        DatastoreCmd::Delete { name } => super::delete(
            cx,
            &format!("/datastores/{name}"),
            &format!("datastore {name}"),
            "deleted",
        ),
    }
}

pub(crate) fn run_group(cx: &Cx, cmd: GroupCmd) -> Result<()> {
    let (c, p, fmt) = (cx.client, &cx.project, cx.fmt);
    match cmd {
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
        GroupCmd::Delete { name } => super::delete(
            cx,
            &format!("{p}/groups/{name}"),
            &format!("group {name}"),
            "deleted",
        ),
    }
}

pub(crate) fn run_project(cx: &Cx, cmd: ProjectCmd) -> Result<()> {
    let (c, fmt) = (cx.client, cx.fmt);
    match cmd {
        ProjectCmd::Create { name } => {
            let created: Vec<String> =
                c.post("/projects", &CreateProjectRequest { name: name.clone() })?;
            output::done(
                fmt,
                &format!("project {name} created ({} projects)", created.len()),
            )
        }
        ProjectCmd::List => {
            let projects: Vec<String> = c.get("/projects")?;
            if fmt == Format::Json {
                println!("{}", serde_json::to_string_pretty(&projects)?);
            } else {
                projects.iter().for_each(|p| println!("{p}"));
            }
            Ok(())
        }
    }
}
