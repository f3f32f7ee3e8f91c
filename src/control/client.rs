//! The CLI's side: [`call`] sends one request and reads the replies, after checking that
//! the socket (and whoever listens on it) is the daemon's.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::*;

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
    let trusted = crate::storage::statedir::trusted_socket_uids(path);
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
        crate::storage::statedir::describe_uid(uid),
        crate::storage::statedir::describe_uid(crate::storage::statedir::euid()),
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
