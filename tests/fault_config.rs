//! Proof under fire: bad configuration files at the command line (exit 78 and what is
//! wrong on stderr), and SIGHUP with a bad file keeping the old configuration.
//! (tests/config.rs covers the malformed-content cases at the library level.)

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs `rollbackd --config PATH check-config`, killing it after 10 s.
fn check_config(path: &Path) -> (Option<i32>, String) {
    let child = Command::new(BIN)
        .arg("--config")
        .arg(path)
        .arg("check-config")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match wait_bounded(child, Duration::from_secs(10)) {
        (Some(status), stderr) => (status.code(), stderr),
        (None, _) => (None, "still running after 10 s".into()),
    }
}

#[test]
fn a_directory_as_the_config_file_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollbackd.toml");
    std::fs::create_dir(&path).unwrap();
    let (code, stderr) = check_config(&path);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn an_invalid_utf8_config_file_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollbackd.toml");
    std::fs::write(&path, b"[monitor]\ncheck_interval = \"30s\xff\xfe\"\n").unwrap();
    let (code, stderr) = check_config(&path);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn a_bad_value_exits_78_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollbackd.toml");
    std::fs::write(&path, "[rules]\nerror_rate_threshold = 1.5\n").unwrap();
    let (code, stderr) = check_config(&path);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("rules.error_rate_threshold"), "{stderr}");
}

/// Regression: a FIFO named as the configuration file made `check-config` (and `run`, and
/// a SIGHUP reload) block forever in `read`, waiting for a writer.
#[test]
fn a_fifo_as_the_config_file_exits_78_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollbackd.toml");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let (code, stderr) = check_config(&path);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

fn hup(pid: u32) {
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
}

fn reloads(setup: &Setup) -> Vec<Value> {
    setup.events("config-reloaded")
}

#[test]
fn sighup_with_a_bad_file_keeps_the_old_configuration_and_a_good_one_is_taken() {
    let setup = Setup::new("");
    let good_text = std::fs::read_to_string(&setup.config).unwrap();
    let daemon = setup.start();
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(out.status.success());
    wait_for(Duration::from_secs(10), || {
        !setup.events("health-check").is_empty()
    })
    .expect("checks run");

    // 1. Garbage: refused, audited with ok: false, the old configuration stays.
    std::fs::write(&setup.config, "this is [not toml\n\u{0}").unwrap();
    hup(daemon.pid());
    wait_for(Duration::from_secs(10), || !reloads(&setup).is_empty())
        .unwrap_or_else(|| panic!("no config-reloaded line; log:\n{}", setup.daemon_log()));
    let refused = &reloads(&setup)[0];
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("TOML"),
        "{refused}"
    );
    let old_hash = refused["configHash"].as_str().unwrap().to_owned();

    // Still working, with the old thresholds: 30% breaches 20%, and it rolls back.
    setup.routes.error_rate(0.3);
    wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-executed").is_empty()
    })
    .unwrap_or_else(|| {
        panic!(
            "no rollback after the bad reload; log:\n{}",
            setup.daemon_log()
        )
    });
    assert!(setup
        .events("health-check")
        .iter()
        .any(|l| l["errorClass"] == "breach"));

    // 2. A good file with a changed threshold is taken.
    let mut table: toml::Table = good_text.parse().unwrap();
    table
        .entry("rules")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert("error_rate_threshold".into(), toml::Value::Float(0.5));
    std::fs::write(&setup.config, toml::to_string(&table).unwrap()).unwrap();
    hup(daemon.pid());
    wait_for(Duration::from_secs(10), || reloads(&setup).len() >= 2).unwrap_or_else(|| {
        panic!(
            "no second config-reloaded line; log:\n{}",
            setup.daemon_log()
        )
    });
    let taken = &reloads(&setup)[1];
    assert_eq!(taken["ok"], true, "{taken}");
    assert_ne!(taken["configHash"].as_str().unwrap(), old_hash);
    assert_eq!(taken["previousConfigHash"].as_str().unwrap(), old_hash);

    // The new threshold is in force: 30% is no longer a breach.
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session = setup.events("monitoring-started").last().unwrap()["sessionId"].clone();
    let checks = || {
        setup
            .events("health-check")
            .into_iter()
            .filter(|l| l["sessionId"] == session)
            .collect::<Vec<_>>()
    };
    wait_for(Duration::from_secs(10), || checks().len() >= 3).expect("checks of the new session");
    for line in checks() {
        assert_eq!(line["errorClass"], "ok", "{line}");
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}
