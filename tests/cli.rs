//! The command line as operators and scripts use it: exit statuses, messages, files.

mod common;

use std::process::{Command, Stdio};
use std::time::SystemTime;

use common::*;
use serde_json::{json, Value};

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .env_remove("ROLLBACKD_CONFIG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_refuses_bad_files_with_exit_78_and_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[rules]\nerror_rate_threshold = 3\n[monitor]\nwindwo = 5\n",
    )
    .unwrap();
    let (code, _, err) = run(&["--config", bad.to_str().unwrap(), "check-config"], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("rules.error_rate_threshold"), "{err}");
    assert!(err.contains("monitor.windwo"), "{err}");
    let (code, _, err) = run(&["--config", "/nonexistent/r.toml", "check-config"], &[]);
    assert_eq!(code, 78, "{err}");
    let (code, _, err) = run(
        &["check-config"],
        &[("ROLLBACKD_CONFIG", "/nonexistent/r.toml")],
    );
    assert_eq!(code, 78, "{err}");
    let (code, _, err) = run(
        &[
            "--config",
            bad.to_str().unwrap(),
            "simulate",
            "--trace",
            "config/example-trace.jsonl",
        ],
        &[],
    );
    assert_eq!(code, 78, "simulate refuses a bad config too: {err}");
}

#[test]
fn check_config_prints_sources_and_worst_case_times() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rollbackd.example.toml");
    let (code, out, err) = run(
        &["--config", example, "check-config"],
        &[
            ("ROLLBACKD_MONITOR_WINDOW", "6"),
            ("WVO_ROLLBACK_FAILURE_THRESHOLD", "3"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("monitor.window                  = 6"), "{out}");
    assert!(
        out.contains("# environment ROLLBACKD_MONITOR_WINDOW"),
        "{out}"
    );
    assert!(
        out.contains("# environment WVO_ROLLBACK_FAILURE_THRESHOLD"),
        "{out}"
    );
    assert!(
        out.contains("rollback after 3 breaching checks (of the last 6): at most 1m 5s"),
        "{out}"
    );
}

#[test]
fn simulate_replays_the_example_and_reports_malformed_lines() {
    let trace = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example-trace.jsonl");
    let (code, out, err) = run(&["simulate", "--trace", trace, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["at"], 195);
    assert_eq!(last["verdict"], "rollback");
    assert_eq!(last["action"], "rollback");
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["action"].is_null()));
    // stops at the first action: the check at 210 s is not evaluated
    assert_eq!(lines.len(), 8);

    let (code, out, _) = run(&["simulate", "--trace", trace], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("first action: rollback at +195s"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"at\": 30, \"probe\": \"ok\", \"snapshot\": null}\n\n{\"at\": 60, \"probe\": \n",
    )
    .unwrap();
    let (code, _, err) = run(&["simulate", "--trace", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.jsonl:3:"), "{err}");
}

#[test]
fn simulate_stops_evaluating_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.jsonl");
    let mut text = String::new();
    for i in 1..=30 {
        text.push_str(&format!(
            "{{\"at\": {}, \"probe\": \"ok\", \"snapshot\": {{\"failureRate\": 0.01}}}}\n",
            i * 30
        ));
    }
    std::fs::write(&trace, text).unwrap();
    let (code, out, _) = run(
        &["simulate", "--trace", trace.to_str().unwrap(), "--json"],
        &[("ROLLBACKD_PROFILE", "staging")],
    );
    assert_eq!(code, 0);
    // staging: grace period 5m = 300 s → checks at 30..300 s
    assert_eq!(out.lines().count(), 10);
}

#[test]
fn kill_switch_without_a_daemon_sets_audits_and_guards_the_reset() {
    let setup = Setup::new("[kill_switch]\nreset_quiet_period = \"15m\"");
    let out = setup.cli(&["kill-switch", "set", "--reason", "incident 42"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = rollbackd::flags::read_once(&setup.path("app.db"), "DISABLE_NEW").unwrap();
    assert_eq!(rows.get("DISABLE_NEW").map(String::as_str), Some("1"));
    let log =
        std::fs::read_to_string(setup.state().join("analytics/kill_switch_audit.log")).unwrap();
    let line: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(line["source"], "manual");
    assert_eq!(line["reason"], "incident 42");
    assert!(line["operator"].as_str().unwrap().starts_with("uid:"));

    // A failed check recorded just now: reset is refused (exit 3) without --force.
    {
        let mut store =
            rollbackd::storage::store::Store::open(&setup.state().join("rollbackd.db")).unwrap();
        let now = rollbackd::daemon::recorder::now_ms(SystemTime::now());
        let session = rollbackd::daemon::new_session_row(SystemTime::now(), "v2", "v1", None, None);
        store.insert_session(&session).unwrap();
        store
            .insert_check(&rollbackd::storage::store::CheckRow {
                session_id: session.id.clone(),
                check_index: 0,
                taken_at_ms: now,
                check_json: "{}".into(),
                verdict: "degraded".into(),
                failed: true,
            })
            .unwrap();
    }
    let out = setup.cli(&["kill-switch", "reset"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("quiet period"));
    let out = setup.cli(&["kill-switch", "reset", "--force"]);
    assert_eq!(out.status.code(), Some(2), "--force needs --reason");
    let out = setup.cli(&[
        "kill-switch",
        "reset",
        "--force",
        "--reason",
        "fixed by hand",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = setup.cli(&["kill-switch", "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("DISABLE_NEW=0 (off)"));
}

#[test]
fn flags_get_uses_safe_defaults_while_the_kill_switch_is_on() {
    let setup = Setup::new("[flags.defaults]\nNEW_CHECKOUT = \"0\"");
    let mut store = rollbackd::appdb::settings::SettingsStore::open(&setup.path("app.db")).unwrap();
    store.write_once("NEW_CHECKOUT", "1").unwrap();
    let out = setup.cli(&["flags", "get", "NEW_CHECKOUT"]);
    assert!(out.status.success());
    // The value alone on stdout, for `$(rollbackd flags get NEW_CHECKOUT)`.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    store.write_once("DISABLE_NEW", "1").unwrap();
    let out = setup.cli(&["flags", "get", "NEW_CHECKOUT", "--explain"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("NEW_CHECKOUT=0 (safe default"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = setup.cli(&["flags", "get", "NEW_CHECKOUT", "--json"]);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["value"], "0");
    assert_eq!(line["source"], "kill-switch");
    // No value (no row, no safe default): nothing on stdout, why on stderr, exit 1.
    let out = setup.cli(&["flags", "get", "NO_SUCH_FLAG"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NO_SUCH_FLAG unset"));
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, _) = run(&["rollback"], &[]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&["no-such-command"], &[]);
    assert_eq!(code, 2);
}

fn health_line(index: u32) -> String {
    format!(
        r#"{{"timestamp":"2025-10-22T14:32:15.000Z","event":"health-check","sessionId":"s-1","worker":"v2","checkIndex":{index},"verdict":"healthy","errorRate":0.01,"probe":"ok"}}"#
    )
}

fn write_audit_log(setup: &Setup, lines: &[String]) -> std::path::PathBuf {
    let dir = setup.state().join("analytics");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.log");
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    path
}

fn append(path: &std::path::Path, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    writeln!(file, "{line}").unwrap();
}

#[test]
fn audit_tail_prints_the_last_lines_readably_and_marks_unparsed_ones() {
    let setup = Setup::new("");
    let mut lines: Vec<String> = (1..=30).map(health_line).collect();
    lines.push("{torn or garbage".into());
    write_audit_log(&setup, &lines);

    let out = setup.cli(&["audit", "tail", "-n", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let shown: Vec<&str> = stdout.lines().collect();
    assert_eq!(shown.len(), 3, "{stdout}");
    assert!(
        shown[0].contains("health-check")
            && shown[0].contains("v2 #29 verdict=healthy error=1.0% probe=ok"),
        "{stdout}"
    );
    assert!(shown[1].contains("#30"), "{stdout}");
    assert_eq!(shown[2], "[unparsed] {torn or garbage");
    assert!(
        !stdout.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );

    let out = setup.cli(&["audit", "tail"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 20, "20 lines by default");
    assert!(stdout.lines().next().unwrap().contains("#12"), "{stdout}");
}

#[test]
fn audit_tail_json_passes_the_raw_lines_through() {
    let setup = Setup::new("");
    let mut lines: Vec<String> = (1..=5).map(health_line).collect();
    lines.push("not json at all".into());
    write_audit_log(&setup, &lines);
    let out = setup.cli(&["audit", "tail", "--json", "-n", "4"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", lines[2..].join("\n")),
        "byte for byte, unparsed lines included"
    );
}

#[test]
fn audit_tail_without_a_log_fails_with_its_path() {
    let setup = Setup::new("");
    let out = setup.cli(&["audit", "tail"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("analytics/audit.log"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `audit tail -f` as a child whose stdout lines arrive on a channel.
struct Following {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Following {
    fn start(setup: &Setup, args: &[&str]) -> Following {
        use std::io::BufRead;
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&setup.config)
            .args(["audit", "tail", "-f"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Following { child, lines }
    }

    /// The next line, or a panic after 10 s.
    fn next(&self, what: &str) -> String {
        self.lines
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line within 10 s: expected {what}"))
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn audit_tail_follow_picks_up_appends_truncation_and_rotation() {
    let setup = Setup::new("");
    let lines: Vec<String> = (1..=3).map(health_line).collect();
    let path = write_audit_log(&setup, &lines);
    let follow = Following::start(&setup, &["-n", "1", "--json"]);
    assert_eq!(follow.next("the last existing line"), lines[2]);

    // Appended lines.
    append(&path, &health_line(4));
    append(&path, &health_line(5));
    assert_eq!(follow.next("appended line 4"), health_line(4));
    assert_eq!(follow.next("appended line 5"), health_line(5));

    // Truncated in place (copytruncate), then written again: read from the start.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    // Whether or not the follower polls while it is empty, one line is shorter than
    // what it had read: it starts again from 0.
    append(&path, &health_line(6));
    assert_eq!(follow.next("line 6 after truncation"), health_line(6));

    // Rotated: renamed away and replaced by a new file.
    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated).unwrap();
    append(&rotated, &health_line(7));
    append(&path, &health_line(8));
    assert_eq!(
        follow.next("line 7, written to the old file after the rename"),
        health_line(7)
    );
    assert_eq!(follow.next("line 8 from the new file"), health_line(8));
    append(&path, &health_line(9));
    assert_eq!(follow.next("line 9"), health_line(9));
}

#[test]
fn audit_tail_follow_shows_readable_lines_for_a_log_that_appears_later() {
    let setup = Setup::new("");
    let follow = Following::start(&setup, &[]);
    let path = write_audit_log(&setup, &[health_line(1)]);
    let shown = follow.next("the first line of a new log");
    assert!(shown.contains("v2 #1 verdict=healthy"), "{shown}");
    append(&path, "not an audit record");
    append(&path, &health_line(2));
    assert_eq!(
        follow.next("unparsed line"),
        "[unparsed] not an audit record"
    );
    assert!(follow.next("line 2").contains("#2"));
}

#[test]
fn completions_and_man_page_are_generated_from_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run(&["completions", shell], &[]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains("kill-switch"), "{shell}: {out}");
        assert!(out.contains("audit"), "{shell}");
    }
    let (code, out, err) = run(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(".ie") || out.contains(".TH rollbackd"),
        "{out}"
    );
    assert!(out.contains("kill\\-switch"), "{out}");
    let (code, _, _) = run(&["completions", "powershell"], &[]);
    assert_eq!(code, 2, "only bash, zsh and fish");
}

/// Every `rollbackd-<sub>(1)` a page names (SUBCOMMANDS, the see-also list) in a roff
/// page, unescaped.
fn named_pages(roff: &str) -> Vec<String> {
    let text = roff.replace("\\-", "-");
    let mut names = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("rollbackd-") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(tail.len());
        if tail[end..].starts_with("(1)") {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn man_dir_writes_every_page_the_pages_name_each_with_an_exit_status_section() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(&["man", "--dir", dir.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let page = |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.1")));
    let top = page("rollbackd").expect("rollbackd.1");
    let named = named_pages(&top);
    for sub in [
        "rollbackd-promote",
        "rollbackd-kill-switch",
        "rollbackd-audit",
    ] {
        assert!(named.iter().any(|n| n == sub), "{sub} not named: {named:?}");
    }
    // Follow every page a page names, down to the nested ones.
    let mut pending = vec!["rollbackd".to_owned()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let text = page(&name).unwrap_or_else(|e| panic!("{name}.1 is named but missing: {e}"));
        assert!(text.contains(".SH \"EXIT STATUS\""), "{name}.1: {text}");
        for status in ["0", "1", "2", "3", "78"] {
            assert!(
                text.contains(&format!(".TP\n\\fB{status}\\fR\n")),
                "{name}.1 lacks exit status {status}"
            );
        }
        assert!(out.contains(&format!("{name}.1")), "not listed: {out}");
        pending.extend(named_pages(&text));
    }
    for nested in [
        "rollbackd-kill-switch-set",
        "rollbackd-flags-get",
        "rollbackd-audit-tail",
    ] {
        assert!(seen.contains(nested), "{nested} not reached: {seen:?}");
    }
    assert!(!seen.contains("rollbackd-help"), "no page for `help`");
    assert!(
        !seen.contains("rollbackd-demo-hook"),
        "no page for a hidden command"
    );
    // Every file written is a page some page names.
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, seen.len(), "{seen:?}");

    // Without --dir: the top-level page on stdout, the same one.
    let (code, stdout_page, err) = run(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(stdout_page, top);

    let (code, _, err) = run(&["man", "--dir", "/nonexistent/man1"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/man1"), "{err}");
}

#[test]
fn check_config_for_run_exits_78_when_run_could_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rollbackd.toml");
    // Valid for check-config, but `run` has nothing to roll back with.
    std::fs::write(
        &config,
        "[worker]\nhealth_url = \"http://127.0.0.1:9/health\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, out, err) = run(&["--config", config, "check-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("`run` needs it"), "{out}");
    let (code, out, err) = run(&["--config", config, "check-config", "--for", "run"], &[]);
    assert_eq!(code, 78, "{out}{err}");
    assert!(
        out.contains("worst-case times:"),
        "the report is still printed: {out}"
    );
    assert!(err.contains("rollback.switch_command"), "{err}");
    assert!(err.contains("`rollbackd run` would not start"), "{err}");

    // The test Setup's configuration is complete: ready.
    let setup = Setup::new("");
    let out = setup.cli(&["check-config", "--for", "run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ready for `rollbackd run`"), "{stdout}");

    let (code, _, err) = run(&["--config", config, "check-config", "--for", "demo"], &[]);
    assert_eq!(code, 2, "{err}");
}

/// On a terminal, `rollback` asks first; declining exits 3 and changes nothing. `script`
/// gives the command a pseudo-terminal.
#[test]
fn rollback_on_a_terminal_asks_and_a_no_is_refused() {
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !tool_available(
        has_script,
        "rollback_on_a_terminal_asks_and_a_no_is_refused",
        "script (util-linux)",
    ) {
        return;
    }
    let setup = Setup::new("");
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(out.status.success());
    let command_line = format!(
        "{BIN} --config {} rollback --reason 'asked on a tty'",
        setup.config.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &command_line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"n\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("rollback from v2 to v1"),
        "the prompt names the workers: {shown}"
    );
    assert_eq!(out.status.code(), Some(3), "declined: {shown}");
    assert!(setup.switches().is_empty(), "nothing was switched");
    assert!(setup.events("rollback-started").is_empty());
}

/// A newcomer's happy path shows no warnings: the demo printed a raw `WARN ... liveflags
/// cannot read the settings table` before promotion (its database did not exist yet).
#[test]
fn the_demo_runs_to_a_verified_rollback_without_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .env_remove("RUST_LOG")
        .env_remove("ROLLBACKD_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("rollback"), "{stdout}");
    for line in stdout.lines().chain(stderr.lines()) {
        assert!(
            !line.contains("WARN") && !line.contains("ERROR"),
            "the demo printed a warning: {line}\nstderr:\n{stderr}"
        );
    }
}

#[test]
fn simulate_applies_the_daemons_action_policy() {
    let trace = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example-trace.jsonl");
    let last_action = |extra: &[&str]| {
        let mut args = vec!["simulate", "--trace", trace, "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args, &[]);
        assert_eq!(code, 0, "{err}");
        let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        (
            last["at"].clone(),
            last["verdict"].clone(),
            last["action"].clone(),
            last["reason"].clone(),
        )
    };
    let (at, verdict, action, _) = last_action(&[]);
    assert_eq!(
        (at, verdict, action),
        (json!(195), json!("rollback"), json!("rollback"))
    );
    // The engine's verdict stays "rollback"; what the daemon would start is an escalation.
    let (at, verdict, action, reason) = last_action(&["--no-previous"]);
    assert_eq!(
        (at, verdict, action),
        (json!(195), json!("rollback"), json!("escalate"))
    );
    assert!(
        reason
            .as_str()
            .unwrap()
            .contains("no previous worker is known"),
        "{reason}"
    );
    let (_, _, action, _) = last_action(&["--recent-rollbacks", "3"]);
    assert_eq!(
        action,
        json!("escalate"),
        "max_rollbacks_per_hour = 3 is spent"
    );
    let (_, _, action, _) = last_action(&["--recent-rollbacks", "2"]);
    assert_eq!(action, json!("rollback"), "one rollback left this hour");
}

/// SPEC §6: negative-`at` lines are the previous version observed before the promotion;
/// they make the automatic baseline exactly as the daemon's own observations would, are
/// never evaluated as checks, and an explicit baseline line overrides them.
#[test]
fn simulate_derives_the_baseline_from_pre_promotion_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut before = String::new();
    for i in (1..=5).rev() {
        before.push_str(&format!(
            "{{\"at\": -{}, \"probe\": \"ok\", \"snapshot\": {{\"failureRate\": 0.003, \"requests\": 5000, \"latencyP95Ms\": 120}}}}\n",
            i * 60
        ));
    }
    let mut after = String::new();
    for i in 1..=5 {
        after.push_str(&format!(
            "{{\"at\": {}, \"probe\": \"ok\", \"snapshot\": {{\"failureRate\": 0.012, \"requests\": 5000}}}}\n",
            i * 30
        ));
    }
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let observed = write("observed.jsonl", format!("{before}{after}"));
    let (code, out, err) = run(&["simulate", "--trace", &observed, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Only the checks after the promotion are evaluated; the third rolls back.
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0]["at"], 30);
    assert_eq!(lines[2]["action"], "rollback");
    let fired = lines[2]["rules"].as_array().unwrap();
    assert!(fired.iter().any(|r| r["rule"] == "baseline"), "{out}");
    let (code, out, _) = run(&["simulate", "--trace", &observed], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("baseline: error rate 0.30% (75 errors in 25000 requests), p95 120 ms [observed, 5 samples, over 240s, swings ±0% (persistence 0.00)]"),
        "{out}"
    );

    // Without the pre-promotion lines: no baseline, and 1.2% is not a catastrophe.
    let bare = write("bare.jsonl", after.clone());
    let (code, out, _) = run(&["simulate", "--trace", &bare], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("baseline: none"), "{out}");
    assert!(out.contains("no action in 5 checks"), "{out}");

    // An explicit baseline line overrides the observations (5% baseline: 1.2% is fine).
    let explicit = write(
        "explicit.jsonl",
        format!("{{\"baseline\": {{\"failureRate\": 0.05}}}}\n{before}{after}"),
    );
    let (code, out, _) = run(&["simulate", "--trace", &explicit], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("[operator]"), "{out}");
    assert!(out.contains("no action in 5 checks"), "{out}");

    // A pre-promotion line after the first check is malformed, with its line number.
    let late = write("late.jsonl", format!("{after}{before}"));
    let (code, _, err) = run(&["simulate", "--trace", &late], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("late.jsonl:6:"), "{err}");
}

/// `simulate --stability-watch` models the watch after a rollback as the Supervisor runs
/// it: the later lines are the restored version's checks; it holds for
/// rollback.stability_period (confirmed) or breaches (an escalation, never a second
/// rollback). Without the flag the replay still stops at the rollback (SPEC §6).
#[test]
fn simulate_models_the_stability_watch_after_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let line = |at: u64, rate: f64| {
        format!(r#"{{"at":{at},"probe":"ok","snapshot":{{"failureRate":{rate},"requests":1000}}}}"#)
    };
    // Canary: healthy at 30 and 60, then 45% from 90: rolled back at 150.
    let canary: Vec<String> = (1..=5)
        .map(|i| line(i * 30, if i < 3 { 0.01 } else { 0.45 }))
        .collect();
    let write = |name: &str, after: &dyn Fn(u64) -> f64| {
        let mut text = canary.join("\n");
        for at in (180..=1200).step_by(60) {
            text.push('\n');
            text.push_str(&line(at, after(at)));
        }
        let path = dir.path().join(name);
        std::fs::write(&path, text + "\n").unwrap();
        path.display().to_string()
    };
    let stable = write("stable.jsonl", &|_| 0.01);
    let relapse = write("relapse.jsonl", &|at| if at < 400 { 0.01 } else { 0.5 });
    let config = dir.path().join("watch.toml");
    std::fs::write(&config, "[rollback]\nstability_period = \"10m\"\n").unwrap();
    let config = config.display().to_string();
    let lines = |trace: &str, watch: bool| -> Vec<Value> {
        let mut args = vec!["--config", &config, "simulate", "--trace", trace, "--json"];
        if watch {
            args.push("--stability-watch");
        }
        let (code, out, err) = run(&args, &[]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    let plain = lines(&stable, false);
    assert_eq!(plain.last().unwrap()["action"], "rollback");
    assert_eq!(
        plain.last().unwrap()["at"],
        150,
        "without the flag it stops at the rollback"
    );

    let held = lines(&stable, true);
    let watched: Vec<&Value> = held
        .iter()
        .filter(|l| l["stabilityWatch"] == true)
        .collect();
    assert!(
        held.iter().filter(|l| !l["action"].is_null()).count() == 1,
        "only the rollback acted"
    );
    // 10 minutes from the rollback at +150: the watch ends at the first check due after
    // +750 once a window is full; +780 is that check, and it is not evaluated.
    assert_eq!(watched.first().unwrap()["at"], 180);
    assert_eq!(watched.last().unwrap()["at"], 720);
    let (code, human, _) = run(
        &[
            "--config",
            &config,
            "simulate",
            "--trace",
            &stable,
            "--stability-watch",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(human.contains("stability confirmed at +780s"), "{human}");

    let failed = lines(&relapse, true);
    let last = failed.last().unwrap();
    assert_eq!(last["action"], "escalate", "never a second rollback");
    assert_eq!(last["at"], 540, "three breaches from +420");
    assert_eq!(last["stabilityWatch"], true);
    assert!(last["reason"]
        .as_str()
        .unwrap()
        .starts_with("restored version previous unstable: "));
    assert_eq!(
        failed.iter().filter(|l| l["action"] == "rollback").count(),
        1
    );
}

/// Issue 26, item 14: `check-config` shows a webhook URL without its secrets (userinfo,
/// path, query), so pasting its output into a ticket leaks nothing.
#[test]
fn check_config_redacts_the_webhook_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rollbackd.toml");
    std::fs::write(
        &config,
        "[alerts]\nwebhook_url = \"https://ops:hunter2@hooks.example.com/services/T0/B0/SECRETTOKEN?sig=abc\"\n",
    )
    .unwrap();
    let (code, out, err) = run(&["--config", config.to_str().unwrap(), "check-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alerts.webhook_url"), "{out}");
    for secret in ["hunter2", "ops:", "SECRETTOKEN", "sig=abc"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} shown:\n{out}\n{err}"
        );
    }
    assert!(out.contains("https://…@hooks.example.com/…?…"), "{out}");
}

/// Issue 26, item 17: `check-config --for run` makes exactly `run`'s checks. A switch
/// command that does not exist (or cannot be executed) and a state directory others can
/// write to are refused by both, naming the key — the Debian postinst relies on it.
#[test]
fn check_config_for_run_refuses_what_run_refuses() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    std::fs::write(&db, b"").unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("rollbackd.toml");
    let write = |switch: &str| {
        std::fs::write(
            &config,
            format!(
                "state_dir = {state:?}\n[worker]\nhealth_url = \"http://127.0.0.1:9/health\"\n\
                 [rollback]\nswitch_command = [{switch:?}, \"{{to}}\"]\n\
                 [kill_switch]\ndatabase = {db:?}\n[http]\nlisten = \"\"\n"
            ),
        )
        .unwrap();
    };
    let config_arg = config.to_str().unwrap().to_owned();
    let check = || {
        run(
            &["--config", &config_arg, "check-config", "--for", "run"],
            &[],
        )
    };
    let start = || run(&["--config", &config_arg, "run"], &[]);

    // A switch command that is not there.
    write("/nonexistent/switch-worker");
    let (code, out, err) = check();
    assert_eq!(code, 78, "{out}{err}");
    assert!(
        err.contains("rollback.switch_command") && err.contains("/nonexistent/switch-worker"),
        "{err}"
    );
    let (code, _, err) = start();
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("rollback.switch_command"), "{err}");

    // One that exists but cannot be executed.
    let script = dir.path().join("switch.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    write(script.to_str().unwrap());
    let (code, _, err) = check();
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("not executable"), "{err}");

    // Executable: the only problem left is a state directory anyone may write to.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (code, out, err) = check();
    assert_eq!(code, 78, "ready although run refuses: {out}{err}");
    assert!(err.contains("state_dir"), "{err}");
    let (code, _, _) = start();
    assert_eq!(code, 78);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    let (code, out, err) = check();
    assert_eq!(code, 0, "{out}{err}");
}

/// Issue 26, item 20: `report ""` named every session; it is a usage error now.
#[test]
fn an_empty_session_id_is_refused_by_report() {
    let setup = Setup::new("");
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = setup.cli(&["report", ""]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("empty session id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
