//! DRS with real guests on a two-host lab: three busy guests packed on one host, measured by their
//! host; `drs plan` recommends moving load to the idle host and says why, `drs apply` carries the
//! plan out by live migration, and planning again proposes nothing.

mod common;

use std::time::{Duration, Instant};

use common::netlab::{start_in_guest, wait_booted, TestLab};
use serde_json::Value;

fn vm(lab: &TestLab, name: &str) -> Value {
    lab.json(&["vm", "show", name])
}

#[test]
fn drs_moves_load_off_a_busy_host_and_then_rests() {
    let lab = TestLab::up(2);
    lab.jeos_and_shared_datastore();
    // Pack: all guests start on host-1. DRS off: nothing may be applied yet.
    lab.ok(&["cluster", "set", "--placement", "pack"]);
    let names = ["busy-1", "busy-2", "busy-3"];
    for name in names {
        lab.ok(&[
            "vm",
            "create",
            name,
            "--image",
            "jeos",
            "--memory",
            "128M",
            "--datastore",
            "nfs",
            "--start",
        ]);
    }
    wait_booted(&lab, &names);
    for name in names {
        assert_eq!(vm(&lab, name)["status"]["host"], "host-1");
        start_in_guest(
            &lab,
            name,
            "(touch /tmp/spin; while :; do :; done) >/dev/null 2>&1 &",
            "test -e /tmp/spin; v=$?",
        );
    }
    // Their host measures what they use.
    let deadline = Instant::now() + Duration::from_secs(180);
    for name in names {
        loop {
            let v = vm(&lab, name);
            let cores = v["status"]["usage"]["cpu_cores"].as_f64().unwrap_or(0.0);
            // Spinning, though on a loaded machine a guest may get little of a core.
            if cores > 0.15 {
                assert!(v["status"]["usage"]["memory_bytes"].as_u64().unwrap_or(0) > 16 << 20);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no usage measured for {name}: {v}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    // One more measurement of each, so every figure covers a whole interval of spinning.
    let measured =
        |name: &str| lab.json(&["vm", "show", name])["status"]["usage"]["measured_at"].clone();
    let first: Vec<_> = names.iter().map(|n| measured(n)).collect();
    for (name, before) in names.iter().zip(&first) {
        common::wait_for(
            &format!("a new measurement of {name}"),
            Duration::from_secs(30),
            || measured(name) != *before,
        );
    }
    let err = String::from_utf8_lossy(&lab.corral(&["drs", "apply"]).stderr).into_owned();
    assert!(err.contains("DRS is off"), "{err}");

    // The most sensitive level, so the test holds however little CPU the guests get here.
    lab.ok(&[
        "cluster",
        "set",
        "--drs",
        "manual",
        "--drs-aggressiveness",
        "5",
    ]);
    let plan = lab.json(&["drs", "plan"]);
    let moves = plan["moves"].as_array().expect("moves").clone();
    assert!(!moves.is_empty(), "a busy host and an idle one: {plan}");
    assert_eq!(moves[0]["from"], "host-1", "{plan}");
    assert_eq!(moves[0]["to"], "host-2", "{plan}");
    assert!(
        moves[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("imbalance"),
        "{plan}"
    );
    let load = |p: &Value, when: &str, host: &str| -> f64 {
        p[when]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["host"] == host))
            .and_then(|l| l["load"].as_f64())
            .expect("load")
    };
    assert!(load(&plan, "before", "host-1") > load(&plan, "before", "host-2"));
    assert!(plan["imbalance_after"].as_f64() < plan["imbalance_before"].as_f64());

    let id = plan["id"].as_str().expect("id");
    let applied = lab.json(&["drs", "apply", id]);
    assert_eq!(
        applied["tasks"].as_array().map(Vec::len),
        Some(moves.len()),
        "{applied}"
    );
    for m in &moves {
        let name = m["vm"].as_str().expect("vm").trim_start_matches("default/");
        let v = vm(&lab, name);
        assert_eq!(v["status"]["host"], m["to"], "{name} moved: {v}");
        assert_eq!(v["status"]["phase"], "running");
        let mig = lab.json(&["vm", "migration", name]);
        assert!(
            mig["reason"].as_str().unwrap_or("").starts_with("DRS:"),
            "{mig}"
        );
    }
    // A plan that was carried out is not the latest any more once another is made.
    lab.ok(&["drs", "plan"]);
    let err = String::from_utf8_lossy(&lab.corral(&["drs", "apply", id]).stderr).into_owned();
    assert!(err.contains("not the latest plan"), "{err}");

    // Balanced now: moving any other guest would only swap the loads. Measured usage settles
    // over a few samples (slower on a loaded machine): DRS must come to rest within 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let again = loop {
        std::thread::sleep(Duration::from_secs(6));
        let plan = lab.json(&["drs", "plan"]);
        if plan["moves"].as_array().map(Vec::len) == Some(0) {
            break plan;
        }
        assert!(
            Instant::now() < deadline,
            "after the move DRS rests: {plan}"
        );
    };
    assert!(!again["note"].as_str().unwrap_or("").is_empty(), "{again}");
}
