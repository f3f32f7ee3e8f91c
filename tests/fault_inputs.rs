//! Proof under fire: inputs past every bound (durations past the clock's range, endless
//! or oversized files, FIFOs) end in a clear refusal within a deadline, never a panic, a
//! hang or unbounded memory.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs the binary with `args`, killing it after 20 s: (exit code, stdout, stderr).
fn run_bounded(args: &[&str], env: &[(&str, &str)], stdin: Stdio) -> (Option<i32>, String) {
    let child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match wait_bounded(child, Duration::from_secs(20)) {
        (Some(status), stderr) => (status.code(), stderr),
        (None, _) => (None, "still running after 20 s".into()),
    }
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("rollbackd.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn durations_past_the_clocks_range_exit_78_naming_the_key_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[rollback]\nswitch_command = [\"/bin/true\", \"{to}\"]\n",
    );
    for key in [
        "ROLLBACKD_ROLLBACK_HOOK_TIMEOUT",
        "ROLLBACKD_ROLLBACK_VERIFY_TIMEOUT",
    ] {
        let (code, stderr) = run_bounded(
            &["--config", &config, "check-config"],
            &[(key, "18446744073709551615s")],
            Stdio::null(),
        );
        assert_eq!(code, Some(78), "{key}: {stderr}");
        assert!(stderr.contains(key), "{key} named: {stderr}");
        assert!(stderr.contains("largest value"), "{stderr}");
    }
}

#[test]
fn check_config_with_the_largest_durations_allowed_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[monitor]
check_interval = "7days"
degraded_check_interval = "7days"
check_timeout = "7days"
grace_period = "7days"
[rollback]
switch_command = ["/bin/true", "{to}"]
pause_command = ["/bin/true"]
drain_command = ["/bin/true"]
resume_command = ["/bin/true"]
hook_timeout = "7days"
verify_timeout = "7days"
verify_interval = "7days"
max_attempts = 10
[kill_switch]
reset_quiet_period = "7days"
[alerts]
timeout = "7days"
[retention]
sessions = "365days"
"#,
    );
    let (code, stderr) = run_bounded(&["--config", &config, "check-config"], &[], Stdio::null());
    assert_eq!(code, Some(0), "{stderr}");
}

/// A config whose state directory is `dir/state`, with `analytics/` made (0700).
fn tail_setup(dir: &Path) -> (String, std::path::PathBuf) {
    use std::os::unix::fs::DirBuilderExt;
    let state = dir.join("state");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(state.join("analytics"))
        .unwrap();
    let config = write_config(dir, &format!("state_dir = {:?}\n", state.to_str().unwrap()));
    (config, state.join("analytics").join("audit.log"))
}

#[test]
fn audit_tail_refuses_a_symlink_to_dev_zero_instead_of_growing_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = tail_setup(dir.path());
    std::os::unix::fs::symlink("/dev/zero", &log).unwrap();
    for args in [
        &["--config", &config, "audit", "tail", "-n", "3"][..],
        &["--config", &config, "audit", "tail", "-f"][..],
    ] {
        let (code, stderr) = run_bounded(args, &[], Stdio::null());
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("audit.log") && stderr.contains("symbolic link"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn audit_tail_refuses_a_fifo_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = tail_setup(dir.path());
    let c_path = std::ffi::CString::new(log.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for args in [
        &["--config", &config, "audit", "tail", "-n", "3"][..],
        &["--config", &config, "audit", "tail", "-f"][..],
    ] {
        let (code, stderr) = run_bounded(args, &[], Stdio::null());
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("audit.log") && stderr.contains("not a regular file"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn audit_tail_shows_an_overlong_line_as_too_long_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = tail_setup(dir.path());
    let long = "x".repeat(200 * 1024);
    std::fs::write(
        &log,
        format!("{{\"event\":\"first\"}}\n{long}\n{{\"event\":\"last\"}}\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", &config, "audit", "tail", "-n", "3", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "{\"event\":\"first\"}",
            &format!("[line too long: {} bytes]", long.len()),
            "{\"event\":\"last\"}"
        ],
        "{stdout:.300}"
    );
}

#[test]
fn simulate_refuses_an_endless_line_on_stdin_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let (code, stderr) = run_bounded(
        &["--config", &config, "simulate", "--trace", "-"],
        &[],
        Stdio::from(zero),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("<stdin>:1:"), "{stderr}");
    assert!(stderr.contains("longer than"), "{stderr}");
}

#[test]
fn simulate_refuses_an_oversized_line_in_a_file_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(
        &trace,
        format!(
            "{{\"at\": 30, \"probe\": \"ok\"}}\n{{\"at\": 60, \"probe\": \"{}\"}}\n",
            "y".repeat(2 * 1024 * 1024)
        ),
    )
    .unwrap();
    let (code, stderr) = run_bounded(
        &[
            "--config",
            &config,
            "simulate",
            "--trace",
            trace.to_str().unwrap(),
        ],
        &[],
        Stdio::null(),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("trace.jsonl:2:"), "{stderr}");
    assert!(stderr.contains("longer than"), "{stderr}");
}

#[test]
fn a_config_file_over_1_mib_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("profile = \"default\"\n");
    while text.len() < 2 * 1024 * 1024 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    let config = write_config(dir.path(), &text);
    let (code, stderr) = run_bounded(&["--config", &config, "check-config"], &[], Stdio::null());
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("rollbackd.toml") && stderr.contains("1 MiB"),
        "{stderr}"
    );
}

fn hup(pid: u32) {
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
}

/// A SIGHUP changing `key` to `value` is refused naming the key; the old config stays.
fn reload_refuses(key_path: &[&str], value: &str) {
    let setup = Setup::new("");
    let daemon = setup.start();
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elsewhere = setup.path(value);
    let value = elsewhere.to_str().unwrap().to_owned();
    setup.rewrite_config(|table| {
        let (leaf, sections) = key_path.split_last().unwrap();
        let mut at = table;
        for section in sections {
            at = at
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap();
        }
        at.insert(leaf.to_string(), toml::Value::String(value.clone()));
    });
    hup(daemon.pid());
    let key = key_path.join(".");
    wait_for(Duration::from_secs(15), || {
        !setup.events("config-reloaded").is_empty()
    })
    .unwrap_or_else(|| panic!("no config-reloaded; log:\n{}", setup.daemon_log()));
    let reloaded = &setup.events("config-reloaded")[0];
    assert_eq!(reloaded["ok"], false, "{key}: {reloaded}");
    let error = reloaded["error"].as_str().unwrap();
    assert!(
        error.contains(&key) && error.contains("restart"),
        "{key}: {error}"
    );
    // The daemon still answers on the old state directory's socket, with the session
    // (the CLI reads the edited file, so it is pointed back at the old directory).
    let status = Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .args(["status", "--json"])
        .env("ROLLBACKD_STATE_DIR", setup.state())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_ne!(status["daemon"], "not running", "{status}");
    assert_eq!(status["session"]["active"], "v2", "{status}");
    assert!(!elsewhere.join("rollbackd.db").exists());
    daemon.terminate();
}

#[test]
fn sighup_changing_state_dir_is_refused_naming_it_and_the_old_dir_stays() {
    reload_refuses(&["state_dir"], "other-state");
}

#[test]
fn sighup_changing_the_kill_switch_database_is_refused_naming_it() {
    reload_refuses(&["kill_switch", "database"], "other-app.db");
}
