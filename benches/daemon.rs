//! Daemon figures: manual rollback overhead (CLI to artifact), RSS and CPU while
//! monitoring at a 100 ms interval, the floor under that CPU (the least any program
//! doing a check's work can cost here), and the delay from an error spike to the switch
//! hook.
//!
//! Run: `cargo bench --bench daemon` (or `-- rollback`, `-- monitoring`, `-- floor`,
//! `-- detection` for one part). Loopback only; about three minutes.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use common::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn manual_rollback_overhead() {
    let setup = Setup::new("[rollback]\nswitch_command = [\"/bin/true\", \"{to}\"]\nverify_interval = \"10ms\"\n[monitor]\ncheck_interval = \"10s\"\ndegraded_check_interval = \"5s\"\ncheck_timeout = \"1s\"");
    let _daemon = setup.start();
    let mut times = Vec::new();
    for i in 0..30 {
        let (active, previous) = if i % 2 == 0 {
            ("v2", "v1")
        } else {
            ("v1", "v2")
        };
        let out = setup.cli(&["promote", "--active", active, "--previous", previous]);
        assert!(out.status.success());
        let before = setup.artifacts("rollback_").len();
        let start = Instant::now();
        let out = setup.cli(&["rollback", "--reason", "bench", "--yes"]);
        let elapsed = start.elapsed().as_secs_f64() * 1000.0;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            setup.artifacts("rollback_").len(),
            before + 1,
            "the artifact exists when the CLI returns"
        );
        times.push(elapsed);
    }
    println!(
        "manual rollback, no-op hooks, `rollbackd rollback --yes` start to exit (artifact written): median {:.1} ms, p90 {:.1} ms, max {:.1} ms over {} runs",
        median(times.clone()),
        percentile(times.clone(), 0.9),
        percentile(times.clone(), 1.0),
        times.len()
    );
}

fn proc_stat(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    (ticks as f64 / hz, rss_kb)
}

/// CPU time of each of the process's threads in nanoseconds (`/proc/PID/task/*/schedstat`,
/// the scheduler's own count: exact, where `/proc/PID/stat` counts 10 ms clock ticks).
fn thread_cpu_ns(pid: u32) -> std::collections::HashMap<String, u64> {
    let mut threads = std::collections::HashMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let tid = task.file_name().to_string_lossy().into_owned();
            if let Some(ns) = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
            {
                threads.insert(tid, ns);
            }
        }
    }
    threads
}

/// Seconds of CPU between two [`thread_cpu_ns`] readings: each thread's growth, a thread
/// born in between counted whole (a thread that ended in between — an idle blocking-pool
/// thread retiring — is missed, and was idle).
fn cpu_between(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> f64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

/// The binary measured as "this build": `RBD_BENCH_BIN`, or the one `cargo bench` built.
fn bench_bin() -> PathBuf {
    std::env::var_os("RBD_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN))
}

/// How many 10 s windows to measure: `RBD_BENCH_WINDOWS`, default 5.
fn bench_windows() -> usize {
    std::env::var("RBD_BENCH_WINDOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// `program` running and monitoring v2 at a 100 ms interval against its own loopback
/// worker (`keep_alive`: see [`monitoring_cost`]).
fn monitoring_daemon(program: &std::path::Path, keep_alive: bool) -> (Setup, Daemon) {
    let setup = Setup::with_server("[monitor]\ncheck_interval = \"100ms\"\ndegraded_check_interval = \"50ms\"\ncheck_timeout = \"50ms\"\ngrace_period = \"10m\"", keep_alive);
    let daemon = setup.start_program(program, |_| {});
    let out = std::process::Command::new(program)
        .arg("--config")
        .arg(&setup.config)
        .args(["promote", "--active", "v2", "--previous", "v1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (setup, daemon)
}

/// `keep_alive`: the loopback worker keeps connections open, as real HTTP servers do;
/// without it every probe and snapshot is a new TCP connection. With
/// `RBD_BENCH_BASELINE_BIN=path/to/older/rollbackd` that build runs beside this one,
/// each against its own worker, measured over the same windows (a ratio from one run).
///
/// `RBD_BENCH_BIN=path` measures that binary as "this build" instead of the one `cargo
/// bench` built: that one has tokio's `test-util` (a dev-dependency feature, unified into
/// every target cargo builds for a bench), which adds a wake-up to every blocking-pool
/// task. Build both with `cargo build --release` to measure what ships.
fn monitoring_cost(keep_alive: bool) {
    let this = bench_bin();
    let mut programs = vec![(format!("this build {}", this.display()), this)];
    if let Ok(older) = std::env::var("RBD_BENCH_BASELINE_BIN") {
        programs.push((format!("baseline {older}"), PathBuf::from(older)));
    }
    let windows = bench_windows();
    let runs: Vec<_> = programs
        .iter()
        .map(|(name, program)| {
            let (setup, daemon) = monitoring_daemon(program, keep_alive);
            (name.clone(), setup, daemon)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let window = Duration::from_secs(10);
    let mut cpu = vec![Vec::new(); runs.len()];
    let mut ticks = vec![Vec::new(); runs.len()];
    let mut rss = vec![Vec::new(); runs.len()];
    let mut checks = vec![Vec::new(); runs.len()];
    for _ in 0..windows {
        let before: Vec<_> = runs
            .iter()
            .map(|(_, setup, daemon)| {
                (
                    proc_stat(daemon.pid()).0,
                    setup.events("health-check").len(),
                    thread_cpu_ns(daemon.pid()),
                )
            })
            .collect();
        let start = Instant::now();
        std::thread::sleep(window);
        let elapsed = start.elapsed().as_secs_f64();
        for (i, (_, setup, daemon)) in runs.iter().enumerate() {
            let threads = thread_cpu_ns(daemon.pid());
            let (cpu_after, rss_kb) = proc_stat(daemon.pid());
            ticks[i].push((cpu_after - before[i].0) / elapsed * 100.0);
            cpu[i].push(cpu_between(&before[i].2, &threads) / elapsed * 100.0);
            rss[i].push(rss_kb as f64 / 1024.0);
            checks[i].push((setup.events("health-check").len() - before[i].1) as f64);
        }
    }
    for (i, (name, _, _)) in runs.iter().enumerate() {
        println!(
            "monitoring at a 100 ms interval, {name}, worker {}: CPU median {:.2}% of one core (min {:.2}%, max {:.2}%; schedstat), {:.1}% in clock ticks, RSS median {:.1} MB (max {:.1} MB), {:.0} checks per 10 s window; {windows} windows of 10 s",
            if keep_alive {
                "keeps connections open"
            } else {
                "closes each connection"
            },
            median(cpu[i].clone()),
            percentile(cpu[i].clone(), 0.0),
            percentile(cpu[i].clone(), 1.0),
            median(ticks[i].clone()),
            median(rss[i].clone()),
            percentile(rss[i].clone(), 1.0),
            median(checks[i].clone())
        );
    }
    if runs.len() == 2 {
        let ratios: Vec<f64> = cpu[1]
            .iter()
            .zip(&cpu[0])
            .map(|(old, new)| old / new)
            .collect();
        println!(
            "  baseline / this build CPU, per window: median {:.2}x (min {:.2}x, max {:.2}x)",
            median(ratios.clone()),
            percentile(ratios.clone(), 0.0),
            percentile(ratios, 1.0)
        );
    }
}

fn detection_delay() {
    let mut delays = Vec::new();
    for _ in 0..7 {
        let setup = Setup::new("[monitor]\ncheck_interval = \"100ms\"\ndegraded_check_interval = \"50ms\"\ncheck_timeout = \"50ms\"\ngrace_period = \"10m\"\n[rollback]\nswitch_command = [\"/bin/sh\", \"-c\", \"date +%s%N > \\\"$0\\\"\", \"SWITCHED\"]");
        // The hook writes the time it ran to <state dir's parent>/SWITCHED ($0 is relative to the daemon's cwd).
        let _daemon = setup.start();
        let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
        assert!(out.status.success());
        // A random phase against the check schedule.
        let jitter = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100;
        std::thread::sleep(Duration::from_millis(700 + jitter as u64));
        let onset = SystemTime::now();
        setup.routes.error_rate(0.6);
        let marker = std::env::current_dir().unwrap().join("SWITCHED");
        let seen = wait_for(Duration::from_secs(10), || {
            marker.exists()
                && std::fs::read_to_string(&marker)
                    .map(|t| !t.trim().is_empty())
                    .unwrap_or(false)
        });
        assert!(seen.is_some(), "no switch; log:\n{}", setup.daemon_log());
        let ns: u128 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::remove_file(&marker).unwrap();
        let onset_ns = onset
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        delays.push((ns.saturating_sub(onset_ns)) as f64 / 1e6);
    }
    println!(
        "error spike onset to switch hook at a 100 ms interval (3 breaching checks): median {:.0} ms, min {:.0} ms, max {:.0} ms over {} runs",
        median(delays.clone()),
        percentile(delays.clone(), 0.0),
        percentile(delays.clone(), 1.0),
        delays.len()
    );
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`), in nanoseconds.
fn thread_cpu_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One `GET` on a kept connection, by hand: the request in one write, the response read
/// until its `content-length` is in. The least an HTTP check can cost.
fn floor_get(stream: &mut std::net::TcpStream, path: &str, buf: &mut Vec<u8>) -> usize {
    use std::io::{Read, Write};
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the worker closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap();
            if buf.len() >= end + 4 + length {
                return length;
            }
        }
    }
}

/// The floor under a check: everything the contract asks of one check, done by the
/// simplest program — one thread, no runtime, blocking calls, the HTTP by hand — and the
/// daemon's own storage code for the record: `GET` health and `GET` snapshot on kept
/// loopback connections, the snapshot's JSON parsed, `/proc/meminfo` read, the check's row
/// committed to a `rollbackd.db` by `Store::insert_check` (WAL, `synchronous=NORMAL`) and
/// its audit line appended and fsynced by `Analytics::audit`, then a sleep to the next
/// 100 ms tick. Measured beside a real daemon (its own worker) over the same windows.
fn monitoring_floor() {
    use rollbackd::storage::audit::{Analytics, AuditEvent, AuditRecord};
    use rollbackd::storage::store::{CheckRow, SessionRow, SessionState, Store};
    let this = bench_bin();
    let windows = bench_windows();
    let (_setup, daemon) = monitoring_daemon(&this, true);

    let routes = Routes::default();
    routes.set("/v2/health", 200, r#"{"status":"ok"}"#);
    routes.error_rate(0.01);
    let port = serve_with(routes, true);
    let dir = tempfile::tempdir().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Per check: nanoseconds of the thread's CPU in HTTP, meminfo, db, audit, and all.
    let parts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<[u64; 5]>::new()));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let floor = {
        let stop = stop.clone();
        let parts = parts.clone();
        let path = dir.path().to_path_buf();
        std::thread::spawn(move || {
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let mut store = Store::open(&path.join("rollbackd.db")).unwrap();
            let session = "floor-v2";
            store
                .insert_session(&SessionRow {
                    id: session.into(),
                    active: "v2".into(),
                    previous: Some("v1".into()),
                    promoted_at_ms: 0,
                    state: SessionState::Monitoring,
                    paused: false,
                    pause_reason: None,
                    baseline_json: None,
                    operator: None,
                    ended_at_ms: None,
                    end_reason: None,
                    stability_json: None,
                })
                .unwrap();
            let mut analytics = Analytics::open(&path.join("analytics")).unwrap();
            let mut health = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut snapshot = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            health.set_nodelay(true).unwrap();
            snapshot.set_nodelay(true).unwrap();
            let mut buf = Vec::new();
            let meminfo = std::fs::File::open("/proc/meminfo").unwrap();
            let mut meminfo_buf = vec![0u8; 64 * 1024];
            let mut next = Instant::now();
            let mut index = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = thread_cpu_now();
                floor_get(&mut health, "/v2/health", &mut buf);
                let length = floor_get(&mut snapshot, "/snapshot", &mut buf);
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[buf.len() - length..]).unwrap();
                let t1 = thread_cpu_now();
                // Kept open and read from offset 0, as the daemon does.
                let meminfo_len = {
                    use std::os::unix::fs::FileExt;
                    let mut len = 0;
                    loop {
                        match meminfo
                            .read_at(&mut meminfo_buf[len..], len as u64)
                            .unwrap()
                        {
                            0 => break len,
                            n => len += n,
                        }
                    }
                };
                let t2 = thread_cpu_now();
                index += 1;
                let check_json = serde_json::json!({
                    "probe": {"outcome": "ok"},
                    "snapshot": {"outcome": "values", "errorRate": {"kind": "number", "value": body["failureRate"]},
                        "requests": {"kind": "number", "value": body["requests"]},
                        "latencyP95Ms": {"kind": "missing"}, "latencyP99Ms": {"kind": "missing"},
                        "memoryPercent": {"kind": "missing"}, "dbConnectionErrors": {"kind": "missing"}},
                    "resources": {"hostMemoryPercent": meminfo_len as f64 / 100.0,
                        "workerRssBytes": null, "workerOpenFiles": null}
                });
                store
                    .insert_check(&CheckRow {
                        session_id: session.into(),
                        check_index: index,
                        taken_at_ms: index * 100,
                        check_json: check_json.to_string(),
                        verdict: "healthy".into(),
                        failed: false,
                    })
                    .unwrap();
                let t3 = thread_cpu_now();
                let mut record =
                    AuditRecord::new(SystemTime::now(), AuditEvent::HealthCheck, Some(session));
                for (key, value) in [
                    ("action", serde_json::Value::Null),
                    ("checkIndex", index.into()),
                    ("errorClass", "ok".into()),
                    ("errorRate", body["failureRate"].clone()),
                    ("failurePattern", "none".into()),
                    ("probe", "ok".into()),
                    ("rules", serde_json::json!([])),
                    ("verdict", "healthy".into()),
                    ("worker", "v2".into()),
                ] {
                    record.fields.insert(key.into(), value);
                }
                analytics.audit(&record).unwrap();
                let t4 = thread_cpu_now();
                next += Duration::from_millis(100);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let t5 = thread_cpu_now();
                parts
                    .lock()
                    .unwrap()
                    .push([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t0]);
            }
        })
    };
    let floor_tid = tid_rx.recv().unwrap();
    eprintln!(
        "floor thread: tid {floor_tid}; daemon: pid {} (for `perf record -t`)",
        daemon.pid()
    );
    let floor_ns = || -> u64 {
        std::fs::read_to_string(format!("/proc/self/task/{floor_tid}/schedstat"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    std::thread::sleep(Duration::from_secs(2));
    let window = Duration::from_secs(10);
    let (mut daemon_cpu, mut floor_cpu, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..windows {
        let (d0, f0) = (thread_cpu_ns(daemon.pid()), floor_ns());
        let start = Instant::now();
        std::thread::sleep(window);
        let elapsed = start.elapsed().as_secs_f64();
        let d = cpu_between(&d0, &thread_cpu_ns(daemon.pid())) / elapsed * 100.0;
        let f = (floor_ns() - f0) as f64 / 1e9 / elapsed * 100.0;
        daemon_cpu.push(d);
        floor_cpu.push(f);
        ratios.push(d / f);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    floor.join().unwrap();
    let parts = parts.lock().unwrap();
    let part = |i: usize| median(parts.iter().map(|p| p[i] as f64 / 1000.0).collect());
    let total = part(4);
    println!(
        "the floor under a check at a 100 ms interval (one thread, blocking calls, HTTP by hand, the daemon's storage code): CPU median {:.2}% of one core (min {:.2}%, max {:.2}%); per check, medians: {:.0} us in all = HTTP (two GETs, JSON) {:.0} us + /proc/meminfo {:.0} us + rollbackd.db row {:.0} us + audit line with fdatasync {:.0} us + the sleep and wake-up {:.0} us; {} checks",
        median(floor_cpu.clone()),
        percentile(floor_cpu.clone(), 0.0),
        percentile(floor_cpu.clone(), 1.0),
        total,
        part(0),
        part(1),
        part(2),
        part(3),
        total - part(0) - part(1) - part(2) - part(3),
        parts.len()
    );
    println!(
        "  beside it, {}: CPU median {:.2}% (min {:.2}%, max {:.2}%); daemon / floor per window: median {:.2}x (min {:.2}x, max {:.2}x); {windows} windows of 10 s",
        this.display(),
        median(daemon_cpu.clone()),
        percentile(daemon_cpu.clone(), 0.0),
        percentile(daemon_cpu.clone(), 1.0),
        median(ratios.clone()),
        percentile(ratios.clone(), 0.0),
        percentile(ratios.clone(), 1.0),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo bench --bench daemon -- monitoring` runs only the parts named.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| name.contains(w.as_str()));
    if run("rollback") {
        manual_rollback_overhead();
    }
    if run("monitoring") {
        monitoring_cost(true);
        monitoring_cost(false);
    }
    if run("floor") {
        monitoring_floor();
    }
    if run("detection") {
        detection_delay();
    }
}
