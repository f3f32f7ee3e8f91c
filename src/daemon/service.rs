//! The whole daemon process around the driver: state directory and its lock, the control
//! socket, the HTTP endpoint, LiveFlags on the application's database, signals, and systemd
//! notification.
//! `rollbackd run` and `rollbackd demo` both come through here.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::appdb::flags::{LiveFlags, LiveFlagsOptions};
use crate::config::{ConfigError, ConfigIssue, LoadedConfig};
use crate::control::ControlServer;
use crate::daemon::http::HttpServer;
use crate::daemon::metrics::Metrics;
use crate::daemon::notify::Notifier;
use crate::daemon::{AdapterFactory, Adapters, Driver, DriverInputs, Reloader, SystemClock};

/// The state directory is held by one process at a time: a daemon, or a CLI command
/// acting on the state directly while no daemon runs.
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the lock on `state_dir` without waiting; `Ok(None)` when another process has it.
///
/// Every entry point that acts on the state comes through here, so this is where the state
/// directory is created (mode 0750, only when missing: an existing directory's mode is
/// never changed) and checked ([`crate::storage::statedir::check`]): a state directory another user
/// could write to is refused with [`crate::storage::statedir::Untrusted`] before anything in it is
/// opened.
pub fn try_lock_state(state_dir: &Path) -> anyhow::Result<Option<StateLock>> {
    crate::storage::statedir::prepare(state_dir)?;
    let path = state_dir.join("rollbackd.lock");
    // O_NOFOLLOW: a link planted after the check is an error (ELOOP), never followed.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open the state lock {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(anyhow::Error::new(err).context(format!(
            "cannot lock the state directory {}",
            path.display()
        )));
    }
    Ok(Some(StateLock { _file: file, path }))
}

/// What `run` needs beyond what `check-config` accepts.
pub fn check_runnable(loaded: &LoadedConfig) -> Result<(), ConfigError> {
    let mut issues = Vec::new();
    if loaded.config.worker.probe.is_none() {
        issues.push(ConfigIssue {
            key: "worker".into(),
            message: "the daemon needs one of health_url, health_command, health_tcp".into(),
        });
    }
    if loaded.config.rollback.switch_command.is_none() {
        issues.push(ConfigIssue {
            key: "rollback.switch_command".into(),
            message: "the daemon needs it to roll back".into(),
        });
    }
    // Every hook must be a program that can run: a switch_command that does not exist
    // would otherwise show up only when a rollback fails.
    let rb = &loaded.config.rollback;
    for (key, argv) in [
        ("rollback.switch_command", &rb.switch_command),
        ("rollback.pause_command", &rb.pause_command),
        ("rollback.drain_command", &rb.drain_command),
        ("rollback.resume_command", &rb.resume_command),
    ] {
        let Some(program) = argv.as_ref().and_then(|argv| argv.first()) else {
            continue;
        };
        if let Err(why) = runnable(program) {
            issues.push(ConfigIssue {
                key: key.into(),
                message: why,
            });
        }
    }
    // The state directory, when it exists already, must be one only this user can write
    // (`run` refuses it otherwise; `check-config --for run` must say so too).
    // (Something wrong *inside* it is not the configuration's problem: `run` refuses that
    // with exit 1, and so does `check-config --for run`, through `check_state_dir`.)
    let state_dir = &loaded.config.state_dir;
    if std::fs::symlink_metadata(state_dir).is_ok() {
        if let Err(err) = crate::storage::statedir::check(state_dir) {
            let untrusted = err
                .chain()
                .find_map(|cause| cause.downcast_ref::<crate::storage::statedir::Untrusted>());
            if untrusted.is_none_or(|u| u.config_level) {
                issues.push(ConfigIssue {
                    key: "state_dir".into(),
                    message: format!("{err:#}"),
                });
            }
        }
    }
    let ks = &loaded.config.kill_switch;
    if !ks.create_database {
        if let Err(e) = std::fs::metadata(&ks.database) {
            if e.kind() == std::io::ErrorKind::NotFound {
                issues.push(ConfigIssue {
                    key: "kill_switch.database".into(),
                    message: format!(
                        "{} does not exist: the daemon could not set the kill switch. Check the \
                         path for a typo, or set kill_switch.create_database = true to let \
                         rollbackd create it",
                        ks.database.display()
                    ),
                });
            }
        }
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(issues))
    }
}

/// Whether `program` (a hook's argv[0]) names an executable file: a path as given, a bare
/// name looked up in `PATH` as the hook runner will.
fn runnable(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| -> Result<(), String> {
        let metadata = std::fs::metadata(path)
            .map_err(|e| format!("{} cannot be run: {e}", path.display()))?;
        if !metadata.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        if metadata.permissions().mode() & 0o111 == 0 {
            return Err(format!(
                "{} is not executable (chmod +x it)",
                path.display()
            ));
        }
        Ok(())
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| executable(&dir.join(program)).is_ok()) {
        Ok(())
    } else {
        Err(format!("{program:?} is not an executable program in PATH"))
    }
}

/// Real adapters from the configuration.
pub fn real_adapters() -> AdapterFactory {
    Arc::new(|config: &crate::config::Config| {
        let timeout = config.monitor.check_timeout;
        Adapters {
            probe: match &config.worker.probe {
                Some(spec) => crate::adapters::worker_probe(spec, timeout),
                None => crate::adapters::worker_probe(
                    &crate::config::ProbeSpec::Tcp("127.0.0.1:1".into()),
                    timeout,
                ),
            },
            snapshot: crate::adapters::snapshot_source(config.operations.as_ref(), timeout),
            resources: crate::adapters::resource_sampler(config.worker.pid_file.as_deref()),
            hooks: Arc::new(crate::daemon::ProcessHooks),
        }
    })
}

/// Where a started daemon listens, told to [`run`]'s caller.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The control socket.
    pub socket: PathBuf,
    /// The HTTP endpoint's bound address (the real port when `[http] listen` asked for
    /// port 0); `None` when disabled or when it could not be bound.
    pub http: Option<SocketAddr>,
}

/// Runs the daemon until `shutdown` is cancelled or SIGTERM/SIGINT arrives. `ready` is
/// told once everything listens (the same moment systemd gets READY=1).
pub async fn run(
    loaded: LoadedConfig,
    reloader: Reloader,
    factory: AdapterFactory,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
) -> anyhow::Result<()> {
    check_runnable(&loaded)?;
    raise_fd_limit();
    let config = &loaded.config;
    let state_dir = config.state_dir.clone();
    let notifier = Notifier::from_env();
    let _lock = try_lock_state(&state_dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "another rollbackd holds {} (is the daemon already running?)",
            state_dir.join("rollbackd.lock").display()
        )
    })?;

    let socket_path = config.socket_path();
    let server = ControlServer::bind(&socket_path, 0o600)
        .with_context(|| format!("cannot bind the control socket {}", socket_path.display()))?;
    let (commands_tx, commands_rx) = mpsc::channel(16);
    let server_shutdown = CancellationToken::new();

    // The HTTP endpoint is an operator surface, not part of guarding: when its address
    // cannot be bound the daemon says so and guards without it rather than not at all.
    let mut http_addr = None;
    let mut metrics = None;
    let mut http_task = None;
    if let Some(listen) = config.http_listen {
        let endpoint_metrics = Metrics::new();
        match HttpServer::bind(listen, endpoint_metrics.clone(), commands_tx.clone()).await {
            Ok(http) if http.max_connections() == 0 => tracing::error!(
                reserve = crate::sys::fdlimit::RESERVE,
                "the file descriptor limit (RLIMIT_NOFILE) leaves no room for the http \
                 endpoint next to the descriptors the daemon keeps for itself; running \
                 without /metrics, /status, /healthz (raise LimitNOFILE= in the unit)"
            ),
            Ok(http) => {
                let addr = http.local_addr().unwrap_or(listen);
                tracing::info!(
                    %addr,
                    max_connections = http.max_connections(),
                    "http endpoint listening: /metrics, /status, /healthz"
                );
                http_addr = Some(addr);
                metrics = Some(endpoint_metrics);
                http_task = Some(tokio::spawn(http.serve(server_shutdown.clone())));
            }
            Err(err) => tracing::error!(
                "cannot bind the http endpoint on {listen} ({err}); running without /metrics, /status, /healthz"
            ),
        }
    }
    let server_task = tokio::spawn(server.serve(commands_tx, server_shutdown.clone()));

    let flags_options = LiveFlagsOptions {
        kill_key: config.kill_switch.key.clone(),
        defaults: config.flag_defaults.clone(),
        // Woken by the kernel on a commit, like the applications' LiveFlags; the 1 s
        // backstop poll is the default.
        ..LiveFlagsOptions::default()
    };
    let flags_db = config.kill_switch.database.clone();
    // LiveFlags reads the table once as it starts: off the async thread.
    let flags = tokio::task::spawn_blocking(move || LiveFlags::start(flags_db, flags_options))
        .await
        .context("starting LiveFlags")?;

    // Signals: TERM/INT stop (after an action in flight), HUP reloads.
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let signal_shutdown = shutdown.clone();
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); signal_shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); signal_shutdown.cancel(); }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading the configuration"); let _ = reload_tx.try_send(()); }
                _ = signal_shutdown.cancelled() => return,
            }
        }
    });

    // The fleet agent (SPEC §8): its own task, started whether or not etcd answers now;
    // the driver only ever reads what it reports.
    let fleet_shutdown = CancellationToken::new();
    let mut fleet_task = None;
    let fleet_inputs = match &config.fleet {
        None => None,
        Some(fleet_config) => {
            for warning in crate::fleet::etcd::secret_file_warnings(
                &fleet_config.tls,
                fleet_config.auth.as_ref(),
            ) {
                tracing::warn!("{warning}");
            }
            match crate::fleet::store_for(fleet_config) {
                Ok(store) => {
                    // It registers the host once the driver has said what the host runs.
                    let agent = crate::fleet::agent::start(
                        fleet_config.clone(),
                        store,
                        fleet_shutdown.clone(),
                    );
                    tracing::info!(host = %fleet_config.host, endpoints = ?fleet_config.endpoints, "fleet agent started");
                    fleet_task = Some(agent.task);
                    Some(crate::daemon::fleet::FleetInputs::Agent {
                        events: agent.events,
                        host: agent.host,
                        verdicts: agent.verdicts,
                    })
                }
                Err(err) => {
                    tracing::error!("cannot start the fleet agent ({err}); guarding this host without the fleet");
                    None
                }
            }
        }
    };

    let status_notifier = notifier.clone();
    let watchdog_notifier = notifier.clone();
    let inputs = DriverInputs {
        fleet: fleet_inputs,
        one_shot: false,
        factory,
        clock: Arc::new(SystemClock),
        commands: commands_rx,
        flags: Some(flags.subscribe()),
        reload: Some((reload_rx, reloader)),
        shutdown: shutdown.clone(),
        on_status: Some(Box::new(move |line: &str| status_notifier.status(line))),
        watchdog: notifier.watchdog_interval().map(|period| {
            (
                period,
                Box::new(move || watchdog_notifier.watchdog()) as Box<dyn Fn() + Send>,
            )
        }),
        metrics,
    };
    tracing::info!(
        state_dir = %state_dir.display(),
        socket = %socket_path.display(),
        config = %loaded.hash,
        "rollbackd starting"
    );
    let driver = tokio::spawn(Driver::run(loaded, inputs));
    // Everything listens: the socket is bound, LiveFlags runs, the driver is started.
    notifier.ready();
    if let Some(ready) = ready {
        let _ = ready.send(Ready {
            socket: socket_path.clone(),
            http: http_addr,
        });
    }
    let result = driver.await.context("the driver task panicked")?;
    notifier.stopping();
    fleet_shutdown.cancel();
    if let Some(task) = fleet_task {
        // It revokes its lease (bounded by a second) so the host leaves the fleet view.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    server_shutdown.cancel();
    let _ = server_task.await;
    if let Some(http_task) = http_task {
        let _ = http_task.await;
    }
    signals.abort();
    // Joining the LiveFlags thread may wait for its current poll.
    let _ = tokio::task::spawn_blocking(move || drop(flags)).await;
    tracing::info!(at = %crate::storage::audit::rfc3339_millis(SystemTime::now()), "rollbackd stopped");
    result
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (systemd's default soft limit is
/// 1024; the unit's `LimitNOFILE=` sets both), and logs the limit the daemon runs with.
fn raise_fd_limit() {
    match crate::sys::fdlimit::raise_soft_to_hard() {
        Ok((before, after)) if before.soft != after.soft => tracing::info!(
            soft = after.soft,
            hard = after.hard,
            raised_from = before.soft,
            "file descriptor limit (RLIMIT_NOFILE) raised to the hard limit"
        ),
        Ok((_, after)) => tracing::info!(
            soft = after.soft,
            hard = after.hard,
            "file descriptor limit (RLIMIT_NOFILE)"
        ),
        Err(error) => tracing::warn!(
            %error,
            "cannot raise the file descriptor limit (RLIMIT_NOFILE); keeping the current one"
        ),
    }
}
