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
mod client;
mod peercred;
mod protocol;
mod server;
pub mod status;

pub use client::{call, CallError};
pub use protocol::*;
pub use server::ControlServer;

#[cfg(test)]
mod tests {
    use super::server::AccessPolicy;
    use super::*;
    use crate::storage::statedir::user_name;
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
                    force: false,
                    reason: None,
                },
                json!({"command": "promote", "active": "v2", "previous": "v1",
                       "baseline_error_rate": 0.01, "baseline_latency_p95_ms": null}),
            ),
            (
                Request::Promote {
                    active: "v2".into(),
                    previous: "v1".into(),
                    baseline_error_rate: None,
                    baseline_latency_p95_ms: None,
                    force: true,
                    reason: Some("fixed".into()),
                },
                json!({"command": "promote", "active": "v2", "previous": "v1",
                       "baseline_error_rate": null, "baseline_latency_p95_ms": null,
                       "force": true, "reason": "fixed"}),
            ),
            (
                Request::Rollback {
                    reason: "bad".into(),
                    emergency: true,
                    force: false,
                },
                json!({"command": "rollback", "reason": "bad", "emergency": true, "force": false}),
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
                emergency: false,
                force: false
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
