//! The control socket over real Unix sockets: protocol round trips, socket file handling,
//! bad requests, and peer-credential checks with a client running as another user.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollbackd::control::{call, CallError, Command, ControlServer, Reply, Request};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NOBODY: u32 = 65534;

struct Running {
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
}

fn serve(server: ControlServer) -> Running {
    let (sender, commands) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server.serve(sender, shutdown.clone()));
    Running {
        commands,
        shutdown,
        server,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .expect("server stops")
            .unwrap();
    }
}

fn socket_in(dir: &Path) -> PathBuf {
    dir.join("rollbackd.sock")
}

/// Sends raw bytes, returns the reply lines until the connection closes (or errors).
async fn raw_exchange(path: &Path, request: &[u8]) -> Vec<Reply> {
    let stream = tokio::net::UnixStream::connect(path).await.unwrap();
    let (read_half, mut write_half) = stream.into_split();
    // The server may refuse before reading everything; the write may then fail.
    let _ = write_half.write_all(request).await;
    let mut lines = BufReader::new(read_half).lines();
    let mut replies = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        replies.push(serde_json::from_str(&line).expect("reply is JSON"));
    }
    replies
}

fn our_euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

#[tokio::test]
async fn round_trip_with_progress_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind(&path, 0o600).unwrap());

    let daemon = tokio::spawn(async move {
        let command = running.commands.recv().await.unwrap();
        let replies = command.replies.clone();
        replies
            .send(Reply::Progress {
                message: "pause done".into(),
                detail: json!({"seconds": 0.01}),
            })
            .await
            .unwrap();
        replies
            .send(Reply::Progress {
                message: "switch done".into(),
                detail: serde_json::Value::Null,
            })
            .await
            .unwrap();
        replies
            .send(Reply::Done {
                result: json!({"to": "v1"}),
            })
            .await
            .unwrap();
        (command.operator, command.request, running)
    });

    let request = Request::Rollback {
        reason: "error rate; rm -rf /".into(),
        emergency: true,
        force: false,
    };
    let mut progress = Vec::new();
    let result = call(&path, &request, |message, detail| {
        progress.push((message.to_string(), detail.clone()))
    })
    .await
    .unwrap();
    assert_eq!(result, json!({"to": "v1"}));
    assert_eq!(
        progress,
        vec![
            ("pause done".to_string(), json!({"seconds": 0.01})),
            ("switch done".to_string(), serde_json::Value::Null),
        ]
    );

    let (operator, received, running) = daemon.await.unwrap();
    assert_eq!(received, request);
    assert_eq!(operator.uid, our_euid());
    assert_eq!(operator.pid, Some(std::process::id() as i32));
    assert!(
        operator.name.starts_with(&format!("uid:{}", our_euid())),
        "{}",
        operator.name
    );
    running.stop().await;
    assert!(!path.exists(), "shutdown removes the socket file");
}

#[tokio::test]
async fn dropped_command_is_reported_as_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind(&path, 0o600).unwrap());
    let daemon = tokio::spawn(async move {
        drop(running.commands.recv().await.unwrap());
        running
    });
    let error = call(&path, &Request::Status, |_, _| {}).await.unwrap_err();
    match &error {
        CallError::Failed { message, exit } => {
            assert_eq!(message, "daemon dropped the command");
            assert_eq!(*exit, 1);
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(error.exit_status(), 1);
    daemon.await.unwrap().stop().await;
}

#[tokio::test]
async fn socket_mode_is_what_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o600, 0o660] {
        let path = dir.path().join(format!("{mode:o}.sock"));
        let _server = ControlServer::bind(&path, mode).unwrap();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, mode);
    }
}

#[tokio::test]
async fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    // A socket file left behind by a crashed daemon: nobody listens on it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let error = call(&path, &Request::Status, |_, _| {}).await.unwrap_err();
    assert!(error.is_not_running(), "{error:?}");

    let mut running = serve(ControlServer::bind(&path, 0o600).unwrap());
    let daemon = tokio::spawn(async move {
        let command = running.commands.recv().await.unwrap();
        command
            .replies
            .send(Reply::Done {
                result: json!("ok"),
            })
            .await
            .unwrap();
        running
    });
    assert_eq!(
        call(&path, &Request::Status, |_, _| {}).await.unwrap(),
        json!("ok")
    );
    daemon.await.unwrap().stop().await;
}

#[tokio::test]
async fn live_socket_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let first = serve(ControlServer::bind(&path, 0o600).unwrap());
    let error = ControlServer::bind(&path, 0o600).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    assert!(
        error.to_string().contains("another rollbackd is running"),
        "{error}"
    );
    assert!(path.exists());
    first.stop().await;
}

#[tokio::test]
async fn path_that_is_not_a_socket_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    std::fs::write(&path, "precious").unwrap();
    let error = ControlServer::bind(&path, 0o600).unwrap_err();
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test]
async fn missing_socket_means_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let error = call(&path, &Request::Status, |_, _| {}).await.unwrap_err();
    assert!(error.is_not_running());
    assert_eq!(
        error.to_string(),
        format!("daemon not running (no socket at {})", path.display())
    );
}

#[tokio::test]
async fn malformed_requests_fail_with_exit_2_and_are_not_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind(&path, 0o600).unwrap());
    for request in [
        &b"not json\n"[..],
        b"{\"command\":\"explode\"}\n",
        b"{\"command\":\"rollback\",\"reason\":\"x\",\"emergancy\":true}\n",
        b"{\"command\":\"rollback\"}\n",
        b"\n",
    ] {
        let replies = raw_exchange(&path, request).await;
        match replies.as_slice() {
            [Reply::Failed { message, exit: 2 }] => {
                assert!(!message.is_empty())
            }
            other => panic!(
                "{:?}: expected one Failed exit 2, got {other:?}",
                String::from_utf8_lossy(request)
            ),
        }
    }
    assert!(running.commands.try_recv().is_err());
    running.stop().await;
}

#[tokio::test]
async fn request_without_newline_before_eof_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind(&path, 0o600).unwrap());
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (read_half, mut write_half) = stream.into_split();
    write_half
        .write_all(br#"{"command":"resume"}"#)
        .await
        .unwrap();
    write_half.shutdown().await.unwrap();
    let command = running.commands.recv().await.unwrap();
    assert_eq!(command.request, Request::Resume);
    command
        .replies
        .send(Reply::Done {
            result: serde_json::Value::Null,
        })
        .await
        .unwrap();
    let mut lines = BufReader::new(read_half).lines();
    assert_eq!(
        lines.next_line().await.unwrap().unwrap(),
        r#"{"type":"done","result":null}"#
    );
    running.stop().await;
}

#[tokio::test]
async fn oversized_request_line_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind(&path, 0o600).unwrap());
    let mut huge = br#"{"command":"rollback","reason":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 200 * 1024));
    huge.extend(b"\"}\n");
    let replies = raw_exchange(&path, &huge).await;
    match replies.as_slice() {
        [Reply::Failed { message, exit: 2 }] => {
            assert!(message.contains("longer than 65536 bytes"), "{message}")
        }
        other => panic!("expected one Failed exit 2, got {other:?}"),
    }
    assert!(running.commands.try_recv().is_err());
    running.stop().await;
}

/// Runs a Python client as `nobody` (optionally with extra groups) against `path` and
/// returns its output, or `None` (with the reason on stderr) if that is not possible here.
async fn status_as_nobody(path: &Path, extra_groups: Option<&str>) -> Option<String> {
    const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"command":"status"}\n')
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"#;
    if our_euid() != 0 {
        eprintln!("skipped: switching to nobody needs root");
        return None;
    }
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|candidate| Path::new(candidate).exists())
    else {
        eprintln!("skipped: setpriv is not installed");
        return None;
    };
    let Some(python) = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|candidate| Path::new(candidate).exists())
    else {
        eprintln!("skipped: no python3 that nobody can run");
        return None;
    };
    let groups = match extra_groups {
        Some(groups) => format!("--groups={groups}"),
        None => "--clear-groups".to_string(),
    };
    let output = tokio::process::Command::new(setpriv)
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg(groups)
        .arg(python)
        .arg("-c")
        .arg(CLIENT)
        .arg(path)
        .kill_on_drop(true)
        .output();
    // A client left waiting means its command was forwarded and nobody answered it.
    let output = tokio::time::timeout(Duration::from_secs(10), output)
        .await
        .expect("client as nobody got no final reply within 10 s")
        .unwrap();
    assert!(
        output.status.success(),
        "client as nobody failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8(output.stdout).unwrap())
}

/// A directory (and socket) that `nobody` can reach, so the refusal under test is the
/// daemon's peer check, not the file system.
fn world_reachable_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn client_running_as_another_user_is_refused() {
    let dir = world_reachable_dir();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind_with_owner(&path, 0o666, 4242, 4243).unwrap());
    let Some(output) = status_as_nobody(&path, None).await else {
        running.stop().await;
        return;
    };
    let replies: Vec<Reply> = output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        replies,
        vec![Reply::Failed {
            message: format!("permission denied: uid {NOBODY} is not the socket owner or group"),
            exit: 3
        }]
    );
    assert!(
        running.commands.try_recv().is_err(),
        "a refused command must never reach the daemon"
    );
    running.stop().await;
}

#[tokio::test]
async fn member_of_the_socket_group_through_a_supplementary_group_is_allowed() {
    let dir = world_reachable_dir();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind_with_owner(&path, 0o666, 4242, 4243).unwrap());
    let daemon = tokio::spawn(async move {
        let command = running.commands.recv().await.unwrap();
        command
            .replies
            .send(Reply::Done {
                result: json!("hello nobody"),
            })
            .await
            .unwrap();
        (command.operator, running)
    });
    let Some(output) = status_as_nobody(&path, Some("4243")).await else {
        daemon.abort();
        return;
    };
    assert_eq!(output, "{\"type\":\"done\",\"result\":\"hello nobody\"}\n");
    let (operator, running) = daemon.await.unwrap();
    assert_eq!((operator.uid, operator.gid), (NOBODY, NOBODY));
    assert_eq!(operator.name, format!("uid:{NOBODY}(nobody)"));
    running.stop().await;
}

/// The server serves at most `MAX_CONNECTIONS` connections at once (each costs the daemon
/// a descriptor); one more client waits in the socket's backlog and is served as soon as a
/// connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_connections_are_served_at_once() {
    use rollbackd::control::MAX_CONNECTIONS;
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(dir.path());
    let mut running = serve(ControlServer::bind(&path, 0o600).unwrap());

    // MAX_CONNECTIONS + 1 clients; the driver holds every command without answering, so
    // each forwarded command keeps its connection (and slot) busy.
    let clients: Vec<_> = (0..=MAX_CONNECTIONS)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { call(&path, &Request::Status, |_, _| {}).await })
        })
        .collect();
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let command = tokio::time::timeout(Duration::from_secs(30), running.commands.recv())
            .await
            .expect("the first MAX_CONNECTIONS commands are forwarded")
            .unwrap();
        held.push(command);
    }
    // The correct server never forwards the extra one while all slots are busy, so this
    // wait passes however loaded the machine is; an unbounded server forwards it at once.
    let extra = tokio::time::timeout(Duration::from_secs(1), running.commands.recv()).await;
    assert!(
        extra.is_err(),
        "a command beyond MAX_CONNECTIONS = {MAX_CONNECTIONS} was served while all were busy"
    );

    // One command is answered: its connection ends and the waiting client is served.
    let first = held.remove(0);
    first
        .replies
        .send(Reply::Done {
            result: json!({"answered": true}),
        })
        .await
        .unwrap();
    drop(first);
    let late = tokio::time::timeout(Duration::from_secs(30), running.commands.recv())
        .await
        .expect("the waiting client is served once a slot frees")
        .unwrap();
    held.push(late);
    for command in held {
        command
            .replies
            .send(Reply::Done {
                result: json!({"answered": true}),
            })
            .await
            .unwrap();
    }
    for client in clients {
        let answer = tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("every client gets its answer")
            .unwrap()
            .unwrap();
        assert_eq!(answer, json!({"answered": true}));
    }
    running.stop().await;
}
