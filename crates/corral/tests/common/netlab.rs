//! A lab of network-namespace hosts (`corral lab up`) under its own name, network and port, driven
//! through the real CLI; `lab down` runs when it is dropped, also when the test failed.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A lab under its own name, network and port; `lab down` runs when dropped, also on failure.
pub struct TestLab {
    pub dir: tempfile::TempDir,
    pub name: String,
    /// The file that holds this lab's number for it (see [`reserve`]).
    reservation: std::path::PathBuf,
}

/// Takes a lab number (name `tN`, network 10.77.N.0/24) that no other test lab on this machine
/// holds: `/tmp/corral-test-lab-N`, created exclusively, with this process's id; one left by a
/// process that is gone is taken over. A random start keeps parallel runs apart.
fn reserve() -> (u32, std::path::PathBuf) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let start = std::process::id() ^ nanos;
    for i in 0..400 {
        let n = start.wrapping_add(i / 2) % 200 + 20;
        let path = std::path::PathBuf::from(format!("/tmp/corral-test-lab-{n}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                write!(f, "{}", std::process::id()).expect("reservation");
                return (n, path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let alive = holder
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
                // Written a moment ago (pid not yet in it), or held: try the next number.
                if !alive && !holder.trim().is_empty() {
                    let _ = std::fs::remove_file(&path);
                }
            }
            Err(e) => panic!("cannot reserve a lab number in /tmp: {e}"),
        }
    }
    panic!("no free lab number: remove stale /tmp/corral-test-lab-* files of labs that are down");
}

impl TestLab {
    pub fn up(hosts: u8) -> TestLab {
        TestLab::up_with(hosts, &[])
    }

    /// A lab with more `lab up` arguments (e.g. simulated hosts).
    pub fn up_with(hosts: u8, extra: &[&str]) -> TestLab {
        let dir = tempfile::Builder::new()
            .prefix("corral-lab-")
            .tempdir_in("/tmp")
            .expect("dir");
        // A name and network of its own, so labs of parallel runs do not meet.
        let (n, reservation) = reserve();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let lab = TestLab {
            dir,
            name: format!("t{n}"),
            reservation,
        };
        let hosts = hosts.to_string();
        let net = n.to_string();
        let port = port.to_string();
        let mut args = vec![
            "lab", "up", "--hosts", &hosts, "--net", &net, "--port", &port, "--accel", "tcg",
        ];
        args.extend(extra);
        let out = lab.corral(&args);
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

    /// Builds JeOS and creates the datastore `nfs`: a directory of the lab every host sees.
    pub fn jeos_and_shared_datastore(&self) {
        self.ok(&["image", "build-jeos"]);
        let shared = self.dir.path().join("shared");
        std::fs::create_dir_all(&shared).expect("shared dir");
        let shared = shared.to_str().expect("path");
        self.ok(&["datastore", "create", "nfs", "--path", shared, "--shared"]);
    }

    pub fn netns(&self, host: &str) -> String {
        format!("corral-{}-{host}", self.name)
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.corral(&["lab", "down"]);
        let _ = std::fs::remove_file(&self.reservation);
    }
}

/// Waits until each VM's console shows the guest's userspace marker.
pub fn wait_booted(lab: &TestLab, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(180);
    for name in names {
        while !lab.ok(&["vm", "console", name]).contains(super::READY) {
            assert!(Instant::now() < deadline, "{name} did not boot");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Types a line on the guest's serial console.
pub fn type_line(lab: &TestLab, name: &str, line: &str) {
    let run_dir = lab.json(&["vm", "show", name])["status"]["run_dir"]
        .as_str()
        .expect("run dir")
        .to_string();
    let mut s = std::os::unix::net::UnixStream::connect(corral_hypervisor::serial_socket(
        std::path::Path::new(&run_dir),
    ))
    .expect("serial socket");
    // The guest's UART holds 16 bytes: type at a human pace so nothing is dropped.
    // Guests on a loaded machine (TCG) may not get to drain it for tens of milliseconds.
    for chunk in format!("{line}\n").as_bytes().chunks(4) {
        s.write_all(chunk).expect("type");
        std::thread::sleep(Duration::from_millis(40));
    }
}

/// Starts `line` (a command put in the background) on the guest's console and waits until `check`
/// (a [`guest_value`] command) answers 0: a character the UART drops can garble a typed line, which
/// is then typed again rather than found missing minutes later.
pub fn start_in_guest(lab: &TestLab, name: &str, line: &str, check: &str) {
    for _ in 0..3 {
        type_line(lab, name, line);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if guest_value(lab, name, "STARTED", check) == "0" {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    panic!("{name} did not start {line:?} (checked with {check:?})");
}

/// Runs `command` on the guest's serial console, which leaves its answer in the shell variable `v`,
/// and returns that answer. The guest prints it as `KEY=v=v`, and the typed line never holds
/// `KEY=` itself (the key goes through a variable): a character the UART drops, in the typed line
/// or in its echo, then shows as a missing key or two different copies, never as a wrong answer,
/// and the line is typed again. Lines are kept free of quotes and parentheses, so a dropped
/// character cannot leave the shell waiting for the rest of a quoted string.
pub fn guest_value(lab: &TestLab, name: &str, key: &str, command: &str) -> String {
    let line = format!("{command}; k={key}; echo $k=$v=$v");
    let before = lab.ok(&["vm", "console", name]).len();
    type_line(lab, name, &line);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut retype = Instant::now() + Duration::from_secs(12);
    loop {
        let text = lab.ok(&["vm", "console", name]);
        let found = text
            .get(before..)
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.split_once(&format!("{key}=")))
            .filter_map(|(_, v)| v.trim().split_once('='))
            .find(|(a, b)| !a.is_empty() && a == b)
            .map(|(a, _)| a.to_string());
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not answer {line:?}; console:\n{text}"
        );
        if Instant::now() > retype {
            // On a loaded machine the guest's UART may have dropped characters: abandon the line
            // (Ctrl-C) and type it again.
            type_line(lab, name, "\u{3}");
            type_line(lab, name, &line);
            retype = Instant::now() + Duration::from_secs(12);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `f` on a thread inside a network namespace (`setns` changes only the calling thread).
#[allow(unsafe_code)]
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns");
        // SAFETY: setns(2) takes a valid descriptor we own and a flag; it touches no memory of ours.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
}

/// TCP throughput in bytes per second from namespace `from_ns` to `to` (an address in `to_ns`):
/// 1 GiB in one stream.
pub fn tcp_throughput(from_ns: &str, to_ns: &str, to: &str) -> f64 {
    use std::io::Read;
    let to = to.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_netns(to_ns, move || {
        let listener = std::net::TcpListener::bind((to.as_str(), 0)).expect("listen");
        tx.send(listener.local_addr().expect("addr")).expect("send");
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    let addr = rx.recv().expect("address");
    let bytes = 1u64 << 30;
    let t = Instant::now();
    in_netns(from_ns, move || {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        let buf = vec![0u8; 1 << 20];
        for _ in 0..(bytes >> 20) {
            conn.write_all(&buf).expect("write");
        }
    })
    .join()
    .expect("client");
    let received = server.join().expect("server");
    assert_eq!(received, bytes);
    bytes as f64 / t.elapsed().as_secs_f64()
}
