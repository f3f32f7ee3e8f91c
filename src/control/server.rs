//! The daemon's side: binding the socket, checking who connects, forwarding each request
//! to the driver as a [`Command`] and streaming its replies back.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::peercred::peer_supplementary_groups;
use super::protocol::*;

/// How many replies the driver can queue for one connection before `send` waits.
const REPLY_QUEUE: usize = 64;

/// Who may command the daemon.
#[derive(Debug, Clone, Copy)]
pub(super) struct AccessPolicy {
    pub(super) owner_uid: u32,
    pub(super) owner_gid: u32,
    pub(super) group_may_command: bool,
}

impl AccessPolicy {
    pub(super) fn allows(
        &self,
        uid: u32,
        gid: u32,
        supplementary_groups: impl FnOnce() -> Vec<u32>,
    ) -> bool {
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
