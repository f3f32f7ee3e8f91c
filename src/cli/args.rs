//! The command line's grammar (clap): every command, flag and value parser. What each
//! command does is in [`super::commands`] and [`super`].

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// `--baseline-error-rate`: a finite fraction in [0, 1] (a JSON request cannot carry NaN,
/// so it is refused here, where it is typed).
fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{text} is not a fraction between 0 and 1 (an error rate of 2% is 0.02)"
        ))
    }
}

/// `--baseline-p95-ms`: a finite number of milliseconds above 0.
fn parse_positive_ms(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(format!("{text} is not a positive number of milliseconds"))
    }
}

/// Guards a host after a canary promotion: health-checks the new worker, decides through a
/// windowed engine, rolls back or flips the DISABLE_NEW kill switch, and audits it all.
#[derive(Debug, Parser)]
#[command(
    name = "rollbackd",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Configuration file [default: $ROLLBACKD_CONFIG, else /etc/rollbackd/rollbackd.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log level or filter (overrides RUST_LOG), e.g. "debug" or "rollbackd=trace"
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd Type=notify)
    Run,

    /// The whole daemon against built-in loopback workers: promotion, degradation,
    /// rollback and verification in under a minute, no set-up
    Demo,

    /// The demo's switch hook (internal)
    #[command(hide = true)]
    DemoHook {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, value_parser = crate::text::parse_worker_id)]
        to: String,
    },

    /// Validate the configuration; print the effective values, where each came from, and
    /// the worst-case time to each action
    CheckConfig {
        /// Also require what this command needs to start (exit 78 if `run` would refuse
        /// the configuration, e.g. without rollback.switch_command)
        #[arg(long = "for", value_enum, value_name = "COMMAND")]
        for_command: Option<CheckFor>,
    },

    /// Record a promotion and start a monitoring session (through the daemon when it runs;
    /// otherwise recorded for the daemon to pick up when it starts)
    Promote {
        /// The worker that was just promoted (the canary). A worker id is 1-64
        /// characters of A-Z a-z 0-9 . _ + -, starting with a letter or digit
        #[arg(long, value_name = "ID", value_parser = crate::text::parse_worker_id)]
        active: String,
        /// The worker to roll back to (same rule as --active)
        #[arg(long, value_name = "ID", value_parser = crate::text::parse_worker_id)]
        previous: String,
        /// Error rate before the promotion, a fraction from 0 to 1 (0.02 is 2%), for the
        /// baseline rule
        #[arg(long, value_name = "FRACTION", value_parser = parse_fraction)]
        baseline_error_rate: Option<f64>,
        /// p95 latency before the promotion, in milliseconds (> 0), for the baseline rule
        #[arg(long = "baseline-p95-ms", value_name = "MS", value_parser = parse_positive_ms)]
        baseline_latency_p95_ms: Option<f64>,
        /// Promote even though another host of the fleet rolled this version back (needs
        /// --reason)
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why the fleet's rollback verdict is overridden (one line, at most 1024 characters)
        #[arg(long, value_parser = crate::text::parse_reason)]
        reason: Option<String>,
    },

    /// State, active/previous workers, recent checks, verdict, kill switch
    Status {
        /// The status as JSON
        #[arg(long)]
        json: bool,
    },

    /// Roll back to the previous worker now; prints each phase as it completes
    Rollback {
        /// Why (recorded in the audit trail and passed to hooks as {reason}); one line,
        /// at most 1024 characters
        #[arg(long, value_parser = crate::text::parse_reason)]
        reason: String,
        /// Skip the drain phase
        #[arg(long)]
        emergency: bool,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
        /// Roll back even when the version to go back to is one rollbackd itself rolled
        /// back (and no promotion of it was confirmed since): that would re-deploy a bad
        /// release, so it is refused (exit 3) without this
        #[arg(long)]
        force: bool,
    },

    /// The DISABLE_NEW kill switch in the application's database
    KillSwitch {
        #[command(subcommand)]
        action: KillSwitchAction,
    },

    /// The fleet in etcd ([fleet] endpoints): hosts, the version each runs, their
    /// session state and kill switch, the fleet kill switch, the release verdicts
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },

    /// Stop automatic actions (checks continue)
    Pause {
        /// Why (one line, at most 1024 characters)
        #[arg(long, value_parser = crate::text::parse_reason)]
        reason: Option<String>,
    },

    /// Restart automatic actions after `pause`
    Resume,

    /// LiveFlags from the command line
    Flags {
        #[command(subcommand)]
        action: FlagsAction,
    },

    /// The audit log (state_dir/analytics/audit.log)
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },

    /// The incident report of a session (after a rollback or an escalation), from
    /// rollbackd.db, daemon running or not
    Report {
        /// A session id (or a unique start of one), or `latest`: the newest action's
        #[arg(value_name = "SESSION", default_value = "latest")]
        session: String,
        /// The report's facts as JSON
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// Markdown (the default), as in analytics/incident_<UTC>.md
        #[arg(long)]
        markdown: bool,
    },

    /// Replay a JSON-lines trace of checks through the engine and print the verdict
    /// timeline and the first action
    Simulate {
        /// Trace file: one check per line, `at` in seconds since promotion ("-" for stdin)
        #[arg(long, value_name = "FILE")]
        trace: PathBuf,
        /// One JSON object per evaluated check instead of the human timeline
        #[arg(long)]
        json: bool,
        /// Replay as if no previous worker were known: a rollback verdict escalates, as
        /// the daemon's would
        #[arg(long)]
        no_previous: bool,
        /// Automatic rollbacks of this version already made in the hour before the promotion: at
        /// rollback.max_rollbacks_per_hour a rollback verdict escalates, as the daemon's would
        #[arg(long, value_name = "N", default_value_t = 0)]
        recent_rollbacks: u32,
        /// Replay past a rollback: it is taken as verified at its check, and the trace's
        /// later lines are the restored version's checks during rollback.stability_period
        /// (ends with the watch: confirmed, or failed and escalated)
        #[arg(long)]
        stability_watch: bool,
    },

    /// Shell completions for bash, zsh or fish, generated from these definitions
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },

    /// The manual page (roff), generated from these definitions; with --dir, every page
    Man {
        /// Write rollbackd.1 and a page for every subcommand (rollbackd-promote.1,
        /// rollbackd-kill-switch-set.1, ...) into this directory instead of printing the
        /// top-level page
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// What `check-config --for` checks the configuration for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFor {
    /// `rollbackd run`: the checks `run` itself makes before it starts
    Run,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// The last lines of the audit log, one readable line per event
    Tail {
        /// Keep printing lines as they are appended (through truncation and rotation)
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many of the last lines to print first
        #[arg(long, short = 'n', value_name = "N", default_value_t = 20)]
        lines: usize,
        /// The raw JSON lines, unchanged (for jq)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetAction {
    /// Hosts (registered under etcd leases: a dead host disappears), the version each
    /// runs, session state, kill switch; the fleet kill switch; the verdicts
    Status {
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KillSwitchAction {
    /// Turn the kill switch on: every app falls back to its safe flag defaults
    Set {
        /// Why (one line, at most 1024 characters) [default: manual; required with --fleet]
        #[arg(long, value_parser = crate::text::parse_reason)]
        reason: Option<String>,
        /// Set it on every host of the fleet: writes the fleet key in etcd, which every
        /// daemon mirrors into its host's database (needs --reason)
        #[arg(long, requires = "reason")]
        fleet: bool,
    },
    /// Turn it off; refused while a check failed within reset_quiet_period
    Reset {
        /// Why (one line, at most 1024 characters)
        #[arg(long, value_parser = crate::text::parse_reason)]
        reason: Option<String>,
        /// Reset even inside the quiet period, or while the fleet kill switch is on; with
        /// --fleet, on every host whatever its quiet period (needs --reason)
        #[arg(long, requires = "reason")]
        force: bool,
        /// Reset the fleet kill switch (needs --reason). A host whose own kill switch was
        /// set there (an escalation, kill-switch set) keeps it on; a host where a check
        /// failed within its reset_quiet_period keeps it on until that ends, unless --force
        #[arg(long, requires = "reason")]
        fleet: bool,
    },
    /// Show the kill switch's value
    Status,
}

#[derive(Debug, Subcommand)]
pub enum FlagsAction {
    /// The effective value of a flag, alone on stdout (exit 1: no value, or the
    /// database cannot be read)
    Get {
        key: String,
        /// The application database [default: kill_switch.database]
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// One JSON object: {"key","value","source":"row|default|kill-switch|none","row","killSwitch"}
        #[arg(long)]
        json: bool,
        /// Also say why on stderr (safe default, kill switch on, no row)
        #[arg(long)]
        explain: bool,
    },
    /// Print the flags, then one line per change
    Watch {
        /// The application database [default: kill_switch.database]
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// JSON lines
        #[arg(long)]
        json: bool,
    },
}
