//! The fleet (SPEC §8) against a real etcd on loopback (Debian's `etcd-server`; `.ci/run`
//! installs it; without it these print `SKIP` locally and fail under `CI`): the fleet
//! kill switch mirrored into every host's `settings` table and audited `source: fleet`,
//! the local OR fleet rule, a host cut off from etcd (at start, mid-session, during a
//! fleet set), two operators at once, release verdicts and the promotion they refuse,
//! the hosts' leases and `fleet status`. Every wait is for the event that proves it.

mod common;

use std::time::{Duration, Instant};

use common::etcd::{need_etcd, need_etcd_tls, Certs, Etcd, Proxy};
use common::*;
use serde_json::Value;

fn fleet_setup(endpoint: &str, host: &str, extra: &str) -> Setup {
    Setup::new(&format!(
        "[fleet]\nendpoints = [\"{endpoint}\"]\nhost = \"{host}\"\nlease_ttl = \"2s\"\n{extra}"
    ))
}

fn kill_value(setup: &Setup) -> Option<String> {
    rollbackd::appdb::killswitch::read(&setup.path("app.db"), "DISABLE_NEW")
        .ok()
        .flatten()
}

fn status_json(setup: &Setup) -> Value {
    let out = setup.cli(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn fleet_link(setup: &Setup) -> String {
    status_json(setup)["fleet"]["link"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

fn fleet_audit(setup: &Setup) -> Vec<Value> {
    audit_lines(&setup.state().join("analytics/kill_switch_audit.log"))
        .into_iter()
        .filter(|line| line["source"] == "fleet")
        .collect()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_fleet_kill_switch_reaches_every_daemon_and_a_fleet_reset_clears_it() {
    if !need_etcd("a_fleet_kill_switch_reaches_every_daemon_and_a_fleet_reset_clears_it") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let setups: Vec<Setup> = (0..5)
        .map(|i| fleet_setup(&etcd.url(), &format!("host-{i}"), ""))
        .collect();
    let _daemons: Vec<Daemon> = setups.iter().map(Setup::start).collect();
    for setup in &setups {
        wait_for(Duration::from_secs(20), || fleet_link(setup) == "connected")
            .unwrap_or_else(|| panic!("not connected; log:\n{}", setup.daemon_log()));
    }

    let started = Instant::now();
    let out = setups[0].cli(&[
        "kill-switch",
        "set",
        "--fleet",
        "--reason",
        "bad release 42",
    ]);
    assert!(ok(&out).contains("fleet kill switch ON"));
    for setup in &setups {
        wait_for(Duration::from_secs(10), || {
            kill_value(setup).as_deref() == Some("1")
        })
        .unwrap_or_else(|| panic!("not mirrored; log:\n{}", setup.daemon_log()));
    }
    // Generous for a loaded 2-core machine; benches/fleet.rs measures the real bound.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for setup in &setups {
        wait_for(Duration::from_secs(10), || !fleet_audit(setup).is_empty()).unwrap();
        let line = &fleet_audit(setup)[0];
        assert_eq!(line["action"], "activated");
        assert_eq!(line["value"], "1");
        assert!(
            line["reason"].as_str().unwrap().contains("bad release 42"),
            "{line}"
        );
        assert!(line["operator"].is_string());
        // A fleet write is rollbackd's own: never audited as external.
        assert!(setup.events("kill-switch-external").is_empty());
        let status = status_json(setup);
        assert_eq!(status["fleet"]["killSwitch"]["on"], true, "{status}");
    }

    ok(&setups[1].cli(&["kill-switch", "reset", "--fleet", "--reason", "fixed"]));
    for setup in &setups {
        wait_for(Duration::from_secs(10), || {
            kill_value(setup).as_deref() == Some("0")
        })
        .unwrap_or_else(|| panic!("not reset; log:\n{}", setup.daemon_log()));
        wait_for(Duration::from_secs(10), || fleet_audit(setup).len() == 2).unwrap();
        assert_eq!(fleet_audit(setup)[1]["action"], "reset");
    }

    // fleet status: every host, its kill switch, mirrored.
    let out = ok(&setups[0].cli(&["fleet", "status", "--json"]));
    let view: Value = serde_json::from_str(&out).unwrap();
    let hosts = view["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 5, "{view}");
    assert_eq!(view["killSwitch"]["on"], false);
    wait_for(Duration::from_secs(10), || {
        let out = setups[0].cli(&["fleet", "status", "--json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        view["hosts"].as_array().is_some_and(|h| {
            h.iter()
                .all(|h| h["mirrored"] == true && h["killSwitch"] == "0")
        })
    })
    .expect("every host reports the reset mirrored");
    let human = ok(&setups[0].cli(&["fleet", "status"]));
    assert!(
        human.contains("host-3") && human.contains("fleet kill switch  off"),
        "{human}"
    );
}

#[test]
fn a_fleet_reset_never_clears_a_kill_switch_set_on_the_host_and_a_local_reset_is_refused_while_the_fleet_is_on(
) {
    if !need_etcd("a_fleet_reset_never_clears_a_local_kill_switch") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let local = fleet_setup(&etcd.url(), "local", "");
    let other = fleet_setup(&etcd.url(), "other", "");
    let _a = local.start();
    let _b = other.start();
    for setup in [&local, &other] {
        wait_for(Duration::from_secs(20), || fleet_link(setup) == "connected").unwrap();
    }
    // On-call sets this host's own kill switch, then the fleet is set and reset.
    ok(&local.cli(&["kill-switch", "set", "--reason", "local incident"]));
    ok(&local.cli(&[
        "kill-switch",
        "set",
        "--fleet",
        "--reason",
        "fleet incident",
    ]));
    wait_for(Duration::from_secs(10), || {
        kill_value(&other).as_deref() == Some("1")
    })
    .unwrap();

    // While the fleet is on, a local reset is refused (exit 3) unless forced.
    let out = other.cli(&["kill-switch", "reset", "--reason", "try"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fleet kill switch is on"));

    ok(&local.cli(&["kill-switch", "reset", "--fleet", "--reason", "fleet over"]));
    wait_for(Duration::from_secs(10), || {
        kill_value(&other).as_deref() == Some("0")
    })
    .unwrap();
    // The host that mirrored the reset has seen it; the local hold kept the other on.
    wait_for(Duration::from_secs(10), || {
        let status = status_json(&local);
        status["fleet"]["killSwitch"]["on"] == false
            && status["fleet"]["mirroredRevision"] == status["fleet"]["killSwitchRevision"]
    })
    .unwrap();
    assert_eq!(kill_value(&local).as_deref(), Some("1"));
    assert_eq!(status_json(&local)["fleet"]["localHold"], true);
    // The local reset then clears it, as always.
    ok(&local.cli(&["kill-switch", "reset", "--force", "--reason", "local over"]));
    assert_eq!(kill_value(&local).as_deref(), Some("0"));
}

#[test]
fn a_daemon_started_with_etcd_down_guards_its_host_reports_the_partition_and_catches_up() {
    if !need_etcd("a_daemon_started_with_etcd_down") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.kill();
    let setup = fleet_setup(&etcd.url(), "early", "[http]\nlisten = \"127.0.0.1:0\"\n");
    let _daemon = setup.start();
    wait_for(Duration::from_secs(10), || {
        fleet_link(&setup) == "partitioned"
    })
    .unwrap_or_else(|| panic!("no partition reported; log:\n{}", setup.daemon_log()));
    let addr = setup.http_addr();
    let metrics = http_get(addr, "/metrics").body;
    assert_eq!(
        metric_value(&metrics, "rollbackd_fleet_connected"),
        Some(0.0),
        "{metrics}"
    );
    let human = String::from_utf8_lossy(&setup.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("CUT OFF from etcd"), "{human}");
    // A promotion goes ahead with etcd down (saying it could not check the verdicts):
    // an etcd outage must not stop every deploy.
    let promoted = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(
        promoted.status.success(),
        "{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    assert!(String::from_utf8_lossy(&promoted.stderr).contains("promoting without that check"));
    // The local kill switch works without etcd.
    ok(&setup.cli(&["kill-switch", "set", "--reason", "local while cut off"]));
    assert_eq!(kill_value(&setup).as_deref(), Some("1"));
    ok(&setup.cli(&["kill-switch", "reset", "--force", "--reason", "done"]));
    assert_eq!(kill_value(&setup).as_deref(), Some("0"));
    // A fleet set while etcd is down fails loudly and says what to do instead.
    let out = setup.cli(&["kill-switch", "set", "--fleet", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT set"));

    etcd.restart();
    wait_for(Duration::from_secs(20), || {
        fleet_link(&setup) == "connected"
    })
    .unwrap_or_else(|| panic!("did not reconnect; log:\n{}", setup.daemon_log()));
    let metrics = http_get(addr, "/metrics").body;
    assert_eq!(
        metric_value(&metrics, "rollbackd_fleet_connected"),
        Some(1.0)
    );
    ok(&setup.cli(&["kill-switch", "set", "--fleet", "--reason", "after"]));
    wait_for(Duration::from_secs(10), || {
        kill_value(&setup).as_deref() == Some("1")
    })
    .unwrap();
}

#[test]
fn etcd_killed_mid_session_keeps_the_last_value_and_a_set_made_meanwhile_lands_once() {
    if !need_etcd("etcd_killed_mid_session") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&tmp.path().join("etcd"));
    let setup = fleet_setup(&etcd.url(), "mid", "");
    let _daemon = setup.start();
    wait_for(Duration::from_secs(20), || {
        fleet_link(&setup) == "connected"
    })
    .unwrap();
    ok(&setup.cli(&[
        "kill-switch",
        "set",
        "--fleet",
        "--reason",
        "before the crash",
    ]));
    wait_for(Duration::from_secs(10), || {
        kill_value(&setup).as_deref() == Some("1")
    })
    .unwrap();

    etcd.kill();
    wait_for(Duration::from_secs(10), || {
        fleet_link(&setup) == "partitioned"
    })
    .unwrap_or_else(|| panic!("no partition reported; log:\n{}", setup.daemon_log()));
    // Keeps the last value it saw.
    assert_eq!(kill_value(&setup).as_deref(), Some("1"));
    assert_eq!(status_json(&setup)["fleet"]["killSwitch"]["on"], true);

    // etcd comes back with a reset written while this host could not see it.
    etcd.restart();
    etcd.put(
        "/rollbackd/kill_switch",
        br#"{"value":"0","operator":"bob","reason":"reset while away","at":"t"}"#,
    );
    wait_for(Duration::from_secs(20), || {
        kill_value(&setup).as_deref() == Some("0")
    })
    .unwrap_or_else(|| panic!("did not catch up; log:\n{}", setup.daemon_log()));
    wait_for(Duration::from_secs(10), || {
        fleet_link(&setup) == "connected"
    })
    .unwrap();
    // Reconnecting again mirrors nothing twice.
    etcd.restart();
    wait_for(Duration::from_secs(20), || {
        let status = status_json(&setup);
        status["fleet"]["link"] == "connected" && status["fleet"]["failures"] == 0
    })
    .unwrap();
    let lines = fleet_audit(&setup);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["operator"], "bob");
}

#[test]
fn a_host_partitioned_during_a_fleet_set_mirrors_it_when_the_partition_heals() {
    if !need_etcd("a_host_partitioned_during_a_fleet_set") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let proxy = Proxy::start(etcd.client_port);
    let cut_off = fleet_setup(&proxy.url(), "cut-off", "");
    let fine = fleet_setup(&etcd.url(), "fine", "");
    let _a = cut_off.start();
    let _b = fine.start();
    for setup in [&cut_off, &fine] {
        wait_for(Duration::from_secs(20), || fleet_link(setup) == "connected").unwrap();
    }
    proxy.cut();
    wait_for(Duration::from_secs(10), || {
        fleet_link(&cut_off) == "partitioned"
    })
    .unwrap_or_else(|| panic!("no partition reported; log:\n{}", cut_off.daemon_log()));
    ok(&fine.cli(&[
        "kill-switch",
        "set",
        "--fleet",
        "--reason",
        "during the partition",
    ]));
    wait_for(Duration::from_secs(10), || {
        kill_value(&fine).as_deref() == Some("1")
    })
    .unwrap();
    // The fleet view shows the cut-off host has not mirrored it (until its lease ends).
    assert_ne!(kill_value(&cut_off).as_deref(), Some("1"));
    proxy.heal();
    wait_for(Duration::from_secs(20), || {
        kill_value(&cut_off).as_deref() == Some("1")
    })
    .unwrap_or_else(|| panic!("not mirrored after healing; log:\n{}", cut_off.daemon_log()));
    wait_for(Duration::from_secs(10), || fleet_audit(&cut_off).len() == 1).unwrap();
}

#[test]
fn two_operators_setting_and_resetting_at_once_leave_every_host_at_the_last_value() {
    if !need_etcd("two_operators_at_once") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let a = fleet_setup(&etcd.url(), "a", "");
    let b = fleet_setup(&etcd.url(), "b", "");
    let _da = a.start();
    let _db = b.start();
    for setup in [&a, &b] {
        wait_for(Duration::from_secs(20), || fleet_link(setup) == "connected").unwrap();
    }
    let config_a = a.config.clone();
    let config_b = b.config.clone();
    let run = |config: std::path::PathBuf, action: &'static str| {
        std::thread::spawn(move || {
            for i in 0..5 {
                let out = std::process::Command::new(BIN)
                    .arg("--config")
                    .arg(&config)
                    .args([
                        "kill-switch",
                        action,
                        "--fleet",
                        "--reason",
                        &format!("{action} {i}"),
                    ])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        })
    };
    let t1 = run(config_a, "set");
    let t2 = run(config_b, "reset");
    t1.join().unwrap();
    t2.join().unwrap();
    let last: Value = serde_json::from_slice(&etcd.get("/rollbackd/kill_switch").unwrap()).unwrap();
    let want = last["value"].as_str().unwrap().to_owned();
    for setup in [&a, &b] {
        wait_for(Duration::from_secs(10), || {
            let status = status_json(setup);
            status["fleet"]["mirroredRevision"] == status["fleet"]["killSwitchRevision"]
                && status["fleet"]["killSwitch"]["value"] == want.as_str()
        })
        .unwrap_or_else(|| panic!("not settled; log:\n{}", setup.daemon_log()));
        assert_eq!(
            kill_value(setup).as_deref(),
            Some(want.as_str()),
            "host settled elsewhere"
        );
        // Each audited change is a real change: no value written twice in a row.
        let lines = fleet_audit(setup);
        for pair in lines.windows(2) {
            assert_ne!(pair[0]["value"], pair[1]["value"], "{lines:?}");
        }
    }
}

#[test]
fn a_rollback_records_a_verdict_that_refuses_the_promotion_elsewhere_and_a_dead_host_leaves() {
    if !need_etcd("a_rollback_records_a_verdict") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let canary = fleet_setup(&etcd.url(), "canary", "");
    let next = fleet_setup(&etcd.url(), "next", "");
    let canary_daemon = canary.start();
    let _next_daemon = next.start();
    for setup in [&canary, &next] {
        wait_for(Duration::from_secs(20), || fleet_link(setup) == "connected").unwrap();
    }
    canary.promote();
    canary.routes.error_rate(0.5);
    wait_for(Duration::from_secs(30), || {
        !canary.artifacts("rollback_").is_empty()
    })
    .unwrap_or_else(|| panic!("no rollback; log:\n{}", canary.daemon_log()));
    wait_for(Duration::from_secs(10), || {
        etcd.get("/rollbackd/verdicts/v2/canary").is_some()
    })
    .expect("the verdict is in etcd");
    let verdict: Value =
        serde_json::from_slice(&etcd.get("/rollbackd/verdicts/v2/canary").unwrap()).unwrap();
    assert_eq!(verdict["host"], "canary");
    assert_eq!(verdict["to"], "v1");
    assert_eq!(verdict["trigger"], "automatic");
    assert!(verdict["artifact"]
        .as_str()
        .unwrap()
        .starts_with("rollback_"));

    // Promoting v2 elsewhere is refused, naming the host and the reason.
    let out = next.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("canary"), "{stderr}");
    assert!(
        stderr.contains(verdict["reason"].as_str().unwrap()),
        "{stderr}"
    );
    // Another version is not.
    ok(&next.cli(&["promote", "--active", "v3", "--previous", "v1"]));
    // Forced, with a reason.
    let out = next.cli(&["promote", "--active", "v2", "--previous", "v1", "--force"]);
    assert_eq!(out.status.code(), Some(2), "--force needs --reason");
    ok(&next.cli(&[
        "promote",
        "--active",
        "v2",
        "--previous",
        "v1",
        "--force",
        "--reason",
        "fixed config",
    ]));

    // fleet status lists the verdict; a host killed -9 disappears when its lease ends.
    let human = ok(&next.cli(&["fleet", "status"]));
    assert!(human.contains("v2 rolled back on canary"), "{human}");
    canary_daemon.kill9();
    wait_for(Duration::from_secs(15), || {
        let out = next.cli(&["fleet", "status", "--json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        view["hosts"]
            .as_array()
            .is_some_and(|h| h.len() == 1 && h[0]["host"] == "next")
    })
    .expect("the dead host's registration expired with its lease");
}

#[test]
fn with_follow_verdicts_a_host_running_the_rolled_back_version_rolls_back_too() {
    if !need_etcd("with_follow_verdicts_a_host_rolls_back_too") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let canary = fleet_setup(&etcd.url(), "canary", "");
    let follower = fleet_setup(&etcd.url(), "follower", "follow_verdicts = true\n");
    let bystander = fleet_setup(&etcd.url(), "bystander", "");
    let _c = canary.start();
    let _f = follower.start();
    let _b = bystander.start();
    for setup in [&canary, &follower, &bystander] {
        wait_for(Duration::from_secs(20), || fleet_link(setup) == "connected").unwrap();
    }
    // Both run v2 and are healthy; only the canary's worker goes bad.
    follower.promote();
    bystander.promote();
    canary.promote();
    canary.routes.error_rate(0.5);
    wait_for(Duration::from_secs(30), || {
        follower.artifacts("rollback_").len() == 1
    })
    .unwrap_or_else(|| {
        panic!(
            "the follower did not roll back; log:\n{}",
            follower.daemon_log()
        )
    });
    let artifact: Value = serde_json::from_str(
        &std::fs::read_to_string(&follower.artifacts("rollback_")[0]).unwrap(),
    )
    .unwrap();
    assert_eq!(artifact["trigger"], "fleet", "{artifact}");
    assert_eq!(artifact["operator"], "canary", "{artifact}");
    assert!(artifact["reason"]
        .as_str()
        .unwrap()
        .contains("rolled back on canary"));
    assert_eq!(follower.switches(), ["v1"], "switched once");
    // Its own rollback is a verdict too, recorded as following the fleet.
    wait_for(Duration::from_secs(10), || {
        etcd.get("/rollbackd/verdicts/v2/follower").is_some()
    })
    .unwrap();
    let verdict: Value =
        serde_json::from_slice(&etcd.get("/rollbackd/verdicts/v2/follower").unwrap()).unwrap();
    assert_eq!(verdict["trigger"], "fleet");
    // Without follow_verdicts a host is told (status) but keeps running v2.
    wait_for(Duration::from_secs(10), || {
        status_json(&bystander)["fleet"]["verdicts"]
            .as_array()
            .is_some_and(|v| v.len() == 2)
    })
    .unwrap();
    assert!(bystander.switches().is_empty());
    assert_eq!(status_json(&bystander)["session"]["active"], "v2");
}

#[test]
fn a_verdict_written_while_the_host_is_mid_rollback_starts_nothing_more() {
    if !need_etcd("a_verdict_written_while_the_host_is_mid_rollback_starts_nothing_more") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-1", "follow_verdicts = true\n");
    // The switch hook holds the rollback open until the gate is removed.
    std::fs::write(host.path("gate"), "").unwrap();
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    host.promote();
    host.routes.error_rate(0.5);
    wait_for(Duration::from_secs(30), || host.switches() == ["v1"]).unwrap_or_else(|| {
        panic!(
            "the rollback's switch never started; log:\n{}",
            host.daemon_log()
        )
    });
    // Mid-rollback, another host's verdict for v2 arrives.
    let verdict = serde_json::json!({
        "version": "v2",
        "host": "web-9",
        "decision": "rollback",
        "reason": "high error rate",
        "trigger": "automatic",
        "at": rollbackd::storage::audit::rfc3339_millis(std::time::SystemTime::now()),
    });
    etcd.put(
        "/rollbackd/verdicts/v2/web-9",
        verdict.to_string().as_bytes(),
    );
    wait_for(Duration::from_secs(20), || {
        host.daemon_log()
            .contains("v2 was rolled back on web-9: high error rate; not following it: a rollback is in progress")
    })
    .unwrap_or_else(|| {
        panic!(
            "the verdict was not seen during the rollback; log:\n{}",
            host.daemon_log()
        )
    });
    std::fs::remove_file(host.path("gate")).unwrap();
    wait_for(Duration::from_secs(30), || {
        !host.events("rollback-executed").is_empty()
    })
    .unwrap_or_else(|| panic!("the rollback did not finish; log:\n{}", host.daemon_log()));
    // Its own verdict reaches etcd: proof the daemon went on past the rollback.
    wait_for(Duration::from_secs(10), || {
        etcd.get("/rollbackd/verdicts/v2/web-1").is_some()
    })
    .unwrap();
    assert_eq!(host.switches(), ["v1"], "switched once");
    assert_eq!(host.events("rollback-executed").len(), 1);
    let artifacts = host.artifacts("rollback_");
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let artifact: Value =
        serde_json::from_str(&std::fs::read_to_string(&artifacts[0]).unwrap()).unwrap();
    assert_eq!(artifact["trigger"], "automatic", "{artifact}");
    assert!(host.artifacts("escalation_").is_empty());
}

#[test]
fn a_verdict_that_came_while_paused_is_followed_on_resume_even_after_a_kill_9() {
    if !need_etcd("a_verdict_that_came_while_paused_is_followed_on_resume_even_after_a_kill_9") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-1", "follow_verdicts = true\n");
    let daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    host.promote();
    ok(&host.cli(&["pause", "--reason", "investigating"]));
    let verdict = serde_json::json!({
        "version": "v2",
        "host": "web-9",
        "decision": "rollback",
        "reason": "high error rate",
        "trigger": "automatic",
        "at": rollbackd::storage::audit::rfc3339_millis(std::time::SystemTime::now()),
    });
    etcd.put(
        "/rollbackd/verdicts/v2/web-9",
        verdict.to_string().as_bytes(),
    );
    let deferred = "not following it: monitoring is paused (it is followed on resume)";
    wait_for(Duration::from_secs(20), || {
        host.daemon_log().contains(deferred)
    })
    .unwrap_or_else(|| {
        panic!(
            "the verdict was not seen while paused; log:\n{}",
            host.daemon_log()
        )
    });
    // The deferral is in memory only: after a kill -9 etcd hands the verdict over again.
    daemon.kill9();
    std::fs::remove_file(host.path("daemon.log")).unwrap();
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || {
        host.daemon_log().contains(deferred)
    })
    .unwrap_or_else(|| {
        panic!(
            "the restarted daemon did not see the verdict; log:\n{}",
            host.daemon_log()
        )
    });
    assert!(host.switches().is_empty(), "nothing while paused");
    assert!(host.artifacts("rollback_").is_empty());
    ok(&host.cli(&["resume"]));
    wait_for(Duration::from_secs(30), || {
        host.artifacts("rollback_").len() == 1 && !host.events("rollback-executed").is_empty()
    })
    .unwrap_or_else(|| panic!("no rollback on resume; log:\n{}", host.daemon_log()));
    let artifact: Value =
        serde_json::from_str(&std::fs::read_to_string(&host.artifacts("rollback_")[0]).unwrap())
            .unwrap();
    assert_eq!(artifact["trigger"], "fleet", "{artifact}");
    assert_eq!(artifact["operator"], "web-9", "{artifact}");
    assert_eq!(host.switches(), ["v1"], "switched once");
}

fn tls_config(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string()
    )
}

#[test]
fn over_tls_with_a_client_certificate_the_fleet_kill_switch_reaches_the_host() {
    if !need_etcd_tls("over_tls_with_a_client_certificate_the_fleet_kill_switch_reaches_the_host") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("certs"));
    let etcd = Etcd::start_tls(&tmp.path().join("etcd"), &certs);
    // The host's own copy of the CA, to rotate below (etcd keeps reading certs.ca).
    let host_ca = tmp.path().join("host-ca.pem");
    std::fs::copy(&certs.ca, &host_ca).unwrap();
    let host = fleet_setup(
        &etcd.tls_url(),
        "web-1",
        &tls_config(&host_ca, &certs.client_cert, &certs.client_key),
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |m| std::fs::set_permissions(&certs.client_key, std::fs::Permissions::from_mode(m));
    mode(0o644).unwrap();
    let check = ok(&host.cli(&["check-config"]));
    assert!(
        check.contains("has mode 0644: others than its owner"),
        "{check}"
    );
    mode(0o600).unwrap();
    let check = ok(&host.cli(&["check-config"]));
    assert!(!check.contains("warning"), "{check}");
    assert!(
        check.contains("fleet TLS files: readable and valid PEM"),
        "{check}"
    );
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap_or_else(|| {
        panic!(
            "not connected over TLS: {}\nlog:\n{}",
            status_json(&host)["fleet"],
            host.daemon_log()
        )
    });
    // The CLI's fleet write goes over TLS too; the host mirrors it.
    ok(&host.cli(&["kill-switch", "set", "--fleet", "--reason", "tls test"]));
    wait_for(Duration::from_secs(20), || {
        kill_value(&host).as_deref() == Some("1")
    })
    .unwrap();
    let record: Value =
        serde_json::from_slice(&etcd.get("/rollbackd/kill_switch").unwrap()).unwrap();
    assert_eq!(record["reason"], "tls test", "{record}");
    let listed = ok(&host.cli(&["fleet", "status", "--json"]));
    assert!(listed.contains("web-1"), "{listed}");

    // A rotation caught half-written keeps the client that works...
    let replace = |from: &[u8]| {
        let next = tmp.path().join("host-ca.next");
        std::fs::write(&next, from).unwrap();
        std::fs::rename(&next, &host_ca).unwrap();
    };
    replace(b"-----BEGIN CERTIFICATE-----\ntruncat");
    wait_for(Duration::from_secs(20), || {
        host.daemon_log()
            .contains("a TLS file changed but cannot be used")
    })
    .unwrap_or_else(|| {
        panic!(
            "the broken file was not noticed; log:\n{}",
            host.daemon_log()
        )
    });
    assert_eq!(
        fleet_link(&host),
        "connected",
        "{}",
        status_json(&host)["fleet"]
    );
    // ...a rotation to a CA that did not sign etcd's certificate is used, so the host is
    // cut off (new connections fail the handshake), and rotating back joins it again:
    // both without a restart.
    replace(&std::fs::read(&certs.other_ca).unwrap());
    wait_for(Duration::from_secs(30), || {
        fleet_link(&host) == "partitioned"
    })
    .unwrap_or_else(|| {
        panic!(
            "the rotated CA was not used: {}",
            status_json(&host)["fleet"]
        )
    });
    replace(&std::fs::read(&certs.ca).unwrap());
    wait_for(Duration::from_secs(30), || fleet_link(&host) == "connected").unwrap_or_else(|| {
        panic!(
            "not connected after rotating back: {}",
            status_json(&host)["fleet"]
        )
    });
    assert!(host
        .daemon_log()
        .contains("a TLS file changed: new connections use it"));
}

#[test]
fn a_host_whose_tls_files_are_wrong_is_cut_off_says_why_guards_itself_and_heals_when_they_are_mended(
) {
    if !need_etcd_tls("a_host_whose_tls_files_are_wrong_is_cut_off_says_why_guards_itself_and_heals_when_they_are_mended") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("certs"));
    let etcd = Etcd::start_tls(&tmp.path().join("etcd"), &certs);

    // A CA that did not sign etcd's certificate: the handshake fails, and says so.
    let rogue = fleet_setup(
        &etcd.tls_url(),
        "web-2",
        &tls_config(&certs.other_ca, &certs.client_cert, &certs.client_key),
    );
    let _rogue = rogue.start();
    wait_for(Duration::from_secs(20), || {
        fleet_link(&rogue) == "partitioned"
    })
    .unwrap();
    let error = status_json(&rogue)["fleet"]["linkError"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );

    // No client certificate: etcd refuses the connection.
    let anonymous = fleet_setup(
        &etcd.tls_url(),
        "web-3",
        &format!("ca_file = {:?}\n", certs.ca.display().to_string()),
    );
    let _anonymous = anonymous.start();
    wait_for(Duration::from_secs(20), || {
        fleet_link(&anonymous) == "partitioned"
    })
    .unwrap();
    let error = status_json(&anonymous)["fleet"]["linkError"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.contains("Certificate"),
        "etcd's TLS alert is in the link error: {error}"
    );
    let out = anonymous.cli(&["kill-switch", "set", "--fleet", "--reason", "nope"]);
    assert!(
        !out.status.success(),
        "a fleet write without a client certificate succeeded"
    );
    assert!(etcd.get("/rollbackd/kill_switch").is_none());

    // The key file is missing: check-config warns, `run` still guards the host, and once
    // the file is there the host joins without a restart.
    let key = tmp.path().join("late.key");
    let late = fleet_setup(
        &etcd.tls_url(),
        "web-4",
        &tls_config(&certs.ca, &certs.client_cert, &key),
    );
    let check = ok(&late.cli(&["check-config", "--for", "run"]));
    assert!(check.contains("warning: fleet: fleet.key_file"), "{check}");
    assert!(check.contains("cannot read it"), "{check}");
    let _late = late.start();
    // The verdict check cannot be made with these files: `promote` fails closed (an etcd
    // outage would let it through with a warning), and --force skips the check.
    let refused = late.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(
        !refused.status.success(),
        "promoted without checking the verdicts"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("cannot check the fleet's verdicts for v2")
            && stderr.contains("fleet.key_file"),
        "{stderr}"
    );
    ok(&late.cli(&[
        "promote",
        "--active",
        "v2",
        "--previous",
        "v1",
        "--force",
        "--reason",
        "the key is on its way",
    ]));
    wait_for(Duration::from_secs(20), || {
        fleet_link(&late) == "partitioned"
    })
    .unwrap();
    let error = status_json(&late)["fleet"]["linkError"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.contains("fleet.key_file") && error.contains("cannot read it"),
        "{error}"
    );
    assert_eq!(
        status_json(&late)["session"]["active"],
        "v2",
        "the host guards itself"
    );
    std::fs::copy(&certs.client_key, &key).unwrap();
    wait_for(Duration::from_secs(30), || fleet_link(&late) == "connected").unwrap_or_else(|| {
        panic!(
            "not connected once the key was there: {}",
            status_json(&late)["fleet"]
        )
    });
}

#[test]
fn with_an_etcd_user_the_host_authenticates_says_why_when_it_cannot_and_authenticates_again_after_a_password_rotation(
) {
    if !need_etcd_tls("with_an_etcd_user_the_host_authenticates") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("certs"));
    let mut etcd = Etcd::start_https(&tmp.path().join("etcd"), &certs, false);
    etcd.enable_auth("web-1", "right-pw", "/rollbackd/");
    let password = tmp.path().join("etcd-password");
    std::fs::write(&password, "wrong-pw\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let host = fleet_setup(
        &etcd.tls_url(),
        "web-1",
        &format!(
            "ca_file = {:?}\nusername = \"web-1\"\npassword_file = {:?}\n",
            certs.ca.display().to_string(),
            password.display().to_string()
        ),
    );
    let check = ok(&host.cli(&["check-config"]));
    assert!(
        check.contains("fleet.password_file") && check.contains("has mode 0644"),
        "{check}"
    );
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _daemon = host.start();
    // A wrong password: cut off, and the link error says so.
    wait_for(Duration::from_secs(20), || {
        fleet_link(&host) == "partitioned"
    })
    .unwrap();
    let error = status_json(&host)["fleet"]["linkError"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        error.contains("authenticating as \"web-1\"") && error.contains("authentication failed"),
        "{error}"
    );
    // The password file is read at each attempt: mended, the host joins.
    std::fs::write(&password, "right-pw\n").unwrap();
    wait_for(Duration::from_secs(30), || fleet_link(&host) == "connected").unwrap_or_else(|| {
        panic!(
            "not connected with the right password: {}",
            status_json(&host)["fleet"]
        )
    });
    ok(&host.cli(&["kill-switch", "set", "--fleet", "--reason", "auth test"]));
    wait_for(Duration::from_secs(20), || {
        kill_value(&host).as_deref() == Some("1")
    })
    .unwrap();
    // A password rotation: the new one goes into the file, then into etcd. etcd keeps
    // the host's token but refuses it at its next read or write ("revision of auth
    // store is old"); the host authenticates again with the new password, without a
    // restart. A fleet reset makes it write: its registration records the mirrored value.
    std::fs::write(&password, "rotated-pw\n").unwrap();
    etcd.change_password("web-1", "rotated-pw");
    ok(&host.cli(&[
        "kill-switch",
        "reset",
        "--fleet",
        "--reason",
        "auth test over",
    ]));
    let registered =
        || -> Option<Value> { serde_json::from_slice(&etcd.get("/rollbackd/hosts/web-1")?).ok() };
    wait_for(Duration::from_secs(30), || {
        kill_value(&host).as_deref() == Some("0")
            && registered().is_some_and(|r| r["killSwitch"] == "0")
    })
    .unwrap_or_else(|| {
        panic!(
            "the reset after the rotation did not reach the host and its registration: {:?}\nlog:\n{}",
            registered(),
            host.daemon_log()
        )
    });
    assert!(
        host.daemon_log().contains("etcd refused the auth token"),
        "{}",
        host.daemon_log()
    );
    // Through a restart of etcd (its tokens may or may not survive it) the host stays in.
    etcd.restart();
    wait_for(Duration::from_secs(30), || fleet_link(&host) == "connected").unwrap();
}

#[test]
fn a_verdict_made_while_cut_off_survives_a_kill_9_and_reaches_etcd_on_reconnect() {
    if !need_etcd("a_verdict_made_while_cut_off_survives_a_kill_9_and_reaches_etcd_on_reconnect") {
        return;
    }
    verdict_survives_a_kill_9(false);
}

#[test]
fn a_rollback_whose_verdict_was_never_queued_is_told_to_the_fleet_after_a_restart() {
    if !need_etcd("a_rollback_whose_verdict_was_never_queued_is_told_to_the_fleet_after_a_restart")
    {
        return;
    }
    verdict_survives_a_kill_9(true);
}

/// A rollback while cut off from etcd, then kill -9 (with `forget_the_queue`, as if it
/// came before the verdict was queued), then etcd back and a restart: the verdict lands.
fn verdict_survives_a_kill_9(forget_the_queue: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&tmp.path().join("etcd"));
    let setup = fleet_setup(&etcd.url(), "island", "");
    let daemon = setup.start();
    wait_for(Duration::from_secs(20), || {
        fleet_link(&setup) == "connected"
    })
    .unwrap();
    etcd.kill();
    wait_for(Duration::from_secs(10), || {
        fleet_link(&setup) == "partitioned"
    })
    .unwrap_or_else(|| panic!("no partition reported; log:\n{}", setup.daemon_log()));
    // Cut off, the host still promotes (with a warning) and still rolls back on its own.
    setup.promote();
    setup.routes.error_rate(0.5);
    wait_for(Duration::from_secs(30), || {
        !setup.events("rollback-executed").is_empty()
    })
    .unwrap_or_else(|| panic!("no rollback while cut off; log:\n{}", setup.daemon_log()));
    let db_path = setup.state().join("rollbackd.db");
    let queued = || -> Option<String> {
        let db = rusqlite::Connection::open(&db_path).ok()?;
        db.query_row(
            "SELECT value FROM meta WHERE key = 'fleet_verdicts_pending'",
            [],
            |r| r.get(0),
        )
        .ok()
    };
    if forget_the_queue {
        // Queued first, so that taking it away below is the state of a daemon killed
        // between the rollback's end and the queueing.
        wait_for(Duration::from_secs(10), || {
            queued().is_some_and(|q| q.contains("\"v2\""))
        })
        .unwrap_or_else(|| panic!("the verdict was never queued; log:\n{}", setup.daemon_log()));
    }
    daemon.kill9();
    assert!(etcd.get("/rollbackd/verdicts/v2/island").is_none());
    if forget_the_queue {
        // The worst moment: the rollback's row is done, but the daemon died before the
        // verdict was queued. The row alone must be enough.
        let db = rusqlite::Connection::open(&db_path).unwrap();
        db.execute("DELETE FROM meta WHERE key = 'fleet_verdicts_pending'", [])
            .unwrap();
        db.execute(
            "UPDATE meta SET value = '0' WHERE key = 'fleet_verdicts_through'",
            [],
        )
        .unwrap();
    }

    etcd.restart();
    let _daemon = setup.start();
    wait_for(Duration::from_secs(20), || {
        etcd.get("/rollbackd/verdicts/v2/island").is_some()
    })
    .unwrap_or_else(|| {
        panic!(
            "the verdict kept in rollbackd.db never reached etcd; log:\n{}",
            setup.daemon_log()
        )
    });
    let verdict: Value =
        serde_json::from_slice(&etcd.get("/rollbackd/verdicts/v2/island").unwrap()).unwrap();
    assert_eq!(verdict["to"], "v1", "{verdict}");
    assert_eq!(verdict["trigger"], "automatic", "{verdict}");
    // The restart carried out nothing twice.
    assert_eq!(setup.switches(), ["v1"]);
    assert_eq!(setup.events("rollback-executed").len(), 1);
}

/// A verdict of `host` for `version` as another build writes it, its `at` by `clock`.
fn verdict_body(version: &str, host: &str, at: std::time::SystemTime) -> Vec<u8> {
    serde_json::json!({
        "version": version,
        "host": host,
        "decision": "rollback",
        "reason": "high error rate",
        "to": "v1",
        "trigger": "automatic",
        "at": rollbackd::storage::audit::rfc3339_millis(at),
    })
    .to_string()
    .into_bytes()
}

fn refused_with(out: &std::process::Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains(says), "{says:?} not in: {stderr}");
}

/// One raw request line to the daemon's control socket (any client, not the CLI); the
/// reply lines.
fn raw_request(setup: &Setup, request: &Value) -> Vec<Value> {
    use std::io::{BufRead, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(setup.state().join("rollbackd.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.to_string().as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    std::io::BufReader::new(stream)
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect()
}

#[test]
fn a_verdict_written_by_a_host_whose_clock_is_slow_is_followed_by_its_etcd_revision() {
    if !need_etcd("a_verdict_written_by_a_host_whose_clock_is_slow_is_followed") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-1", "follow_verdicts = true\n");
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    host.promote();
    // After the promotion, a host whose clock is ten minutes slow rolls v2 back.
    let slow = std::time::SystemTime::now() - Duration::from_secs(600);
    etcd.put(
        "/rollbackd/verdicts/v2/web-9",
        &verdict_body("v2", "web-9", slow),
    );
    wait_for(Duration::from_secs(30), || {
        !host.events("rollback-executed").is_empty()
    })
    .unwrap_or_else(|| {
        panic!(
            "a verdict written after the promotion was not followed; log:\n{}",
            host.daemon_log()
        )
    });
    let artifact: Value =
        serde_json::from_str(&std::fs::read_to_string(&host.artifacts("rollback_")[0]).unwrap())
            .unwrap();
    assert_eq!(artifact["trigger"], "fleet", "{artifact}");
    assert_eq!(host.switches(), ["v1"]);
}

#[test]
fn a_verdict_a_forced_promotion_went_past_is_not_followed_after_a_restart_whatever_its_writers_clock(
) {
    if !need_etcd("a_verdict_a_forced_promotion_went_past_is_not_followed_after_a_restart") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-1", "follow_verdicts = true\n");
    // Written before the promotion by a host whose clock is a day fast.
    let fast = std::time::SystemTime::now() + Duration::from_secs(86_400);
    etcd.put(
        "/rollbackd/verdicts/v2/web-9",
        &verdict_body("v2", "web-9", fast),
    );
    let daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    refused_with(
        &host.cli(&["promote", "--active", "v2", "--previous", "v1"]),
        "web-9",
    );
    ok(&host.cli(&[
        "promote",
        "--active",
        "v2",
        "--previous",
        "v1",
        "--force",
        "--reason",
        "fixed in the config",
    ]));
    daemon.terminate();
    std::fs::remove_file(host.path("daemon.log")).unwrap();
    let _daemon = host.start();
    let said =
        "v2 was rolled back on web-9: high error rate; not following it: written at etcd revision";
    wait_for(Duration::from_secs(20), || host.daemon_log().contains(said)).unwrap_or_else(|| {
        panic!(
            "the restarted daemon did not say why the verdict is not followed; log:\n{}",
            host.daemon_log()
        )
    });
    assert!(host.switches().is_empty(), "{:?}", host.switches());
    assert!(host.events("rollback-started").is_empty());
    assert_eq!(status_json(&host)["session"]["active"], "v2");
}

#[test]
fn a_second_host_with_the_same_name_is_refused_and_never_removes_the_first() {
    if !need_etcd("a_second_host_with_the_same_name_is_refused") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let first = fleet_setup(&etcd.url(), "web-2", "");
    let twin = fleet_setup(&etcd.url(), "web-2", "");
    let first_daemon = first.start();
    wait_for(Duration::from_secs(20), || {
        fleet_link(&first) == "connected"
    })
    .unwrap();
    first.promote();
    let registered = || -> Value {
        etcd.get("/rollbackd/hosts/web-2")
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or(Value::Null)
    };
    wait_for(Duration::from_secs(10), || registered()["active"] == "v2").unwrap();

    // A clone of the image, with the same name, running nothing yet.
    let twin_daemon = twin.start();
    wait_for(Duration::from_secs(30), || {
        let status = status_json(&twin);
        let error = status["fleet"]["linkError"].as_str().unwrap_or("");
        status["fleet"]["link"] == "partitioned"
            && error.contains("web-2")
            && error.contains("fleet.host")
    })
    .unwrap_or_else(|| {
        panic!(
            "the twin was not refused; status {}; log:\n{}",
            status_json(&twin),
            twin.daemon_log()
        )
    });
    assert!(
        twin.daemon_log()
            .contains("Set a unique host under [fleet]"),
        "{}",
        twin.daemon_log()
    );
    assert_eq!(fleet_link(&first), "connected");
    assert_eq!(registered()["active"], "v2", "the first host's record");
    // The twin stops (revoking its lease): the first host's registration stays.
    assert!(twin_daemon.terminate().success());
    assert_eq!(
        registered()["active"],
        "v2",
        "the twin's stop removed the first host's registration"
    );

    // The first host killed -9 and started again: it waits out its own previous lease,
    // then joins again.
    first_daemon.kill9();
    let _first = first.start();
    wait_for(Duration::from_secs(30), || {
        fleet_link(&first) == "connected"
    })
    .unwrap_or_else(|| panic!("not rejoined; log:\n{}", first.daemon_log()));
    wait_for(Duration::from_secs(10), || registered()["active"] == "v2").unwrap();
}

#[test]
fn an_unreadable_verdict_refuses_the_promotion_naming_its_key_with_or_without_a_daemon() {
    if !need_etcd("an_unreadable_verdict_refuses_the_promotion") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-1", "");
    // No `to` nor `trigger`; and one from a build whose fields have other types.
    etcd.put(
        "/rollbackd/verdicts/v8/web-3",
        br#"{"version": "v8", "host": "web-3", "decision": "rollback", "reason": "bad", "at": "2026-01-01T00:00:00Z"}"#,
    );
    etcd.put(
        "/rollbackd/verdicts/v2/web-4",
        br#"{"version": "v2", "host": "web-4", "decision": "rollback", "reason": "bad", "to": "v1", "trigger": "automatic", "failureCount": "three", "at": "2026-01-01T00:00:00Z"}"#,
    );
    let cases = [
        ("v8", "/rollbackd/verdicts/v8/web-3"),
        ("v2", "/rollbackd/verdicts/v2/web-4"),
    ];
    // No daemon running: the command's own run applies the same gate.
    for (version, key) in cases {
        refused_with(
            &host.cli(&["promote", "--active", version, "--previous", "v1"]),
            key,
        );
    }
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    for (version, key) in cases {
        refused_with(
            &host.cli(&["promote", "--active", version, "--previous", "v1"]),
            key,
        );
    }
    assert!(host.events("monitoring-started").is_empty());
    // Forced past, with a reason.
    ok(&host.cli(&[
        "promote",
        "--active",
        "v2",
        "--previous",
        "v1",
        "--force",
        "--reason",
        "written by a broken build",
    ]));
}

#[test]
fn a_verdict_whose_body_disagrees_with_its_key_is_refused_not_followed_and_blocks_no_other_version()
{
    if !need_etcd("a_verdict_whose_body_disagrees_with_its_key") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let follower = fleet_setup(&etcd.url(), "web-1", "follow_verdicts = true\n");
    let other = fleet_setup(&etcd.url(), "web-2", "");
    let _daemon = follower.start();
    wait_for(Duration::from_secs(20), || {
        fleet_link(&follower) == "connected"
    })
    .unwrap();
    follower.promote();
    // The key says v9 on web-Z; the body says v2 on web-Q.
    etcd.put(
        "/rollbackd/verdicts/v9/web-Z",
        &verdict_body("v2", "web-Q", std::time::SystemTime::now()),
    );
    wait_for(Duration::from_secs(20), || {
        let log = follower.daemon_log();
        log.contains("/rollbackd/verdicts/v9/web-Z") && log.contains("does not match its key")
    })
    .unwrap_or_else(|| {
        panic!(
            "the mismatch was not refused; log:\n{}",
            follower.daemon_log()
        )
    });
    assert!(follower.switches().is_empty(), "{:?}", follower.switches());
    assert!(follower.events("rollback-started").is_empty());
    // v2 is not blocked by it; v9 is, naming the key.
    ok(&other.cli(&["promote", "--active", "v2", "--previous", "v1"]));
    refused_with(
        &other.cli(&["promote", "--active", "v9", "--previous", "v1"]),
        "/rollbackd/verdicts/v9/web-Z",
    );
}

#[test]
fn the_daemon_refuses_a_promotion_of_a_rolled_back_version_from_any_control_socket_client() {
    if !need_etcd("the_daemon_refuses_a_promotion_from_any_client") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-1", "");
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    etcd.put(
        "/rollbackd/verdicts/v2/web-9",
        &verdict_body("v2", "web-9", std::time::SystemTime::now()),
    );
    wait_for(Duration::from_secs(10), || {
        status_json(&host)["fleet"]["verdictCount"] == 1
    })
    .unwrap();
    let replies = raw_request(
        &host,
        &serde_json::json!({"command": "promote", "active": "v2", "previous": "v1"}),
    );
    let last = replies.last().unwrap();
    assert_eq!(last["type"], "failed", "{replies:?}");
    assert_eq!(last["exit"], 3, "{replies:?}");
    assert!(
        last["message"].as_str().unwrap().contains("web-9"),
        "{last}"
    );
    assert!(host.events("monitoring-started").is_empty());
    // Forcing needs a reason, on the socket as on the command line.
    let replies = raw_request(
        &host,
        &serde_json::json!({"command": "promote", "active": "v2", "previous": "v1", "force": true}),
    );
    assert_eq!(replies.last().unwrap()["exit"], 2, "{replies:?}");
    let replies = raw_request(
        &host,
        &serde_json::json!({"command": "promote", "active": "v2", "previous": "v1",
                            "force": true, "reason": "fixed in the config"}),
    );
    assert_eq!(replies.last().unwrap()["type"], "done", "{replies:?}");
    assert_eq!(host.events("monitoring-started").len(), 1);
    assert!(
        host.daemon_log()
            .contains("promotion forced past the fleet's rollback verdicts"),
        "{}",
        host.daemon_log()
    );
}

#[test]
fn a_fleet_reset_waits_out_each_hosts_reset_quiet_period_unless_forced() {
    if !need_etcd("a_fleet_reset_waits_out_each_hosts_reset_quiet_period") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let long = fleet_setup(
        &etcd.url(),
        "long",
        "[kill_switch]\nreset_quiet_period = \"10m\"\n",
    );
    let short = fleet_setup(
        &etcd.url(),
        "short",
        "[kill_switch]\nreset_quiet_period = \"4s\"\n",
    );
    let _l = long.start();
    let _s = short.start();
    for setup in [&long, &short] {
        wait_for(Duration::from_secs(20), || fleet_link(setup) == "connected").unwrap();
        // Checks fail on both: each rolls back (and has failed checks to count).
        setup.promote();
        setup.routes.error_rate(0.5);
    }
    for setup in [&long, &short] {
        wait_for(Duration::from_secs(30), || {
            !setup.events("rollback-executed").is_empty()
        })
        .unwrap_or_else(|| panic!("no rollback; log:\n{}", setup.daemon_log()));
    }
    ok(&long.cli(&["kill-switch", "set", "--fleet", "--reason", "bad release"]));
    for setup in [&long, &short] {
        wait_for(Duration::from_secs(10), || {
            kill_value(setup).as_deref() == Some("1")
        })
        .unwrap();
    }
    let out = ok(&long.cli(&["kill-switch", "reset", "--fleet", "--reason", "fixed"]));
    let held = "inside the reset quiet period";
    for setup in [&long, &short] {
        wait_for(Duration::from_secs(10), || {
            setup.daemon_log().contains(held)
        })
        .unwrap_or_else(|| {
            panic!(
                "the fleet reset did not wait for the quiet period; kill switch {:?}; log:\n{}",
                kill_value(setup),
                setup.daemon_log()
            )
        });
        assert_eq!(kill_value(setup).as_deref(), Some("1"));
    }
    // The command said so.
    assert!(out.contains("reset_quiet_period"), "{out}");
    // The short quiet period ends: that host resets with the fleet, on its own.
    wait_for(Duration::from_secs(20), || {
        kill_value(&short).as_deref() == Some("0")
    })
    .unwrap_or_else(|| {
        panic!(
            "not reset after the quiet period; log:\n{}",
            short.daemon_log()
        )
    });
    assert_eq!(kill_value(&long).as_deref(), Some("1"));
    let view: Value = serde_json::from_str(&ok(&long.cli(&["fleet", "status", "--json"]))).unwrap();
    let long_row = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "long")
        .cloned()
        .unwrap();
    assert_eq!(long_row["mirrored"], false, "{view}");
    // Forced, with a reason: every host now.
    ok(&long.cli(&[
        "kill-switch",
        "reset",
        "--fleet",
        "--force",
        "--reason",
        "verified by hand",
    ]));
    wait_for(Duration::from_secs(10), || {
        kill_value(&long).as_deref() == Some("0")
    })
    .unwrap_or_else(|| panic!("the forced reset did not land; log:\n{}", long.daemon_log()));
}

#[test]
fn after_a_restart_an_idle_host_registers_the_version_it_runs() {
    if !need_etcd("after_a_restart_an_idle_host_registers_the_version_it_runs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-4", "");
    let daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    host.promote();
    ok(&host.cli(&["rollback", "--reason", "by hand", "--yes"]));
    assert_eq!(status_json(&host)["state"], "idle");
    assert!(daemon.terminate().success());
    let _daemon = host.start();
    assert_eq!(status_json(&host)["workers"]["active"], "v1");
    wait_for(Duration::from_secs(20), || {
        let out = host.cli(&["fleet", "status", "--json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        view["hosts"]
            .as_array()
            .is_some_and(|h| h.len() == 1 && h[0]["active"] == "v1" && h[0]["state"] == "idle")
    })
    .unwrap_or_else(|| {
        panic!(
            "the idle host registered without its version: {}",
            String::from_utf8_lossy(&host.cli(&["fleet", "status"]).stdout)
        )
    });
}

#[test]
fn a_verdict_deleted_in_etcd_no_longer_refuses_the_promotion() {
    if !need_etcd("a_verdict_deleted_in_etcd_no_longer_refuses_the_promotion") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(&etcd.url(), "web-1", "");
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    etcd.put(
        "/rollbackd/verdicts/v2/web-9",
        &verdict_body("v2", "web-9", std::time::SystemTime::now()),
    );
    let listed = || status_json(&host)["fleet"]["verdictCount"] == 1;
    wait_for(Duration::from_secs(10), listed).unwrap();
    refused_with(
        &host.cli(&["promote", "--active", "v2", "--previous", "v1"]),
        "web-9",
    );
    // `etcdctl del /rollbackd/verdicts/v2/ --prefix`, as docs/FLEET.md says.
    etcd.delete("/rollbackd/verdicts/v2/", true);
    wait_for(Duration::from_secs(10), || !listed())
        .unwrap_or_else(|| panic!("the delete was not seen: {}", status_json(&host)));
    host.promote();
}

#[test]
fn during_the_stability_watch_a_verdict_for_the_restored_version_counts_only_if_etcd_wrote_it_after_the_watch_began(
) {
    if !need_etcd("during_the_stability_watch_a_verdict_for_the_restored_version_counts_only_if") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let host = fleet_setup(
        &etcd.url(),
        "web-1",
        "follow_verdicts = true\n[rollback]\nstability_period = \"5m\"\n",
    );
    // Before anything here: web-8 rolled v1 back once, its clock a day fast.
    let fast = std::time::SystemTime::now() + Duration::from_secs(86_400);
    etcd.put(
        "/rollbackd/verdicts/v1/web-8",
        &verdict_body("v1", "web-8", fast),
    );
    let daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    // v2 goes bad here: rolled back to a healthy v1, which is watched.
    std::fs::write(host.path("slow"), "1").unwrap();
    host.promote();
    host.routes.error_rate(0.45);
    wait_for(Duration::from_secs(20), || {
        !host.events("rollback-started").is_empty()
    })
    .unwrap_or_else(|| panic!("no rollback; log:\n{}", host.daemon_log()));
    host.routes.error_rate(0.01);
    wait_for(Duration::from_secs(20), || {
        !host.events("stability-watch-started").is_empty()
    })
    .unwrap_or_else(|| panic!("no watch; log:\n{}", host.daemon_log()));
    // A restart hands the old verdict over again: it was there before the watch began.
    assert!(daemon.terminate().success());
    std::fs::remove_file(host.path("daemon.log")).unwrap();
    let _daemon = host.start();
    let said =
        "v1 was rolled back on web-8: high error rate; not following it: written at etcd revision";
    wait_for(Duration::from_secs(20), || host.daemon_log().contains(said)).unwrap_or_else(|| {
        panic!(
            "the old verdict was not set aside; log:\n{}",
            host.daemon_log()
        )
    });
    assert!(
        host.daemon_log()
            .contains("before its stability watch began"),
        "{}",
        host.daemon_log()
    );
    assert_eq!(status_json(&host)["state"], "stability-watch");
    // One written now — by a host whose clock is a day slow — fails the watch.
    let slow = std::time::SystemTime::now() - Duration::from_secs(86_400);
    etcd.put(
        "/rollbackd/verdicts/v1/web-9",
        &verdict_body("v1", "web-9", slow),
    );
    wait_for(Duration::from_secs(20), || {
        !host.events("escalation-triggered").is_empty()
    })
    .unwrap_or_else(|| panic!("the watch did not fail; log:\n{}", host.daemon_log()));
    let failed = &host.events("stability-failed")[0];
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("v1 was rolled back on web-9"),
        "{failed}"
    );
    assert_eq!(host.switches(), ["v1"], "never a second rollback");
}

#[test]
fn status_summarises_thousands_of_verdicts_and_lists_those_of_the_versions_this_host_runs() {
    if !need_etcd("status_summarises_thousands_of_verdicts") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    // 1,000 hosts × 5 bad releases, each with a long reason: over 5 MB of verdicts.
    let reason = "r".repeat(1000);
    let mut kvs = Vec::new();
    for release in 0..5 {
        for host in 0..1000 {
            let body = serde_json::json!({
                "version": format!("w{release}"), "host": format!("web-{host}"),
                "decision": "rollback", "reason": reason, "to": "v1",
                "trigger": "automatic", "at": "2026-01-01T00:00:00Z",
            });
            kvs.push((
                format!("/rollbackd/verdicts/w{release}/web-{host}"),
                body.to_string().into_bytes(),
            ));
        }
    }
    etcd.put_many(&kvs);
    let host = fleet_setup(&etcd.url(), "web-1", "");
    let _daemon = host.start();
    wait_for(Duration::from_secs(20), || fleet_link(&host) == "connected").unwrap();
    host.promote();
    etcd.put(
        "/rollbackd/verdicts/v2/web-9",
        &verdict_body("v2", "web-9", std::time::SystemTime::now()),
    );
    wait_for(Duration::from_secs(20), || {
        status_json(&host)["fleet"]["verdictCount"] == 5001
    })
    .unwrap_or_else(|| {
        let out = host.cli(&["status", "--json"]);
        panic!(
            "status does not summarise: exit {:?}, {} bytes, stderr {}",
            out.status,
            out.stdout.len(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let out = host.cli(&["status", "--json"]);
    assert!(out.stdout.len() < 64 * 1024, "{} bytes", out.stdout.len());
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = status["fleet"]["verdicts"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{status}");
    assert_eq!(listed[0]["host"], "web-9");
    assert_eq!(status["fleet"]["verdictVersions"], 6);
    let human = ok(&host.cli(&["status"]));
    assert!(human.contains("5001 in etcd for 6 versions"), "{human}");
    assert!(human.contains("v2 rolled back on web-9"), "{human}");
}
