//! Proof under fire: a full or unwritable `state/analytics` (and a full `rollbackd.db`)
//! never prevents a rollback or the kill switch; the failure to record is logged, and the
//! records are written once the space or the directory is back (the recorder retries
//! every 5 s).
//!
//! A full disk is a small tmpfs filled to the brim. We run as root, so permissions do not
//! bite; where mounting is not permitted, the analytics directory is replaced by a regular
//! file of the same name instead, which fails every write with ENOTDIR.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmpfs mounted at `dir` for the life of the guard.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a `size` tmpfs at `dir` (created); `None` when mounting is not permitted.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            // mode=0750: a fresh tmpfs is 1777, which rollbackd refuses as a state
            // directory (or analytics/) anyone could plant files in.
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0750"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Fills the file system until a write fails with ENOSPC.
    fn fill(&self) {
        let mut filler = std::fs::File::create(self.dir.join("filler")).unwrap();
        let block = [0u8; 4096];
        loop {
            if let Err(err) = filler.write_all(&block).and_then(|_| filler.sync_all()) {
                assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
                break;
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Makes `state/analytics` unwritable: a full tmpfs, or else a file in its place.
/// Returns what to call to make it writable again, and which way it went.
fn break_analytics(setup: &Setup) -> (Box<dyn FnOnce()>, &'static str) {
    let analytics = setup.state().join("analytics");
    if let Some(tmpfs) = Tmpfs::mount(&analytics, "64k") {
        tmpfs.fill();
        return (
            Box::new(move || {
                tmpfs.free();
                // Stays mounted (and writable) until the guard goes at the end of the test.
                std::mem::forget(tmpfs);
            }),
            "full tmpfs",
        );
    }
    eprintln!("note: mount not permitted; replacing analytics/ by a regular file instead");
    let _ = std::fs::remove_dir_all(&analytics);
    std::fs::create_dir_all(setup.state()).unwrap();
    std::fs::write(&analytics, "not a directory").unwrap();
    let restore = analytics.clone();
    (
        Box::new(move || {
            std::fs::remove_file(&restore).unwrap();
            std::fs::create_dir(&restore).unwrap();
        }),
        "a file in its place",
    )
}

fn unmount_later(setup: &Setup) -> impl Drop {
    struct Later(PathBuf);
    impl Drop for Later {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    Later(setup.state().join("analytics"))
}

#[test]
fn a_rollback_happens_with_analytics_unwritable_and_is_recorded_once_it_is_back() {
    let setup = Setup::new("");
    let _unmount = unmount_later(&setup);
    let (repair, how) = break_analytics(&setup);
    eprintln!("analytics unwritable: {how}");
    let daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.5);

    // The action does not wait for its records.
    let switched = wait_for(Duration::from_secs(20), || !setup.switches().is_empty());
    assert!(
        switched.is_some(),
        "no rollback with analytics unwritable; log:\n{}",
        setup.daemon_log()
    );
    let said = wait_for(Duration::from_secs(10), || {
        setup
            .daemon_log()
            .contains("cannot write to the analytics directory")
    });
    assert!(
        said.is_some(),
        "failure not logged:\n{}",
        setup.daemon_log()
    );
    let status = setup.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    wait_for(Duration::from_secs(10), || {
        let status = setup.cli(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        status["state"] == "idle"
    })
    .unwrap_or_else(|| panic!("rollback did not finish: {status}"));
    assert!(setup.events("rollback-executed").is_empty());

    repair();
    let recorded = wait_for(Duration::from_secs(15), || {
        !setup.events("rollback-executed").is_empty() && setup.artifacts("rollback_").len() == 1
    });
    assert!(
        recorded.is_some(),
        "records not written after analytics came back; log:\n{}",
        setup.daemon_log()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    // In order, once each.
    let events: Vec<String> = setup
        .audit()
        .iter()
        .map(|l| l["event"].as_str().unwrap().to_owned())
        .filter(|e| e != "health-check")
        .collect();
    assert_eq!(
        events,
        [
            "monitoring-started",
            "rollback-started",
            "rollback-executed",
            "monitoring-stopped"
        ],
        "{how}"
    );
    assert_eq!(setup.switches(), ["v1"]);
}

#[test]
fn the_kill_switch_is_set_with_analytics_unwritable_and_recorded_once_it_is_back() {
    let setup = Setup::new("");
    let _unmount = unmount_later(&setup);
    let (repair, how) = break_analytics(&setup);
    let daemon = setup.start();
    setup.promote();
    setup.routes.set("/v2/health", 503, r#"{"status":"down"}"#);

    let set = wait_for(Duration::from_secs(20), || {
        rollbackd::appdb::killswitch::read(&setup.path("app.db"), "DISABLE_NEW")
            .ok()
            .flatten()
            .as_deref()
            == Some("1")
    });
    assert!(
        set.is_some(),
        "kill switch not set with analytics unwritable ({how}); log:\n{}",
        setup.daemon_log()
    );
    assert!(setup
        .daemon_log()
        .contains("cannot write to the analytics directory"));

    repair();
    let recorded = wait_for(Duration::from_secs(15), || {
        !setup.events("kill-switch-activated").is_empty()
            && setup.artifacts("escalation_").len() == 1
    });
    assert!(
        recorded.is_some(),
        "records not written after analytics came back; log:\n{}",
        setup.daemon_log()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_eq!(setup.events("escalation-triggered").len(), 1);
    let kill_log = audit_lines(&setup.state().join("analytics/kill_switch_audit.log"));
    assert_eq!(kill_log.len(), 1);
    assert_eq!(kill_log[0]["action"], "activated");
}

/// `rollbackd.db` itself on a full file system: the intent cannot be recorded, the
/// rollback happens anyway ("acting without crash protection" in the journal), and the
/// records follow once there is space again.
#[test]
fn a_full_file_system_under_rollbackd_db_does_not_stop_a_rollback() {
    let setup = Setup::new("");
    let state = setup.state();
    let Some(tmpfs) = Tmpfs::mount(&state, "2m") else {
        eprintln!("SKIP a_full_file_system_under_rollbackd_db...: mount not permitted");
        return;
    };
    let daemon = setup.start();
    setup.promote();
    wait_for(Duration::from_secs(10), || {
        !setup.events("health-check").is_empty()
    })
    .expect("checks run");
    tmpfs.fill();
    setup.routes.error_rate(0.5);
    let switched = wait_for(Duration::from_secs(20), || !setup.switches().is_empty());
    assert!(
        switched.is_some(),
        "no rollback with rollbackd.db on a full disk; log:\n{}",
        setup.daemon_log()
    );
    wait_for(Duration::from_secs(10), || {
        setup.daemon_log().contains("monitoring stopped")
    })
    .unwrap_or_else(|| panic!("session did not end; log:\n{}", setup.daemon_log()));
    tmpfs.free();
    let recorded = wait_for(Duration::from_secs(15), || {
        !setup.events("rollback-executed").is_empty() && setup.artifacts("rollback_").len() == 1
    });
    assert!(
        recorded.is_some(),
        "records not written after space came back; log:\n{}",
        setup.daemon_log()
    );
    // The state database catches up too: the session is over and v1 is active, so a
    // restart will not go back to watching the old canary.
    let caught_up = wait_for(Duration::from_secs(15), || {
        let Ok(store) =
            rollbackd::storage::store::Store::open_read_only(&state.join("rollbackd.db"))
        else {
            return false;
        };
        store.current_session().ok().flatten().is_none()
            && store.get_meta("active").ok().flatten().as_deref() == Some("v1")
    });
    assert!(
        caught_up.is_some(),
        "rollbackd.db did not catch up after space came back; log:\n{}",
        setup.daemon_log()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_eq!(setup.switches(), ["v1"]);
    assert_eq!(setup.events("rollback-executed").len(), 1);
    // What the journal said meanwhile (docs/TESTING.md quotes it).
    for line in setup.daemon_log().lines().filter(|l| l.contains("ERROR")) {
        eprintln!("journal: {}", &line[line.len().min(28)..]);
    }
    drop(tmpfs);
}
