//! Records that never go missing (issue 9 items 5 and 6): the audit log follows its name
//! through a rotation or a deleted analytics directory, and `rollbackd.db` is neither
//! started fresh over when it is damaged nor lost when deleted under a running daemon.

mod common;

use std::os::unix::fs::DirBuilderExt;
use std::time::Duration;

use common::*;

fn count(path: &std::path::Path, event: &str) -> usize {
    audit_lines(path)
        .iter()
        .filter(|line| line["event"] == event)
        .count()
}

#[test]
fn after_a_rename_rotation_later_records_go_to_a_new_audit_log() {
    let setup = Setup::new("");
    let _daemon = setup.start();
    setup.promote();
    let log = setup.state().join("analytics/audit.log");
    let rotated = setup.state().join("analytics/audit.log.1");
    assert!(
        wait_for(Duration::from_secs(20), || count(&log, "health-check") > 0).is_some(),
        "no health check; log:\n{}",
        setup.daemon_log()
    );
    std::fs::rename(&log, &rotated).unwrap();
    let in_new = wait_for(Duration::from_secs(20), || count(&log, "health-check") > 0);
    assert!(
        in_new.is_some(),
        "no record reached the new audit.log after `mv audit.log audit.log.1`; log:\n{}",
        setup.daemon_log()
    );
}

#[test]
fn after_rm_rf_analytics_a_rollback_is_recorded_in_the_new_audit_log() {
    let setup = Setup::new("");
    let _daemon = setup.start();
    setup.promote();
    let analytics = setup.state().join("analytics");
    let log = analytics.join("audit.log");
    assert!(
        wait_for(Duration::from_secs(20), || count(&log, "health-check") > 0).is_some(),
        "no health check; log:\n{}",
        setup.daemon_log()
    );
    std::fs::remove_dir_all(&analytics).unwrap();
    setup.routes.error_rate(0.5);
    let executed = wait_for(Duration::from_secs(40), || {
        count(&log, "rollback-executed") == 1
    });
    assert!(
        executed.is_some(),
        "rollback-executed is not in the recreated audit.log; log:\n{}",
        setup.daemon_log()
    );
    assert_eq!(setup.artifacts("rollback_").len(), 1);
    let status = setup.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["recordsPending"], 0, "{status}");
}

#[test]
fn an_empty_rollbackd_db_is_refused_at_start_naming_the_file_and_the_way_out() {
    let setup = Setup::new("");
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(setup.state())
        .unwrap();
    let db = setup.state().join("rollbackd.db");
    std::fs::write(&db, b"").unwrap();
    // Bounded: a daemon that starts fresh over the file would run forever.
    let mut child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .arg("run")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_for(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        exited.is_some(),
        "the daemon started over an empty rollbackd.db"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");
    assert!(stderr.contains("move it aside"), "{stderr}");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "left untouched");
}

#[test]
fn rollbackd_db_deleted_while_running_is_noticed_and_the_session_survives_a_restart() {
    let setup = Setup::new("");
    let daemon = setup.start();
    setup.promote();
    let db = setup.state().join("rollbackd.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let status_json = || {
        let out = setup.cli(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let noticed = wait_for(Duration::from_secs(20), || {
        !status_json()["stateDbRestored"].is_null()
    });
    assert!(
        noticed.is_some(),
        "status never reported the deleted database; log:\n{}",
        setup.daemon_log()
    );
    assert!(db.exists(), "the database was not written back");
    assert!(
        setup.daemon_log().contains("deleted or replaced"),
        "no error in the journal:\n{}",
        setup.daemon_log()
    );
    daemon.kill9();
    let _daemon = setup.start();
    let status = status_json();
    assert_eq!(status["state"], "monitoring", "{status}");
    assert_eq!(status["session"]["active"], "v2", "{status}");
}
