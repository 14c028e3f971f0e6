//! A lab of network-namespace hosts (`corral lab up`) under its own name, network and port, driven
//! through the real CLI; `lab down` runs when it is dropped, also when the test failed.

use std::process::Command;

use serde_json::Value;

/// A lab under its own name, network and port; `lab down` runs when dropped, also on failure.
pub struct TestLab {
    pub dir: tempfile::TempDir,
    pub name: String,
}

impl TestLab {
    pub fn up(hosts: u8) -> TestLab {
        let dir = tempfile::Builder::new()
            .prefix("corral-lab-")
            .tempdir_in("/tmp")
            .expect("dir");
        // A name and network of its own, so labs of parallel runs do not meet.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = (std::process::id() ^ nanos) % 200 + 20;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let lab = TestLab {
            dir,
            name: format!("t{n}"),
        };
        let hosts = hosts.to_string();
        let net = n.to_string();
        let port = port.to_string();
        let out = lab.corral(&[
            "lab", "up", "--hosts", &hosts, "--net", &net, "--port", &port, "--accel", "tcg",
        ]);
        assert!(
            out.status.success(),
            "lab up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    pub fn corral(&self, args: &[&str]) -> std::process::Output {
        let mut a: Vec<&str> = args.to_vec();
        if args[0] == "lab" {
            a.extend(["--name", &self.name]);
        }
        Command::new(super::BIN)
            .args(&a)
            .env("CORRAL_LAB_DIR", self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env_remove("CORRAL_URL")
            .env_remove("CORRAL_TOKEN")
            .output()
            .expect("corral runs")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.corral(args);
        assert!(
            out.status.success(),
            "corral {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("json")
    }

    /// A host's address on the lab fabric.
    pub fn address(&self, host: &str) -> String {
        let state = self.dir.path().join(&self.name).join("lab.json");
        let state: Value =
            serde_json::from_slice(&std::fs::read(state).expect("lab.json")).expect("json");
        state["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["name"] == host)
            .and_then(|h| h["address"].as_str())
            .expect("host address")
            .to_string()
    }

    pub fn netns(&self, host: &str) -> String {
        format!("corral-{}-{host}", self.name)
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.corral(&["lab", "down"]);
    }
}
