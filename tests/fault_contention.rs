//! Proof under fire: the application's database is locked by someone else while an
//! escalation fires. The kill switch must land once the lock is released (delayed, never
//! dropped), be audited, and the daemon must keep checking and answering meanwhile.
//!
//! (1,000 `SettingsStore` writes racing an external writer are covered by
//! `tests/settings.rs::a_thousand_writes_racing_an_external_writer_lose_nothing`.)

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rusqlite::Connection;

const LOCK_HELD: Duration = Duration::from_secs(3);

#[test]
fn kill_switch_lands_after_an_external_write_lock_is_released_and_checks_go_on_meanwhile() {
    let setup = Setup::new("");
    // The application's database exists, as it would in production, in WAL mode.
    drop(rollbackd::appdb::settings::SettingsStore::open(&setup.path("app.db")).unwrap());
    let daemon = setup.start();
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(out.status.success());
    wait_for(Duration::from_secs(10), || {
        !setup.events("health-check").is_empty()
    })
    .expect("first check");

    // Another process (here: another connection, from the daemon's view just as foreign)
    // takes the write lock and keeps it.
    let (locked_tx, locked_rx) = mpsc::channel();
    let app_db = setup.path("app.db");
    let daemon_log = setup.path("daemon.log");
    let holder = std::thread::spawn(move || {
        let connection = Connection::open(&app_db).unwrap();
        connection.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(Instant::now()).unwrap();
        std::thread::sleep(LOCK_HELD);
        // On a loaded machine the escalation may start late in the lock: hold it until
        // the daemon has said it is waiting (the event the test checks), within a bound.
        let _ = wait_for(Duration::from_secs(20), || {
            std::fs::read_to_string(&daemon_log)
                .is_ok_and(|log| log.contains("kill switch: database busy, still waiting"))
        });
        connection.execute_batch("ROLLBACK").unwrap();
        std::time::SystemTime::now()
    });
    let locked_at = locked_rx.recv().unwrap();

    // The canary's health probe fails: an escalation follows after two failed probes.
    setup.routes.set("/v2/health", 503, r#"{"status":"down"}"#);
    let escalating = wait_for(Duration::from_secs(2), || {
        setup
            .daemon_log()
            .contains("kill switch: database busy, still waiting")
            || setup
                .events("health-check")
                .iter()
                .any(|l| l["action"] == "escalate")
    });
    assert!(
        escalating.is_some(),
        "the escalation did not fire while the lock was held; log:\n{}",
        setup.daemon_log()
    );
    let checks_when_escalating = setup.events("health-check").len();

    // While the lock is held: the daemon answers, keeps checking, and has not claimed a
    // kill switch it could not write.
    while locked_at.elapsed() < LOCK_HELD - Duration::from_millis(300) {
        let status = setup.cli(&["status", "--json"]);
        assert!(
            status.status.success(),
            "status failed while the application database was locked"
        );
        assert!(
            setup.events("kill-switch-activated").is_empty(),
            "kill switch audited while the database was still locked"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let checks_during_lock = setup.events("health-check").len() - checks_when_escalating;
    // ~2.5 s at the degraded interval (150 ms) is ~16 checks; half of that is plenty.
    assert!(
        checks_during_lock >= 5,
        "only {checks_during_lock} checks while the kill switch waited for the lock: the driver \
         stopped checking; log:\n{}",
        setup.daemon_log()
    );
    let released_at = holder.join().unwrap();

    let landed = wait_for(Duration::from_secs(15), || {
        !setup.events("kill-switch-activated").is_empty()
    });
    assert!(
        landed.is_some(),
        "the kill switch never landed after the lock was released; log:\n{}",
        setup.daemon_log()
    );
    let value = rollbackd::appdb::killswitch::read(&setup.path("app.db"), "DISABLE_NEW").unwrap();
    assert_eq!(value.as_deref(), Some("1"));
    let activated = &setup.events("kill-switch-activated")[0];
    assert_eq!(activated["value"], "1");
    assert_eq!(activated["source"], "automatic");
    let audited_at = humantime::parse_rfc3339(activated["timestamp"].as_str().unwrap()).unwrap();
    assert!(
        audited_at >= released_at - Duration::from_millis(200),
        "audited before the lock was released"
    );
    assert_eq!(setup.events("escalation-triggered").len(), 1);
    assert!(
        setup
            .daemon_log()
            .contains("kill switch: database busy, still waiting"),
        "the wait was not logged"
    );
    // Checks go on after the escalation too (as evidence), with no second action.
    let after = setup.events("health-check").len();
    wait_for(Duration::from_secs(5), || {
        setup.events("health-check").len() >= after + 3
    })
    .expect("checks continue in the escalated state");
    assert_eq!(setup.events("escalation-triggered").len(), 1);
    assert_eq!(daemon.terminate().code(), Some(0));
}
