//! The control socket `state_dir/rollbackd.sock` (SPEC §5, §6): how `promote`, `status`,
//! `rollback`, `kill-switch`, `pause` and `resume` reach the running daemon.
//!
//! Protocol: JSON lines over a Unix stream socket. The client sends **one** [`Request`]
//! line; the server answers with zero or more [`Reply::Progress`] lines and then exactly one
//! final [`Reply::Done`] or [`Reply::Failed`] line, and closes. Requests with options reject
//! unknown fields, so a misspelt `"emergancy": true` is an error rather than a quiet normal
//! rollback.
//!
//! **Who sent a command comes from the kernel, never from the request body**: the peer's
//! credentials (`SO_PEERCRED`) become the [`Operator`], and only the socket's owner, root,
//! or (when the socket mode has group bits) a member of the socket's group may command the
//! daemon. Group membership counts the peer's primary group and, where the kernel reports
//! them (`SO_PEERGROUPS`, Linux 4.13+), its supplementary groups, which is how operators
//! are usually given access (`usermod -aG`). The file mode is defence in depth; the peer
//! check is the authority.
//!
//! The server never executes anything itself: it forwards each accepted request as a
//! [`Command`] to the daemon's driver and streams back whatever the driver replies. A
//! client that disconnects does not cancel its command (a rollback that has begun is never
//! cancelled halfway); its replies are simply discarded. A client that stops reading is cut
//! off after [`REPLY_WRITE_TIMEOUT`], so it cannot stall the driver's reply channel.

use crate::statedir::user_name;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest request line accepted, without its newline.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long a client has, after connecting, to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one reply line may take to write before the client is given up on.
pub const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest reply line the client accepts.
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// How many replies the driver can queue for one connection before `send` waits.
const REPLY_QUEUE: usize = 64;
/// The most control connections served at once (each is one descriptor; see
/// [`crate::fdlimit`]). Further clients wait in the socket's backlog.
pub const MAX_CONNECTIONS: usize = 32;

/// A command from the CLI. `{"command": "rollback", "reason": "...", "emergency": true}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Promote {
        active: String,
        previous: String,
        #[serde(default)]
        baseline_error_rate: Option<f64>,
        #[serde(default)]
        baseline_latency_p95_ms: Option<f64>,
    },
    Rollback {
        reason: String,
        #[serde(default)]
        emergency: bool,
    },
    KillSwitchSet {
        reason: String,
    },
    KillSwitchReset {
        reason: String,
        #[serde(default)]
        force: bool,
    },
    KillSwitchStatus,
    Pause {
        #[serde(default)]
        reason: Option<String>,
    },
    Resume,
}

impl Request {
    /// The wire name of the command, for logs.
    pub fn command_name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Promote { .. } => "promote",
            Request::Rollback { .. } => "rollback",
            Request::KillSwitchSet { .. } => "kill-switch-set",
            Request::KillSwitchReset { .. } => "kill-switch-reset",
            Request::KillSwitchStatus => "kill-switch-status",
            Request::Pause { .. } => "pause",
            Request::Resume => "resume",
        }
    }

    /// Why the request's text fields break the rules every entry point applies (worker
    /// ids, operator text: see [`crate::text`]), or `Ok`. The CLI checks the same while
    /// parsing; this is for a request from any other client, and for the paths that act
    /// without a daemon.
    pub fn validate(&self) -> Result<(), String> {
        use crate::text::{check_operator_text, check_worker_id};
        match self {
            Request::Promote {
                active, previous, ..
            } => {
                check_worker_id(active).map_err(|e| format!("active: {e}"))?;
                check_worker_id(previous).map_err(|e| format!("previous: {e}"))
            }
            Request::Rollback { reason, .. }
            | Request::KillSwitchSet { reason }
            | Request::KillSwitchReset { reason, .. } => check_operator_text("reason", reason),
            Request::Pause {
                reason: Some(reason),
            } => check_operator_text("reason", reason),
            Request::Pause { reason: None }
            | Request::Status
            | Request::KillSwitchStatus
            | Request::Resume => Ok(()),
        }
    }
}

/// One line from the daemon. `{"type": "progress", "message": "...", "detail": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Progress {
        message: String,
        #[serde(default)]
        detail: serde_json::Value,
    },
    Done {
        #[serde(default)]
        result: serde_json::Value,
    },
    /// `exit`: the CLI exit status to use (1 failure, 2 bad request, 3 refused).
    Failed { message: String, exit: u8 },
}

impl Reply {
    fn failed(message: impl Into<String>, exit: u8) -> Reply {
        Reply::Failed {
            message: message.into(),
            exit,
        }
    }
}

/// Who sent a command, from the socket's peer credentials (never from the request body).
#[derive(Debug, Clone, PartialEq)]
pub struct Operator {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// `uid:1000(alice)`, or `uid:1000` when the uid has no user name.
    pub name: String,
}

impl Operator {
    /// This process's own user: the operator of a command run without a daemon.
    pub fn current() -> Operator {
        // SAFETY: these calls only read the process's credentials.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Operator::from_peer(uid, gid, Some(std::process::id() as i32))
    }

    fn from_peer(uid: u32, gid: u32, pid: Option<i32>) -> Operator {
        let name = match user_name(uid) {
            Some(user) => format!("uid:{uid}({user})"),
            None => format!("uid:{uid}"),
        };
        Operator {
            uid,
            gid,
            pid,
            name,
        }
    }
}

/// An accepted request, handed to the daemon's driver.
///
/// The driver sends any number of [`Reply::Progress`] and then one [`Reply::Done`] or
/// [`Reply::Failed`] on `replies`. Dropping the sender without a final reply makes the
/// server answer `Failed {"daemon dropped the command", 1}`. Sends fail once the client
/// is gone; the driver should ignore that and carry on with the command.
#[derive(Debug)]
pub struct Command {
    pub operator: Operator,
    pub request: Request,
    pub replies: mpsc::Sender<Reply>,
}

/// Who may command the daemon.
#[derive(Debug, Clone, Copy)]
struct AccessPolicy {
    owner_uid: u32,
    owner_gid: u32,
    group_may_command: bool,
}

impl AccessPolicy {
    fn allows(&self, uid: u32, gid: u32, supplementary_groups: impl FnOnce() -> Vec<u32>) -> bool {
        if uid == 0 || uid == self.owner_uid {
            return true;
        }
        self.group_may_command
            && (gid == self.owner_gid || supplementary_groups().contains(&self.owner_gid))
    }
}

/// A bound control socket, not yet serving. See [`ControlServer::serve`].
#[derive(Debug)]
pub struct ControlServer {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// `(dev, ino)` of the socket file we created, so shutdown never removes a successor's.
    socket_file: (u64, u64),
    access: AccessPolicy,
}

impl ControlServer {
    /// Binds the socket at `path` with permission bits `mode` (0o600 or 0o660). Commands
    /// are accepted from this process's effective uid, root, and, if `mode` has group bits,
    /// the socket file's group.
    ///
    /// A socket file nobody answers on (left by a crash) is replaced. Fails if a live
    /// daemon answers on it ("another rollbackd is running") or if `path` is not a socket
    /// (which is left untouched).
    pub fn bind(path: &Path, mode: u32) -> io::Result<ControlServer> {
        // SAFETY: geteuid cannot fail and has no preconditions.
        let euid = unsafe { libc::geteuid() };
        Self::bind_inner(path, mode, euid, None)
    }

    /// Like [`ControlServer::bind`], but commands are accepted from `owner_uid` (plus root)
    /// and the group `owner_gid` instead of from our own uid and the file's group. For
    /// tests, which run as root, and for deployments where the operator account differs
    /// from the daemon's.
    pub fn bind_with_owner(
        path: &Path,
        mode: u32,
        owner_uid: u32,
        owner_gid: u32,
    ) -> io::Result<ControlServer> {
        Self::bind_inner(path, mode, owner_uid, Some(owner_gid))
    }

    fn bind_inner(
        path: &Path,
        mode: u32,
        owner_uid: u32,
        owner_gid: Option<u32>,
    ) -> io::Result<ControlServer> {
        remove_stale_socket(path)?;
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        // Between bind and chmod the file has umask-derived permissions; that is harmless
        // because every connection's peer credentials are checked anyway.
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o777))?;
        listener.set_nonblocking(true)?;
        let metadata = fs::symlink_metadata(path)?;
        let access = AccessPolicy {
            owner_uid,
            owner_gid: owner_gid.unwrap_or(metadata.gid()),
            group_may_command: mode & 0o070 != 0,
        };
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            socket_file: (metadata.dev(), metadata.ino()),
            access,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until `shutdown` is cancelled, forwarding each permitted,
    /// well-formed request on `commands` and streaming the driver's replies back. Then
    /// stops accepting, removes the socket file, and waits for the connections in flight
    /// (each ends when its command gets its final reply or its sender is dropped; requests
    /// not yet forwarded are answered "daemon is shutting down").
    pub async fn serve(self, commands: mpsc::Sender<Command>, shutdown: CancellationToken) {
        let ControlServer {
            listener,
            path,
            socket_file,
            access,
        } = self;
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "control socket cannot join the runtime");
                remove_own_socket(&path, socket_file);
                return;
            }
        };
        let connections = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            // A slot first, then accept: at the limit, clients wait in the backlog and
            // cost the daemon no descriptor.
            let slot = tokio::select! {
                () = shutdown.cancelled() => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break, // never closed
                },
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let connection =
                            handle_connection(stream, access, commands.clone(), shutdown.clone());
                        connections.spawn(async move {
                            let _slot = slot;
                            connection.await
                        });
                    }
                    Err(error) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        remove_own_socket(&path, socket_file);
        connections.close();
        connections.wait().await;
    }
}

/// Clears the way for `bind`: nothing there is fine; a socket nobody answers on is removed;
/// anything else is an error and is left alone.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        Ok(_) => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another rollbackd is running (it answers on {})",
                path.display()
            ),
        )),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale control socket");
            match fs::remove_file(path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
                _ => Ok(()),
            }
        }
        // Removed between our two looks.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io::Error::new(
            error.kind(),
            format!("cannot tell whether {} is in use: {error}", path.display()),
        )),
    }
}

fn remove_own_socket(path: &Path, socket_file: (u64, u64)) {
    match fs::symlink_metadata(path) {
        Ok(metadata) if (metadata.dev(), metadata.ino()) == socket_file => {
            if let Err(error) = fs::remove_file(path) {
                tracing::warn!(path = %path.display(), %error, "cannot remove control socket");
            }
        }
        Ok(_) => tracing::warn!(
            path = %path.display(),
            "control socket was replaced by another file; leaving it"
        ),
        Err(_) => {}
    }
}

async fn handle_connection(
    stream: UnixStream,
    access: AccessPolicy,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let peer = stream.peer_cred();
    let peer_groups = peer_supplementary_groups(&stream);
    let (read_half, mut write_half) = stream.into_split();

    // Read the request even from a peer about to be refused, so every client sees the same
    // protocol: request line out, reply line in.
    let line = match read_request_line(read_half).await {
        Ok(line) => line,
        Err(problem) => {
            let _ = write_reply(&mut write_half, &Reply::failed(problem, 2)).await;
            return;
        }
    };

    let peer = match peer {
        Ok(peer) => peer,
        Err(error) => {
            tracing::warn!(%error, "control socket: cannot read peer credentials; refusing");
            let reply = Reply::failed(
                format!("permission denied: cannot identify peer: {error}"),
                3,
            );
            let _ = write_reply(&mut write_half, &reply).await;
            return;
        }
    };
    let (uid, gid, pid) = (peer.uid(), peer.gid(), peer.pid());
    if !access.allows(uid, gid, || peer_groups.unwrap_or_default()) {
        tracing::warn!(
            uid,
            gid,
            pid,
            "control socket: refused command from a peer that is not the socket owner or group"
        );
        let reply = Reply::failed(
            format!("permission denied: uid {uid} is not the socket owner or group"),
            3,
        );
        let _ = write_reply(&mut write_half, &reply).await;
        return;
    }

    let request: Request = match serde_json::from_slice(&line) {
        Ok(request) => request,
        Err(error) => {
            let reply = Reply::failed(format!("malformed request: {error}"), 2);
            let _ = write_reply(&mut write_half, &reply).await;
            return;
        }
    };
    if let Err(problem) = request.validate() {
        tracing::warn!(
            uid,
            command = request.command_name(),
            "control socket: refused an invalid request: {problem}"
        );
        let reply = Reply::failed(format!("invalid request: {problem}"), 2);
        let _ = write_reply(&mut write_half, &reply).await;
        return;
    }

    // getpwuid_r may ask NSS (LDAP, sssd): keep it off the async workers.
    let operator = tokio::task::spawn_blocking(move || Operator::from_peer(uid, gid, pid))
        .await
        .unwrap_or_else(|_| Operator {
            uid,
            gid,
            pid,
            name: format!("uid:{uid}"),
        });
    tracing::info!(
        operator = %operator.name,
        pid = ?operator.pid,
        command = request.command_name(),
        "control command"
    );

    let (replies, mut reply_queue) = mpsc::channel(REPLY_QUEUE);
    let command = Command {
        operator,
        request,
        replies,
    };
    let forwarded = tokio::select! {
        biased;
        () = shutdown.cancelled() => Err("daemon is shutting down"),
        sent = commands.send(command) => sent.map_err(|_| "daemon is not accepting commands"),
    };
    if let Err(message) = forwarded {
        let _ = write_reply(&mut write_half, &Reply::failed(message, 1)).await;
        return;
    }

    loop {
        let reply = reply_queue
            .recv()
            .await
            .unwrap_or_else(|| Reply::failed("daemon dropped the command", 1));
        let is_final = !matches!(reply, Reply::Progress { .. });
        if let Err(error) = write_reply(&mut write_half, &reply).await {
            // The command carries on; only its audience is gone.
            tracing::debug!(%error, "control client went away before the final reply");
            return;
        }
        if is_final {
            let _ = write_half.shutdown().await;
            return;
        }
    }
}

/// The request line without its newline, or why there is none (to send back, exit 2).
async fn read_request_line(read_half: impl AsyncRead + Unpin) -> Result<Vec<u8>, String> {
    let mut reader = BufReader::new(read_half).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => {
            return Err(format!(
                "no request line within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(error)) => return Err(format!("cannot read request: {error}")),
        Ok(Ok(_)) => {}
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request line longer than {MAX_REQUEST_BYTES} bytes"
        ));
    }
    // A request cut short by EOF instead of a newline is still one line.
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request".to_string());
    }
    Ok(line)
}

async fn write_reply(write_half: &mut OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    match tokio::time::timeout(REPLY_WRITE_TIMEOUT, write_half.write_all(&line)).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client stopped reading replies",
        )),
    }
}

/// Sends `request` to the daemon at `path`, calls `on_progress(message, detail)` for each
/// progress line, and returns the final `Done` result, or the `Failed` message and exit
/// status as [`CallError::Failed`]. No time limit: a rollback may take minutes; wrap the
/// call in a timeout where one is wanted.
pub async fn call(
    path: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&str, &serde_json::Value),
) -> Result<serde_json::Value, CallError> {
    // Whoever answers on the socket decides what the CLI prints ("rolled back"), so the
    // socket must be the daemon's: a socket file owned by a trusted uid, and a listener
    // running as one. Checked before anything is sent.
    let trusted = crate::statedir::trusted_socket_uids(path);
    match fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(CallError::NotRunning(path.to_path_buf()))
        }
        Err(error) => return Err(CallError::Io(error)),
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(CallError::Untrusted(format!(
                "refusing the control socket {}: it is not a socket{}; nothing was sent. \
                 Fix: find out who put it there, then remove it",
                path.display(),
                if metadata.file_type().is_symlink() {
                    " but a symlink"
                } else {
                    ""
                },
            )))
        }
        Ok(metadata) if !trusted.contains(&metadata.uid()) => {
            return Err(CallError::Untrusted(untrusted_socket_message(
                path,
                "the socket file is owned by",
                metadata.uid(),
            )))
        }
        Ok(_) => {}
    }
    let stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(CallError::NotRunning(path.to_path_buf()))
        }
        Err(error) => return Err(CallError::Io(error)),
    };
    // The file may have been swapped between the look and the connect; the kernel's word
    // on who listens is the authority.
    let server_uid = stream.peer_cred().map_err(CallError::Io)?.uid();
    if !trusted.contains(&server_uid) {
        return Err(CallError::Untrusted(untrusted_socket_message(
            path,
            "the process listening on it runs as",
            server_uid,
        )));
    }
    let (read_half, mut write_half) = stream.into_split();
    let mut line = serde_json::to_vec(request)
        .map_err(|error| CallError::Protocol(format!("cannot encode request: {error}")))?;
    line.push(b'\n');
    // A server that refuses us may answer and close before reading all we sent; its answer
    // is still the best explanation, so read it before reporting a failed write.
    let mut write_error = write_half.write_all(&line).await.err();

    let mut reader = BufReader::new(read_half);
    loop {
        let mut reply_line = Vec::new();
        let n_read = (&mut reader)
            .take(MAX_REPLY_BYTES as u64 + 1)
            .read_until(b'\n', &mut reply_line)
            .await;
        if n_read? == 0 {
            if let Some(error) = write_error.take() {
                return Err(CallError::Io(error));
            }
            return Err(CallError::Protocol(
                "connection closed before the final reply".to_string(),
            ));
        }
        if reply_line.last() != Some(&b'\n') && reply_line.len() > MAX_REPLY_BYTES {
            return Err(CallError::Protocol(format!(
                "reply line longer than {MAX_REPLY_BYTES} bytes"
            )));
        }
        let reply: Reply = serde_json::from_slice(&reply_line).map_err(|error| {
            CallError::Protocol(format!(
                "{error} in {:?}",
                String::from_utf8_lossy(&reply_line).trim_end()
            ))
        })?;
        match reply {
            Reply::Progress { message, detail } => on_progress(&message, &detail),
            Reply::Done { result } => return Ok(result),
            Reply::Failed { message, exit } => return Err(CallError::Failed { message, exit }),
        }
    }
}

fn untrusted_socket_message(path: &Path, what: &str, uid: u32) -> String {
    format!(
        "refusing the control socket {}: {what} {}, which is not root, you ({}) or the \
         owner of a state directory nobody else can write; another user may have put it there to fake \
         the daemon's answers, so nothing was sent and nothing was done. Fix: find who \
         listens there (`ss -xlp | grep rollbackd.sock`), remove the socket, and make the \
         state directory the daemon's own (`rollbackd run` names what is wrong with it)",
        path.display(),
        crate::statedir::describe_uid(uid),
        crate::statedir::describe_uid(crate::statedir::euid()),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("daemon not running (no socket at {0})")]
    NotRunning(PathBuf),
    #[error("{message}")]
    Failed { message: String, exit: u8 },
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("control socket: bad reply: {0}")]
    Protocol(String),
    /// The socket, or whoever listens on it, is not the daemon's.
    #[error("{0}")]
    Untrusted(String),
}

impl CallError {
    /// No daemon: no socket file, or a stale one nobody listens on.
    pub fn is_not_running(&self) -> bool {
        match self {
            CallError::NotRunning(_) => true,
            CallError::Io(error) => matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ),
            _ => false,
        }
    }

    /// The CLI exit status for this error: the daemon's choice for `Failed`, else 1.
    pub fn exit_status(&self) -> u8 {
        match self {
            CallError::Failed { exit, .. } => *exit,
            _ => 1,
        }
    }
}

/// `SO_PEERGROUPS` (not in the libc crate). The asm-generic value; architectures with
/// their own socket option numbers fall back to the primary group only.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "powerpc64",
        target_arch = "s390x"
    )
))]
const SO_PEERGROUPS: Option<libc::c_int> = Some(59);
#[cfg(not(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "powerpc64",
        target_arch = "s390x"
    )
)))]
const SO_PEERGROUPS: Option<libc::c_int> = None;

/// The peer's supplementary groups as of `connect`, or `None` where the kernel cannot say.
fn peer_supplementary_groups(stream: &UnixStream) -> Option<Vec<u32>> {
    let option = SO_PEERGROUPS?;
    let mut n_groups = 32usize;
    loop {
        let mut groups = vec![0 as libc::gid_t; n_groups];
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice())).ok()?;
        // SAFETY: `groups` has room for `len` bytes, and `len` is a valid in/out length.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize;
        if rc == 0 {
            groups.truncate(len / std::mem::size_of::<libc::gid_t>());
            return Some(groups);
        }
        let error = io::Error::last_os_error();
        // ERANGE: the kernel has put the size it needs in `len`.
        if error.raw_os_error() == Some(libc::ERANGE)
            && len > std::mem::size_of_val(groups.as_slice())
            && n_groups < 65536
        {
            n_groups = len.div_ceil(std::mem::size_of::<libc::gid_t>());
            continue;
        }
        return None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_format_is_pinned() {
        let cases = [
            (Request::Status, json!({"command": "status"})),
            (
                Request::Promote {
                    active: "v2".into(),
                    previous: "v1".into(),
                    baseline_error_rate: Some(0.01),
                    baseline_latency_p95_ms: None,
                },
                json!({"command": "promote", "active": "v2", "previous": "v1",
                       "baseline_error_rate": 0.01, "baseline_latency_p95_ms": null}),
            ),
            (
                Request::Rollback {
                    reason: "bad".into(),
                    emergency: true,
                },
                json!({"command": "rollback", "reason": "bad", "emergency": true}),
            ),
            (
                Request::KillSwitchSet { reason: "r".into() },
                json!({"command": "kill-switch-set", "reason": "r"}),
            ),
            (
                Request::KillSwitchReset {
                    reason: "r".into(),
                    force: false,
                },
                json!({"command": "kill-switch-reset", "reason": "r", "force": false}),
            ),
            (
                Request::KillSwitchStatus,
                json!({"command": "kill-switch-status"}),
            ),
            (
                Request::Pause { reason: None },
                json!({"command": "pause", "reason": null}),
            ),
            (Request::Resume, json!({"command": "resume"})),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_value(&request).unwrap(), wire);
            assert_eq!(serde_json::from_value::<Request>(wire).unwrap(), request);
            assert!(!request.command_name().is_empty());
        }
    }

    #[test]
    fn request_defaults_apply_and_unknown_fields_are_refused() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"rollback","reason":"x"}"#).unwrap(),
            Request::Rollback {
                reason: "x".into(),
                emergency: false
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"pause"}"#).unwrap(),
            Request::Pause { reason: None }
        );
        let typo = serde_json::from_str::<Request>(
            r#"{"command":"rollback","reason":"x","emergancy":true}"#,
        );
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
        // serde cannot refuse extra fields on unit variants of an internally tagged enum;
        // harmless, since those commands have no options to misspell.
        assert!(serde_json::from_str::<Request>(r#"{"command":"status","x":1}"#).is_ok());
    }

    #[test]
    fn reply_wire_format_is_pinned() {
        let cases = [
            (
                Reply::Progress {
                    message: "switch done".into(),
                    detail: json!({"seconds": 0.2}),
                },
                json!({"type": "progress", "message": "switch done", "detail": {"seconds": 0.2}}),
            ),
            (
                Reply::Done {
                    result: json!({"ok": true}),
                },
                json!({"type": "done", "result": {"ok": true}}),
            ),
            (
                Reply::failed("refused", 3),
                json!({"type": "failed", "message": "refused", "exit": 3}),
            ),
        ];
        for (reply, wire) in cases {
            assert_eq!(serde_json::to_value(&reply).unwrap(), wire);
            assert_eq!(serde_json::from_value::<Reply>(wire).unwrap(), reply);
        }
        assert_eq!(
            serde_json::from_str::<Reply>(r#"{"type":"done"}"#).unwrap(),
            Reply::Done {
                result: serde_json::Value::Null
            }
        );
    }

    #[test]
    fn access_policy() {
        let owner_only = AccessPolicy {
            owner_uid: 1000,
            owner_gid: 2000,
            group_may_command: false,
        };
        assert!(owner_only.allows(1000, 1, Vec::new));
        assert!(owner_only.allows(0, 0, Vec::new));
        assert!(!owner_only.allows(1001, 2000, || vec![2000]));
        let with_group = AccessPolicy {
            group_may_command: true,
            ..owner_only
        };
        assert!(with_group.allows(1001, 2000, Vec::new));
        assert!(with_group.allows(1001, 1001, || vec![5, 2000]));
        assert!(!with_group.allows(1001, 1001, || vec![5]));
    }

    #[test]
    fn user_names() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(Operator::from_peer(0, 0, None).name, "uid:0(root)");
        assert_eq!(Operator::from_peer(3_999_999, 0, None).name, "uid:3999999");
    }
}
