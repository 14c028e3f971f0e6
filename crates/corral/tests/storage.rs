//! RBD datastores against a real Ceph cluster (started for this binary from Debian's packages):
//! what a user sees when they add one, run guests on it, stop and start them, and remove it.

mod common;

use std::time::{Duration, Instant};

use common::ceph::Ceph;
use common::{Lab, READY};

const BOOT: Duration = Duration::from_secs(90);

/// Waits until the VM's guest is up after a start: its console shows the ready marker again
/// (the console log starts anew or grows with the new QEMU).
fn wait_booted_again(lab: &Lab, name: &str, before: &str) {
    let deadline = Instant::now() + BOOT;
    let seen = before.matches(READY).count();
    loop {
        let text = lab.console(name);
        let fresh = if text.len() >= before.len() && text.starts_with(before) {
            text[before.len()..].to_string()
        } else {
            text.clone()
        };
        if fresh.contains(READY) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} did not boot again within {BOOT:?} (ready x{seen} before); console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn guests_run_on_rbd_clones_of_one_stored_image_and_keep_their_data() {
    let ceph = Ceph::start("corral");
    let lab = Lab::start();
    lab.build_jeos();
    let mon = ceph.monitor();
    let keyring = ceph.user_keyring();
    let keyring = keyring.to_str().expect("utf-8");
    let create = |pool: &str, keyring: &str| {
        lab.try_cli(&[
            "datastore",
            "create",
            "ceph",
            "--type",
            "rbd",
            "--pool",
            pool,
            "--monitors",
            &mon,
            "--user",
            "corral",
            "--keyring",
            keyring,
        ])
    };

    // A wrong key, and a pool that is not there: refused with Ceph's reason, nothing recorded.
    let wrong = lab.dir.path().join("wrong.keyring");
    std::fs::write(
        &wrong,
        "[client.corral]\n\tkey = AQBkq1ZnAAAAABAAm5yJ3f1dd6Dp0V2uF2H6qQ==\n",
    )
    .expect("keyring");
    for (pool, keyring, says) in [
        (
            "corral",
            wrong.to_str().expect("utf-8"),
            "refused the key of user corral",
        ),
        ("nope", keyring, "No such file or directory"),
    ] {
        let out = create(pool, keyring);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "pool {pool} was accepted");
        assert!(
            err.contains("datastore ceph cannot be used") && err.contains(says),
            "pool {pool}: {err}"
        );
    }
    assert_eq!(lab.json(&["datastore", "list"]), serde_json::json!([]));

    let out = create("corral", keyring);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The key is a secret: never shown, neither on create nor on show or list.
    let key = ceph.user_key();
    let shown = lab.cli(&["datastore", "show", "ceph", "-o", "json"])
        + &lab.cli(&["datastore", "list", "-o", "json"])
        + &String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains(&key), "the key was shown: {shown}");
    let ds = lab.json(&["datastore", "show", "ceph"]);
    assert_eq!(
        (ds["type"].as_str(), ds["shared"].as_bool()),
        (Some("rbd"), Some(true)),
        "{ds}"
    );
    let capacity = ds["usage"]["capacity_bytes"].as_u64().unwrap_or(0);
    assert!(capacity > 1 << 30, "the 8 GiB OSD has room: {ds}");

    for name in ["rbd-a", "rbd-b"] {
        lab.cli(&[
            "vm",
            "create",
            name,
            "--image",
            "jeos",
            "--memory",
            "128M",
            "--disk",
            "1G",
            "--datastore",
            "ceph",
            "--start",
        ]);
    }
    for name in ["rbd-a", "rbd-b"] {
        lab.wait_console(name, READY, 1, BOOT);
    }
    // One stored image, and each VM's disk a clone of it.
    let mut images = ceph.images();
    images.sort();
    let stored: Vec<&String> = images
        .iter()
        .filter(|i| i.starts_with("corral-image-"))
        .collect();
    let disks: Vec<&String> = images
        .iter()
        .filter(|i| i.starts_with("corral-vm-"))
        .collect();
    assert_eq!((stored.len(), disks.len()), (1, 2), "{images:?}");
    let info = ceph.admin(
        "rbd",
        &[
            "info", "--pool", "corral", "--image", disks[0], "--format", "json",
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(
        info["parent"]["image"].as_str(),
        Some(stored[0].as_str()),
        "{info}"
    );
    assert_eq!(
        info["size"].as_u64(),
        Some(1 << 30),
        "the disk has the size asked for: {info}"
    );
    let vm = lab.vm("rbd-a");
    let pid = vm["status"]["pid"].as_u64().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("file.driver=rbd,file.pool=corral,"),
        "{cmdline}"
    );
    assert!(
        !cmdline.contains(&key),
        "the key is not on QEMU's command line"
    );
    let ds = lab.json(&["datastore", "show", "ceph"]);
    assert_eq!(
        ds["usage"]["provisioned_bytes"]
            .as_u64()
            .map(|b| b >= 2 << 30),
        Some(true),
        "{ds}"
    );

    // A disk larger than all the pool has free is refused with the figures, and nothing is made.
    let err = lab.fails(&[
        "vm",
        "create",
        "huge",
        "--image",
        "jeos",
        "--memory",
        "128M",
        "--disk",
        "1T",
        "--datastore",
        "ceph",
    ]);
    assert!(
        err.contains("cannot fit on datastore ceph") && err.contains("free"),
        "{err}"
    );
    assert!(lab
        .fails(&["vm", "show", "huge"])
        .contains("does not exist"));

    // What the guest writes is on its RBD disk: it is there after a stop and a start.
    let written = lab.guest_value(
        "rbd-a",
        "W",
        "echo kept > /corral-proof && sync && cat /corral-proof",
    );
    assert_eq!(written, "kept");
    lab.cli(&["vm", "stop", "rbd-a"]);
    let before = lab.console("rbd-a");
    lab.cli(&["vm", "start", "rbd-a"]);
    wait_booted_again(&lab, "rbd-a", &before);
    let read = lab.guest_value("rbd-a", "R", "cat /corral-proof");
    assert_eq!(read, "kept", "the file written before the stop");

    // Not yet: moving a disk off RBD is refused with a sentence, and changes nothing.
    let err = lab.fails(&["vm", "move-storage", "rbd-b", "--datastore", "local"]);
    assert!(err.contains("RBD datastore is not possible yet"), "{err}");

    // A datastore in use is kept; once its VMs are gone, removing it empties the pool.
    let err = lab.fails(&["datastore", "delete", "ceph"]);
    assert!(err.contains("holds the disks of VMs"), "{err}");
    lab.delete_vm("rbd-a", &["--force"]);
    lab.delete_vm("rbd-b", &["--force"]);
    lab.cli(&["datastore", "delete", "ceph"]);
    assert_eq!(
        ceph.images(),
        Vec::<String>::new(),
        "nothing of Corral's is left in the pool"
    );
    assert!(lab.qemu_pids().is_empty());
}
