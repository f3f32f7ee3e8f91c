//! Proof under fire: a state directory another user controls is not trusted (issue 8,
//! item 2). The real binary, as root, against state directories `nobody` made or planted
//! things in: `run` and the offline commands refuse with a message naming the path, its
//! owner and mode and the fix, and the victim of a planted symlink is byte-identical
//! afterwards; a control socket planted by `nobody` gets no request and prints no
//! "rolled back"; a shared 1777 directory is refused and keeps its mode.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;
/// The system interpreter, which `nobody` can run (a root-only pyenv shim would not do).
const PYTHON: &str = "/usr/bin/python3";

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether this test can act as `nobody`: root, with setpriv (and python3 when asked).
/// Skips with a reason otherwise; under `CI` a missing tool fails.
fn can_act_as_nobody(test: &str, python: bool) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root to act as nobody");
        return false;
    }
    if !tool_available(runs("setpriv", "--version"), test, "setpriv") {
        return false;
    }
    !python || tool_available(runs(PYTHON, "--version"), test, PYTHON)
}

fn as_nobody(program: &str) -> Command {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
    command
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// `rollbackd run`, which should refuse at once: its exit status and stderr. A daemon
/// that starts instead is stopped after the deadline and reported as `None`.
fn run_expecting_refusal(setup: &Setup) -> (Option<ExitStatus>, String) {
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, Duration::from_secs(30))
}

fn assert_refused(
    what: &str,
    status: Option<ExitStatus>,
    stderr: &str,
    code: i32,
    needles: &[&str],
) {
    let status = status.unwrap_or_else(|| {
        panic!("{what}: did not refuse, it ran (stopped after 30 s); stderr:\n{stderr}")
    });
    assert_eq!(status.code(), Some(code), "{what}: stderr:\n{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: stderr lacks {needle:?}:\n{stderr}"
        );
    }
}

fn cli_refused(setup: &Setup, args: &[&str], code: i32, needles: &[&str]) {
    let out = setup.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_refused(
        &format!("{args:?}"),
        Some(out.status),
        &stderr,
        code,
        needles,
    );
    assert!(
        out.stdout.is_empty(),
        "{args:?} printed as if it worked: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A root-only file a planted symlink points at.
fn victim(setup: &Setup) -> (std::path::PathBuf, Vec<u8>) {
    let path = setup.path("root-secret");
    let content = b"root's secret\nits last line, without a newline".to_vec();
    std::fs::write(&path, &content).unwrap();
    chmod(&path, 0o600);
    (path, content)
}

#[test]
fn a_state_dir_made_0777_by_nobody_with_a_planted_audit_log_symlink_is_refused() {
    let name = "a_state_dir_made_0777_by_nobody_with_a_planted_audit_log_symlink_is_refused";
    if !can_act_as_nobody(name, false) {
        return;
    }
    let setup = Setup::new("");
    let (victim, content) = victim(&setup);
    // nobody may reach the test directory, and owns a world-writable state directory in
    // it, where it plants analytics/audit.log -> root's file.
    chmod(setup.dir.path(), 0o755);
    let state = setup.state();
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    chmod(&state, 0o777);
    let planted = as_nobody("/bin/sh")
        .arg("-c")
        .arg(r#"mkdir -m 0777 "$1/analytics" && ln -s "$2" "$1/analytics/audit.log""#)
        .arg("sh")
        .arg(&state)
        .arg(&victim)
        .output()
        .unwrap();
    assert!(
        planted.status.success(),
        "nobody could not plant the link: {}",
        String::from_utf8_lossy(&planted.stderr)
    );

    let (status, stderr) = run_expecting_refusal(&setup);
    let state_text = state.display().to_string();
    assert_refused(
        "run",
        status,
        &stderr,
        78,
        &[
            &state_text,
            "uid 65534 (nobody)",
            "mode 0777",
            "chown root:",
            "chmod 0750",
        ],
    );
    // The offline commands act on the state too, and refuse the same way.
    for args in [
        &["promote", "--active", "v2", "--previous", "v1"][..],
        &["kill-switch", "set", "--reason", "test"],
        &["pause", "--reason", "test"],
        &["rollback", "--reason", "test", "--yes"],
    ] {
        cli_refused(&setup, args, 78, &[&state_text, "uid 65534 (nobody)"]);
    }
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        content,
        "the victim changed"
    );
    assert!(std::fs::symlink_metadata(state.join("analytics/audit.log"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        rollbackd::appdb::killswitch::read(&setup.path("app.db"), "DISABLE_NEW").unwrap_or(None),
        None,
        "the kill switch was set through an untrusted state directory"
    );
    assert!(!state.join("rollbackd.db").exists());
}

#[test]
fn a_symlinked_audit_log_in_our_own_state_dir_is_refused_and_its_target_untouched() {
    let setup = Setup::new("");
    let (victim, content) = victim(&setup);
    let state = setup.state();
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o750);
    std::fs::create_dir(state.join("analytics")).unwrap();
    chmod(&state.join("analytics"), 0o750);
    let link = state.join("analytics/audit.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();

    let (status, stderr) = run_expecting_refusal(&setup);
    let link_text = link.display().to_string();
    let victim_text = victim.display().to_string();
    assert_refused(
        "run",
        status,
        &stderr,
        1,
        &[&link_text, "is a symlink", &victim_text, "rm "],
    );
    cli_refused(
        &setup,
        &["promote", "--active", "v2", "--previous", "v1"],
        1,
        &[&link_text, "is a symlink"],
    );
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        content,
        "the victim changed"
    );
    assert_eq!(mode_of(&state), 0o750);
}

/// A fake daemon run by `nobody` at `socket`: answers every request the way the real one
/// answers a rollback that worked, and prints each request it got on stdout (a client that
/// connects, looks at who listens and hangs up sent none).
fn fake_listener(socket: &Path) -> Child {
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    request = c.makefile("rb").readline()
    if request:
        print("request:", request.decode(errors="replace").strip(), flush=True)
    c.sendall(b'{"type":"done","result":{"outcome":"rolled-back","from":"v2","to":"v1","artifact":"/fake/rollback.json"}}\n')
    c.close()
"#;
    let mut child = as_nobody(PYTHON)
        .arg("-c")
        .arg(script)
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "listening", "the fake listener did not start");
    child
}

/// Stops the fake listener and returns the requests it got.
fn stop(mut child: Child) -> String {
    let _ = child.kill();
    let _ = child.wait();
    let mut rest = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut rest);
    rest
}

fn rollback_refused(setup: &Setup, needles: &[&str]) {
    let out = setup.cli(&["rollback", "--reason", "operator's call", "--yes"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("rolled back"),
        "the CLI believed a fake daemon: {stdout}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}:\n{stderr}"
        );
    }
}

#[test]
fn a_control_socket_planted_by_nobody_is_refused_and_gets_no_request() {
    let name = "a_control_socket_planted_by_nobody_is_refused_and_gets_no_request";
    if !can_act_as_nobody(name, true) {
        return;
    }
    let setup = Setup::new("");
    chmod(setup.dir.path(), 0o755);
    let state = setup.state();
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    chmod(&state, 0o777);
    let socket = state.join("rollbackd.sock");
    let listener = fake_listener(&socket);

    rollback_refused(
        &setup,
        &[
            &socket.display().to_string(),
            "the socket file is owned by uid 65534 (nobody)",
        ],
    );
    let got = stop(listener);
    assert!(!got.contains("request:"), "the fake daemon got: {got}");
}

#[test]
fn a_listener_run_by_nobody_behind_a_root_owned_socket_file_is_refused() {
    let name = "a_listener_run_by_nobody_behind_a_root_owned_socket_file_is_refused";
    if !can_act_as_nobody(name, true) {
        return;
    }
    let setup = Setup::new("");
    chmod(setup.dir.path(), 0o755);
    let state = setup.state();
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o777);
    let socket = state.join("rollbackd.sock");
    let listener = fake_listener(&socket);
    // The file now looks like root's; only the kernel's peer credentials tell.
    std::os::unix::fs::lchown(&socket, Some(0), Some(0)).unwrap();

    rollback_refused(
        &setup,
        &["the process listening on it runs as uid 65534 (nobody)"],
    );
    let got = stop(listener);
    assert!(!got.contains("request:"), "the fake daemon got: {got}");
}

#[test]
fn a_state_dir_pointing_at_a_shared_1777_directory_is_refused_and_keeps_its_mode() {
    let setup = Setup::new("");
    let state = setup.state();
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o1777);

    let (status, stderr) = run_expecting_refusal(&setup);
    let state_text = state.display().to_string();
    assert_refused(
        "run",
        status,
        &stderr,
        78,
        &[
            &state_text,
            "mode 1777",
            "writable by group and others",
            "chmod 0750",
        ],
    );
    cli_refused(
        &setup,
        &["promote", "--active", "v2", "--previous", "v1"],
        78,
        &[&state_text, "mode 1777"],
    );
    assert_eq!(mode_of(&state), 0o1777, "rollbackd changed the mode");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
}

#[test]
fn a_private_state_dir_of_ours_is_used_as_it_is() {
    let setup = Setup::new("");
    let state = setup.state();
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    let daemon = setup.start();
    setup.promote();
    wait_for(Duration::from_secs(20), || {
        !setup.events("health-check").is_empty()
    })
    .unwrap_or_else(|| panic!("no check; log:\n{}", setup.daemon_log()));
    assert_eq!(mode_of(&state), 0o700, "rollbackd changed the mode");
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn a_state_dir_rollbackd_creates_is_0750_and_restarts_cleanly() {
    let setup = Setup::new("");
    let daemon = setup.start();
    setup.promote();
    wait_for(Duration::from_secs(20), || {
        !setup.events("health-check").is_empty()
    })
    .unwrap_or_else(|| panic!("no check; log:\n{}", setup.daemon_log()));
    assert_eq!(daemon.terminate().code(), Some(0));
    let state = setup.state();
    assert_eq!(mode_of(&state) & !0o750, 0, "mode {:o}", mode_of(&state));
    assert_eq!(mode_of(&state.join("analytics")) & 0o022, 0);
    // Everything it made passes its own check on the next start.
    let daemon = setup.start();
    assert_eq!(daemon.terminate().code(), Some(0));
}
