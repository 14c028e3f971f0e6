//! Ceph RBD pools as Corral uses them. VM disks on an RBD datastore are RBD images that QEMU
//! opens through librbd (no kernel module, as Proxmox and OpenStack run KVM on Ceph); an image is
//! stored once per pool, with a protected snapshot, and each VM's disk is a clone of it
//! (layering), so a new VM costs a few kilobytes and a twentieth of a second.
//!
//! The controller (checking a pool before it records a datastore, reporting space, removing the
//! stored images) and the hosts (cloning and removing disks) both use it, so it lives apart from
//! the agent and links no hypervisor. It drives Ceph's own `rbd` and `ceph` tools, each call
//! bounded in time: librbd behind a C binding would cost every build, and the tools are what an
//! operator would run by hand. Every setting is checked again here before it reaches a
//! configuration file or a command line, since hosts treat what the store holds as untrusted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use corral_api::{RbdSettings, ValidationError};
use serde::Deserialize;

/// The snapshot of a stored image that VM disks are cloned from.
pub const BASE_SNAPSHOT: &str = "base";

/// How long a call that only reads or changes metadata may take. Ceph gives up on unreachable
/// monitors after `client_mount_timeout` (set below this), so a bad address fails with Ceph's
/// own reason rather than this one.
const META_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds Ceph's clients wait for a monitor before they give up.
const MOUNT_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum CephError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("the Ceph directory {0} cannot be named in Ceph and QEMU options (it holds ',', ':', '=', a space or a line break): use a --data-dir without them")]
    BadDirectory(String),
    #[error("{what} failed: {message}")]
    Command { what: String, message: String },
    #[error("{what} did not finish within {secs} s: is the Ceph cluster reachable from here?")]
    Timeout { what: String, secs: u64 },
    #[error("{what}: Ceph answered something unexpected: {message}")]
    Parse { what: String, message: String },
}

impl CephError {
    /// Whether Ceph said the image (or pool, or snapshot) does not exist.
    pub fn not_found(&self) -> bool {
        matches!(self, CephError::Command { message, .. } if message.contains("(2) No such file or directory"))
    }
    fn exists(&self) -> bool {
        matches!(self, CephError::Command { message, .. } if message.contains("(17) File exists"))
    }
}

/// One RBD pool, reached with one user's key through the configuration written by
/// [`Pool::configure`].
#[derive(Clone, Debug)]
pub struct Pool {
    pool: String,
    user: String,
    conf: PathBuf,
}

/// Space in a pool, from `ceph df` and `rbd du`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    /// Bytes stored in the pool (before replication).
    pub used: u64,
    /// Bytes that can still be stored in it (after replication).
    pub available: u64,
    /// The sum of the sizes of its images.
    pub provisioned: u64,
}

impl Pool {
    /// Writes the configuration and keyring (mode 0600) that reach `settings`' pool with `key`
    /// into `dir`, and returns the pool. Safe to call from several tasks at once: files already
    /// holding the same text are not written again, and each writer uses its own temporary file.
    pub fn configure(dir: &Path, settings: &RbdSettings, key: &str) -> Result<Pool, CephError> {
        settings.validate()?;
        corral_api::validate_key(key)?;
        let shown = dir.display().to_string();
        if shown.contains([',', ':', '=', ' ', '\n', '\r', '#', ';']) {
            return Err(CephError::BadDirectory(shown));
        }
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        set_mode(dir, 0o700)?;
        let keyring = dir.join("keyring");
        let conf = dir.join("ceph.conf");
        write_if_changed(
            &keyring,
            &format!("[client.{}]\n\tkey = {key}\n", settings.user),
        )?;
        write_if_changed(
            &conf,
            &format!(
                "# Written by Corral for one RBD datastore; rewritten from its record.\n\
                 [global]\n\
                 mon_host = {}\n\
                 keyring = {}\n\
                 auth_client_required = cephx\n\
                 client_mount_timeout = {MOUNT_TIMEOUT_SECS}\n\
                 rados_mon_op_timeout = {MOUNT_TIMEOUT_SECS}\n\
                 rados_osd_op_timeout = 60\n\
                 admin_socket =\n\
                 log_file =\n",
                settings.monitors.join(","),
                keyring.display()
            ),
        )?;
        Ok(Pool {
            pool: settings.pool.clone(),
            user: settings.user.clone(),
            conf,
        })
    }

    pub fn name(&self) -> &str {
        &self.pool
    }
    /// `POOL/IMAGE`, as the rbd tool names an image (a bare name would be in pool `rbd`).
    fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.pool)
    }
    pub fn user(&self) -> &str {
        &self.user
    }
    /// The configuration file (monitors, keyring) that QEMU and the Ceph tools read.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The `rbd:` target of `image` for `qemu-img` (which cannot take options otherwise).
    pub fn qemu_img_target(&self, image: &str) -> String {
        format!(
            "rbd:{}/{image}:id={}:conf={}",
            self.pool,
            self.user,
            self.conf.display()
        )
    }

    /// Checks that the pool can be opened and listed with this user and key; the error says
    /// what Ceph said (a wrong key, a pool that does not exist, monitors that do not answer).
    pub async fn check(&self) -> Result<(), CephError> {
        self.images().await.map(|_| ())
    }

    /// The names of the pool's images.
    pub async fn images(&self) -> Result<Vec<String>, CephError> {
        let out = self
            .rbd(
                "listing the pool",
                &["ls", "--pool", &self.pool, "--format", "json"],
            )
            .await?;
        parse("listing the pool", &out)
    }

    /// Bytes stored in the pool and bytes it can still take, as `ceph df` reports them.
    pub async fn space(&self) -> Result<(u64, u64), CephError> {
        #[derive(Deserialize)]
        struct Df {
            pools: Vec<DfPool>,
        }
        #[derive(Deserialize)]
        struct DfPool {
            name: String,
            stats: DfStats,
        }
        #[derive(Deserialize)]
        struct DfStats {
            stored: u64,
            max_avail: u64,
        }
        let what = "reading the pool's space";
        let df: Df = parse(
            what,
            &self.tool("ceph", what, &["df", "--format", "json"]).await?,
        )?;
        let stats = df
            .pools
            .into_iter()
            .find(|p| p.name == self.pool)
            .ok_or_else(|| CephError::Parse {
                what: what.into(),
                message: format!("ceph df does not list pool {}", self.pool),
            })?
            .stats;
        Ok((stats.stored, stats.max_avail))
    }

    /// Space used, free and provisioned in the pool.
    pub async fn usage(&self) -> Result<Usage, CephError> {
        #[derive(Deserialize)]
        struct Du {
            #[serde(default)]
            total_provisioned_size: u64,
        }
        let (used, available) = self.space().await?;
        let what = "reading the pool's provisioned space";
        let du: Du = parse(
            what,
            &self
                .rbd(what, &["du", "--pool", &self.pool, "--format", "json"])
                .await?,
        )?;
        Ok(Usage {
            used,
            available,
            provisioned: du.total_provisioned_size,
        })
    }

    /// The size of `image` in bytes, or `None` if it does not exist.
    pub async fn size(&self, image: &str) -> Result<Option<u64>, CephError> {
        #[derive(Deserialize)]
        struct Info {
            size: u64,
        }
        let what = format!("reading RBD image {}/{image}", self.pool);
        let args = ["info", "--format", "json", &self.spec(image)];
        match self.rbd(&what, &args).await {
            Ok(out) => Ok(Some(parse::<Info>(&what, &out)?.size)),
            Err(e) if e.not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn exists(&self, image: &str) -> Result<bool, CephError> {
        Ok(self.size(image).await?.is_some())
    }

    /// Makes the freshly written image `staged` the stored image `base`: snapshots and protects
    /// it, then renames it, so an image under the name `base` always has its snapshot. If another
    /// writer got there first, `staged` is removed and theirs is used.
    pub async fn publish_base(&self, staged: &str, base: &str) -> Result<(), CephError> {
        let snap = self.spec(&format!("{staged}@{BASE_SNAPSHOT}"));
        self.rbd(
            "snapshotting the stored image",
            &["snap", "create", "--no-progress", &snap],
        )
        .await?;
        self.rbd(
            "protecting the stored image's snapshot",
            &["snap", "protect", &snap],
        )
        .await?;
        match self
            .rbd(
                "naming the stored image",
                &["rename", &self.spec(staged), &self.spec(base)],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.exists() => self.remove_base(staged).await,
            Err(e) => Err(e),
        }
    }

    /// Removes a stored image and its snapshot (refused by Ceph while disks are cloned from it).
    /// Removing one that is gone is not an error.
    pub async fn remove_base(&self, base: &str) -> Result<(), CephError> {
        let snap = self.spec(&format!("{base}@{BASE_SNAPSHOT}"));
        match self
            .rbd(
                "unprotecting the stored image's snapshot",
                &["snap", "unprotect", &snap],
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            // Not protected (a crash between snapshot and protect): purge it all the same.
            Err(CephError::Command { message, .. })
                if message.contains("(22) Invalid argument") => {}
            Err(e) => return Err(e),
        }
        match self
            .rbd(
                "removing the stored image's snapshot",
                &["snap", "purge", "--no-progress", &self.spec(base)],
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.not_found() => return Ok(()),
            Err(e) => return Err(e),
        }
        self.remove(base).await
    }

    /// Makes `image` a clone of the stored image `base` (of `base_size` bytes), `size` bytes
    /// large (at least `base_size`); one that exists already is left as it is. The clone is made
    /// under a temporary name and renamed, so a crash never leaves a half-made disk under the
    /// real name. Two calls of the rbd tool, three when the disk is larger than the image (each
    /// call costs a process and a cephx handshake: they are what a clone costs).
    pub async fn clone_base(
        &self,
        base: &str,
        base_size: u64,
        image: &str,
        size: u64,
    ) -> Result<(), CephError> {
        let staged_name = format!("{image}.part");
        let staged = self.spec(&staged_name);
        let snap = self.spec(&format!("{base}@{BASE_SNAPSHOT}"));
        let clone = ["clone", snap.as_str(), staged.as_str()];
        match self.rbd("cloning the stored image", &clone).await {
            Ok(_) => {}
            // Left by a crash: made again from the start.
            Err(e) if e.exists() => {
                self.remove(&staged_name).await?;
                self.rbd("cloning the stored image", &clone).await?;
            }
            Err(e) => return Err(e),
        }
        if size > base_size {
            let bytes = format!("{size}B");
            self.rbd(
                "growing the VM's disk",
                &["resize", "--size", &bytes, "--no-progress", &staged],
            )
            .await?;
        }
        match self
            .rbd(
                "naming the VM's disk",
                &["rename", &staged, &self.spec(image)],
            )
            .await
        {
            Ok(_) => Ok(()),
            // Made before (its record was not written yet): that one stays.
            Err(e) if e.exists() => self.remove(&staged_name).await,
            Err(e) => Err(e),
        }
    }

    /// Cuts every client that has `image` open (its watchers) or holds its exclusive lock off
    /// the cluster (`ceph osd blocklist add`, for an hour), so that a copy of a VM still running
    /// on a failed or cut-off host can never write to the disk again, however long it lives; the
    /// addresses cut off. This is how a Ceph cluster fences: librbd then breaks the dead
    /// owner's lock for the next QEMU that opens the image.
    pub async fn fence_image(&self, image: &str) -> Result<Vec<String>, CephError> {
        let spec = self.spec(image);
        let what = format!("finding the clients of RBD image {spec}");
        let mut addresses = Vec::new();
        let status: &[&str] = &["status", "--format", "json"];
        let locks: &[&str] = &["lock", "ls", "--format", "json"];
        for args in [status, locks] {
            let mut args = args.to_vec();
            args.push(&spec);
            let out = self.rbd(&what, &args).await;
            let out = match out {
                Ok(out) => out,
                Err(e) if e.not_found() => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let v: serde_json::Value = parse(&what, &out)?;
            collect_addresses(&v, &mut addresses);
        }
        addresses.sort();
        addresses.dedup();
        for a in &addresses {
            self.tool(
                "ceph",
                &format!("cutting client {a} off the cluster"),
                &["osd", "blocklist", "add", a, "3600"],
            )
            .await?;
        }
        Ok(addresses)
    }

    /// Removes `image`; one that is gone is not an error.
    pub async fn remove(&self, image: &str) -> Result<(), CephError> {
        let what = format!("removing RBD image {}/{image}", self.pool);
        match self
            .rbd(&what, &["rm", "--no-progress", &self.spec(image)])
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn rbd(&self, what: &str, args: &[&str]) -> Result<Vec<u8>, CephError> {
        self.tool("rbd", what, args).await
    }

    /// Runs a Ceph tool as this pool's user, bounded in time; its error is the tool's own words.
    async fn tool(&self, program: &str, what: &str, args: &[&str]) -> Result<Vec<u8>, CephError> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg("--conf")
            .arg(&self.conf)
            .args(["--id", &self.user])
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(META_TIMEOUT, cmd.output()).await {
            Err(_) => {
                return Err(CephError::Timeout {
                    what: what.into(),
                    secs: META_TIMEOUT.as_secs(),
                })
            }
            Ok(Err(e)) => {
                return Err(CephError::Command {
                    what: what.into(),
                    message: format!("could not run {program} (install ceph-common): {e}"),
                })
            }
            Ok(Ok(out)) => out,
        };
        if out.status.success() {
            return Ok(out.stdout);
        }
        let mut message = last_words(&out.stderr);
        // A wrong key looks like unreachable monitors in the tools' last words ("(110) Connection
        // timed out", after hunting for one that takes it): say which it was.
        if String::from_utf8_lossy(&out.stderr).contains("handle_auth_bad_method") {
            message = format!(
                "the monitors refused the key of user {} (cephx authentication failed): {message}",
                self.user
            );
        }
        Err(CephError::Command {
            what: what.into(),
            message,
        })
    }
}

/// Every client address (`IP:PORT/NONCE`) under an `address` key of what `rbd status` or
/// `rbd lock ls` printed; anything else is not passed on to `ceph osd blocklist`.
fn collect_addresses(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v.as_str() {
                    Some(a) if k == "address" && is_client_address(a) => out.push(a.to_string()),
                    _ => collect_addresses(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_addresses(v, out)),
        _ => {}
    }
}

fn is_client_address(a: &str) -> bool {
    let (host, nonce) = a.rsplit_once('/').unwrap_or((a, ""));
    !host.is_empty()
        && host.len() <= 64
        && nonce.bytes().all(|b| b.is_ascii_digit())
        && host
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'[' | b']'))
}

/// What a Ceph tool said last: the line with its reason (earlier lines are start-up noise).
fn last_words(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let reason = lines
        .iter()
        .rev()
        .find(|l| l.contains(") ") || l.starts_with("rbd:"))
        .or(lines.last())
        .copied()
        .unwrap_or("no reason given");
    reason.chars().take(400).collect()
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, out: &[u8]) -> Result<T, CephError> {
    serde_json::from_slice(out).map_err(|e| CephError::Parse {
        what: what.into(),
        message: e.to_string(),
    })
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> CephError {
    CephError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), CephError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("restricting", path, e))
}

/// Writes `text` to `path` (mode 0600) unless it holds it already; through a temporary file of
/// this writer's own, renamed into place, so readers never see half a file.
fn write_if_changed(path: &Path, text: &str) -> Result<(), CephError> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    std::fs::write(&tmp, "").map_err(|e| io("writing", &tmp, e))?;
    set_mode(&tmp, 0o600)?;
    std::fs::write(&tmp, text).map_err(|e| io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEY: &str = "AQBkq1ZnAAAAABAAm5yJ3f1dd6Dp0V2uF2H6qQ==";

    fn settings() -> RbdSettings {
        RbdSettings {
            pool: "corral".into(),
            monitors: vec!["127.0.0.1:3300".into(), "[::1]:3300".into()],
            user: "corral".into(),
        }
    }

    #[test]
    fn the_key_is_written_only_to_a_private_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::configure(&dir.path().join("ds"), &settings(), KEY).unwrap();
        let conf = std::fs::read_to_string(pool.conf()).unwrap();
        assert!(
            conf.contains("mon_host = 127.0.0.1:3300,[::1]:3300\n"),
            "{conf}"
        );
        assert!(!conf.contains(KEY));
        let keyring = dir.path().join("ds/keyring");
        assert_eq!(
            std::fs::read_to_string(&keyring).unwrap(),
            format!("[client.corral]\n\tkey = {KEY}\n")
        );
        let mode = std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Again, unchanged: nothing left behind.
        Pool::configure(&dir.path().join("ds"), &settings(), KEY).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join("ds"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ceph.conf", "keyring"]);
    }

    #[test]
    fn settings_from_the_store_are_checked_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings();
        s.monitors = vec!["h:1\nkeyring = /etc/shadow".into()];
        assert!(matches!(
            Pool::configure(dir.path(), &s, KEY),
            Err(CephError::Invalid(_))
        ));
        assert!(matches!(
            Pool::configure(dir.path(), &settings(), "AQB==\n[client.admin]"),
            Err(CephError::Invalid(_))
        ));
        let odd = dir.path().join("a:b");
        assert!(matches!(
            Pool::configure(&odd, &settings(), KEY),
            Err(CephError::BadDirectory(_))
        ));
    }

    #[test]
    fn only_client_addresses_are_fenced() {
        let status =
            serde_json::json!({"watchers": [{"address": "10.77.5.3:0/2911", "client": 4235}]});
        let locks = serde_json::json!([{"id": "auto 1", "locker": "client.4235", "address": "10.77.5.3:0/2911"},
            {"address": "--cluster=x"}, {"address": "1.2.3.4:0/5 6"}]);
        let mut found = Vec::new();
        collect_addresses(&status, &mut found);
        collect_addresses(&locks, &mut found);
        assert_eq!(found, ["10.77.5.3:0/2911", "10.77.5.3:0/2911"]);
    }

    #[test]
    fn a_tool_error_is_its_last_reason() {
        let stderr = b"2026-12-08T00:00:00 7f auth: unable to find a keyring\n\
            rbd: error opening pool 'nope': (2) No such file or directory\n";
        assert_eq!(
            last_words(stderr),
            "rbd: error opening pool 'nope': (2) No such file or directory"
        );
    }
}
