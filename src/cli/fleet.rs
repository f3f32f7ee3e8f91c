//! The fleet from the command line: `kill-switch set|reset --fleet`, `fleet status`, and
//! the verdict check before `promote`. These talk to etcd directly (no daemon needed): an
//! operator flipping the fleet's kill switch must not depend on the host they run it on.

use std::io::Write;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::config::{ConfigError, ConfigIssue, FleetConfig, LoadedConfig};
use crate::daemon::fleet::FleetRead;
use crate::exit;
use crate::fleet::{FleetKillSwitch, HostRecord, Keys, Known, VerdictEntry};
use crate::storage::audit::rfc3339_millis;
use crate::text::escape;

fn fleet_config(loaded: &LoadedConfig) -> Result<&FleetConfig, ConfigError> {
    loaded.config.fleet.as_ref().ok_or_else(|| {
        ConfigError::Invalid(vec![ConfigIssue {
            key: "fleet.endpoints".into(),
            message: "is empty: no fleet is configured (list the etcd client URLs, e.g. \
                      [\"http://10.0.0.1:2379\"])"
                .into(),
        }])
    })
}

/// Who runs the command: the user name of the real uid.
fn operator() -> String {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    crate::storage::statedir::user_name(uid).unwrap_or_else(|| uid.to_string())
}

/// `kill-switch set|reset --fleet --reason R [--force]`: one put of the fleet key. A reset
/// is mirrored by each host as a local reset would be: not while a check failed there
/// within its `reset_quiet_period` (it waits that out), unless `force`.
pub async fn kill_switch(
    loaded: &LoadedConfig,
    value: &str,
    reason: &str,
    force: bool,
) -> anyhow::Result<u8> {
    let config = fleet_config(loaded)?;
    let store = crate::fleet::store_for(config)?;
    let keys = Keys::new(&config.prefix);
    let record = FleetKillSwitch {
        value: value.to_owned(),
        operator: operator(),
        reason: reason.to_owned(),
        at: rfc3339_millis(SystemTime::now()),
        from_host: Some(config.host.clone()),
        force: force && value == "0",
    };
    let bytes = serde_json::to_vec(&record)?;
    match store.put(&keys.kill_switch(), bytes, None).await {
        Ok((previous, revision)) => {
            let previous = previous.map(|kv| FleetKillSwitch::parse(&kv.value));
            let was = match &previous {
                Some(p) => format!(
                    "was {} (by {} at {}: {})",
                    if p.on() { "on" } else { "off" },
                    escape(&p.operator),
                    escape(&p.at),
                    escape(&p.reason)
                ),
                None => "was never set".into(),
            };
            println!(
                "fleet kill switch {} at revision {revision}; {was}. Every daemon mirrors it \
                 into its host's database; `rollbackd fleet status` shows which have{}",
                if value == "1" { "ON" } else { "off" },
                match (value, force) {
                    ("1", _) => "",
                    (_, false) =>
                        " (a host whose own kill switch was set there keeps it on; a host where \
                         a check failed within its kill_switch.reset_quiet_period keeps it on \
                         until that ends: --force resets those now)",
                    (_, true) =>
                        " (forced: also on hosts inside their kill_switch.reset_quiet_period; a \
                         host whose own kill switch was set there keeps it on)",
                }
            );
            Ok(exit::SUCCESS)
        }
        Err(err) => {
            eprintln!(
                "rollbackd: the fleet kill switch was NOT {}: {err}. To act on this host \
                 alone now: rollbackd kill-switch {} --reason ..",
                if value == "1" { "set" } else { "reset" },
                if value == "1" { "set" } else { "reset" }
            );
            Ok(exit::FAILURE)
        }
    }
}

/// Reads the verdicts of `version` for a `promote` run without a daemon (the daemon's
/// gate then judges them, as it judges its own). Never fails: what cannot be read is said
/// by `known` (this user's credentials that cannot be used fail the gate closed; an etcd
/// that cannot be reached lets the promotion through with a warning).
pub async fn read_for_promotion(config: &crate::config::FleetConfig, version: &str) -> FleetRead {
    use crate::fleet::store::FleetError;
    let keys = crate::fleet::Keys::new(&config.prefix);
    let listed = match crate::fleet::store_for(config) {
        Ok(store) => store.list(&keys.verdicts_of(version)).await,
        Err(err) => Err(err),
    };
    match listed {
        Ok((kvs, revision)) => FleetRead {
            entries: kvs
                .iter()
                .map(|kv| VerdictEntry::read(&keys, &kv.key, &kv.value, kv.mod_revision))
                .collect(),
            revision,
            known: Known::Complete,
        },
        Err(err @ FleetError::Credentials(_)) => FleetRead {
            entries: Vec::new(),
            revision: 0,
            known: Known::Credentials(err.to_string()),
        },
        Err(err) => FleetRead {
            entries: Vec::new(),
            revision: 0,
            known: Known::Stale(err.to_string()),
        },
    }
}

/// `fleet status [--json]`.
pub async fn status(loaded: &LoadedConfig, json_out: bool) -> anyhow::Result<u8> {
    let config = fleet_config(loaded)?;
    let store = crate::fleet::store_for(config)?;
    let keys = Keys::new(&config.prefix);
    let result = async {
        let (kill, revision) = store.get(&keys.kill_switch()).await?;
        let (hosts, _) = store.list(&keys.hosts()).await?;
        let (verdicts, _) = store.list(&keys.verdicts()).await?;
        Ok::<_, crate::fleet::store::FleetError>((kill, revision, hosts, verdicts))
    }
    .await;
    let (kill, revision, hosts, verdicts) = match result {
        Ok(parts) => parts,
        Err(err) => {
            eprintln!("rollbackd: cannot read the fleet: {err}");
            return Ok(exit::FAILURE);
        }
    };
    let kill_revision = kill.as_ref().map(|kv| kv.mod_revision);
    let kill = kill.map(|kv| FleetKillSwitch::parse(&kv.value));
    let hosts: Vec<HostRecord> = hosts
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    let entries: Vec<VerdictEntry> = verdicts
        .iter()
        .map(|kv| VerdictEntry::read(&keys, &kv.key, &kv.value, kv.mod_revision))
        .collect();
    let verdicts: Vec<_> = entries.iter().filter_map(VerdictEntry::verdict).collect();
    let unusable: Vec<&VerdictEntry> = entries.iter().filter(|e| e.body.is_err()).collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json_out {
        let value = json!({
            "revision": revision,
            "killSwitch": kill.as_ref().map(|k| json!({
                "value": k.value, "on": k.on(), "operator": k.operator, "reason": k.reason,
                "at": k.at, "fromHost": k.from_host, "revision": kill_revision,
            })),
            "hosts": hosts.iter().map(|h| {
                let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
                v["mirrored"] = Value::Bool(kill_revision.is_none_or(|r| h.fleet_revision >= r));
                v
            }).collect::<Vec<_>>(),
            "verdicts": verdicts,
            "unusableVerdicts": unusable.iter().map(|e| json!({
                "key": e.key, "version": e.version, "host": e.host,
                "error": e.body.as_ref().err(), "revision": e.mod_revision,
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(exit::SUCCESS);
    }
    match &kill {
        Some(k) => writeln!(
            out,
            "fleet kill switch  {} (by {} at {}{}: {})",
            if k.on() { "ON" } else { "off" },
            escape(&k.operator),
            escape(&k.at),
            k.from_host
                .as_deref()
                .map(|h| format!(" on {}", escape(h)))
                .unwrap_or_default(),
            escape(&k.reason)
        )?,
        None => writeln!(out, "fleet kill switch  off (never set)")?,
    }
    writeln!(out, "hosts ({})", hosts.len())?;
    if !hosts.is_empty() {
        writeln!(
            out,
            "  {:<24} {:<14} {:<14} {:<12} {:<5} {:<9} updated",
            "host", "version", "previous", "state", "kill", "mirrored"
        )?;
    }
    for host in &hosts {
        let mirrored = kill_revision.is_none_or(|r| host.fleet_revision >= r);
        writeln!(
            out,
            "  {:<24} {:<14} {:<14} {:<12} {:<5} {:<9} {}",
            escape(&host.host),
            escape(host.active.as_deref().unwrap_or("-")),
            escape(host.previous.as_deref().unwrap_or("-")),
            escape(&host.state),
            escape(host.kill_switch.as_deref().unwrap_or("unset")),
            if mirrored { "yes" } else { "NO" },
            escape(&host.updated_at)
        )?;
    }
    for entry in &unusable {
        writeln!(
            out,
            "UNUSABLE           {}; it refuses a promotion of {} until deleted or forced past",
            entry.unusable().unwrap_or_default(),
            escape(&entry.version)
        )?;
    }
    if verdicts.is_empty() {
        writeln!(out, "verdicts           none")?;
    } else {
        writeln!(out, "verdicts ({})", verdicts.len())?;
        for v in &verdicts {
            writeln!(
                out,
                "  {} rolled back on {} at {} ({}): {}{}",
                escape(&v.version),
                escape(&v.host),
                escape(&v.at),
                escape(&v.trigger),
                escape(&v.reason),
                v.artifact
                    .as_deref()
                    .map(|a| format!(" [{}]", escape(a)))
                    .unwrap_or_default()
            )?;
        }
    }
    Ok(exit::SUCCESS)
}
