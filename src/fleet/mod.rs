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

    /// The version and the host a key under `verdicts/` names, as written (checked by
    /// [`VerdictEntry::read`]); `None` for a key outside `verdicts/`.
    pub fn verdict_parts<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.verdicts())?;
        Some(rest.split_once('/').unwrap_or((rest, "")))
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
    /// A reset forced past each host's `kill_switch.reset_quiet_period` (`--force`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
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
                force: record.force,
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
                force: false,
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
    /// Parses a verdict's body read from etcd, or says why it cannot be used: its version
    /// and host must follow the worker-id rule (they name keys and are compared with the
    /// active worker); its texts are cut to [`TEXT_MAX`] characters without control
    /// characters. What the body is about is decided by its key: see [`VerdictEntry`].
    pub fn parse(bytes: &[u8]) -> Result<Verdict, String> {
        let mut verdict: Verdict = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "not a verdict this build can read ({})",
                bounded(&e.to_string())
            )
        })?;
        crate::text::check_worker_id(&verdict.version).map_err(|e| format!("its version: {e}"))?;
        crate::text::check_worker_id(&verdict.host).map_err(|e| format!("its host: {e}"))?;
        verdict.reason = bounded(&verdict.reason);
        verdict.trigger = bounded(&verdict.trigger);
        verdict.decision = bounded(&verdict.decision);
        verdict.at = bounded(&verdict.at);
        verdict.to = verdict.to.as_deref().map(bounded);
        verdict.artifact = verdict.artifact.as_deref().map(bounded);
        verdict.session_id = verdict.session_id.as_deref().map(bounded);
        Ok(verdict)
    }
}

/// One key under `verdicts/` as read from etcd. **The key decides** what it is about (the
/// version and the host it names; it is also what etcd's permissions can be granted on):
/// its body is used only when it is a readable verdict of that same version and host.
/// Anything else under `verdicts/<version>/` is kept as unusable (`body` says why): it is
/// never followed and never blocks another version, but it still refuses a promotion of
/// the version its key names (fail closed, as the fleet kill switch does), unless forced.
#[derive(Debug, Clone, PartialEq)]
pub struct VerdictEntry {
    /// The etcd key, as read.
    pub key: String,
    /// The version the key names, as written.
    pub version: String,
    /// The host the key names, as written.
    pub host: String,
    /// The etcd revision that last wrote the key: what orders it against this host's
    /// promotion (never the writer's clock).
    pub mod_revision: i64,
    pub body: Result<Verdict, String>,
}

impl VerdictEntry {
    pub fn read(keys: &Keys, key: &str, value: &[u8], mod_revision: i64) -> VerdictEntry {
        let (version, host) = keys.verdict_parts(key).unwrap_or((key, ""));
        let body = crate::text::check_worker_id(version)
            .map_err(|e| format!("the version its key names: {e}"))
            .and_then(|()| {
                crate::text::check_worker_id(host)
                    .map_err(|e| format!("the host its key names: {e}"))
            })
            .and_then(|()| Verdict::parse(value))
            .and_then(|verdict| {
                if verdict.version == version && verdict.host == host {
                    Ok(verdict)
                } else {
                    Err(format!(
                        "its body (version {}, host {}) does not match its key",
                        crate::text::escape(&verdict.version),
                        crate::text::escape(&verdict.host)
                    ))
                }
            });
        VerdictEntry {
            key: key.to_owned(),
            version: version.to_owned(),
            host: host.to_owned(),
            mod_revision,
            body,
        }
    }

    /// The verdict, when its body can be used.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.body.as_ref().ok()
    }

    /// `verdict at KEY cannot be used (why)`, escaped for a terminal or the journal.
    pub fn unusable(&self) -> Option<String> {
        self.body.as_ref().err().map(|why| {
            format!(
                "the verdict at {} cannot be used: {}",
                crate::text::escape(&self.key),
                crate::text::escape(why)
            )
        })
    }
}

/// How complete this host's knowledge of the fleet's verdicts is, for
/// [`promotion_gate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Every verdict up to the revision read (a read, or a watch that is live).
    Complete,
    /// etcd cannot be reached now (why): the verdicts known are the last seen.
    Stale(String),
    /// This host's (or this user's) fleet credentials cannot be used (why): nothing is
    /// known, and mending it is the caller's. Fails closed.
    Credentials(String),
}

/// A promotion the verdicts let through: what to say (stderr and the journal).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Passed {
    pub warnings: Vec<String>,
    /// `--force` went past verdicts (or past a check that could not be made).
    pub forced: bool,
}

/// **The one promotion gate** (the daemon, for any client of its control socket, and a
/// command run without a daemon both call it): may `version` be promoted, given the
/// verdict keys under `verdicts/<version>/` (`entries`, with what is known of the rest)?
///
/// A verdict refuses it, naming the host and the reason; so does a key there whose body
/// cannot be used, naming the key (fail closed: somebody meant something by writing it).
/// `--force` (with its reason) goes past both. An etcd that cannot be reached lets the
/// promotion through with a warning (an etcd outage must not stop every deploy: the host's
/// own guard still watches the canary); credentials that cannot be used do not, unless
/// forced. `Err` is the refusal's message.
pub fn promotion_gate(
    version: &str,
    entries: &[&VerdictEntry],
    known: &Known,
    force: bool,
    reason: Option<&str>,
) -> Result<Passed, String> {
    use crate::text::escape;
    let version_shown = escape(version);
    let mut passed = Passed::default();
    match known {
        Known::Complete => {}
        Known::Stale(why) => passed.warnings.push(format!(
            "cannot check the fleet's verdicts for {version_shown} ({}); promoting without \
             that check",
            escape(why),
        )),
        Known::Credentials(why) if !force => {
            return Err(format!(
                "cannot check the fleet's verdicts for {version_shown} ({}); mend that (or run as \
                 a user who can read the files), or promote with --force --reason .. to skip \
                 the check",
                escape(why)
            ))
        }
        Known::Credentials(why) => {
            passed.forced = true;
            passed.warnings.push(format!(
                "cannot check the fleet's verdicts for {version_shown} ({}); promoting anyway \
                 (--force): {}",
                escape(why),
                escape(reason.unwrap_or(""))
            ));
        }
    }
    if entries.is_empty() {
        return Ok(passed);
    }
    let mut said: Vec<String> = entries
        .iter()
        .filter_map(|entry| {
            let verdict = entry.verdict()?;
            Some(format!(
                "{version_shown} was rolled back on host {}: {}",
                escape(&verdict.host),
                escape(&verdict.reason)
            ))
        })
        .collect();
    said.extend(entries.iter().filter_map(|entry| entry.unusable()));
    let first = said.remove(0);
    let more = match said.len() {
        0 => String::new(),
        n => format!(" (and {n} more: {})", said.join("; ")),
    };
    if force {
        passed.forced = true;
        passed.warnings.push(format!(
            "{first}{more}; promoting anyway (--force): {}",
            escape(reason.unwrap_or(""))
        ));
        return Ok(passed);
    }
    let all = entries[0]
        .key
        .strip_suffix(entries[0].host.as_str())
        .unwrap_or(&entries[0].key);
    Err(format!(
        "refused: {first}{more}; promote it anyway with --force --reason .., or, once the \
         version is fixed, delete the verdicts (etcdctl del {} --prefix)",
        escape(all)
    ))
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
/// `fleet_on`, the host's row holds `local`, `local_hold` says whether it was turned on
/// here (escalation, `kill-switch set`, a hand-made edit) rather than by the fleet, and
/// `quiet` whether a reset must wait here: a check failed within this host's
/// `kill_switch.reset_quiet_period` and the fleet reset was not forced.
///
/// The effective value is local OR fleet: a fleet set always lands; a fleet reset clears
/// only what the fleet set, never a local escalation, and — as a local reset — not inside
/// the host's quiet period unless forced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirror {
    /// Write this value.
    Write(&'static str),
    /// The fleet was reset but the host's kill switch stays on: it was set here.
    KeepLocal,
    /// The fleet was reset but the host's kill switch stays on until its quiet period
    /// ends (why); the reset is mirrored then.
    Quiet(String),
    /// Already as it should be.
    Nothing,
}

pub fn mirror(
    fleet_on: bool,
    local: Option<&str>,
    local_hold: bool,
    quiet: Option<&str>,
) -> Mirror {
    let local_on = local == Some("1");
    match (fleet_on, local_on) {
        (true, false) => Mirror::Write("1"),
        (true, true) => Mirror::Nothing,
        (false, true) if local_hold => Mirror::KeepLocal,
        (false, true) => match quiet {
            Some(why) => Mirror::Quiet(why.to_owned()),
            None => Mirror::Write("0"),
        },
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
        // (fleet on, local row, set here, inside the quiet period) -> what the mirror does
        let quiet = Some("a check failed 5s ago");
        let cases = [
            (true, None, false, None, Mirror::Write("1")),
            (true, Some("0"), false, None, Mirror::Write("1")),
            (true, Some("0"), true, None, Mirror::Write("1")),
            (true, Some("1"), false, None, Mirror::Nothing),
            (true, Some("1"), true, None, Mirror::Nothing),
            (false, Some("1"), false, None, Mirror::Write("0")),
            (false, Some("1"), true, None, Mirror::KeepLocal),
            (false, Some("0"), false, None, Mirror::Nothing),
            (false, Some("0"), true, None, Mirror::Nothing),
            (false, None, false, None, Mirror::Nothing),
            // Anything but '1' is off for LiveFlags: nothing to reset.
            (false, Some("yes"), false, None, Mirror::Nothing),
            (true, Some("yes"), false, None, Mirror::Write("1")),
            // A fleet reset waits out the host's quiet period, as a local reset must; a
            // set never waits, and a local hold is kept whatever the quiet period.
            (
                false,
                Some("1"),
                false,
                quiet,
                Mirror::Quiet("a check failed 5s ago".into()),
            ),
            (false, Some("1"), true, quiet, Mirror::KeepLocal),
            (false, Some("0"), false, quiet, Mirror::Nothing),
            (true, Some("0"), false, quiet, Mirror::Write("1")),
        ];
        for (fleet_on, local, hold, quiet, want) in cases {
            assert_eq!(
                mirror(fleet_on, local, hold, quiet),
                want,
                "fleet {fleet_on}, local {local:?}, hold {hold}, quiet {quiet:?}"
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
        assert!(verdict("v2", "web-1").is_ok());
        assert!(verdict("../v2", "web-1").is_err());
        assert!(verdict("v2", "web/1").is_err());
        assert!(Verdict::parse(b"{}").is_err());
    }

    fn body(version: &str, host: &str) -> Vec<u8> {
        serde_json::json!({"version": version, "host": host, "decision": "rollback",
            "reason": "high error rate", "to": "v1", "trigger": "automatic", "at": "t"})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn the_key_decides_what_a_verdict_is_about() {
        let keys = Keys::new("/rollbackd/");
        // (key, body) -> usable, or a part of why not
        let cases: Vec<(&str, Vec<u8>, Result<(), &str>)> = vec![
            ("/rollbackd/verdicts/v2/web-1", body("v2", "web-1"), Ok(())),
            (
                "/rollbackd/verdicts/v9/web-Z",
                body("v5", "web-Q"),
                Err("does not match its key"),
            ),
            (
                "/rollbackd/verdicts/v2/web-Z",
                body("v2", "web-Q"),
                Err("does not match its key"),
            ),
            (
                "/rollbackd/verdicts/v8/web-3",
                br#"{"version": "v8", "host": "web-3", "decision": "rollback", "reason": "r", "at": "t"}"#.to_vec(),
                Err("missing field `trigger`"),
            ),
            (
                "/rollbackd/verdicts/v8/web-3",
                serde_json::json!({"version": "v8", "host": "web-3", "decision": "rollback",
                    "reason": "r", "trigger": "automatic", "failureCount": "three", "at": "t"})
                .to_string()
                .into_bytes(),
                Err("invalid type"),
            ),
            ("/rollbackd/verdicts/v8/web-3", b"garbage".to_vec(), Err("not a verdict")),
            (
                "/rollbackd/verdicts/v8/web/3",
                body("v8", "web/3"),
                Err("the host its key names"),
            ),
            ("/rollbackd/verdicts/v8", body("v8", "web-3"), Err("the host its key names")),
        ];
        for (key, value, want) in cases {
            let entry = VerdictEntry::read(&keys, key, &value, 7);
            assert_eq!(entry.mod_revision, 7);
            match (want, &entry.body) {
                (Ok(()), Ok(verdict)) => {
                    assert_eq!(
                        (verdict.version.as_str(), verdict.host.as_str()),
                        keys.verdict_parts(key).unwrap()
                    )
                }
                (Err(says), Err(why)) => assert!(why.contains(says), "{key}: {why}"),
                (want, got) => panic!("{key}: want {want:?}, got {got:?}"),
            }
        }
        let entry = VerdictEntry::read(
            &keys,
            "/rollbackd/verdicts/v9/web-Z",
            &body("v5", "web-Q"),
            1,
        );
        assert_eq!(
            (entry.version.as_str(), entry.host.as_str()),
            ("v9", "web-Z")
        );
        assert!(entry
            .unusable()
            .unwrap()
            .contains("/rollbackd/verdicts/v9/web-Z"));
    }

    #[test]
    fn the_promotion_gate_refuses_verdicts_and_unusable_keys_unless_forced() {
        let keys = Keys::new("/rollbackd/");
        let good = VerdictEntry::read(
            &keys,
            "/rollbackd/verdicts/v2/web-9",
            &body("v2", "web-9"),
            5,
        );
        let bad = VerdictEntry::read(&keys, "/rollbackd/verdicts/v2/web-3", b"{}", 6);
        let stale = Known::Stale("etcd unreachable: x".into());
        let creds = Known::Credentials("fleet.key_file k: cannot read it".into());
        // (entries, known, force) -> refused saying / passed with warnings saying
        // (entries, known, force) -> Ok(warnings say) / Err(the refusal says)
        type Case<'a> = (
            Vec<&'a VerdictEntry>,
            &'a Known,
            bool,
            Result<&'a [&'a str], &'a [&'a str]>,
        );
        let cases: Vec<Case> = vec![
            (vec![], &Known::Complete, false, Ok(&[])),
            (vec![], &stale, false, Ok(&["promoting without that check"])),
            (
                vec![&good],
                &Known::Complete,
                false,
                Err(&[
                    "refused: v2 was rolled back on host web-9: high error rate",
                    "etcdctl del /rollbackd/verdicts/v2/ --prefix",
                ]),
            ),
            (
                vec![&bad],
                &Known::Complete,
                false,
                Err(&["the verdict at /rollbackd/verdicts/v2/web-3 cannot be used"]),
            ),
            (
                vec![&good, &bad],
                &Known::Complete,
                false,
                Err(&["web-9", "and 1 more", "/rollbackd/verdicts/v2/web-3"]),
            ),
            // What was seen before the link broke still refuses.
            (vec![&good], &stale, false, Err(&["web-9"])),
            (
                vec![&good, &bad],
                &Known::Complete,
                true,
                Ok(&["promoting anyway (--force): why"]),
            ),
            (
                vec![],
                &creds,
                false,
                Err(&["cannot check the fleet's verdicts for v2", "fleet.key_file"]),
            ),
            (
                vec![],
                &creds,
                true,
                Ok(&["promoting anyway (--force): why"]),
            ),
        ];
        for (entries, known, force, want) in cases {
            let got = promotion_gate("v2", &entries, known, force, Some("why"));
            match (want, got) {
                (Ok(says), Ok(passed)) => {
                    assert_eq!(passed.warnings.is_empty(), says.is_empty(), "{passed:?}");
                    for s in says {
                        assert!(
                            passed.warnings.iter().any(|w| w.contains(s)),
                            "{s:?} in {passed:?}"
                        );
                    }
                    assert_eq!(
                        passed.forced,
                        force && (!entries.is_empty() || known != &Known::Complete)
                    );
                }
                (Err(says), Err(message)) => {
                    for s in says {
                        assert!(message.contains(s), "{s:?} in {message}");
                    }
                }
                (want, got) => panic!("{entries:?} {known:?} {force}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn the_wire_shapes_are_camel_case() {
        let record = FleetKillSwitch {
            value: "1".into(),
            operator: "alice".into(),
            reason: "bad release".into(),
            at: "2026-01-01T00:00:00.000Z".into(),
            from_host: Some("ops-1".into()),
            force: false,
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
