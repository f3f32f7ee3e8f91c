//! Beyond one host (SPEC §8): the fleet's shared state in etcd v3 — the fleet kill
//! switch, release verdicts and the hosts' registrations — behind [`store::FleetStore`].
//!
//! One daemon per host stays the unit: the fleet is an input the daemon mirrors, never a
//! dependency of its guard. The key layout under `fleet.prefix` (default `/rollbackd/`):
//!
//! | key | value (JSON) | written by |
//! | --- | --- | --- |
//! | `kill_switch` | [`FleetKillSwitch`] | `kill-switch set|reset --fleet` |
//! | `hosts/<host>` | [`HostRecord`], under the host's lease | each daemon |
//! | `verdicts/<version>/<host>` | [`Verdict`] | the daemon that rolled `<version>` back |
//!
//! These JSON shapes are the fleet's wire format (what other hosts and other builds
//! read), so they live here with their tests, as the on-disk formats live in `storage`.

pub mod agent;
pub mod etcd;
pub mod store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::FleetConfig;

/// The keys of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn kill_switch(&self) -> String {
        format!("{}kill_switch", self.prefix)
    }

    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.prefix)
    }

    pub fn host(&self, host: &str) -> String {
        format!("{}hosts/{host}", self.prefix)
    }

    pub fn verdicts(&self) -> String {
        format!("{}verdicts/", self.prefix)
    }

    /// Every verdict about `version` (the trailing `/` keeps `v1` from matching `v10`).
    pub fn verdicts_of(&self, version: &str) -> String {
        format!("{}verdicts/{version}/", self.prefix)
    }

    pub fn verdict(&self, version: &str, host: &str) -> String {
        format!("{}verdicts/{version}/{host}", self.prefix)
    }
}

/// The value of the fleet kill switch key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetKillSwitch {
    /// `"1"` on, `"0"` off.
    pub value: String,
    /// Who set it (the user that ran the command).
    pub operator: String,
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
    /// The host the command ran on.
    #[serde(default)]
    pub from_host: Option<String>,
}

impl FleetKillSwitch {
    pub fn on(&self) -> bool {
        self.value == "1"
    }

    /// Parses the key's value; a value no build could have written reads as on (fail
    /// closed: somebody meant something by writing it). Its texts come from whoever can
    /// write etcd: each is cut to [`TEXT_MAX`] characters without control characters.
    pub fn parse(bytes: &[u8]) -> FleetKillSwitch {
        let parsed: Result<FleetKillSwitch, _> = serde_json::from_slice(bytes);
        if let Ok(record) = parsed {
            return FleetKillSwitch {
                value: if record.value == "0" { "0" } else { "1" }.to_owned(),
                operator: bounded(&record.operator),
                reason: bounded(&record.reason),
                at: bounded(&record.at),
                from_host: record.from_host.as_deref().map(bounded),
            };
        }
        parsed
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| FleetKillSwitch {
                value: "1".into(),
                operator: "unknown".into(),
                reason: bounded(&format!(
                    "unreadable fleet kill switch value ({e}): {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                )),
                at: String::new(),
                from_host: None,
            })
    }
}

/// A host's registration, written under its lease (gone when the host is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub host: String,
    /// The active worker (the version the host runs), when known.
    pub active: Option<String>,
    pub previous: Option<String>,
    /// The session state (`monitoring`, `confirmed`, `rolled-back`, `escalated`, ...) or
    /// `idle` without a session.
    pub state: String,
    /// The host's own kill switch value (`"1"`, `"0"`, `null`: no row, `"?"` unknown).
    pub kill_switch: Option<String>,
    /// The fleet kill switch revision this host has mirrored.
    pub fleet_revision: i64,
    /// The rollbackd build.
    pub rollbackd: String,
    pub updated_at: String,
}

/// A release verdict: `host` rolled `version` back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub version: String,
    pub host: String,
    /// `rollback`.
    pub decision: String,
    pub reason: String,
    /// The worker the host went back to.
    pub to: Option<String>,
    /// `automatic`, `manual`, `emergency` or `fleet`.
    pub trigger: String,
    /// The artifact's file name on that host, and its summary.
    pub artifact: Option<String>,
    pub error_rate: Option<f64>,
    pub failure_count: Option<u32>,
    pub session_id: Option<String>,
    pub at: String,
}

impl Verdict {
    /// Parses a verdict read from etcd: `None` unless its version and host follow the
    /// worker-id rule (they name keys and are compared with the active worker); its texts
    /// are cut to [`TEXT_MAX`] characters without control characters.
    pub fn parse(bytes: &[u8]) -> Option<Verdict> {
        let mut verdict: Verdict = serde_json::from_slice(bytes).ok()?;
        if !crate::text::is_valid_worker_id(&verdict.version)
            || !crate::text::is_valid_worker_id(&verdict.host)
        {
            return None;
        }
        verdict.reason = bounded(&verdict.reason);
        verdict.trigger = bounded(&verdict.trigger);
        verdict.decision = bounded(&verdict.decision);
        verdict.at = bounded(&verdict.at);
        verdict.to = verdict.to.as_deref().map(bounded);
        verdict.artifact = verdict.artifact.as_deref().map(bounded);
        verdict.session_id = verdict.session_id.as_deref().map(bounded);
        Some(verdict)
    }
}

/// The longest text taken from etcd (a reason, an operator), in characters.
pub const TEXT_MAX: usize = 1024;

/// `text` without control characters, cut to [`TEXT_MAX`] characters.
pub fn bounded(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(TEXT_MAX)
        .collect()
}

/// What the fleet mirror does with the host's kill switch when the fleet value is
/// `fleet_on`, the host's row holds `local`, and `local_hold` says whether it was turned
/// on here (escalation, `kill-switch set`, a hand-made edit) rather than by the fleet.
///
/// The effective value is local OR fleet: a fleet set always lands; a fleet reset clears
/// only what the fleet set, never a local escalation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirror {
    /// Write this value.
    Write(&'static str),
    /// The fleet was reset but the host's kill switch stays on: it was set here.
    KeepLocal,
    /// Already as it should be.
    Nothing,
}

pub fn mirror(fleet_on: bool, local: Option<&str>, local_hold: bool) -> Mirror {
    let local_on = local == Some("1");
    match (fleet_on, local_on) {
        (true, false) => Mirror::Write("1"),
        (true, true) => Mirror::Nothing,
        (false, true) if local_hold => Mirror::KeepLocal,
        (false, true) => Mirror::Write("0"),
        (false, false) => Mirror::Nothing,
    }
}

/// The fleet store for a configuration (etcd v3 through its gateway).
pub fn store_for(config: &FleetConfig) -> Result<Arc<dyn store::FleetStore>, store::FleetError> {
    Ok(Arc::new(etcd::EtcdGateway::new(
        &config.endpoints,
        &config.tls,
        config.auth.as_ref(),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_kill_switch_is_local_or_fleet() {
        // (fleet on, local row, set here) -> what the mirror does
        let cases = [
            (true, None, false, Mirror::Write("1")),
            (true, Some("0"), false, Mirror::Write("1")),
            (true, Some("0"), true, Mirror::Write("1")),
            (true, Some("1"), false, Mirror::Nothing),
            (true, Some("1"), true, Mirror::Nothing),
            (false, Some("1"), false, Mirror::Write("0")),
            (false, Some("1"), true, Mirror::KeepLocal),
            (false, Some("0"), false, Mirror::Nothing),
            (false, Some("0"), true, Mirror::Nothing),
            (false, None, false, Mirror::Nothing),
            // Anything but '1' is off for LiveFlags: nothing to reset.
            (false, Some("yes"), false, Mirror::Nothing),
            (true, Some("yes"), false, Mirror::Write("1")),
        ];
        for (fleet_on, local, hold, want) in cases {
            assert_eq!(
                mirror(fleet_on, local, hold),
                want,
                "fleet {fleet_on}, local {local:?}, hold {hold}"
            );
        }
    }

    #[test]
    fn keys_sit_under_the_prefix_and_a_version_prefix_does_not_match_a_longer_one() {
        let keys = Keys::new("/rollbackd/");
        assert_eq!(keys.kill_switch(), "/rollbackd/kill_switch");
        assert_eq!(keys.host("web-1"), "/rollbackd/hosts/web-1");
        assert_eq!(keys.verdict("v1", "web-1"), "/rollbackd/verdicts/v1/web-1");
        assert!(!keys
            .verdict("v10", "web-1")
            .starts_with(&keys.verdicts_of("v1")));
        assert!(keys
            .verdict("v1", "web-1")
            .starts_with(&keys.verdicts_of("v1")));
    }

    #[test]
    fn an_unreadable_fleet_kill_switch_reads_as_on() {
        let cases: &[(&[u8], bool)] = &[
            (
                br#"{"value":"1","operator":"a","reason":"r","at":"t"}"#,
                true,
            ),
            (
                br#"{"value":"0","operator":"a","reason":"r","at":"t"}"#,
                false,
            ),
            (b"garbage", true),
            (b"", true),
        ];
        for (bytes, on) in cases {
            assert_eq!(FleetKillSwitch::parse(bytes).on(), *on, "{bytes:?}");
        }
    }

    #[test]
    fn texts_from_etcd_are_bounded_and_ids_checked() {
        let long = "x".repeat(5000);
        let record = FleetKillSwitch::parse(
            serde_json::json!({"value": "yes", "operator": "a\u{1b}[2Jb", "reason": long, "at": "t"})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(record.value, "1", "anything but 0 is on");
        assert_eq!(record.operator, "a[2Jb");
        assert_eq!(record.reason.chars().count(), TEXT_MAX);
        let verdict = |version: &str, host: &str| {
            Verdict::parse(
                serde_json::json!({"version": version, "host": host, "decision": "rollback",
                    "reason": "r", "to": "v1", "trigger": "automatic", "artifact": null,
                    "errorRate": 0.5, "failureCount": 3, "sessionId": "s", "at": "t"})
                .to_string()
                .as_bytes(),
            )
        };
        assert!(verdict("v2", "web-1").is_some());
        assert!(verdict("../v2", "web-1").is_none());
        assert!(verdict("v2", "web/1").is_none());
        assert!(Verdict::parse(b"{}").is_none());
    }

    #[test]
    fn the_wire_shapes_are_camel_case() {
        let record = FleetKillSwitch {
            value: "1".into(),
            operator: "alice".into(),
            reason: "bad release".into(),
            at: "2026-01-01T00:00:00.000Z".into(),
            from_host: Some("ops-1".into()),
        };
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            serde_json::json!({"value": "1", "operator": "alice", "reason": "bad release",
                               "at": "2026-01-01T00:00:00.000Z", "fromHost": "ops-1"})
        );
        let host = HostRecord {
            host: "web-1".into(),
            fleet_revision: 3,
            ..HostRecord::default()
        };
        let json = serde_json::to_value(&host).unwrap();
        assert_eq!(json["fleetRevision"], 3);
        assert!(json.get("killSwitch").is_some());
    }
}
