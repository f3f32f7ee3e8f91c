//! Engine cost per check and `simulate` throughput.
//!
//! Run: `cargo bench --bench engine` (release build). Prints medians of 7 runs.
//! Not a test: timings are recorded in docs/BENCHMARKS.md, never asserted.

use std::io::Write;
use std::time::{Duration, Instant};

use rollbackd::core::check::{CheckResult, ProbeOutcome, Sample, Snapshot, SnapshotOutcome};
use rollbackd::core::engine::Engine;

const RUNS: usize = 7;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

/// A deterministic mix: mostly healthy, some degraded, occasional probe failures and
/// provider errors, never three breaches in a window (so no action stops the replay).
fn check_for(i: u64) -> CheckResult {
    let rate = match i % 10 {
        0 => 0.25,
        3 => 0.08,
        _ => 0.01 + (i % 7) as f64 / 1000.0,
    };
    let snapshot = if i % 97 == 0 {
        SnapshotOutcome::Unavailable {
            reason: "timeout".into(),
        }
    } else {
        SnapshotOutcome::Values(Snapshot {
            error_rate: Sample::Number(rate),
            requests: Sample::Number(1000.0),
            latency_p95_ms: Sample::Number(180.0),
            ..Snapshot::default()
        })
    };
    CheckResult {
        probe: if i % 31 == 0 {
            ProbeOutcome::failed("timeout")
        } else {
            ProbeOutcome::Ok
        },
        snapshot,
        resources: None,
    }
}

fn bench_engine() {
    const CHECKS: u64 = 2_000_000;
    let checks: Vec<CheckResult> = (0..1000).map(check_for).collect();
    let mut per_check = Vec::new();
    for _ in 0..RUNS {
        let mut engine = Engine::new(rollbackd::config::default_rules(), None);
        let start = Instant::now();
        let mut actions = 0u64;
        for i in 0..CHECKS {
            let decision = engine.observe(Duration::from_secs(i), &checks[(i % 1000) as usize]);
            actions += decision.action.is_some() as u64;
        }
        let elapsed = start.elapsed();
        assert_eq!(actions, 0, "the bench mix must not trigger actions");
        per_check.push(elapsed.as_nanos() as f64 / CHECKS as f64);
    }
    println!(
        "engine: {:.0} ns per check (median of {RUNS} runs of {CHECKS} checks, window 5)",
        median(per_check)
    );
}

fn bench_simulate() {
    const CHECKS: u64 = 1_000_000;
    let dir = std::env::temp_dir().join(format!("rollbackd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    let config = dir.join("bench.toml");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&trace).unwrap());
        writeln!(
            out,
            r#"{{"baseline": {{"failureRate": 0.05, "latencyP95Ms": 180}}}}"#
        )
        .unwrap();
        for i in 0..CHECKS {
            let rate = match i % 10 {
                0 => 0.25,
                3 => 0.08,
                _ => 0.01 + (i % 7) as f64 / 1000.0,
            };
            let probe = if i % 31 == 0 { "failed" } else { "ok" };
            writeln!(
                out,
                r#"{{"at": {}, "probe": "{probe}", "snapshot": {{"failureRate": {rate}, "requests": 1000, "latencyP95Ms": 180}}}}"#,
                (i + 1) as f64 / 2.0
            )
            .unwrap();
        }
    }
    // Long enough a grace period that all checks are evaluated (checks every 0.5 s: a
    // million fit in the 7-day bound of grace_period).
    std::fs::write(&config, "[monitor]\ngrace_period = \"7days\"\n").unwrap();
    let binary = env!("CARGO_BIN_EXE_rollbackd");
    for json in [true, false] {
        let mut seconds = Vec::new();
        for _ in 0..RUNS {
            let mut command = std::process::Command::new(binary);
            command
                .arg("--config")
                .arg(&config)
                .args(["simulate", "--trace"])
                .arg(&trace)
                .stdout(std::process::Stdio::null());
            if json {
                command.arg("--json");
            }
            let start = Instant::now();
            let status = command.status().unwrap();
            seconds.push(start.elapsed().as_secs_f64());
            assert!(status.success());
        }
        let m = median(seconds);
        println!(
            "simulate{}: {:.2} s for {CHECKS} checks ({:.2} M checks/s; median of {RUNS} runs, output to /dev/null)",
            if json { " --json" } else { "" },
            m,
            CHECKS as f64 / m / 1e6
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    bench_engine();
    bench_simulate();
}
