//! A real single-node Ceph cluster for a test binary (scripts/ceph-dev.sh: a monitor on a free
//! loopback port, a mgr, a bluestore OSD on a sparse file, an initialized RBD pool and a user
//! with `profile rbd` on it), stopped and removed when dropped, also when the test failed.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Ceph {
    dir: tempfile::TempDir,
    /// The address its monitor listens on: loopback, or a lab fabric's so namespace hosts reach it.
    pub addr: String,
    pub port: u16,
    pub pool: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-dev.sh")
}

impl Ceph {
    /// Starts the cluster on loopback with an RBD pool `pool`; fails loudly where Ceph is not
    /// installed.
    pub fn start(pool: &str) -> Ceph {
        Ceph::start_at("127.0.0.1", pool)
    }

    /// Starts the cluster with its monitor on `addr` (an address of this machine).
    pub fn start_at(addr: &str, pool: &str) -> Ceph {
        let dir = tempfile::Builder::new()
            .prefix("corral-ceph-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let port = super::free_port();
        let ceph = Ceph {
            dir,
            addr: addr.into(),
            port,
            pool: pool.into(),
        };
        let out = Command::new("bash")
            .arg(script())
            .args(["start", &ceph.cluster_dir().display().to_string()])
            .arg(format!("{addr}:{port}"))
            .arg(pool)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "the test Ceph cluster did not start (scripts/setup.sh installs Ceph):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ceph
    }

    /// A cluster whose monitor listens on the fabric of `lab` (its .1, where the controller
    /// listens, so every host reaches it), added to the lab as the RBD datastore `ceph`.
    pub fn for_lab(lab: &super::netlab::TestLab) -> Ceph {
        let host = lab.address("host-1");
        let fabric = host.rsplit_once('.').expect("an IPv4 address").0;
        let ceph = Ceph::start_at(&format!("{fabric}.1"), "corral");
        let keyring = ceph.user_keyring();
        lab.ok(&[
            "datastore",
            "create",
            "ceph",
            "--type",
            "rbd",
            "--pool",
            &ceph.pool,
            "--monitors",
            &ceph.monitor(),
            "--user",
            "corral",
            "--keyring",
            keyring.to_str().expect("utf-8"),
        ]);
        ceph
    }

    fn cluster_dir(&self) -> PathBuf {
        self.dir.path().join("cluster")
    }

    /// The monitor, as `--monitors` takes it.
    pub fn monitor(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }

    /// The keyring of the `profile rbd` user `corral`.
    pub fn user_keyring(&self) -> PathBuf {
        self.cluster_dir().join("client.corral.keyring")
    }

    /// The key in the user's keyring.
    pub fn user_key(&self) -> String {
        let text = std::fs::read_to_string(self.user_keyring()).expect("keyring");
        text.lines()
            .find_map(|l| l.trim().strip_prefix("key = "))
            .expect("a key line")
            .to_string()
    }

    /// Runs a Ceph tool (`rbd`, `ceph`) as the cluster's admin; its standard output.
    pub fn admin(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .arg("--conf")
            .arg(self.cluster_dir().join("ceph.conf"))
            .args(args)
            .output()
            .expect("the Ceph tools run");
        assert!(
            out.status.success(),
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The names of the images in the pool.
    pub fn images(&self) -> Vec<String> {
        let out = self.admin("rbd", &["ls", "--pool", &self.pool, "--format", "json"]);
        serde_json::from_str(&out).expect("rbd ls prints JSON")
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.cluster_dir())
            .status();
    }
}
