//! Shared pieces of the system tests: a loopback HTTP server playing workers and the
//! operations manager, a daemon started as the real binary, and audit-log readers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_rollbackd");

pub mod etcd;
pub mod fake_prometheus;

/// What the loopback server answers: path → (status, body).
#[derive(Clone, Default)]
pub struct Routes(Arc<Mutex<HashMap<String, (u16, String)>>>);

impl Routes {
    pub fn set(&self, path: &str, status: u16, body: &str) {
        self.0
            .lock()
            .unwrap()
            .insert(path.to_owned(), (status, body.to_owned()));
    }
    pub fn error_rate(&self, rate: f64) {
        self.set(
            "/snapshot",
            200,
            &format!(r#"{{"failureRate": {rate}, "requests": 1000}}"#),
        );
    }
}

/// A loopback HTTP/1.1 server on its own thread; answers from `Routes`, closes each connection.
pub fn serve(routes: Routes) -> u16 {
    serve_with(routes, false)
}

/// Like [`serve`]; with `keep_alive` a connection serves requests until the client closes
/// it (or 5 s of silence), as a real worker's HTTP server does.
pub fn serve_with(routes: Routes, keep_alive: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let routes = routes.clone();
            std::thread::spawn(move || handle(stream, &routes, keep_alive));
        }
    });
    port
}

fn handle(mut stream: TcpStream, routes: &Routes, keep_alive: bool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => break,
                Ok(_) if header == "\r\n" || header == "\n" => break,
                Ok(_) => {}
            }
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_owned();
        let (status, body) = routes
            .0
            .lock()
            .unwrap()
            .get(&path)
            .cloned()
            .unwrap_or((404, "not found".into()));
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let written = write!(
            stream,
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        if !keep_alive || written.is_err() {
            return;
        }
    }
}

/// A state directory and a configuration for a daemon on the loopback server.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub routes: Routes,
    pub port: u16,
}

impl Setup {
    /// `extra` is appended to the configuration (TOML).
    pub fn new(extra: &str) -> Setup {
        Setup::with_server(extra, false)
    }

    /// [`Setup::new`] with a loopback server that keeps connections open (see [`serve_with`]).
    pub fn with_server(extra: &str, keep_alive: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let routes = Routes::default();
        routes.set("/v1/health", 200, r#"{"status":"ok"}"#);
        routes.set("/v2/health", 200, r#"{"status":"ok"}"#);
        routes.error_rate(0.01);
        let port = serve_with(routes.clone(), keep_alive);
        let state = dir.path().join("state");
        let hook = dir.path().join("switch.sh");
        std::fs::write(
            &hook,
            "#!/bin/sh\n# test switch hook: record the call, optionally sleep or wait for a gate\necho \"$1\" >> \"$(dirname \"$0\")/switches\"\n[ -f \"$(dirname \"$0\")/slow\" ] && sleep \"$(cat \"$(dirname \"$0\")/slow\")\"\n# a test holds the switch open while the file gate exists (at most 60 s)\nn=0; while [ -f \"$(dirname \"$0\")/gate\" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done\nexit 0\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let base = format!(
            r#"state_dir = {state:?}
[monitor]
check_interval = "300ms"
degraded_check_interval = "150ms"
check_timeout = "250ms"
grace_period = "2m"
[worker]
health_url = "http://127.0.0.1:{port}/{{worker}}/health"
[operations]
snapshot_url = "http://127.0.0.1:{port}/snapshot"
[rollback]
switch_command = [{hook:?}, "{{to}}"]
hook_timeout = "20s"
verify_interval = "100ms"
verify_timeout = "1s"
# Most tests end the session at the verified rollback; the stability watch's own tests
# (tests/system.rs `the_restored_version_*`) set a period.
stability_period = "0s"
[kill_switch]
database = {db:?}
reset_quiet_period = "1s"
# Most tests let the daemon create app.db on its first write; tests of a missing
# database set it back to false.
create_database = true
[http]
listen = ""
"#,
            state = state.display().to_string(),
            hook = hook.display().to_string(),
            db = dir.path().join("app.db").display().to_string(),
        );
        let config = dir.path().join("rollbackd.toml");
        std::fs::write(&config, merge_toml(&base, extra)).unwrap();
        Setup {
            dir,
            config,
            routes,
            port,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn start(&self) -> Daemon {
        self.start_with_env(&[])
    }

    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Daemon {
        self.start_with(|command| {
            command.envs(env.iter().copied());
        })
    }

    /// Starts the daemon after `adjust` has had its say on the command (environment,
    /// `pre_exec` resource limits, ...); waits until it answers `status`.
    pub fn start_with(&self, adjust: impl FnOnce(&mut Command)) -> Daemon {
        self.start_program(Path::new(BIN), adjust)
    }

    /// [`Setup::start_with`] for another build of rollbackd (a benchmark's older release).
    pub fn start_program(&self, program: &Path, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let mut command = Command::new(program);
        command
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("daemon.log")).unwrap());
        adjust(&mut command);
        let child = command.spawn().unwrap();
        let socket = self.state().join("rollbackd.sock");
        if wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .is_none()
        {
            panic!(
                "the daemon's socket did not come up in 10 s; its log:\n{}",
                self.daemon_log()
            );
        }
        // The driver answers `status` only once it has restored its state and read the
        // kill switch: from then on changes are seen as changes.
        wait_for(Duration::from_secs(10), || {
            let out = self.cli(&["status", "--json"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"running\"")
        })
        .expect("daemon answers status");
        Daemon { child }
    }

    pub fn audit(&self) -> Vec<Value> {
        audit_lines(&self.state().join("analytics/audit.log"))
    }

    pub fn events(&self, event: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|v| v["event"] == event)
            .collect()
    }

    pub fn switches(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("switches"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn artifacts(&self, prefix: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.state().join("analytics"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        found.retain(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".json")
        });
        found.sort();
        found
    }

    /// The incident reports (`analytics/incident_*.md`), oldest first.
    pub fn incident_reports(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.state().join("analytics"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        found.retain(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("incident_") && name.ends_with(".md")
        });
        found.sort();
        found
    }

    /// `rollbackd promote --active v2 --previous v1`, which must succeed.
    pub fn promote(&self) {
        let out = self.cli(&["promote", "--active", "v2", "--previous", "v1"]);
        assert!(
            out.status.success(),
            "promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }
}

/// Appends `extra` sections, replacing keys of sections that already exist.
fn merge_toml(base: &str, extra: &str) -> String {
    let mut table: toml::Table = base.parse().unwrap();
    let extra: toml::Table = extra.parse().unwrap();
    for (key, value) in extra {
        match (table.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
                for (k, v) in new {
                    existing.insert(k, v);
                }
            }
            (_, value) => {
                table.insert(key, value);
            }
        }
    }
    toml::to_string(&table).unwrap()
}

pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line does not parse ({e}): {line}"))
        })
        .collect()
}

/// Polls `condition` every 20 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn sqlite3_available() -> bool {
    Command::new("sqlite3")
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl Setup {
    /// Rewrites the configuration file in place (e.g. to swap the snapshot source).
    pub fn rewrite_config(&self, edit: impl FnOnce(&mut toml::Table)) {
        let mut table: toml::Table = std::fs::read_to_string(&self.config)
            .unwrap()
            .parse()
            .unwrap();
        edit(&mut table);
        std::fs::write(&self.config, toml::to_string(&table).unwrap()).unwrap();
    }

    /// The HTTP endpoint's address as the daemon logs it once bound (so `[http] listen`
    /// can ask for port 0).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        let mut found = None;
        wait_for(Duration::from_secs(10), || {
            found = self
                .daemon_log()
                .lines()
                .filter(|line| line.contains("http endpoint listening"))
                .find_map(|line| {
                    let rest = &line[line.find("addr=")? + "addr=".len()..];
                    rest.split_whitespace().next()?.parse().ok()
                });
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "the daemon did not log its http address; log:\n{}",
                self.daemon_log()
            )
        })
    }
}

/// A plain HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection (`connection: close`); bodies are content-length
/// framed, as hyper sends a full body.
pub fn http_request(
    method: &str,
    addr: std::net::SocketAddr,
    path: &str,
) -> std::io::Result<HttpResponse> {
    http_request_body(method, addr, path, "")
}

/// [`http_request`] with a request body.
pub fn http_request_body(
    method: &str,
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
) -> std::io::Result<HttpResponse> {
    http_request_with(method, addr, path, body, &[])
}

/// [`http_request_body`] with extra request headers.
pub fn http_request_with(
    method: &str,
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    use std::io::Read;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

pub fn http_get(addr: std::net::SocketAddr, path: &str) -> HttpResponse {
    http_request("GET", addr, path).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// The value of the sample whose series is exactly `series` in a text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// A loopback port that was free a moment ago (for programs that cannot report theirs).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a test that needs an external tool may run. Locally, a missing tool skips the
/// test with a line on stderr that libtest does not swallow; in CI (`CI` set), where
/// `.ci/run` installs the tool, a missing tool fails the test instead of passing silently.
pub fn tool_available(available: bool, test: &str, tool: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {tool} is required in CI (.ci/run installs it) but is missing");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {tool} is not installed");
    false
}

/// The accept queue of the loopback TCP listener on `port` (connections the kernel has
/// completed that the listening process has not `accept`ed yet), from `/proc/net/tcp`,
/// where a listening socket's `rx_queue` is its accept-queue length. `None` when no
/// listener on that port is found.
pub fn accept_queue(port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
        // State 0A is LISTEN; the local address is HEXIP:HEXPORT.
        let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
        if *state != "0A" || local_port != port {
            return None;
        }
        u32::from_str_radix(queues.split(':').nth(1)?, 16).ok()
    })
}

/// How many descriptors process `pid` has open (`/proc/PID/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Waits for `child` (its stderr piped) at most `limit`, killing it past that: its exit
/// status (`None` when it had to be killed) and everything it wrote to stderr.
pub fn wait_bounded(
    mut child: Child,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status, stderr)
}
