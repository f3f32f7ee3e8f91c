//! Proof under fire: inputs past every bound (durations past the clock's range, endless
//! or oversized files, FIFOs) end in a clear refusal within a deadline, never a panic, a
//! hang or unbounded memory.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the binary with `args`, killing it after 20 s: (exit code, stdout, stderr).
fn run_bounded(args: &[&str], env: &[(&str, &str)], stdin: Stdio) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status.code(), stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, "still running after 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
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
