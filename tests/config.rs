//! Configuration layering, provenance and refusal (SPEC §3).

use std::collections::BTreeMap;
use std::time::Duration;

use rollbackd::config::{load, load_str, ConfigError, FileOrigin, Source};

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn source_of(loaded: &rollbackd::config::LoadedConfig, key: &str) -> Source {
    loaded
        .values
        .iter()
        .find(|(k, _, _)| k == key)
        .unwrap_or_else(|| panic!("{key} not in values"))
        .2
        .clone()
}

fn issues(result: Result<rollbackd::config::LoadedConfig, ConfigError>) -> Vec<(String, String)> {
    match result {
        Err(ConfigError::Invalid(issues)) => {
            issues.into_iter().map(|i| (i.key, i.message)).collect()
        }
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(_) => panic!("expected the configuration to be refused"),
    }
}

#[test]
fn layers_apply_in_order_and_record_provenance() {
    let text = r#"
        profile = "production"
        [monitor]
        check_interval = "20s"
        [rules]
        consecutive_failures = 2
    "#;
    let loaded = load_str(text, &env(&[("ROLLBACKD_MONITOR_CHECK_INTERVAL", "10s")])).unwrap();
    let c = &loaded.config;
    // env beats file
    assert_eq!(c.monitor.check_interval, Duration::from_secs(10));
    assert_eq!(
        source_of(&loaded, "monitor.check_interval"),
        Source::Env("ROLLBACKD_MONITOR_CHECK_INTERVAL".into())
    );
    // file beats profile, key by key
    assert_eq!(c.rules.consecutive_failures, 2);
    assert!(matches!(
        source_of(&loaded, "rules.consecutive_failures"),
        Source::File(_)
    ));
    // profile beats default
    assert_eq!(c.rules.error_rate_threshold, 0.15);
    assert_eq!(
        source_of(&loaded, "rules.error_rate_threshold"),
        Source::Profile("production".into())
    );
    assert_eq!(c.monitor.grace_period, Duration::from_secs(900));
    // derived from the effective check interval
    assert_eq!(c.monitor.degraded_check_interval, Duration::from_secs(5));
    assert_eq!(
        source_of(&loaded, "monitor.degraded_check_interval"),
        Source::Derived
    );
    assert_eq!(source_of(&loaded, "monitor.window"), Source::Default);
}

#[test]
fn profile_can_come_from_the_environment() {
    let loaded = load_str("", &env(&[("ROLLBACKD_PROFILE", "staging")])).unwrap();
    assert_eq!(loaded.config.rules.error_rate_threshold, 0.25);
    assert_eq!(loaded.config.monitor.grace_period, Duration::from_secs(300));
}

#[test]
fn legacy_environment_names_are_honoured() {
    let loaded = load_str(
        "",
        &env(&[
            ("WVO_ROLLBACK_ERROR_THRESHOLD", "0.3"),
            ("WVO_ROLLBACK_GRACE_PERIOD_MS", "120000"),
            ("WVO_ROLLBACK_CHECK_INTERVAL_MS", "5000"),
            ("WVO_ROLLBACK_FAILURE_THRESHOLD", "3"),
        ]),
    )
    .unwrap();
    let c = &loaded.config;
    assert_eq!(c.rules.error_rate_threshold, 0.3);
    assert_eq!(c.monitor.grace_period, Duration::from_secs(120));
    assert_eq!(c.monitor.check_interval, Duration::from_secs(5));
    assert_eq!(c.rules.consecutive_failures, 3);
    assert_eq!(
        source_of(&loaded, "rules.error_rate_threshold"),
        Source::Env("WVO_ROLLBACK_ERROR_THRESHOLD".into())
    );
}

#[test]
fn new_environment_names_beat_legacy_ones_with_a_warning() {
    let loaded = load_str(
        "",
        &env(&[
            ("WVO_ROLLBACK_ERROR_THRESHOLD", "0.3"),
            ("ROLLBACKD_RULES_ERROR_RATE_THRESHOLD", "0.4"),
        ]),
    )
    .unwrap();
    assert_eq!(loaded.config.rules.error_rate_threshold, 0.4);
    assert!(loaded
        .warnings
        .iter()
        .any(|w| w.contains("overrides WVO_ROLLBACK_ERROR_THRESHOLD")));
}

#[test]
fn environment_lists_and_flag_defaults() {
    let loaded = load_str(
        "",
        &env(&[
            (
                "ROLLBACKD_ROLLBACK_SWITCH_COMMAND",
                r#"["/bin/switch", "{to}"]"#,
            ),
            ("ROLLBACKD_FLAGS_DEFAULTS_NEW_CHECKOUT", "0"),
            ("ROLLBACKD_HTTP_LISTEN", ""),
        ]),
    )
    .unwrap();
    assert_eq!(
        loaded.config.rollback.switch_command,
        Some(vec!["/bin/switch".to_owned(), "{to}".to_owned()])
    );
    assert_eq!(
        loaded
            .config
            .flag_defaults
            .get("NEW_CHECKOUT")
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(loaded.config.http_listen, None);
}

/// Each malformed configuration is refused, naming the key path.
#[test]
fn bad_configurations_are_refused_naming_the_key() {
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: &[Case] = &[
        (
            "[rules]\nerror_rate_threshold = 1.5",
            &[],
            "rules.error_rate_threshold",
        ),
        (
            "[rules]\nerror_rate_threshold = 0",
            &[],
            "rules.error_rate_threshold",
        ),
        (
            "[rules]\nerror_rate_threshold = \"high\"",
            &[],
            "rules.error_rate_threshold",
        ),
        (
            "[rules]\nerror_rate_treshold = 0.1",
            &[],
            "rules.error_rate_treshold",
        ),
        (
            "[monitor]\ncheck_interval = \"soon\"",
            &[],
            "monitor.check_interval",
        ),
        (
            "[monitor]\ncheck_interval = 30",
            &[],
            "monitor.check_interval",
        ),
        ("[monitor]\nwindow = 0", &[], "monitor.window"),
        ("[monitor]\nwindow = -3", &[], "monitor.window"),
        (
            "[monitor]\ndegraded_check_interval = \"1m\"",
            &[],
            "monitor.degraded_check_interval",
        ),
        (
            "[monitor]\ncheck_timeout = \"1m\"",
            &[],
            "monitor.check_timeout",
        ),
        (
            "[rules]\nrollback_min_breaches = 6",
            &[],
            "rules.rollback_min_breaches",
        ),
        (
            "[rules]\nconsecutive_failures = 0",
            &[],
            "rules.consecutive_failures",
        ),
        (
            "[rules]\ndegraded_error_rate = 0.3",
            &[],
            "rules.degraded_error_rate",
        ),
        (
            "[rules]\nno_data_policy = \"panic\"",
            &[],
            "rules.no_data_policy",
        ),
        (
            "[rules]\nmemory_percent = 150.0",
            &[],
            "rules.memory_percent",
        ),
        (
            "[rules]\nlatency_p95_multiplier = 0.5",
            &[],
            "rules.latency_p95_multiplier",
        ),
        ("[rules]\ndry_run = \"yes\"", &[], "rules.dry_run"),
        (
            "[rules]\ndry_run_rules = [\"everything\"]",
            &[],
            "rules.dry_run_rules",
        ),
        ("profile = \"prod\"", &[], "profile"),
        (
            "[worker]\nhealth_url = \"http://a\"\nhealth_tcp = \"a:1\"",
            &[],
            "worker",
        ),
        (
            "[worker]\nhealth_url = \"ftp://host\"",
            &[],
            "worker.health_url",
        ),
        (
            "[worker]\nhealth_tcp = \"nohost\"",
            &[],
            "worker.health_tcp",
        ),
        (
            "[worker]\nhealth_command = []",
            &[],
            "worker.health_command",
        ),
        (
            "[rollback]\nswitch_command = \"/bin/switch {to}\"",
            &[],
            "rollback.switch_command",
        ),
        ("[rollback]\nmax_attempts = 0", &[], "rollback.max_attempts"),
        (
            "[rollback]\nverify_interval = \"5m\"",
            &[],
            "rollback.verify_interval",
        ),
        (
            "[operations]\nsnapshot_url = \"http://a\"\nsnapshot_command = [\"x\"]",
            &[],
            "operations",
        ),
        (
            "[operations.prometheus]\nurl = \"http://127.0.0.1:9090\"",
            &[],
            "operations.prometheus.error_rate",
        ),
        ("[http]\nlisten = \"everywhere\"", &[], "http.listen"),
        ("[alerts]\nformat = \"teams\"", &[], "alerts.format"),
        ("[alerts]\ntimeout = \"0s\"", &[], "alerts.timeout"),
        ("[kill_switch]\nkey = \"\"", &[], "kill_switch.key"),
        (
            "[flags.defaults]\nNEW_CHECKOUT = 0",
            &[],
            "flags.defaults.NEW_CHECKOUT",
        ),
        ("[surprise]\nx = 1", &[], "surprise.x"),
        (
            "",
            &[("ROLLBACKD_RULES_WINDOW", "5")],
            "ROLLBACKD_RULES_WINDOW",
        ),
        (
            "",
            &[("ROLLBACKD_MONITOR_WINDOW", "five")],
            "monitor.window",
        ),
        (
            "",
            &[("WVO_ROLLBACK_GRACE_PERIOD_MS", "10m")],
            "monitor.grace_period",
        ),
        (
            "",
            &[("WVO_ROLLBACK_ERROR_THRESHOLD", "2")],
            "rules.error_rate_threshold",
        ),
    ];
    for (text, vars, key) in cases {
        let found = issues(load_str(text, &env(vars)));
        assert!(
            found.iter().any(|(k, _)| k.starts_with(key)),
            "{text:?} {vars:?}: expected an issue at {key}, got {found:?}"
        );
    }
}

#[test]
fn retention_defaults_and_limits() {
    let loaded = load_str("", &env(&[])).unwrap();
    assert_eq!(
        loaded.config.retention.sessions,
        Duration::from_secs(90 * 24 * 3600)
    );
    assert_eq!(loaded.config.retention.max_sessions, 5000);
    let loaded = load_str(
        "[retention]\nsessions = \"7d\"\nmax_sessions = 100",
        &env(&[("ROLLBACKD_RETENTION_MAX_SESSIONS", "50")]),
    )
    .unwrap();
    assert_eq!(
        loaded.config.retention.sessions,
        Duration::from_secs(7 * 24 * 3600)
    );
    assert_eq!(loaded.config.retention.max_sessions, 50);
    // Shorter than loop protection's hour, or than the kill-switch reset's quiet period:
    // pruning would take rows they read.
    for text in [
        "[retention]\nsessions = \"10m\"",
        "[retention]\nsessions = \"2h\"\n[kill_switch]\nreset_quiet_period = \"3h\"",
        "[retention]\nmax_sessions = 0",
    ] {
        let found = issues(load_str(text, &env(&[])));
        assert!(
            found.iter().any(|(k, _)| k.starts_with("retention.")),
            "{text:?}: {found:?}"
        );
    }
}

#[test]
fn several_problems_are_reported_together() {
    let found = issues(load_str(
        "[rules]\nerror_rate_threshold = 2.0\nmemory_percent = -1.0\nbogus = 1",
        &env(&[]),
    ));
    assert_eq!(found.len(), 3, "{found:?}");
}

#[test]
fn invalid_toml_is_a_parse_error() {
    assert!(matches!(
        load_str("[rules\n", &env(&[])),
        Err(ConfigError::Parse { .. })
    ));
}

#[test]
fn file_paths_follow_the_lookup_rules() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(&file, "[monitor]\nwindow = 7\n").unwrap();
    // --config wins
    let loaded = load(Some(&file), &env(&[("ROLLBACKD_CONFIG", "/nonexistent")])).unwrap();
    assert_eq!(loaded.config.rules.window, 7);
    assert_eq!(loaded.origin, FileOrigin::Named(file.clone()));
    // then $ROLLBACKD_CONFIG
    let loaded = load(None, &env(&[("ROLLBACKD_CONFIG", file.to_str().unwrap())])).unwrap();
    assert_eq!(loaded.config.rules.window, 7);
    // a named file that is missing is an error
    let missing = dir.path().join("missing.toml");
    assert!(matches!(
        load(Some(&missing), &env(&[])),
        Err(ConfigError::Read { .. })
    ));
    assert!(matches!(
        load(
            None,
            &env(&[("ROLLBACKD_CONFIG", missing.to_str().unwrap())])
        ),
        Err(ConfigError::Read { .. })
    ));
}

#[test]
fn the_example_configuration_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/rollbackd.example.toml"
    ))
    .unwrap();
    let loaded = load_str(&text, &env(&[])).unwrap();
    assert!(loaded.config.rollback.switch_command.is_some());
}

#[test]
fn the_hash_changes_with_any_value() {
    let a = load_str("", &env(&[])).unwrap().hash;
    let b = load_str("[rules]\nmin_requests = 1", &env(&[]))
        .unwrap()
        .hash;
    assert_ne!(a, b);
    assert_eq!(a, load_str("", &env(&[])).unwrap().hash);
}

#[test]
fn worst_case_times_follow_the_cadence_and_a_slow_check() {
    let at_defaults = rollbackd::config::worst_case_times(&load_str("", &env(&[])).unwrap().config);
    // 30 s to the first breaching check, two more at the 15 s degraded cadence, 5 s for the last to finish.
    assert!(at_defaults[0].contains("at most 1m 5s"), "{at_defaults:?}");
    // A check timeout longer than the degraded interval stretches each later step.
    let slow = load_str("[monitor]\ncheck_timeout = \"20s\"", &env(&[])).unwrap();
    let lines = rollbackd::config::worst_case_times(&slow.config);
    assert!(lines[0].contains("at most 1m 30s"), "{lines:?}");
}

/// Every duration key, and the largest value it accepts (README / example config).
const DURATION_KEYS: &[(&str, &str)] = &[
    ("monitor.check_interval", "7days"),
    ("monitor.degraded_check_interval", "7days"),
    ("monitor.check_timeout", "7days"),
    ("monitor.grace_period", "7days"),
    ("monitor.warmup", "7days"),
    ("rules.memory_leak_warmup", "7days"),
    ("operations.prometheus.scrape_interval", "7days"),
    ("rollback.hook_timeout", "7days"),
    ("rollback.verify_timeout", "7days"),
    ("rollback.verify_interval", "7days"),
    ("rollback.retry_backoff", "7days"),
    ("rollback.stability_period", "7days"),
    ("rollback.settle", "7days"),
    ("kill_switch.reset_quiet_period", "7days"),
    ("alerts.timeout", "7days"),
    ("baseline.window", "7days"),
    ("baseline.observe_interval", "7days"),
    ("retention.sessions", "365days"),
    ("fleet.lease_ttl", "7days"),
];

fn env_name(key: &str) -> String {
    format!("ROLLBACKD_{}", key.replace('.', "_").to_uppercase())
}

#[test]
fn every_duration_key_is_bounded_and_refused_past_the_clocks_range() {
    // Every duration key in the key table is covered here.
    let declared: Vec<&str> = rollbackd::config::key_paths()
        .filter(|key| {
            load_str("", &env(&[(&env_name(key), "not a duration")]))
                .err()
                .is_some_and(|e| e.to_string().contains("is not a duration"))
        })
        .collect();
    let covered: Vec<&str> = DURATION_KEYS.iter().map(|(key, _)| *key).collect();
    assert_eq!(declared, covered, "a duration key without a bound test");

    for (key, max) in DURATION_KEYS {
        for huge in ["18446744073709551615s", "600000000years"] {
            for (how, result) in [
                ("environment", load_str("", &env(&[(&env_name(key), huge)]))),
                ("file", {
                    let (section, leaf) = key.split_once('.').unwrap();
                    load_str(&format!("[{section}]\n{leaf} = \"{huge}\"\n"), &env(&[]))
                }),
            ] {
                let found = issues(result);
                assert!(
                    found.iter().any(|(k, message)| k.starts_with(key)
                        && message.contains("longer than the largest value")),
                    "{key} = {huge} from the {how}: {found:?}"
                );
            }
        }
        // One past the bound is refused; the bound itself is not refused for its size.
        let bound = humantime::parse_duration(max).unwrap();
        assert_eq!(rollbackd::config::duration_max(key), bound, "{key}");
        let past = humantime::format_duration(bound + Duration::from_secs(1)).to_string();
        let found = issues(load_str("", &env(&[(&env_name(key), &past)])));
        assert!(
            found.iter().any(|(k, _)| k.starts_with(key)),
            "{key} = {past}: {found:?}"
        );
        if let Err(ConfigError::Invalid(found)) = load_str("", &env(&[(&env_name(key), max)])) {
            assert!(
                !found
                    .iter()
                    .any(|i| i.message.contains("longer than the largest value")),
                "{key} = {max} is the bound itself: {found:?}"
            );
        }
    }
}

#[test]
fn the_largest_durations_give_finite_worst_case_times_without_panicking() {
    let text = r#"
        [monitor]
        check_interval = "7days"
        degraded_check_interval = "7days"
        check_timeout = "7days"
        grace_period = "7days"
        [rollback]
        switch_command = ["/bin/true", "{to}"]
        pause_command = ["/bin/true"]
        drain_command = ["/bin/true"]
        resume_command = ["/bin/true"]
        hook_timeout = "7days"
        verify_timeout = "7days"
        verify_interval = "7days"
        max_attempts = 10
        [retention]
        sessions = "365days"
    "#;
    let loaded = load_str(text, &env(&[])).unwrap();
    let lines = rollbackd::config::worst_case_times(&loaded.config);
    assert!(
        lines.iter().any(|l| l.contains("a rollback takes")),
        "{lines:?}"
    );
    // 10 attempts × (4 hooks × (7 days + 2.5 s kill grace) + 7 days verify), and the
    // waits between them (1 + 2 + 4 + 8 + 16 + 4 × 30 s).
    assert_eq!(
        rollbackd::config::rollback_worst_case(&loaded.config.rollback),
        Duration::from_secs(10 * 5 * 7 * 86_400 + 151) + Duration::from_millis(10 * 4 * 2_500)
    );
}

#[test]
fn a_reload_names_every_key_it_cannot_apply() {
    let old = load_str("", &env(&[])).unwrap().config;
    let same = load_str("[monitor]\ncheck_interval = \"20s\"\n", &env(&[])).unwrap();
    assert!(rollbackd::daemon::fixed_keys_changed(&old, &same.config).is_empty());
    let new = load_str(
        "state_dir = \"elsewhere\"\n[http]\nlisten = \"127.0.0.1:9999\"\n[kill_switch]\ndatabase = \"other.db\"\n",
        &env(&[]),
    )
    .unwrap()
    .config;
    assert_eq!(
        rollbackd::daemon::fixed_keys_changed(&old, &new),
        ["state_dir", "http.listen", "kill_switch.database"]
    );
    let fleet = load_str("[fleet]\nendpoints = [\"http://e:2379\"]\n", &env(&[]))
        .unwrap()
        .config;
    assert_eq!(
        rollbackd::daemon::fixed_keys_changed(&old, &fleet),
        ["fleet"]
    );
}

#[test]
fn every_integer_key_refuses_a_value_that_would_wrap() {
    // 4294967297 = 2^32 + 1 would wrap to 1 in a u32 (max_attempts = 1 passes its 1..=10
    // check); every whole-number key refuses it by name, from the file and the environment.
    let int_keys: Vec<&str> = rollbackd::config::key_paths()
        .filter(|key| {
            load_str("", &env(&[(&env_name(key), "not a number")]))
                .err()
                .is_some_and(|e| e.to_string().contains("whole number"))
        })
        .collect();
    assert!(
        int_keys.contains(&"rollback.max_attempts") && int_keys.len() >= 8,
        "the integer keys were not found: {int_keys:?}"
    );
    for key in &int_keys {
        let (section, leaf) = key.split_once('.').unwrap();
        for (how, result) in [
            (
                "environment",
                load_str("", &env(&[(&env_name(key), "4294967297")])),
            ),
            (
                "file",
                load_str(&format!("[{section}]\n{leaf} = 4294967297\n"), &env(&[])),
            ),
        ] {
            let found = issues(result);
            assert!(
                found
                    .iter()
                    .any(|(k, message)| k.starts_with(key) && message.contains("4294967297")),
                "{key} = 4294967297 from the {how} was not refused by name: {found:?}"
            );
        }
    }
}

#[test]
fn the_rollback_worst_case_includes_each_hooks_kill_grace() {
    let loaded = rollbackd::config::load_str(
        "[rollback]\nswitch_command = [\"/bin/true\"]\nhook_timeout = \"10s\"\nverify_timeout = \"5s\"\nmax_attempts = 2\n",
        &std::collections::BTreeMap::new(),
    )
    .unwrap();
    let rb = &loaded.config.rollback;
    // One hook: 10 s timeout + 2 s SIGTERM→SIGKILL grace + 0.5 s pipe grace, then 5 s verify.
    assert_eq!(
        rollbackd::config::rollback_attempt_worst_case(rb),
        Duration::from_millis(17_500)
    );
    let lines = rollbackd::config::worst_case_times(&loaded.config).join("\n");
    assert!(lines.contains("kill grace"), "{lines}");
}

/// Issue 25 item 10: the waits between a rollback's attempts double from
/// `rollback.retry_backoff` (default 1s) up to 30 s, and count in the worst case.
#[test]
fn rollback_retries_back_off_doubling_and_capped() {
    use rollbackd::config::{retry_wait, retry_waits_total, rollback_worst_case};
    let defaults = load_str("", &env(&[])).unwrap().config.rollback;
    assert_eq!(defaults.retry_backoff, Duration::from_secs(1));
    let waits: Vec<Duration> = (1..=8).map(|n| retry_wait(&defaults, n)).collect();
    let secs = |s: &[u64]| {
        s.iter()
            .map(|s| Duration::from_secs(*s))
            .collect::<Vec<_>>()
    };
    assert_eq!(waits, secs(&[0, 1, 2, 4, 8, 16, 30, 30]));
    // 3 attempts: 1 s + 2 s of waiting, on top of three attempts' worst case.
    assert_eq!(retry_waits_total(&defaults), Duration::from_secs(3));
    assert_eq!(
        rollback_worst_case(&defaults),
        rollbackd::config::rollback_attempt_worst_case(&defaults) * 3 + Duration::from_secs(3)
    );
    let lines = rollbackd::config::worst_case_times(&load_str("", &env(&[])).unwrap().config);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("3 attempts at most, waiting 1s, 2s between them")),
        "{lines:?}"
    );

    let off = load_str("[rollback]\nretry_backoff = \"0s\"", &env(&[])).unwrap();
    assert_eq!(retry_waits_total(&off.config.rollback), Duration::ZERO);
    let long = load_str("[rollback]\nretry_backoff = \"45s\"", &env(&[])).unwrap();
    assert_eq!(
        retry_wait(&long.config.rollback, 3),
        Duration::from_secs(45)
    );
    let found = issues(load_str("[rollback]\nretry_backoff = \"10m\"", &env(&[])));
    assert!(
        found
            .iter()
            .any(|(k, m)| k == "rollback.retry_backoff" && m.contains("at most 5m")),
        "{found:?}"
    );
}

#[test]
fn the_example_config_names_every_rule_dry_run_rules_accepts() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/rollbackd.example.toml"
    ))
    .unwrap();
    let listed: Vec<&str> = example
        .lines()
        .skip_while(|l| !l.contains("Shadow mode per rule"))
        .nth(1)
        .unwrap()
        .trim_start_matches('#')
        .split(',')
        .map(str::trim)
        .collect();
    let accepted: Vec<&str> = rollbackd::core::engine::Rule::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    assert_eq!(listed, accepted);
}

#[test]
fn no_fleet_without_endpoints_and_the_fleet_keys_from_file_and_environment() {
    let none = load_str("", &env(&[])).unwrap();
    assert!(none.config.fleet.is_none());
    // The host defaults to the hostname (derived, and left out of the hash, which a
    // fleet sharing one file keeps identical).
    assert_eq!(source_of(&none, "fleet.host"), Source::Derived);
    let fleet = load_str(
        "[fleet]\nendpoints = [\"http://10.0.0.1:2379/\", \"https://etcd-2:2379\"]\n",
        &env(&[]),
    )
    .unwrap();
    let config = fleet.config.fleet.clone().unwrap();
    assert_eq!(
        config.endpoints,
        vec!["http://10.0.0.1:2379", "https://etcd-2:2379"]
    );
    assert_eq!(config.prefix, "/rollbackd/");
    assert!(!config.follow_verdicts);
    assert_eq!(config.host, rollbackd::config::hostname());
    assert_eq!(config.lease_ttl, Duration::from_secs(10));
    assert_eq!(
        config.tls,
        rollbackd::config::FleetTls::default(),
        "no TLS files by default"
    );
    let tls = load_str(
        "[fleet]\nendpoints = [\"https://e:2379\"]\nca_file = \"/etc/ca.pem\"\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/c.key\"\n",
        &env(&[]),
    )
    .unwrap();
    let tls = tls.config.fleet.unwrap().tls;
    assert_eq!(
        tls.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/ca.pem"))
    );
    assert_eq!(
        tls.cert_file.as_deref(),
        Some(std::path::Path::new("/etc/c.pem"))
    );
    assert_eq!(
        tls.key_file.as_deref(),
        Some(std::path::Path::new("/etc/c.key"))
    );
    let from_env = load_str(
        "",
        &env(&[
            ("ROLLBACKD_FLEET_ENDPOINTS", r#"["http://127.0.0.1:2379"]"#),
            ("ROLLBACKD_FLEET_HOST", "web-7"),
            ("ROLLBACKD_FLEET_PREFIX", "/prod/"),
            ("ROLLBACKD_FLEET_FOLLOW_VERDICTS", "true"),
        ]),
    )
    .unwrap();
    let config = from_env.config.fleet.clone().unwrap();
    assert_eq!(config.host, "web-7");
    assert_eq!(config.prefix, "/prod/");
    assert!(config.follow_verdicts);
    assert_eq!(
        source_of(&from_env, "fleet.host"),
        Source::Env("ROLLBACKD_FLEET_HOST".into())
    );
    // The same file on two hosts: the same hash.
    let a = load_str("[fleet]\nendpoints = [\"http://e:2379\"]\n", &env(&[])).unwrap();
    let b = load_str("[fleet]\nendpoints = [\"http://e:2379\"]\n", &env(&[])).unwrap();
    assert_eq!(a.hash, b.hash);
}

#[test]
fn bad_fleet_keys_are_refused_naming_the_key() {
    let cases = [
        ("endpoints = [\"10.0.0.1:2379\"]", "fleet.endpoints"),
        (
            "endpoints = [\"http://e:2379\"]\nhost = \"a/b\"",
            "fleet.host",
        ),
        ("endpoints = [\"http://e:2379\"]\nhost = \"\"", "fleet.host"),
        (
            "endpoints = [\"http://e:2379\"]\nprefix = \"rollbackd\"",
            "fleet.prefix",
        ),
        (
            "endpoints = [\"http://e:2379\"]\nprefix = \"/rollbackd\"",
            "fleet.prefix",
        ),
        (
            "endpoints = [\"http://e:2379\"]\nlease_ttl = \"1s\"",
            "fleet.lease_ttl",
        ),
        (
            "endpoints = [\"http://e:2379\"]\nlease_ttl = \"1h\"",
            "fleet.lease_ttl",
        ),
        ("endpoints = \"http://e:2379\"", "fleet.endpoints"),
        ("follow_verdict = true", "fleet.follow_verdict"),
        // A client certificate needs its key, and the other way round.
        (
            "endpoints = [\"https://e:2379\"]\ncert_file = \"/c.pem\"",
            "fleet.key_file",
        ),
        (
            "endpoints = [\"https://e:2379\"]\nkey_file = \"/c.key\"",
            "fleet.cert_file",
        ),
        // An etcd user needs its password file, and the other way round; and https://.
        (
            "endpoints = [\"https://e:2379\"]\nusername = \"web-1\"",
            "fleet.password_file",
        ),
        (
            "endpoints = [\"https://e:2379\"]\npassword_file = \"/pw\"",
            "fleet.username",
        ),
        (
            "endpoints = [\"http://e:2379\"]\nusername = \"web-1\"\npassword_file = \"/pw\"",
            "fleet.endpoints",
        ),
        // Certificates with an http:// endpoint would never be used.
        (
            "endpoints = [\"https://e:2379\", \"http://f:2379\"]\nca_file = \"/ca.pem\"",
            "fleet.endpoints",
        ),
    ];
    for (body, key) in cases {
        let found = issues(load_str(&format!("[fleet]\n{body}\n"), &env(&[])));
        assert!(
            found.iter().any(|(k, _)| k.starts_with(key)),
            "{body}: {found:?}"
        );
    }
}
