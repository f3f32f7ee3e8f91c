//! The wire format: one [`Request`] line in, [`Reply`] lines out, and the limits on both.

use crate::storage::statedir::user_name;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Longest request line accepted, without its newline.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long a client has, after connecting, to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one reply line may take to write before the client is given up on.
pub const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest reply line the client accepts.
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// The most control connections served at once (each is one descriptor; see
/// [`crate::sys::fdlimit`]). Further clients wait in the socket's backlog.
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
        /// Promote even though the fleet's verdicts refuse it (needs `reason`). Left out
        /// of the line when false, so a request that does not force reads as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
        /// Why `force` (operator text).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Rollback {
        reason: String,
        #[serde(default)]
        emergency: bool,
        /// Roll back even to a version rollbackd rolled back (and nobody confirmed since).
        #[serde(default)]
        force: bool,
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
                active,
                previous,
                force,
                reason,
                ..
            } => {
                check_worker_id(active).map_err(|e| format!("active: {e}"))?;
                check_worker_id(previous).map_err(|e| format!("previous: {e}"))?;
                match reason {
                    Some(reason) => check_operator_text("reason", reason),
                    None if *force => Err("force needs a reason (--force --reason ..)".into()),
                    None => Ok(()),
                }
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
    pub(super) fn failed(message: impl Into<String>, exit: u8) -> Reply {
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

    pub(super) fn from_peer(uid: u32, gid: u32, pid: Option<i32>) -> Operator {
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
