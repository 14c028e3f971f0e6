//! `corral task` and `corral events`: long operations, and what happened in the cluster.

use anyhow::Result;
use clap::Subcommand;

use super::Cx;
use crate::output::{self, Format};
use corral_api::{ClusterEvent, Task};

use crate::client::Client;

#[derive(Subcommand, Debug)]
pub(crate) enum TaskCmd {
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

pub(crate) fn run(cx: &Cx, cmd: TaskCmd) -> Result<()> {
    let (c, fmt) = (cx.client, cx.fmt);
    match cmd {
        TaskCmd::List { limit } => {
            output::tasks(fmt, &c.get::<Vec<Task>>(&format!("/tasks?limit={limit}"))?)
        }
        TaskCmd::Show { id } => output::task(fmt, &c.get::<Task>(&format!("/tasks/{id}"))?),
        TaskCmd::Cancel { id } => output::task(
            fmt,
            &c.post::<Task>(&format!("/tasks/{id}/cancel"), &serde_json::json!({}))?,
        ),
    }
}

pub(crate) fn events(c: &Client, follow: bool, fmt: Format) -> Result<()> {
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
