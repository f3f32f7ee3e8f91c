//! The command line: clap definitions (parsing validates what was typed), then a resolve
//! step that reads the configuration and the environment, then the command itself.
//! Every error is printed with its whole chain and mapped to an exit status.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{self, ConfigError, FileOrigin, LoadedConfig};

/// Exit statuses (SPEC §6, contract).
pub mod args;
pub mod commands;
pub mod demo;
pub mod flags;
pub mod fleet;
pub mod simulate;
pub mod tail;

pub use crate::exit::{self, Refused};
pub use args::*;

/// Runs the command line and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            if matches!(
                err.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                let _ = err.print();
                return ExitCode::from(exit::SUCCESS);
            }
            eprint!("{}", usage_error_text(&err));
            return ExitCode::from(exit::USAGE);
        }
    };
    if let Err(message) = init_logging(&cli) {
        eprintln!("rollbackd: {message}");
        return ExitCode::from(exit::USAGE);
    }
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::from(exit::SUCCESS);
            }
            let code = exit_code_for(&err);
            eprintln!("rollbackd: {}", error_chain(&err));
            ExitCode::from(code)
        }
    }
}

/// A usage error as printed. clap quotes the offending argument as typed; a refused
/// value is shown through its parser's message instead (which quotes it escaped and cut
/// short: a 130,000-character id is not echoed back), and any other quoted argument is
/// escaped ([`crate::text::escape`]), so what was typed cannot act on the terminal.
fn usage_error_text(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    if err.kind() == ErrorKind::ValueValidation {
        if let (Some(ContextValue::String(arg)), Some(problem)) =
            (err.get(ContextKind::InvalidArg), err.source())
        {
            return format!("error: {arg}: {problem}\n\nFor more information, try '--help'.\n");
        }
    }
    let mut text = String::new();
    for line in err.render().to_string().lines() {
        text.push_str(&crate::text::escape(line));
        text.push('\n');
    }
    text
}

fn init_logging(cli: &Cli) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    // The daemon logs its work at info; the other commands print their own output and
    // log only what goes wrong, unless asked.
    let default = if matches!(cli.command, Command::Run) {
        "info"
    } else {
        "warn"
    };
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|err| format!("invalid --log-level {level:?}: {err}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .fmt_fields(crate::text::JournalFields)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    Ok(())
}

/// The whole chain of an error, outermost first, joined by ": ".
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        // thiserror variants that embed their source already show it.
        if parts.last().is_some_and(|last| last.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

fn exit_code_for(err: &anyhow::Error) -> u8 {
    if let Some(untrusted) = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<crate::storage::statedir::Untrusted>())
    {
        untrusted.exit_status()
    } else if err.chain().any(|cause| cause.is::<ConfigError>()) {
        exit::CONFIG
    } else if err.chain().any(|cause| cause.is::<Refused>()) {
        exit::REFUSED
    } else {
        exit::FAILURE
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn load_config(cli: &Cli) -> Result<LoadedConfig, ConfigError> {
    let loaded = config::load(cli.config.as_deref(), &config::process_env())?;
    for warning in &loaded.warnings {
        tracing::debug!("config: {warning}");
    }
    Ok(loaded)
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match &cli.command {
        Command::CheckConfig { for_command } => {
            let loaded = load_config(&cli)?;
            {
                let stdout = std::io::stdout();
                let mut out = stdout.lock();
                print_check_config(&loaded, &mut out)?;
                if let Some(fleet) = &loaded.config.fleet {
                    for warning in
                        crate::fleet::etcd::secret_file_warnings(&fleet.tls, fleet.auth.as_ref())
                    {
                        writeln!(out, "\nwarning: {warning}")?;
                    }
                    if let Some(auth) = &fleet.auth {
                        if let Err(e) = std::fs::File::open(&auth.password_file) {
                            writeln!(
                                out,
                                "\nwarning: fleet: fleet.password_file {}: cannot read it: {e}\n  `rollbackd run` would guard this host without the fleet until it is mended",
                                auth.password_file.display()
                            )?;
                        }
                    }
                }
                if let Some(fleet) = loaded.config.fleet.as_ref().filter(|f| f.tls.is_set()) {
                    // Read here as the daemon reads them (and as the user running this can):
                    // broken files do not stop `run`, they cut the host off from the fleet.
                    match crate::fleet::etcd::build_client(&fleet.tls) {
                        Ok(_) => writeln!(out, "\nfleet TLS files: readable and valid PEM")?,
                        Err(why) => writeln!(
                            out,
                            "\nwarning: fleet: {why}\n  `rollbackd run` would guard this host without the fleet until it is mended"
                        )?,
                    }
                }
                out.flush()?;
            }
            if let Some(CheckFor::Run) = for_command {
                // The very check `run` makes, so the two cannot drift apart.
                crate::daemon::service::check_runnable(&loaded).map_err(|err| {
                    anyhow::Error::new(err).context("`rollbackd run` would not start")
                })?;
                // What `run` refuses inside the state directory (a planted symlink), with
                // the same exit status.
                let state_dir = &loaded.config.state_dir;
                if std::fs::symlink_metadata(state_dir).is_ok() {
                    crate::storage::statedir::check(state_dir)
                        .map_err(|err| err.context("`rollbackd run` would not start"))?;
                }
                if let Some(config::SnapshotSpec::Prometheus(spec)) = &loaded.config.operations {
                    let stdout = std::io::stdout();
                    let mut out = stdout.lock();
                    let ran = runtime()?.block_on(run_prometheus_queries(&loaded, spec, &mut out));
                    out.flush()?;
                    ran?;
                }
                println!();
                println!("ready for `rollbackd run`");
            }
            Ok(exit::SUCCESS)
        }
        Command::Simulate {
            trace,
            json,
            no_previous,
            recent_rollbacks,
            stability_watch,
        } => {
            let loaded = load_config(&cli)?;
            let scenario = crate::cli::simulate::Scenario {
                previous_known: !no_previous,
                recent_rollbacks: *recent_rollbacks,
                stability_watch: *stability_watch,
            };
            simulate(&loaded, &scenario, trace, *json)
        }
        Command::Audit {
            action:
                AuditAction::Tail {
                    follow,
                    lines,
                    json,
                },
        } => {
            let loaded = load_config(&cli)?;
            let path = loaded
                .config
                .analytics_dir()
                .join(crate::storage::audit::AUDIT_LOG_FILE);
            let style = tail::TailStyle {
                json: *json,
                colour: !*json && std::io::stdout().is_terminal(),
            };
            runtime()?.block_on(async {
                let mut out = std::io::stdout();
                let stop = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                tail::audit_tail(&path, *lines, *follow, style, &mut out, stop).await
            })?;
            Ok(exit::SUCCESS)
        }
        Command::Report { session, json, .. } => {
            let loaded = load_config(&cli)?;
            report(&loaded, session, *json)
        }
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut command, "rollbackd", &mut out);
            std::io::stdout().lock().write_all(&out)?;
            Ok(exit::SUCCESS)
        }
        Command::Man { dir: None } => {
            let out = man_page(&man_command())?;
            std::io::stdout().lock().write_all(&out)?;
            Ok(exit::SUCCESS)
        }
        Command::Man { dir: Some(dir) } => {
            for path in write_man_pages(dir)? {
                println!("{}", path.display());
            }
            Ok(exit::SUCCESS)
        }
        Command::DemoHook { state_dir, to } => {
            demo::hook(state_dir, to)?;
            Ok(exit::SUCCESS)
        }
        Command::Demo => runtime()?.block_on(async {
            let mut out = std::io::stdout();
            demo::run(&mut out).await
        }),
        Command::Run => {
            let loaded = load_config(&cli)?;
            let config_path = cli.config.clone();
            // A reload is refused (the old configuration kept) for what would stop `run`
            // from starting, e.g. a kill_switch.database that does not exist.
            let reloader: crate::daemon::Reloader = std::sync::Arc::new(move || {
                let loaded = config::load(config_path.as_deref(), &config::process_env())?;
                crate::daemon::service::check_runnable(&loaded)?;
                Ok(loaded)
            });
            daemon_runtime()?.block_on(crate::daemon::service::run(
                loaded,
                reloader,
                crate::daemon::service::real_adapters(),
                tokio_util::sync::CancellationToken::new(),
                None,
            ))?;
            Ok(exit::SUCCESS)
        }
        Command::Flags { action } => {
            let loaded = load_config(&cli)?;
            let options = crate::appdb::flags::LiveFlagsOptions {
                kill_key: loaded.config.kill_switch.key.clone(),
                defaults: loaded.config.flag_defaults.clone(),
                ..crate::appdb::flags::LiveFlagsOptions::default()
            };
            let default_db = loaded.config.kill_switch.database.clone();
            let stdout = std::io::stdout();
            match action {
                FlagsAction::Get {
                    key,
                    db,
                    json,
                    explain,
                } => {
                    let mut out = stdout.lock();
                    let has_value = flags::flags_get(
                        db.as_deref().unwrap_or(&default_db),
                        key,
                        &options,
                        flags::GetFormat {
                            json: *json,
                            explain: *explain,
                        },
                        &mut out,
                        &mut std::io::stderr(),
                    )?;
                    if !has_value {
                        return Ok(exit::FAILURE);
                    }
                }
                FlagsAction::Watch { db, json } => {
                    let db = db.clone().unwrap_or(default_db);
                    runtime()?.block_on(async {
                        let mut out = std::io::stdout();
                        let stop = async {
                            let _ = tokio::signal::ctrl_c().await;
                        };
                        flags::flags_watch(&db, options, *json, &mut out, stop).await
                    })?;
                }
            }
            Ok(exit::SUCCESS)
        }
        Command::Promote { .. }
        | Command::Status { .. }
        | Command::Rollback { .. }
        | Command::KillSwitch { .. }
        | Command::Pause { .. }
        | Command::Resume => {
            let loaded = load_config(&cli)?;
            runtime()?.block_on(commands::run(&cli.command, &loaded))
        }
        Command::Fleet {
            action: crate::cli::args::FleetAction::Status { json },
        } => {
            let loaded = load_config(&cli)?;
            runtime()?.block_on(fleet::status(&loaded, *json))
        }
    }
}

/// The command tree the manual pages describe: built (so every subcommand has its
/// `rollbackd-<sub>` name) and without the `help` subcommand, so that every page a page
/// names under SUBCOMMANDS is one that `man --dir` writes.
fn man_command() -> clap::Command {
    let mut command = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    command.build();
    command
}

/// The EXIT STATUS section every page carries (SPEC §6).
const MAN_EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
Failure: the message on standard error says what failed.
.TP
\fB2\fR
Usage: the command line could not be parsed.
.TP
\fB3\fR
Refused: a precondition is not met (for example a rollback already in progress, or a
kill\-switch reset inside the quiet period), or the confirmation was declined.
.TP
\fB78\fR
Invalid configuration: the message names the file or the key and what is wrong.
"#;

/// One manual page (roff): clap_mangen's sections plus EXIT STATUS, before VERSION.
fn man_page(command: &clap::Command) -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    let mut page = String::from_utf8_lossy(&page).into_owned();
    match page.find("\n.SH VERSION") {
        Some(at) => page.insert_str(at + 1, MAN_EXIT_STATUS),
        None => page.push_str(MAN_EXIT_STATUS),
    }
    Ok(page.into_bytes())
}

/// `man --dir DIR`: `rollbackd.1` and one page per visible subcommand, nested ones as
/// `rollbackd-kill-switch-set.1` (clap_mangen's names). Returns the paths written.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context;
    fn write(
        command: &clap::Command,
        dir: &std::path::Path,
        written: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let path = dir.join(clap_mangen::Man::new(command.clone()).get_filename());
        std::fs::write(&path, man_page(command)?)
            .with_context(|| format!("cannot write the manual page {}", path.display()))?;
        written.push(path);
        for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
            write(sub, dir, written)?;
        }
        Ok(())
    }
    if !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory: create it first (man --dir DIR writes the pages into DIR)",
            dir.display()
        );
    }
    let mut written = Vec::new();
    write(&man_command(), dir, &mut written)?;
    Ok(written)
}

/// The daemon's runtime: one thread is plenty for one driver and a check at a time, and
/// it halves the cross-thread wake-ups of a two-worker runtime (CPU while monitoring).
/// SQLite, file writes and hooks' waits run on the blocking pool.
fn daemon_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn simulate(
    loaded: &LoadedConfig,
    scenario: &crate::cli::simulate::Scenario,
    trace: &PathBuf,
    json: bool,
) -> anyhow::Result<u8> {
    use anyhow::Context;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let name = trace.display().to_string();
    let result = if name == "-" {
        crate::cli::simulate::replay_scenario(
            &loaded.config,
            scenario,
            std::io::stdin().lock(),
            "<stdin>",
            json,
            &mut out,
        )
    } else {
        let file =
            std::fs::File::open(trace).with_context(|| format!("cannot open trace {name}"))?;
        crate::cli::simulate::replay_scenario(
            &loaded.config,
            scenario,
            std::io::BufReader::with_capacity(1 << 16, file),
            &name,
            json,
            &mut out,
        )
    };
    result?;
    Ok(exit::SUCCESS)
}

/// `check-config --for run` with `[operations.prometheus]`: each query run once, as a
/// check would run it now (`{worker}`/`{previous}`: the workers on record in
/// rollbackd.db, empty before the first promotion; `{interval}`: the check interval), and
/// its value printed. Prometheus unreachable or refusing a query (a PromQL error) is an
/// invalid configuration naming the key (exit 78); an empty result is a warning.
async fn run_prometheus_queries(
    loaded: &LoadedConfig,
    spec: &config::PrometheusSpec,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let config = &loaded.config;
    let (active, previous) = {
        let db = config.rollbackd_db();
        tokio::task::spawn_blocking(move || {
            let store = crate::storage::store::Store::open_read_only(&db).ok()?;
            let read = |key: &str| {
                store
                    .get_meta(key)
                    .ok()
                    .flatten()
                    .filter(|id| crate::text::is_valid_worker_id(id))
            };
            Some((read("active"), read("previous")))
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
    };
    let vars = crate::adapters::SnapshotVars {
        worker: active.clone().unwrap_or_default(),
        previous: previous.clone(),
        interval: config.monitor.check_interval,
    };
    let shown = |id: &Option<String>| match id {
        Some(id) => id.clone(),
        None => "\"\" (none on record)".into(),
    };
    writeln!(out)?;
    writeln!(
        out,
        "prometheus queries, run once at {} ({{worker}} = {}, {{previous}} = {}, {{interval}} = {}):",
        crate::text::escape(&spec.url),
        shown(&active),
        shown(&previous),
        config::show_promql_duration(spec.interval_window(vars.interval))
    )?;
    let checks = crate::adapters::check_queries(spec, &vars, config.monitor.check_timeout).await;
    let mut issues = Vec::new();
    let mut warnings = Vec::new();
    for check in checks {
        let value = match &check.result {
            Ok(crate::core::check::Sample::Number(v)) => v.to_string(),
            Ok(crate::core::check::Sample::Missing) => {
                let what = if check.key == "operations.prometheus.error_rate" {
                    "every check would have no error rate (no-data)"
                } else {
                    "checks would record no value for it"
                };
                let hint = if active.is_none() && check.expression.contains("\"\"") {
                    " (expected while no worker is on record: {worker} is empty)"
                } else {
                    "; where no series means zero, end the query with `or vector(0)`"
                };
                warnings.push(format!(
                    "{}: the query returned no series: {what} until it does{hint}",
                    check.key
                ));
                "(empty)".into()
            }
            Ok(crate::core::check::Sample::Wrong(raw)) => {
                warnings.push(format!("{}: not a number: {raw}", check.key));
                format!("not a number: {raw}")
            }
            Err(reason) => {
                issues.push(config::ConfigIssue {
                    key: check.key.to_owned(),
                    message: format!("the query failed: {reason}"),
                });
                "FAILED".into()
            }
        };
        writeln!(out, "  {:<36} = {}", check.key, crate::text::escape(&value))?;
        writeln!(
            out,
            "  {:<36}   {}",
            "",
            crate::text::escape(&crate::text::one_line(&check.expression, 300))
        )?;
    }
    for warning in &warnings {
        writeln!(out, "warning: {}", crate::text::escape(warning))?;
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(anyhow::Error::new(ConfigError::Invalid(issues))
            .context("the Prometheus queries cannot be run"))
    }
}

/// `check-config`: the effective configuration, provenance and worst-case times.
pub fn print_check_config(loaded: &LoadedConfig, out: &mut impl Write) -> std::io::Result<()> {
    match &loaded.origin {
        FileOrigin::Named(path) | FileOrigin::DefaultPath(path) => {
            writeln!(out, "configuration: {} (valid)", path.display())?
        }
        FileOrigin::NoFile(path) => writeln!(
            out,
            "configuration: no file at {}: using built-in defaults (plus environment overrides)",
            path.display()
        )?,
        FileOrigin::Inline => writeln!(out, "configuration: inline (valid)")?,
    }
    writeln!(
        out,
        "profile: {}   hash: {}",
        loaded.config.profile, loaded.hash
    )?;
    writeln!(out)?;
    let width = loaded
        .values
        .iter()
        .map(|(k, _, _)| k.len())
        .max()
        .unwrap_or(0);
    for (key, value, source) in &loaded.values {
        // A webhook URL's user, password, path and query are its secrets.
        let value = if key == "alerts.webhook_url" {
            format!("{:?}", crate::text::redact_url(value.trim_matches('"')))
        } else {
            value.clone()
        };
        writeln!(out, "  {key:<width$} = {value:<28} # {source}")?;
    }
    let unset: Vec<&str> = config::key_paths()
        .filter(|key| !loaded.values.iter().any(|(k, _, _)| k == key))
        .collect();
    if !unset.is_empty() {
        writeln!(out, "  not set: {}", unset.join(", "))?;
    }
    writeln!(out)?;
    writeln!(out, "worst-case times:")?;
    for line in config::worst_case_times(&loaded.config) {
        writeln!(out, "  {line}")?;
    }
    let notes = config::prometheus_notes(&loaded.config);
    if !notes.is_empty() {
        writeln!(out)?;
        writeln!(out, "prometheus:")?;
        for line in notes {
            writeln!(out, "  {line}")?;
        }
    }
    if !loaded.warnings.is_empty() {
        writeln!(out)?;
        writeln!(out, "warnings:")?;
        for warning in &loaded.warnings {
            writeln!(out, "  {warning}")?;
        }
    }
    Ok(())
}

/// `rollbackd report [SESSION|latest] [--json]`: the incident report made from
/// `rollbackd.db` now (read-only; a running daemon is not disturbed).
fn report(loaded: &crate::config::LoadedConfig, session: &str, json: bool) -> anyhow::Result<u8> {
    use crate::storage::store::{Store, StoreError};
    let config = &loaded.config;
    let store = match Store::open_read_only(&config.rollbackd_db()) {
        Ok(store) => store,
        Err(StoreError::NotFound(_)) => {
            eprintln!(
                "rollbackd: no incident on record: {} does not exist yet",
                config.rollbackd_db().display()
            );
            return Ok(exit::FAILURE);
        }
        Err(err) => return Err(err.into()),
    };
    let (session_id, action_id) = if session == "latest" {
        match store.latest_action()? {
            Some(action) => match action.session_id {
                Some(id) => (Some(id), None),
                None => (None, action.id),
            },
            None => {
                eprintln!("rollbackd: no incident on record: no rollback or escalation yet");
                return Ok(exit::FAILURE);
            }
        }
    } else if session.is_empty() {
        eprintln!("rollbackd: an empty session id names every session; give one, or `latest`");
        return Ok(exit::USAGE);
    } else {
        let found = store.sessions_like(session)?;
        match found.as_slice() {
            [one] => (Some(one.clone()), None),
            [] => {
                eprintln!(
                    "rollbackd: no session {} on record (`rollbackd report latest`, or a session id from `rollbackd audit tail`)",
                    crate::text::escape(session)
                );
                return Ok(exit::FAILURE);
            }
            many if many.iter().any(|id| id == session) => (Some(session.to_owned()), None),
            many => {
                let total = store.count_sessions_like(session)?;
                eprintln!(
                    "rollbackd: {} names {total} sessions; give more of the id: {}{}",
                    crate::text::escape(session),
                    many.join(", "),
                    if total > many.len() as u64 {
                        format!(" (the newest {} shown)", many.len())
                    } else {
                        String::new()
                    }
                );
                return Ok(exit::USAGE);
            }
        }
    };
    let Some(rows) =
        crate::daemon::incident::gather(&store, session_id.as_deref(), action_id, None)?
    else {
        eprintln!("rollbackd: nothing on record for that session");
        return Ok(exit::FAILURE);
    };
    if rows.actions.is_empty() {
        eprintln!(
            "rollbackd: session {} took no action (no rollback, no escalation): no incident to report",
            session_id.as_deref().unwrap_or("?")
        );
        return Ok(exit::FAILURE);
    }
    let kill_switch = crate::daemon::incident::kill_switch_now(loaded);
    let incident = crate::daemon::incident::build(
        loaded,
        &config.analytics_dir(),
        rows,
        kill_switch,
        std::time::SystemTime::now(),
    );
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &incident)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", incident.markdown())?;
    }
    Ok(exit::SUCCESS)
}
