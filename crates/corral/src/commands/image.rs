//! `corral image`: images VMs are created from.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::Cx;
use crate::output;
use corral_api::{BuildJeosRequest, Image, Task};

#[derive(Subcommand, Debug)]
pub(crate) enum ImageCmd {
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

pub(crate) fn run(cx: &Cx, cmd: ImageCmd) -> Result<()> {
    let (c, p, fmt, show_progress) = (cx.client, &cx.project, cx.fmt, cx.show_progress);
    match cmd {
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
        ImageCmd::List => output::images(fmt, &c.get::<Vec<Image>>(&format!("{p}/images"))?, false),
        ImageCmd::Show { name } => {
            output::images(fmt, &[c.get::<Image>(&format!("{p}/images/{name}"))?], true)
        }
        ImageCmd::Import { name, file } => {
            let image: Image = c.put_file(&format!("{p}/images/{name}"), &file)?;
            output::images(fmt, &[image], true)
        }
        ImageCmd::Delete { name } => super::delete(
            cx,
            &format!("{p}/images/{name}"),
            &format!("image {name}"),
            "deleted",
        ),
    }
}
