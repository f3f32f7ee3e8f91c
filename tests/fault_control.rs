//! Proof under fire: the real daemon's control socket. A client running as `nobody` is
//! refused (the socket is 0600, so `connect` itself fails with EACCES) and causes no audit
//! line; every accepted command's audit line names its operator from the peer
//! credentials. (tests/control.rs covers the peer-credential check at the library level.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

const PYTHON: &str = "/usr/bin/python3";

fn tool_missing(name: &str) -> Option<String> {
    for (tool, path) in [("setpriv", "setpriv"), ("python3", PYTHON)] {
        let found = Command::new(path)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("SKIP {name}: {tool} is not installed"));
        }
    }
    None
}

#[test]
fn a_client_running_as_nobody_is_refused_and_leaves_no_audit_line() {
    let name = "a_client_running_as_nobody_is_refused_and_leaves_no_audit_line";
    if let Some(skip) = tool_missing(name) {
        eprintln!("{skip}");
        return;
    }
    let setup = Setup::new("");
    let daemon = setup.start();
    // Let nobody reach the socket's directory, so only the socket's own mode stands
    // between them and the daemon.
    for dir in [setup.dir.path().to_path_buf(), setup.state()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let socket = setup.state().join("rollbackd.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert!(mode == 0o600 || mode == 0o660, "socket mode {mode:o}");
    let audit_before = setup.audit();

    let client = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused:", e.errno)
    sys.exit(3)
s.sendall(b'{"command": "kill-switch", "action": "set", "reason": "nobody was here"}\n')
print("answer:", s.recv(65536).decode(errors="replace"))
"#;
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PYTHON,
            "-c",
            client,
        ])
        .arg(&socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "nobody was not refused: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("refused: {}", libc::EACCES)),
        "{stdout}"
    );
    // Still answering root, and nothing was recorded on nobody's behalf.
    let status = setup.cli(&["status", "--json"]);
    assert!(status.status.success());
    assert_eq!(setup.audit(), audit_before);
    assert!(!setup.daemon_log().contains("uid:65534"));
    assert_eq!(
        rollbackd::appdb::killswitch::read(&setup.path("app.db"), "DISABLE_NEW").unwrap(),
        None
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn every_accepted_command_names_its_operator_in_the_audit_log() {
    let setup = Setup::new("");
    let daemon = setup.start();
    let run = |args: &[&str]| {
        let out = setup.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["promote", "--active", "v2", "--previous", "v1"]);
    run(&["pause", "--reason", "investigating"]);
    run(&["resume"]);
    run(&["kill-switch", "set", "--reason", "by hand"]);
    run(&["rollback", "--reason", "operator's call", "--yes"]);
    let events = [
        "monitoring-started",
        "monitoring-paused",
        "monitoring-resumed",
        "kill-switch-activated",
        "rollback-started",
        "rollback-executed",
    ];
    wait_for(Duration::from_secs(20), || {
        events.iter().all(|e| !setup.events(e).is_empty())
    })
    .unwrap_or_else(|| panic!("audit: {:?}", setup.audit()));
    for event in events {
        for line in setup.events(event) {
            assert_eq!(line["operator"], "uid:0(root)", "{event}: {line}");
        }
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}
