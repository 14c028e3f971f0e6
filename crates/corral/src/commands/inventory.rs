//! `corral datastore`, `corral group` and `corral project`: where disks live, VM groups, tenants.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::Cx;
use crate::output::{self, Format};
use corral_api::{
    CreateDatastoreRequest, CreateGroupRequest, CreateProjectRequest, CreateRbdRequest, Datastore,
    DatastoreDetail, DatastoreKind, GroupRule, GroupStrength, RbdSettings, VmGroup,
};

#[derive(Subcommand, Debug)]
pub(crate) enum DatastoreCmd {
    /// Add a datastore: a directory (PATH must exist on the hosts; mounted on every host with
    /// --shared), or a Ceph RBD pool (--type rbd), checked with the user's key before it is added.
    Create {
        name: String,
        #[arg(long = "type", value_enum, default_value = "dir")]
        kind: KindArg,
        /// dir: the directory on the hosts.
        #[arg(long, required_if_eq("kind", "dir"))]
        path: Option<String>,
        /// dir: every host sees the same files at PATH (NFS, CephFS...).
        #[arg(long)]
        shared: bool,
        /// rbd: the pool (initialized with `rbd pool init`).
        #[arg(long, required_if_eq("kind", "rbd"))]
        pool: Option<String>,
        /// rbd: the monitors, HOST:PORT, comma-separated.
        #[arg(long, value_delimiter = ',', required_if_eq("kind", "rbd"))]
        monitors: Vec<String>,
        /// rbd: the Ceph user, without `client.`.
        #[arg(long, required_if_eq("kind", "rbd"))]
        user: Option<String>,
        /// rbd: the user's keyring file (as `ceph auth get-or-create` writes it); its key is kept
        /// as a secret, never shown again.
        #[arg(long, required_if_eq("kind", "rbd"))]
        keyring: Option<PathBuf>,
    },
    List,
    /// A datastore, with its capacity, used and provisioned space (RBD).
    Show {
        name: String,
    },
    /// Remove a datastore no VM disk lives on (the files of a dir datastore are left in place;
    /// the images Corral stored in an RBD pool are removed).
    Delete {
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub(crate) enum KindArg {
    Dir,
    Rbd,
}

/// The key of `user` in a keyring file: the `key = ...` line of its `[client.USER]` section.
fn keyring_key(text: &str, user: &str) -> Option<String> {
    let section = format!("[client.{user}]");
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == section;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "key" {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
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
        DatastoreCmd::Create {
            name,
            kind,
            path,
            shared,
            pool,
            monitors,
            user,
            keyring,
        } => {
            let rbd = match (kind, pool, user, keyring) {
                (KindArg::Rbd, Some(pool), Some(user), Some(keyring)) => {
                    let text = std::fs::read_to_string(&keyring)
                        .with_context(|| format!("reading the keyring {}", keyring.display()))?;
                    let key = keyring_key(&text, &user).with_context(|| {
                        format!(
                            "the keyring {} has no key for [client.{user}]: give the keyring of user {user} (ceph auth get client.{user})",
                            keyring.display()
                        )
                    })?;
                    Some(CreateRbdRequest {
                        settings: RbdSettings {
                            pool,
                            monitors,
                            user,
                        },
                        key,
                    })
                }
                _ => None,
            };
            let req = CreateDatastoreRequest {
                name,
                kind: match kind {
                    KindArg::Dir => DatastoreKind::Dir,
                    KindArg::Rbd => DatastoreKind::Rbd,
                },
                path,
                shared,
                rbd,
            };
            output::datastores(fmt, &[c.post::<Datastore>("/datastores", &req)?], true)
        }
        DatastoreCmd::List => {
            output::datastores(fmt, &c.get::<Vec<Datastore>>("/datastores")?, false)
        }
        DatastoreCmd::Show { name } => output::datastore(
            fmt,
            &c.get::<DatastoreDetail>(&format!("/datastores/{name}"))?,
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

#[cfg(test)]
mod tests {
    use super::keyring_key;

    #[test]
    fn the_key_is_read_from_the_users_section() {
        let text = "[client.admin]\n\tkey = AQAdmin==\n[client.corral]\n\tkey = AQCorral==\n\tcaps mon = \"profile rbd\"\n";
        assert_eq!(keyring_key(text, "corral").as_deref(), Some("AQCorral=="));
        assert_eq!(keyring_key(text, "nobody"), None);
    }
}
