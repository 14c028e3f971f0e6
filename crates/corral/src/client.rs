//! The CLI's HTTP client: where the API is and which token to send (flags, environment, or the config
//! file `corral up` writes), and typed calls that turn API errors into their sentences.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use corral_api::{ApiErrorBody, Task};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

/// What `corral up` writes so that client commands find the API without flags.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClientConfig {
    pub url: String,
    pub token: String,
}

/// `$CORRAL_CONFIG`, else `$XDG_CONFIG_HOME/corral/config.json`, else `~/.config/corral/config.json`.
pub fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CORRAL_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".config")
        });
    base.join("corral").join("config.json")
}

/// Writes a file only its owner can read, atomically.
pub fn write_private(path: &std::path::Path, contents: &[u8]) -> Result<()> {
    corral_pki::write_private(path, contents).with_context(|| format!("writing {}", path.display()))
}

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// How long `wait` follows a task that makes no progress before it gives up.
    stall: Duration,
}

impl Client {
    pub fn new(url: Option<String>, token: Option<String>) -> Self {
        let saved: ClientConfig = std::fs::read(config_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let base = url
            .or_else(|| (!saved.url.is_empty()).then(|| saved.url.clone()))
            .unwrap_or_else(|| format!("http://{DEFAULT_LISTEN}"));
        let token = token.or_else(|| (!saved.token.is_empty()).then_some(saved.token));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        Self {
            stall: Duration::from_secs(300),
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut res = res.map_err(|e| {
            anyhow!("cannot reach the Corral API at {} ({e}): is `corral up` running? (set CORRAL_URL or --url)", self.base)
        })?;
        let status = res.status();
        let text = res
            .body_mut()
            .read_to_string()
            .context("reading the response")?;
        if status.is_success() {
            let body = if text.is_empty() { "null" } else { &text };
            return serde_json::from_str(body)
                .with_context(|| format!("unexpected response: {text}"));
        }
        match serde_json::from_str::<ApiErrorBody>(&text) {
            Ok(e) => match hint(method, path, status.as_u16(), &e.message) {
                Some(h) => bail!("{} ({h})", e.message),
                None => bail!("{}", e.message),
            },
            Err(_) => bail!("the API answered {status}: {text}"),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.decode(
            "GET",
            path,
            self.auth(self.agent.get(self.url(path))).call(),
        )
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        let req = self.auth(self.agent.post(self.url(path)));
        self.decode("POST", path, req.send_json(body))
    }

    pub fn put_json<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        let req = self.auth(self.agent.put(self.url(path)));
        self.decode("PUT", path, req.send_json(body))
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.decode(
            "DELETE",
            path,
            self.auth(self.agent.delete(self.url(path))).call(),
        )
    }

    pub fn put_file<T: DeserializeOwned>(&self, path: &str, file: &std::path::Path) -> Result<T> {
        let mut f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let req = self
            .auth(self.agent.put(self.url(path)))
            .header("Content-Type", "application/octet-stream");
        self.decode("PUT", path, req.send(ureq::SendBody::from_reader(&mut f)))
    }

    /// Polls a task until it ends, drawing a progress bar when `show` is set. Fails with the task's
    /// error if the task failed.
    /// Gives up following a task after it made no progress for `stall` (the task goes on).
    pub fn stall_after(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// Follows `task` to its end (a progress bar with `show`), or until it made no progress for
    /// the stall time: then it fails, saying where the task stands.
    pub fn wait(&self, task: Task, show: bool) -> Result<Task> {
        let bar = if show {
            indicatif::ProgressBar::new(100)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} {}", task.kind, task.target));
        let mut task = task;
        let started = std::time::Instant::now();
        let mut moved = (task.progress, task.message.clone(), started);
        loop {
            bar.set_position(task.progress as u64);
            bar.set_message(task.message.clone());
            if task.is_finished() {
                break;
            }
            if (task.progress, &task.message) != (moved.0, &moved.1) {
                moved = (
                    task.progress,
                    task.message.clone(),
                    std::time::Instant::now(),
                );
            } else if moved.2.elapsed() > self.stall {
                bar.abandon();
                bail!(
                    "gave up waiting for {} {}: no progress for {} s, it stands at {}%: {} (the task goes on: `corral task show {}`; --wait-timeout waits longer)",
                    task.kind,
                    task.target,
                    self.stall.as_secs(),
                    task.progress,
                    task.message,
                    task.id
                );
            }
            // Short tasks (a migration) end within a second: look often at first.
            let waited = started.elapsed();
            std::thread::sleep(if waited < Duration::from_secs(2) {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(150)
            });
            task = self.get(&format!("/tasks/{}", task.id))?;
        }
        bar.finish();
        match &task.error {
            Some(e) => bail!("{} {} failed: {e}", task.kind, task.target),
            None => Ok(task),
        }
    }
}

/// What the CLI adds to an API error: the command that helps. The API's own messages speak of its
/// resources and fields, never of CLI commands or flags.
fn hint(method: &str, path: &str, status: u16, message: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let list = |what: &str| Some(format!("see `corral {what} list`"));
    match (status, method, parts.as_slice()) {
        (401, ..) => Some(
            "give the admin token with CORRAL_TOKEN or --token; `corral up` writes it to DATA_DIR/admin-token and the client config".into(),
        ),
        (404, ..) if message.starts_with("project ") => {
            Some("see `corral project list`, or `corral project create NAME`".into())
        }
        // A VM's request that names a host or datastore that does not exist.
        (404, ..) if message.starts_with("there is no host ") => list("host"),
        (404, ..) if message.starts_with("there is no datastore ") => list("datastore"),
        (404, _, ["projects", _, kind, ..]) => match *kind {
            "vms" => list("vm"),
            "images" => list("image"),
            "networks" => list("network"),
            "security-groups" => list("security-group"),
            "groups" => list("group"),
            _ => None,
        },
        (404, _, ["hosts", ..]) => list("host"),
        (404, _, ["datastores", ..]) => list("datastore"),
        (404, _, ["tasks", ..]) => list("task"),
        (409, "DELETE", ["projects", _, "vms", name]) if message.contains("is running") => Some(
            format!("`corral vm stop {name}`, or `corral vm delete {name} --force`"),
        ),
        (409, "POST", ["projects", _, "vms", name, "start"])
            if message.contains("move the disk to a shared datastore") =>
        {
            Some(format!(
                "`corral vm stop OTHER` on that host, or `corral vm move-storage {name} --datastore SHARED` (see `corral datastore list`)"
            ))
        }
        (409, "POST", ["drs", "apply"]) if message.starts_with("DRS is off") => {
            Some("`corral cluster set --drs manual`".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::hint;

    #[test]
    fn hints_name_the_command_that_helps() {
        let h = |m, p, s, msg| hint(m, p, s, msg).unwrap_or_default();
        assert!(h(
            "GET",
            "/projects/default/vms/web",
            404,
            "VM web does not exist"
        )
        .contains("corral vm list"));
        assert!(
            h("GET", "/hosts/h9?x=1", 404, "host h9 does not exist").contains("corral host list")
        );
        let to = "/projects/default/vms/web/migrate";
        assert!(h("POST", to, 404, "there is no host h9").contains("corral host list"));
        let to = "/projects/default/vms/web/move-storage";
        assert!(h("POST", to, 404, "there is no datastore nfs").contains("corral datastore list"));
        assert!(h(
            "GET",
            "/projects/nope/vms",
            404,
            "project nope does not exist"
        )
        .contains("corral project create"));
        assert!(h(
            "DELETE",
            "/projects/default/vms/web",
            409,
            "VM web is running: ..."
        )
        .contains("corral vm delete web --force"));
        let start = "/projects/default/vms/web/start";
        let full = "VM web cannot start now: host h1 has 0 vCPUs ..., or move the disk to a shared datastore (...)";
        assert!(h("POST", start, 409, full).contains("corral vm move-storage web --datastore"));
        assert!(h("GET", "/vms", 401, "the token is not valid").contains("--token"));
        assert_eq!(hint("POST", "/projects/default/vms", 400, "bad"), None);
    }
}
