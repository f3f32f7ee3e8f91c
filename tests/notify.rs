//! systemd notifications, received on a real datagram socket. The notifying side runs in a
//! child process (this test binary re-executed with `ROLLBACKD_NOTIFY_HELPER` set), so no
//! test changes the environment of this multi-threaded process.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use rollbackd::daemon::notify::Notifier;

const HELPER_VAR: &str = "ROLLBACKD_NOTIFY_HELPER";

/// Not a test of its own: the body of the child process. Does nothing unless selected.
#[test]
fn notify_helper() {
    if std::env::var_os(HELPER_VAR).is_none() {
        return;
    }
    let notifier = Notifier::from_env();
    println!("enabled={}", notifier.is_enabled());
    println!("watchdog_interval={:?}", notifier.watchdog_interval());
    notifier.ready();
    notifier.status("monitoring v2: healthy\nSTOPPING=1");
    notifier.watchdog();
    notifier.stopping();
}

/// Runs the helper with `NOTIFY_SOCKET` (if any) and extra variables; returns its stdout.
fn run_helper(notify_socket: Option<&str>, extra_env: &[(&str, &str)]) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "notify_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_VAR, "1")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    if let Some(socket) = notify_socket {
        command.env("NOTIFY_SOCKET", socket);
    }
    for (name, value) in extra_env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "helper failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn receive_all(socket: &UnixDatagram) -> Vec<String> {
    socket.set_nonblocking(true).unwrap();
    let mut datagrams = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n_read) = socket.recv(&mut buffer) {
        datagrams.push(String::from_utf8(buffer[..n_read].to_vec()).unwrap());
    }
    datagrams
}

const EXPECTED: [&str; 4] = [
    "READY=1\n",
    // The embedded newline must not smuggle in a second assignment.
    "STATUS=monitoring v2: healthy STOPPING=1\n",
    "WATCHDOG=1\n",
    "STOPPING=1\n",
];

#[test]
fn notifications_arrive_as_exact_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let stdout = run_helper(path.to_str(), &[("WATCHDOG_USEC", "3000000")]);
    assert!(stdout.contains("enabled=true"), "{stdout}");
    assert!(stdout.contains("watchdog_interval=Some(1.5s)"), "{stdout}");
    assert_eq!(receive_all(&socket), EXPECTED);
}

#[test]
fn abstract_notify_socket_is_supported() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("rollbackd-notify-test-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&address).unwrap();
    run_helper(Some(&format!("@{name}")), &[]);
    assert_eq!(receive_all(&socket), EXPECTED);
}

#[test]
fn watchdog_meant_for_another_process_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let _socket = UnixDatagram::bind(&path).unwrap();
    // pid 1 is never the test helper.
    let stdout = run_helper(
        path.to_str(),
        &[("WATCHDOG_USEC", "3000000"), ("WATCHDOG_PID", "1")],
    );
    assert!(stdout.contains("watchdog_interval=None"), "{stdout}");
}

#[test]
fn without_notify_socket_nothing_is_sent_and_nothing_fails() {
    let stdout = run_helper(None, &[("WATCHDOG_USEC", "3000000")]);
    assert!(stdout.contains("enabled=false"), "{stdout}");
    assert!(stdout.contains("watchdog_interval=None"), "{stdout}");
}

#[test]
fn unreachable_notify_socket_is_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody-listens.sock");
    let started = std::time::Instant::now();
    let stdout = run_helper(missing.to_str(), &[]);
    assert!(stdout.contains("enabled=true"), "{stdout}");
    assert!(started.elapsed() < Duration::from_secs(30));
}
