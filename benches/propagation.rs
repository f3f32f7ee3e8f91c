//! Kill-switch propagation: how long after another process's `COMMIT` to `settings` does
//! a reader in this process see it?
//!
//! `cargo bench --bench propagation` re-executes this binary as a writer child process
//! (`ROLLBACKD_PROPAGATION_WRITER=<db>`), which commits a sequence number under one key
//! through `SettingsStore` at random 30–80 ms intervals and prints `seq unix_ns` right
//! after each `COMMIT` returns. This process observes the same database with
//!
//! - (a) `LiveFlags` as shipped: woken by the kernel (inotify) on a commit,
//! - (b) `LiveFlags` polling `PRAGMA data_version` every 20 ms (the previous release),
//! - (c) a naive reader re-reading the whole table every 500 ms (the seed design),
//!
//! and records, for every commit, the first wall-clock time a reader saw that commit or a
//! later one (a later sequence number means the earlier commit's effect has arrived).
//! A sequence number rather than `DISABLE_NEW` itself is written so that every commit
//! can be told apart; the path from commit to observation is the same for any key.
//!
//! Then two more measurements:
//! - **idle CPU**: (a) and (b) each alone for `ROLLBACKD_PROPAGATION_IDLE_SECS` (60) with no
//!   commit, the `liveflags` thread's CPU time from `/proc/self/task/*/schedstat`;
//! - **rapid commits**: the writer commits `ROLLBACKD_PROPAGATION_RAPID` (10,000) times as
//!   fast as it can; (a) must end on the last value.
//!
//! Environment: `ROLLBACKD_PROPAGATION_COMMITS` (default 1000) sets the number of commits.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rollbackd::appdb::settings::{SettingsReader, SettingsStore};
use rollbackd::flags::{LiveFlags, LiveFlagsOptions};

const WRITER_ENV: &str = "ROLLBACKD_PROPAGATION_WRITER";
const COMMITS_ENV: &str = "ROLLBACKD_PROPAGATION_COMMITS";
const SEQ_KEY: &str = "PROPAGATION_SEQ";
const NAIVE_INTERVAL: Duration = Duration::from_millis(500);
const LIVEFLAGS_POLL: Duration = Duration::from_millis(20);

fn main() {
    let n_commits: u64 = std::env::var(COMMITS_ENV)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1000);
    if let Ok(db) = std::env::var(WRITER_ENV) {
        if std::env::var_os(RAPID_WRITER_ENV).is_some() {
            run_rapid_writer(Path::new(&db), n_commits);
        } else {
            run_writer(Path::new(&db), n_commits);
        }
        return;
    }
    run_bench(n_commits);
    let idle_secs = env_number("ROLLBACKD_PROPAGATION_IDLE_SECS", 60);
    idle_cpu(Duration::from_secs(idle_secs));
    rapid_commits(env_number("ROLLBACKD_PROPAGATION_RAPID", 10_000));
}

static NAIVE_BUSY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

const RAPID_WRITER_ENV: &str = "ROLLBACKD_PROPAGATION_RAPID_WRITER";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}

/// The rapid writer child: `n` commits back to back.
fn run_rapid_writer(db: &Path, n: u64) {
    let mut store = SettingsStore::open(db).expect("writer: opening the database");
    for seq in 1..=n {
        store
            .write_until_landed(SEQ_KEY, &seq.to_string(), |_, _| true)
            .expect("writer: writing");
    }
}

/// Nanoseconds of CPU the threads named `liveflags` of this process have used.
fn liveflags_cpu_ns() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != "liveflags" {
            continue;
        }
        let schedstat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
        total += schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn idle_cpu(span: Duration) {
    println!();
    println!("idle CPU of the reader thread over {span:?} with no commit (a core = 100%)");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("app.db");
    SettingsStore::open(&db)
        .and_then(|mut store| store.write_once(SEQ_KEY, "0"))
        .expect("creating the database");
    let mut results = Vec::new();
    for (name, options) in [
        (
            "(a) LiveFlags, woken by inotify",
            LiveFlagsOptions::default(),
        ),
        (
            "(b) LiveFlags, data_version every 20 ms",
            LiveFlagsOptions {
                poll_interval: LIVEFLAGS_POLL,
                watch_files: false,
                ..LiveFlagsOptions::default()
            },
        ),
    ] {
        let flags = LiveFlags::start(&db, options);
        std::thread::sleep(Duration::from_millis(500));
        let before = liveflags_cpu_ns();
        std::thread::sleep(span);
        let used = liveflags_cpu_ns() - before;
        drop(flags);
        let percent = used as f64 / span.as_nanos() as f64 * 100.0;
        println!(
            "{name:<42} {:>9.4}% ({:.2} ms of CPU)",
            percent,
            used as f64 / 1e6
        );
        results.push(percent);
    }
    println!(
        "{:<42} {:>8.1}x",
        "ratio (b) / (a)",
        results[1] / results[0].max(1e-9)
    );
}

fn rapid_commits(n: u64) {
    println!();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("app.db");
    SettingsStore::open(&db)
        .and_then(|mut store| store.write_once(SEQ_KEY, "0"))
        .expect("creating the database");
    let flags = LiveFlags::start(&db, LiveFlagsOptions::default());
    let mut snapshots = flags.subscribe();
    let started = Instant::now();
    let status = Command::new(std::env::current_exe().expect("current exe"))
        .env(WRITER_ENV, &db)
        .env(RAPID_WRITER_ENV, "1")
        .env(COMMITS_ENV, n.to_string())
        .status()
        .expect("running the rapid writer");
    assert!(status.success(), "the rapid writer failed: {status}");
    let wrote = started.elapsed();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    let mut snapshots_seen = 0u64;
    let last = runtime.block_on(async {
        loop {
            let seq = seq_of(&snapshots.borrow_and_update().rows);
            if seq >= n {
                return Some(seq);
            }
            match tokio::time::timeout(Duration::from_secs(5), snapshots.changed()).await {
                Ok(Ok(())) => snapshots_seen += 1,
                _ => return None,
            }
        }
    });
    match last {
        Some(seq) => println!(
            "rapid commits: {n} commits in {wrote:.1?} by another process; LiveFlags (a) ended on {seq} (the last), {:.1?} after the writer exited, through {snapshots_seen} snapshots",
            started.elapsed() - wrote
        ),
        None => {
            println!(
                "rapid commits: LiveFlags never saw the last of {n} commits (stuck at {})",
                seq_of(&flags.snapshot().rows)
            );
            std::process::exit(1);
        }
    }
}

fn unix_ns(at: SystemTime) -> i128 {
    at.duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as i128
}

/// The writer child: `n_commits` commits at random 30–80 ms intervals.
fn run_writer(db: &Path, n_commits: u64) {
    let mut store = SettingsStore::open(db).expect("writer: opening the database");
    // xorshift64, seeded from the clock: no dependency for a handful of random numbers.
    let mut state = (unix_ns(SystemTime::now()) as u64) | 1;
    let mut next_random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for seq in 1..=n_commits {
        std::thread::sleep(Duration::from_millis(30 + next_random() % 51));
        let report = store
            .write_until_landed(SEQ_KEY, &seq.to_string(), |_, _| true)
            .expect("writer: writing");
        writeln!(out, "{seq} {}", unix_ns(report.committed_at)).expect("writer: stdout");
        out.flush().expect("writer: stdout");
    }
}

fn seq_of(rows: &std::collections::BTreeMap<String, String>) -> u64 {
    rows.get(SEQ_KEY)
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn run_bench(n_commits: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("app.db");
    SettingsStore::open(&db)
        .and_then(|mut store| store.write_once(SEQ_KEY, "0"))
        .expect("creating the database");
    // The application's choice of journal mode: rollback journal (SQLite's default, what
    // SettingsStore creates), or WAL with ROLLBACKD_PROPAGATION_WAL=1.
    if std::env::var_os("ROLLBACKD_PROPAGATION_WAL").is_some() {
        let conn = rusqlite::Connection::open(&db).expect("opening for WAL");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("WAL");
    }
    let mode: String = rusqlite::Connection::open(&db)
        .and_then(|c| c.pragma_query_value(None, "journal_mode", |row| row.get(0)))
        .expect("journal mode");
    println!("journal mode of the application's database: {mode}");
    let give_up_at = Instant::now() + Duration::from_millis(80 * n_commits + 10_000);

    // (a) LiveFlags as shipped, and (b) at a 20 ms data_version poll; both observed
    // through their watch channel.
    let observe = |options: LiveFlagsOptions| {
        let (ready, ready_wait) = mpsc::channel();
        let db = db.clone();
        let handle = std::thread::spawn(move || {
            let flags = LiveFlags::start(&db, options);
            let mut snapshots = flags.subscribe();
            ready.send(()).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("tokio runtime");
            let mut observations: Vec<(u64, i128)> = Vec::new();
            runtime.block_on(async {
                loop {
                    let left = give_up_at.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, snapshots.changed()).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                    let seen_at = unix_ns(SystemTime::now());
                    let seq = seq_of(&snapshots.borrow_and_update().rows);
                    observations.push((seq, seen_at));
                    if seq >= n_commits {
                        break;
                    }
                }
            });
            observations
        });
        ready_wait.recv().unwrap();
        handle
    };
    // ROLLBACKD_PROPAGATION_EVENT_POLL=1: (a) polls every 20 ms too (to tell apart what
    // the event-driven reader costs the others).
    let event_observer = observe(
        if std::env::var_os("ROLLBACKD_PROPAGATION_EVENT_POLL").is_some() {
            LiveFlagsOptions {
                poll_interval: LIVEFLAGS_POLL,
                watch_files: false,
                ..LiveFlagsOptions::default()
            }
        } else {
            LiveFlagsOptions::default()
        },
    );
    let live_observer = observe(LiveFlagsOptions {
        poll_interval: LIVEFLAGS_POLL,
        watch_files: false,
        ..LiveFlagsOptions::default()
    });

    // (c) The seed design: re-read the whole table every 500 ms.
    let (naive_ready, naive_ready_wait) = mpsc::channel();
    let naive_observer = {
        let db = db.clone();
        std::thread::spawn(move || {
            let reader = SettingsReader::open(&db).expect("naive reader: opening");
            naive_ready.send(()).unwrap();
            let mut observations: Vec<(u64, i128)> = Vec::new();
            while Instant::now() < give_up_at {
                let rows = match reader.read_all() {
                    Ok(rows) => rows,
                    Err(error) if error.is_busy() => {
                        // An application reader with a 5 ms busy timeout found the
                        // database busy: counted (it should not happen), and retried.
                        NAIVE_BUSY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Err(error) => panic!("naive reader: reading: {error}"),
                };
                let seen_at = unix_ns(SystemTime::now());
                let seq = seq_of(&rows);
                observations.push((seq, seen_at));
                if seq >= n_commits {
                    break;
                }
                std::thread::sleep(NAIVE_INTERVAL);
            }
            observations
        })
    };
    naive_ready_wait.recv().unwrap();

    let started = Instant::now();
    let mut writer = Command::new(std::env::current_exe().expect("current exe"))
        .env(WRITER_ENV, &db)
        .env(COMMITS_ENV, n_commits.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the writer process");
    let writer_pid = writer.id();
    let mut commits: Vec<i128> = vec![0; n_commits as usize + 1];
    for line in BufReader::new(writer.stdout.take().unwrap()).lines() {
        let line = line.expect("reading the writer's output");
        let (seq, at) = line.split_once(' ').expect("writer line: seq unix_ns");
        commits[seq.parse::<usize>().unwrap()] = at.parse().unwrap();
    }
    let status = writer.wait().expect("waiting for the writer");
    assert!(status.success(), "the writer failed: {status}");
    let event = latencies(&commits, &event_observer.join().unwrap());
    let live = latencies(&commits, &live_observer.join().unwrap());
    let naive = latencies(&commits, &naive_observer.join().unwrap());
    let elapsed = started.elapsed();

    println!(
        "kill-switch propagation: {n_commits} commits by writer process {writer_pid} at random 30-80 ms intervals ({elapsed:.1?})"
    );
    println!("latency = first observation in this process - wall clock right after COMMIT returned in the writer");
    println!();
    println!(
        "{:<42} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "observer", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let event_row = summary(&event);
    let live_row = summary(&live);
    let naive_row = summary(&naive);
    print_row("(a) LiveFlags, woken by inotify", event.len(), &event_row);
    print_row(
        "(b) LiveFlags, data_version every 20 ms",
        live.len(),
        &live_row,
    );
    print_row(
        "(c) naive full re-read every 500 ms",
        naive.len(),
        &naive_row,
    );
    let ratio = |slow: &[f64; 4], fast: &[f64; 4], name: &str| {
        let ratios: Vec<f64> = slow
            .iter()
            .zip(fast)
            .map(|(slow, fast)| slow / fast.max(0.001))
            .collect();
        println!(
            "{name:<42} {:>5} {:>8.1}x {:>8.1}x {:>8.1}x {:>8.1}x",
            "", ratios[0], ratios[1], ratios[2], ratios[3]
        );
    };
    ratio(&live_row, &event_row, "ratio (b) / (a)");
    ratio(&naive_row, &event_row, "ratio (c) / (a)");
    println!(
        "busy answers to the 500 ms reader (a 5 ms busy timeout) while the others read: {}",
        NAIVE_BUSY.load(std::sync::atomic::Ordering::Relaxed)
    );
    let n_missing = |found: &Vec<f64>| n_commits as usize - found.len();
    if n_missing(&event) + n_missing(&live) + n_missing(&naive) > 0 {
        println!(
            "NOT OBSERVED: inotify {}, 20 ms {}, naive {}",
            n_missing(&event),
            n_missing(&live),
            n_missing(&naive)
        );
        std::process::exit(1);
    }
}

/// For each commit, ms from the commit to the first observation of it or a later one.
fn latencies(commits: &[i128], observations: &[(u64, i128)]) -> Vec<f64> {
    let mut latencies = Vec::new();
    for (seq, committed_at) in commits.iter().enumerate().skip(1) {
        if let Some((_, seen_at)) = observations
            .iter()
            .find(|(observed_seq, _)| *observed_seq >= seq as u64)
        {
            latencies.push((seen_at - committed_at) as f64 / 1e6);
        }
    }
    latencies
}

/// p50, p90, p99, max (nearest rank).
fn summary(latencies: &[f64]) -> [f64; 4] {
    if latencies.is_empty() {
        return [f64::NAN; 4];
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |fraction: f64| {
        let index = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[index - 1]
    };
    [rank(0.50), rank(0.90), rank(0.99), sorted[sorted.len() - 1]]
}

fn print_row(name: &str, n: usize, row: &[f64; 4]) {
    println!(
        "{name:<42} {n:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        row[0], row[1], row[2], row[3]
    );
}
