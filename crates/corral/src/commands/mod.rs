//! The client commands, one module per resource: each holds its clap subcommand and what it does
//! through the REST API.

pub(crate) mod cluster;
pub(crate) mod host;
pub(crate) mod image;
pub(crate) mod inventory;
pub(crate) mod network;
pub(crate) mod task;
pub(crate) mod vm;

use anyhow::Result;

use crate::client::Client;
use crate::output::{self, Format};

/// What every client command works with.
pub(crate) struct Cx<'a> {
    pub(crate) client: &'a Client,
    /// `/projects/NAME`, the prefix of the project's resources.
    pub(crate) project: String,
    pub(crate) fmt: Format,
    /// Progress bars while a task is followed (tables only).
    pub(crate) show_progress: bool,
}

/// Everything a list endpoint (`path`, VMs or hosts) holds, a page at a time; `name` gives the
/// name a page ends with.
pub(crate) fn all_pages<T: serde::de::DeserializeOwned>(
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

/// Deletes the object at `path` and says so: "`what` deleted" (`what` names it, e.g. "network web").
pub(crate) fn delete(cx: &Cx, path: &str, what: &str, done: &str) -> Result<()> {
    cx.client.delete::<serde_json::Value>(path)?;
    output::done(cx.fmt, &format!("{what} {done}"))
}
