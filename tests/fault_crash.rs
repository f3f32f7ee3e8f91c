//! Proof under fire: `kill -9` at random points of monitoring and of a rollback, then a
//! restart, trial after trial. After each trial the records must add up: one artifact per
//! executed rollback, the switch hook at most twice (the interrupted phase re-run once),
//! every audit line whole, and the session finished as rolled back.
//!
//! Three trials run in the default `cargo test`; `RBD_CRASH_TRIALS=N` runs N (the long
//! run; see docs/TESTING.md). `RBD_CRASH_SEED=S` replays a seed. (Not `ROLLBACKD_*`: the
//! daemon refuses unknown variables of its own prefix.)

mod common;

use std::time::{Duration, Instant};

use common::*;

/// xorshift64*: small, seeded, good enough to pick kill points.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..bound_ms` milliseconds.
    fn millis(&mut self, bound_ms: u64) -> Duration {
        Duration::from_millis(self.next() % bound_ms)
    }
}

#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// `delay` after the promotion (while monitoring, or early in the rollback).
    AfterPromotion(Duration),
    /// `delay` after the switch hook started (in switch, verify, resume or recording).
    AfterSwitchStarted(Duration),
}

/// One trial: a fresh state, a failing canary, one `kill -9` at `kill`, a restart, and the
/// invariants. Returns where the kill landed, for the summary.
fn trial(index: usize, kill: KillPoint) -> &'static str {
    let setup = Setup::new("");
    // The switch hook takes a moment, so kills land inside it too.
    std::fs::write(setup.path("slow"), "0.4").unwrap();
    let daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.5);
    match kill {
        KillPoint::AfterPromotion(delay) => std::thread::sleep(delay),
        KillPoint::AfterSwitchStarted(delay) => {
            let started = wait_for(Duration::from_secs(20), || !setup.switches().is_empty());
            assert!(
                started.is_some(),
                "trial {index}: the switch never started; log:\n{}",
                setup.daemon_log()
            );
            std::thread::sleep(delay);
        }
    }
    let landed = landed_in(&setup);
    daemon.kill9();
    let log_before = setup.daemon_log();

    let daemon = setup.start();
    let finished = wait_for(Duration::from_secs(30), || {
        setup
            .events("monitoring-stopped")
            .iter()
            .any(|line| line["state"] == "rolled-back")
    });
    assert!(
        finished.is_some(),
        "trial {index} ({kill:?}, landed {landed}): the session did not finish as rolled back\n\
         before the kill:\n{log_before}\nafter the restart:\n{}",
        setup.daemon_log()
    );
    // A clean stop makes the counts final: nothing is written after the daemon exits.
    assert_eq!(daemon.terminate().code(), Some(0), "trial {index}");

    let context = || {
        format!(
            "trial {index} ({kill:?}, landed {landed})\naudit:\n{}\nlog after restart:\n{}",
            std::fs::read_to_string(setup.state().join("analytics/audit.log")).unwrap_or_default(),
            setup.daemon_log()
        )
    };
    // Every audit line parses (audit() panics on a torn line).
    let audit = setup.audit();
    let count = |event: &str| audit.iter().filter(|l| l["event"] == event).count();
    let executed = count("rollback-executed");
    assert_eq!(executed, 1, "one rollback executed; {}", context());
    assert_eq!(
        setup.artifacts("rollback_").len(),
        executed,
        "one artifact per executed rollback; {}",
        context()
    );
    assert_eq!(
        count("rollback-started"),
        1,
        "the rollback was started once (a restart resumes it); {}",
        context()
    );
    let switches = setup.switches();
    assert!(
        (1..=2).contains(&switches.len()) && switches.iter().all(|to| to == "v1"),
        "the switch hook ran once, or twice when the kill interrupted it: {switches:?}; {}",
        context()
    );
    let stopped: Vec<_> = audit
        .iter()
        .filter(|l| l["event"] == "monitoring-stopped")
        .collect();
    assert_eq!(stopped.len(), 1, "the session ended once; {}", context());
    assert_eq!(stopped[0]["state"], "rolled-back", "{}", context());
    // The other analytics files are whole too.
    let kill_log = setup.state().join("analytics/kill_switch_audit.log");
    audit_lines(&kill_log);
    let manager = std::fs::read_to_string(setup.state().join("analytics/worker_manager.json"))
        .expect("worker_manager.json written");
    let manager: serde_json::Value = serde_json::from_str(&manager)
        .unwrap_or_else(|e| panic!("worker_manager.json parses ({e}); {}", context()));
    assert_eq!(manager["active"], "v1", "{}", context());
    landed
}

/// Where the daemon was when it was killed, judged from its records (for the summary).
fn landed_in(setup: &Setup) -> &'static str {
    let audit =
        std::fs::read_to_string(setup.state().join("analytics/audit.log")).unwrap_or_default();
    if audit.contains("\"monitoring-stopped\"") {
        "after the session ended"
    } else if audit.contains("\"rollback-executed\"") {
        "after rollback-executed"
    } else if !setup.switches().is_empty() {
        "during the rollback (switch or later)"
    } else if audit.contains("\"rollback-started\"") {
        "early in the rollback"
    } else {
        "while monitoring"
    }
}

#[test]
fn kill_9_at_random_points_then_restart_gives_exactly_one_rollback() {
    let trials: usize = std::env::var("RBD_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("RBD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash trials: {trials}, seed {seed} (replay with RBD_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut landed: std::collections::BTreeMap<&str, usize> = Default::default();
    for index in 0..trials {
        // Alternate the two kinds of kill point; the delay is random.
        let kill = if index % 2 == 0 {
            KillPoint::AfterPromotion(rng.millis(1000))
        } else {
            KillPoint::AfterSwitchStarted(rng.millis(600))
        };
        let place = trial(index, kill);
        *landed.entry(place).or_default() += 1;
    }
    eprintln!(
        "crash trials: {trials} passed in {:.1}s (seed {seed}); kills landed: {landed:?}",
        started.elapsed().as_secs_f64()
    );
}

/// Regression (found by the random kills above): a kill between recording a rollback's
/// intent in `rollbackd.db` and writing its `rollback-started` line left a rollback that
/// was resumed and executed but never said it had started. The crash state is built by
/// hand here: a session, and a rollback intent with no audit line yet.
#[test]
fn a_rollback_intent_recorded_just_before_a_kill_is_audited_as_started_on_resume() {
    let setup = Setup::new("");
    setup.promote();
    let session = {
        let store =
            rollbackd::storage::store::Store::open(&setup.state().join("rollbackd.db")).unwrap();
        store
            .current_session()
            .unwrap()
            .expect("promote recorded a session")
    };
    let mut store =
        rollbackd::storage::store::Store::open(&setup.state().join("rollbackd.db")).unwrap();
    let started_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let action_id = store
        .insert_action(&rollbackd::storage::store::NewAction {
            session_id: Some(session.id.clone()),
            kind: rollbackd::storage::states::ActionKind::Rollback,
            trigger: rollbackd::storage::states::ActionTrigger::Automatic,
            state: rollbackd::storage::states::ActionState::Pending,
            phase: None,
            attempt: 1,
            from_worker: Some("v2".into()),
            to_worker: Some("v1".into()),
            reason: "error rate 50% in 3 of 5 checks".into(),
            operator: None,
            started_at_ms,
            detail_json: None,
        })
        .unwrap();
    drop(store);

    let daemon = setup.start();
    wait_for(Duration::from_secs(20), || {
        !setup.events("monitoring-stopped").is_empty()
    })
    .unwrap_or_else(|| {
        panic!(
            "the resumed rollback did not finish; log:\n{}",
            setup.daemon_log()
        )
    });
    assert_eq!(daemon.terminate().code(), Some(0));
    let started = setup.events("rollback-started");
    assert_eq!(started.len(), 1, "audit: {:?}", setup.audit());
    assert_eq!(started[0]["actionId"], action_id);
    assert_eq!(started[0]["resumed"], true);
    assert_eq!(setup.events("rollback-executed").len(), 1);
    assert_eq!(setup.switches(), ["v1"]);

    // A second restart finds the line and does not write it again.
    let daemon = setup.start();
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_eq!(setup.events("rollback-started").len(), 1);
}

/// Regression: a kill after a rollback finished (action `done`) but before the session
/// was ended left a session still `monitoring` the old canary; the restart resumed its
/// checks and rolled back a second time. The crash state is built by hand.
#[test]
fn a_kill_after_the_rollback_finished_but_before_the_session_ended_does_not_roll_back_again() {
    let setup = Setup::new("");
    setup.promote();
    let db = setup.state().join("rollbackd.db");
    let session = rollbackd::storage::store::Store::open(&db)
        .unwrap()
        .current_session()
        .unwrap()
        .expect("promote recorded a session");
    let mut store = rollbackd::storage::store::Store::open(&db).unwrap();
    let started_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 2_000;
    store
        .insert_action(&rollbackd::storage::store::NewAction {
            session_id: Some(session.id.clone()),
            kind: rollbackd::storage::states::ActionKind::Rollback,
            trigger: rollbackd::storage::states::ActionTrigger::Automatic,
            state: rollbackd::storage::states::ActionState::Done,
            phase: None,
            attempt: 1,
            from_worker: Some("v2".into()),
            to_worker: Some("v1".into()),
            reason: "error rate 50% in 3 of 5 checks".into(),
            operator: None,
            started_at_ms,
            detail_json: None,
        })
        .unwrap();
    store.set_meta("active", "v1").unwrap();
    store.set_meta("previous", "v2").unwrap();
    drop(store);
    // The canary's numbers are still bad: resuming its checks would roll back again.
    setup.routes.error_rate(0.5);

    let daemon = setup.start();
    wait_for(Duration::from_secs(10), || {
        !setup.events("monitoring-stopped").is_empty()
    })
    .unwrap_or_else(|| panic!("the session was not ended; log:\n{}", setup.daemon_log()));
    assert_eq!(daemon.terminate().code(), Some(0));
    let stopped = setup.events("monitoring-stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["state"], "rolled-back");
    assert_eq!(stopped[0]["active"], "v1");
    assert!(
        setup.switches().is_empty(),
        "rolled back a second time: {:?}",
        setup.switches()
    );
    assert!(setup.events("rollback-started").is_empty());
    assert!(
        setup.events("health-check").is_empty(),
        "the old canary was checked again"
    );
}

/// A switch hook that notes every process it starts in `hook.pids`, and says `overlap` if
/// one from an earlier run is still alive (not a zombie) when it starts; it sleeps for the seconds in
/// `hook.sleep` (in a child, so a killed group takes the sleep with it).
fn use_overlap_logging_hook(setup: &Setup, hook_timeout: &str) {
    let hook = setup.path("overlap.sh");
    std::fs::write(
        &hook,
        r#"#!/bin/sh
d="$(dirname "$0")"
# Read before "start" is logged: once the test sees "start", changing the file no longer
# changes this run.
s="$(cat "$d/hook.sleep")"
for p in $(cat "$d/hook.pids" 2>/dev/null); do
  # alive and not a zombie (an orphan's parent may never reap it here)
  if s=$(cat "/proc/$p/stat" 2>/dev/null); then
    case "$s" in *") Z "*|*") X "*) ;; *) echo "overlap $$ with $p" >> "$d/hook.log" ;; esac
  fi
done
echo $$ >> "$d/hook.pids"
echo "start $$" >> "$d/hook.log"
sleep "$s" &
echo $! >> "$d/hook.pids"
wait
echo "end $$" >> "$d/hook.log"
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace(
            &format!("{:?}", setup.path("switch.sh").display().to_string()),
            &format!("{:?}", hook.display().to_string()),
        )
        .replace(
            "hook_timeout = \"20s\"",
            &format!("hook_timeout = {hook_timeout:?}"),
        );
    std::fs::write(&setup.config, text).unwrap();
}

fn hook_log(setup: &Setup) -> Vec<String> {
    std::fs::read_to_string(setup.path("hook.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Starts a rollback whose switch hook is slow, and `kill -9`s the daemon once the hook
/// has started: the hook is orphaned, still running.
fn orphan_a_switch_hook(setup: &Setup) {
    let daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.5);
    wait_for(Duration::from_secs(20), || !hook_log(setup).is_empty()).unwrap_or_else(|| {
        panic!(
            "the switch hook never started; log:\n{}",
            setup.daemon_log()
        )
    });
    daemon.kill9();
}

/// Restarts the daemon, waits for the resumed rollback to end the session, stops it.
fn restart_until_rolled_back(setup: &Setup) {
    let daemon = setup.start();
    wait_for(Duration::from_secs(30), || {
        setup
            .events("monitoring-stopped")
            .iter()
            .any(|line| line["state"] == "rolled-back")
    })
    .unwrap_or_else(|| {
        panic!(
            "no rollback after the restart; log:\n{}",
            setup.daemon_log()
        )
    });
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Regression (issue 9, item 8): after a `kill -9` mid-switch, the restarted daemon ran
/// the switch hook again while the orphaned one was still running (4 of 4 trials
/// overlapped). It now waits for the orphan to finish, within `hook_timeout`, and says so.
#[test]
fn a_restart_waits_for_an_orphaned_switch_hook_before_running_it_again() {
    let setup = Setup::new("");
    use_overlap_logging_hook(&setup, "20s");
    std::fs::write(setup.path("hook.sleep"), "2").unwrap();
    orphan_a_switch_hook(&setup);

    restart_until_rolled_back(&setup);

    let log = hook_log(&setup);
    assert!(
        !log.iter().any(|line| line.starts_with("overlap")),
        "two switch hooks ran at once: {log:?}"
    );
    assert_eq!(log.len(), 4, "two runs, one after the other: {log:?}");
    let first = log[0]
        .strip_prefix("start ")
        .expect("first line is a start");
    assert_eq!(
        log[1],
        format!("end {first}"),
        "the orphan finished first: {log:?}"
    );
    let orphans = setup.events("hook-orphaned");
    assert_eq!(orphans.len(), 1, "audit: {:?}", setup.audit());
    assert_eq!(orphans[0]["phase"], "switch");
    assert_eq!(orphans[0]["outcome"], "exited", "{:?}", orphans[0]);
    assert_eq!(setup.events("rollback-executed").len(), 1);
}

/// The same, when the orphan would outlive `hook_timeout`: it is stopped (SIGTERM, then
/// SIGKILL), children included, before the phase runs again.
#[test]
fn a_restart_stops_an_orphaned_switch_hook_that_outlives_its_time_limit() {
    let setup = Setup::new("");
    use_overlap_logging_hook(&setup, "3s");
    std::fs::write(setup.path("hook.sleep"), "60").unwrap();
    orphan_a_switch_hook(&setup);
    // The run after the restart is quick.
    std::fs::write(setup.path("hook.sleep"), "0").unwrap();

    restart_until_rolled_back(&setup);

    let log = hook_log(&setup);
    assert!(
        !log.iter().any(|line| line.starts_with("overlap")),
        "the orphan (or its sleep) was alive when the hook ran again: {log:?}"
    );
    assert_eq!(log.len(), 3, "start (killed), start, end: {log:?}");
    let orphans = setup.events("hook-orphaned");
    assert_eq!(orphans.len(), 1, "audit: {:?}", setup.audit());
    assert_eq!(orphans[0]["outcome"], "killed", "{:?}", orphans[0]);
    // Nothing of the orphan is left.
    let pids = std::fs::read_to_string(setup.path("hook.pids")).unwrap();
    for pid in pids.lines() {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|stat| stat.contains(") Z "))
                    .unwrap_or(true),
            "hook process {pid} still runs"
        );
    }
}

/// kill -9 during the stability watch: the restart resumes the watch on the restored
/// version (no second rollback of the canary, no new watch), and it ends once.
#[test]
fn a_kill_during_the_stability_watch_resumes_it_and_never_rolls_back_again() {
    let setup = Setup::new("[rollback]\nstability_period = \"3s\"");
    let daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.45);
    wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-started").is_empty()
    })
    .unwrap_or_else(|| panic!("no rollback; log:\n{}", setup.daemon_log()));
    setup.routes.error_rate(0.01);
    wait_for(Duration::from_secs(20), || {
        setup
            .events("health-check")
            .iter()
            .any(|c| c["stabilityWatch"] == true)
    })
    .unwrap_or_else(|| panic!("no check in the watch; log:\n{}", setup.daemon_log()));
    daemon.kill9();

    let daemon = setup.start();
    wait_for(Duration::from_secs(20), || {
        !setup.events("stability-confirmed").is_empty()
            && !setup.events("monitoring-stopped").is_empty()
    })
    .unwrap_or_else(|| panic!("the watch did not end; log:\n{}", setup.daemon_log()));
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_eq!(setup.switches(), ["v1"], "one switch, before the kill");
    assert_eq!(setup.events("rollback-executed").len(), 1);
    assert_eq!(
        setup.events("stability-watch-started").len(),
        1,
        "resumed, not begun again"
    );
    assert_eq!(setup.events("stability-confirmed").len(), 1);
    let stopped = setup.events("monitoring-stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(
        (stopped[0]["state"].as_str(), stopped[0]["active"].as_str()),
        (Some("rolled-back"), Some("v1"))
    );
    // After the restart only v1 was checked.
    let last_start = setup
        .audit()
        .iter()
        .rposition(|l| l["event"] == "stability-watch-started")
        .unwrap();
    assert!(setup.audit()[last_start..]
        .iter()
        .filter(|l| l["event"] == "health-check")
        .all(|l| l["worker"] == "v1"));
}

/// Issue 26, item 2: a switch hook that starts the restored worker detached (`setsid
/// nohup`, as many deploy scripts do) leaves it carrying the hook's `ROLLBACKD_HOOK_RUN`
/// mark. After a `kill -9` mid-hook and a restart, the hook itself (still running past its
/// time limit) is stopped, but the worker it started must live: in a normal run rollbackd
/// leaves what a hook starts alone, and a restart must not kill the very worker the
/// switch brought up.
#[test]
fn a_restart_does_not_kill_a_worker_the_switch_hook_started() {
    let setup = Setup::new("");
    use_overlap_logging_hook(&setup, "3s");
    // The first run starts the "worker" detached, then keeps running for a minute.
    let hook = setup.path("overlap.sh");
    let script = std::fs::read_to_string(&hook).unwrap().replacen(
        "echo \"start $$\" >> \"$d/hook.log\"",
        "echo \"start $$\" >> \"$d/hook.log\"\n\
         if [ ! -e \"$d/worker.pid\" ]; then setsid nohup sleep 300 >/dev/null 2>&1 < /dev/null & echo $! > \"$d/worker.pid\"; fi",
        1,
    );
    std::fs::write(&hook, script).unwrap();
    std::fs::write(setup.path("hook.sleep"), "60").unwrap();
    orphan_a_switch_hook(&setup);
    std::fs::write(setup.path("hook.sleep"), "0").unwrap();

    restart_until_rolled_back(&setup);

    let orphans = setup.events("hook-orphaned");
    assert_eq!(orphans.len(), 1, "audit: {:?}", setup.audit());
    assert_eq!(orphans[0]["outcome"], "killed", "{:?}", orphans[0]);
    let worker: i32 = std::fs::read_to_string(setup.path("worker.pid"))
        .expect("the hook recorded the worker it started")
        .trim()
        .parse()
        .unwrap();
    let alive = std::fs::read_to_string(format!("/proc/{worker}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z ") && !stat.contains(") X "));
    // Clean up before asserting: the worker is the test's, not the system's.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    assert!(
        alive,
        "the restart killed the worker the switch hook started (pid {worker})"
    );
}
