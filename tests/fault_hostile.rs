//! Proof under fire: a hostile worker and operations manager on loopback, through the
//! real daemon. Garbage, non-UTF-8, a 1 GiB body, a body that never ends, headers dribbled
//! a byte a second, NaN / -1 / 7 / "0.5" / 1e308 rates, deeply nested JSON. Zero crashes;
//! every check is recorded with its class (SPEC §2: `invalid` or `provider-error`) and its
//! raw text cut short; the loop keeps its cadence.
//!
//! (The adapters themselves are unit-tested in tests/adapters.rs.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How the server answers one path.
#[derive(Clone, Debug)]
enum Answer {
    /// 200 with this body and its Content-Length.
    Body(Vec<u8>),
    /// 200 declaring 1 GiB, streamed until the client hangs up.
    GiB(Vec<u8>),
    /// 200, chunked, one byte every 50 ms, never finished.
    Endless,
    /// The response head written one byte a second.
    DribbledHead,
}

#[derive(Clone)]
struct Hostile {
    snapshot: Arc<Mutex<Answer>>,
    health: Arc<Mutex<Answer>>,
}

/// Nothing here may run for long after its client left: every loop is bounded.
const SERVER_LIMIT: Duration = Duration::from_secs(30);

fn serve_hostile(hostile: Hostile) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let hostile = hostile.clone();
            std::thread::spawn(move || answer(stream, &hostile));
        }
    });
    port
}

fn answer(mut stream: TcpStream, hostile: &Hostile) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header == "\r\n" || header == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let answer = if path == "/snapshot" {
        hostile.snapshot.lock().unwrap().clone()
    } else {
        hostile.health.lock().unwrap().clone()
    };
    let started = Instant::now();
    match answer {
        Answer::Body(body) => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
        Answer::GiB(prefix) => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                1u64 << 30
            );
            if stream.write_all(&prefix).is_err() {
                return;
            }
            let block = vec![b'a'; 64 * 1024];
            let mut sent = prefix.len() as u64;
            while sent < (1 << 30) && started.elapsed() < SERVER_LIMIT {
                if stream.write_all(&block).is_err() {
                    return; // the client stopped reading at its limit
                }
                sent += block.len() as u64;
            }
        }
        Answer::Endless => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            );
            let _ = stream.write_all(b"1\r\n{\r\n");
            while started.elapsed() < SERVER_LIMIT {
                if stream.write_all(b"1\r\n \r\n").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Answer::DribbledHead => {
            let head =
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
            for byte in head {
                if stream.write_all(&[*byte]).is_err() || started.elapsed() > SERVER_LIMIT {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

struct Case {
    name: &'static str,
    snapshot: Answer,
    health: Answer,
    /// The `errorClass` every check of the case must have.
    error_class: &'static str,
    /// The `probe` field every check must have.
    probe: &'static str,
}

fn body(text: &str) -> Answer {
    Answer::Body(text.as_bytes().to_vec())
}

fn nested(depth: usize) -> String {
    format!(
        r#"{{"failureRate": 0.01, "requests": 1000, "extra": {}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

fn cases() -> Vec<Case> {
    let ok_health = body(r#"{"status":"ok"}"#);
    let rate = |r: &str| body(&format!(r#"{{"failureRate": {r}, "requests": 1000}}"#));
    let snapshot_case = |name, snapshot, error_class| Case {
        name,
        snapshot,
        health: ok_health.clone(),
        error_class,
        probe: "ok",
    };
    let good = rate("0.01");
    vec![
        snapshot_case("garbage", body("}{ not json <html>"), "invalid"),
        snapshot_case(
            "non-UTF-8",
            Answer::Body(vec![0xff, 0xfe, b'{', 0xc3, 0x28, 0x80, b'}', 0xf5]),
            "invalid",
        ),
        snapshot_case(
            "1 GiB body",
            Answer::GiB(br#"{"failureRate": 0.01, "pad": ""#.to_vec()),
            "invalid",
        ),
        snapshot_case("never-ending body", Answer::Endless, "provider-error"),
        snapshot_case("dribbled headers", Answer::DribbledHead, "provider-error"),
        snapshot_case("NaN", rate("NaN"), "invalid"),
        snapshot_case("-1", rate("-1"), "invalid"),
        snapshot_case("7", rate("7"), "invalid"),
        snapshot_case("\"0.5\"", rate("\"0.5\""), "invalid"),
        snapshot_case("1e308", rate("1e308"), "invalid"),
        // 100k-deep nesting in a field rollbackd does not read is skipped without recursion:
        // the fields it does read still count.
        snapshot_case("deeply nested unknown field", body(&nested(100_000)), "ok"),
        snapshot_case(
            "deeply nested rate",
            body(&format!(r#"{{"failureRate": {}"#, "[".repeat(100_000))),
            "invalid",
        ),
        // The worker's health RPC misbehaving (with a good snapshot).
        Case {
            name: "probe: garbage 2xx",
            snapshot: good.clone(),
            health: Answer::Body(vec![0xff, 0x00, b'<', b'h', 0xfe]),
            error_class: "ok",
            probe: "ok",
        },
        Case {
            name: "probe: never-ending body",
            snapshot: good.clone(),
            health: Answer::Endless,
            error_class: "ok",
            probe: "failed",
        },
        Case {
            name: "probe: dribbled headers",
            snapshot: good.clone(),
            health: Answer::DribbledHead,
            error_class: "ok",
            probe: "failed",
        },
        Case {
            name: "probe: deeply nested",
            snapshot: good,
            health: body(&nested(100_000)),
            error_class: "ok",
            probe: "ok",
        },
    ]
}

fn check_lines(setup: &Setup) -> Vec<Value> {
    setup.events("health-check")
}

#[test]
fn hostile_probe_and_snapshot_answers_are_classified_recorded_short_and_keep_the_cadence() {
    let hostile = Hostile {
        snapshot: Arc::new(Mutex::new(body(
            r#"{"failureRate": 0.01, "requests": 1000}"#,
        ))),
        health: Arc::new(Mutex::new(body(r#"{"status":"ok"}"#))),
    };
    let port = serve_hostile(hostile.clone());
    // Shadow mode: the daemon judges every check but takes no action, so one session sees
    // every case. Intervals as in Setup: 300 ms, 150 ms when degraded, 250 ms timeout.
    let setup = Setup::new(&format!(
        "[rules]\ndry_run = true\n[worker]\nhealth_url = \"http://127.0.0.1:{port}/{{worker}}/health\"\n\
         [operations]\nsnapshot_url = \"http://127.0.0.1:{port}/snapshot\"\n"
    ));
    let daemon = setup.start();
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(out.status.success());
    wait_for(Duration::from_secs(10), || !check_lines(&setup).is_empty()).expect("checks run");

    let run_started = Instant::now();
    let checks_before = check_lines(&setup).len();
    for case in cases() {
        *hostile.snapshot.lock().unwrap() = case.snapshot.clone();
        *hostile.health.lock().unwrap() = case.health.clone();
        // The first check after the switch may have begun before it: skip one, then look
        // at three.
        let from = check_lines(&setup).len() + 1;
        let seen = wait_for(Duration::from_secs(10), || {
            check_lines(&setup).len() >= from + 3
        });
        assert!(
            seen.is_some(),
            "{}: the loop stopped checking; log:\n{}",
            case.name,
            setup.daemon_log()
        );
        let lines = check_lines(&setup);
        let window = &lines[from..from + 3];
        for line in window {
            assert_eq!(
                line["errorClass"], case.error_class,
                "{}: {line}",
                case.name
            );
            assert_eq!(line["probe"], case.probe, "{}: {line}", case.name);
            let text = line.to_string();
            assert!(
                text.len() < 4096,
                "{}: raw text not cut: a {}-byte audit line",
                case.name,
                text.len()
            );
            if case.error_class == "invalid" {
                // The raw value is kept (truncated) for the reader.
                let rate = &line["check"]["snapshot"]["errorRate"];
                assert!(
                    rate["kind"] == "wrong" || rate["kind"] == "number",
                    "{}: raw value not recorded: {line}",
                    case.name
                );
                if let Some(raw) = rate["value"].as_str() {
                    assert!(raw.len() <= 300, "{}: raw text not cut: {raw}", case.name);
                }
            }
        }
        assert_cadence(case.name, &lines[from - 1..from + 3]);
        eprintln!("{}: ok", case.name);
    }
    // Over the whole run: the count of checks is what the intervals allow (no burst, no
    // stall), judged on the daemon's own timestamps.
    let lines = check_lines(&setup);
    let run = &lines[checks_before.saturating_sub(1)..];
    assert_cadence("the whole run", run);
    let n_checks = run.len();
    let elapsed = run_started.elapsed();
    eprintln!("{n_checks} checks in {elapsed:?}");
    assert!(
        daemon_alive(&setup),
        "the daemon died; log:\n{}",
        setup.daemon_log()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// The shortest interval between the starts of two checks (the degraded interval in
/// Setup: 150 ms; healthy checks are 300 ms apart).
const SHORTEST_INTERVAL: Duration = Duration::from_millis(150);
/// The longest a check may take (Setup's check timeout).
const CHECK_TIMEOUT: Duration = Duration::from_millis(250);
/// The longest interval (Setup's check interval).
const LONGEST_INTERVAL: Duration = Duration::from_millis(300);
/// Room for a loaded machine: the daemon, the hostile server and the test share 2 cores
/// with whatever else runs. A real stall (a check that never ends, a loop that stopped
/// scheduling) is far longer.
const LOAD_SLACK: Duration = Duration::from_secs(3);
/// The audit timestamps have millisecond precision.
const ROUNDING: Duration = Duration::from_millis(2);

/// The cadence the contract promises (ARCHITECTURE: the next check is scheduled from the
/// start of the last one; a slow check never causes a burst of catch-up checks), in a
/// form load cannot break. A check that starts right after a late one is correct, so two
/// consecutive `health-check` lines may be a few milliseconds apart. But check `i + 1`
/// starts only after line `i` was stamped, and check `i + 2` starts at least one interval
/// after check `i + 1` did, so line `i + 2` is always more than one interval after line
/// `i`: no three checks within one interval, and `n` lines span at least `n - 2`
/// intervals (at most span / interval + 2 checks). No stall: consecutive lines are at
/// most an interval plus a check timeout apart, plus generous slack for load.
fn assert_cadence(name: &str, lines: &[Value]) {
    let at: Vec<std::time::SystemTime> = lines
        .iter()
        .map(|line| humantime::parse_rfc3339(line["timestamp"].as_str().unwrap()).unwrap())
        .collect();
    let gap = |a: usize, b: usize| at[b].duration_since(at[a]).unwrap_or_default();
    for i in 0..at.len().saturating_sub(2) {
        assert!(
            gap(i, i + 2) + ROUNDING >= SHORTEST_INTERVAL,
            "{name}: a burst: checks {} and {} only {:?} apart (at least {SHORTEST_INTERVAL:?})",
            lines[i]["checkIndex"],
            lines[i + 2]["checkIndex"],
            gap(i, i + 2)
        );
    }
    let stall = LONGEST_INTERVAL + CHECK_TIMEOUT + LOAD_SLACK;
    for i in 0..at.len().saturating_sub(1) {
        assert!(
            gap(i, i + 1) <= stall,
            "{name}: a stall: {:?} between checks {} and {} (at most {stall:?})",
            gap(i, i + 1),
            lines[i]["checkIndex"],
            lines[i + 1]["checkIndex"]
        );
    }
    if at.len() >= 2 {
        let span = gap(0, at.len() - 1) + ROUNDING;
        let most = (span.as_millis() / SHORTEST_INTERVAL.as_millis()) as usize + 2;
        assert!(
            lines.len() <= most,
            "{name}: a burst: {} checks in {span:?} (at most {most})",
            lines.len()
        );
    }
}

fn daemon_alive(setup: &Setup) -> bool {
    setup.cli(&["status", "--json"]).status.success()
}

/// `assert_cadence` itself: a late check followed at once by a quick one passes (the
/// flake of the old per-gap bound: "6ms between two checks"), while a catch-up burst
/// and a stall fail.
#[test]
fn the_cadence_check_allows_a_check_right_after_a_late_one_but_not_a_burst_or_a_stall() {
    fn lines(offsets_ms: &[u64]) -> Vec<Value> {
        let start = humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        offsets_ms
            .iter()
            .enumerate()
            .map(|(index, ms)| {
                let at = start + Duration::from_millis(*ms);
                serde_json::json!({
                    "checkIndex": index,
                    "timestamp": humantime::format_rfc3339_millis(at).to_string(),
                })
            })
            .collect()
    }
    let fails = |offsets: &[u64]| {
        let lines = lines(offsets);
        std::panic::catch_unwind(|| assert_cadence("synthetic", &lines)).is_err()
    };
    // A check that hit the 250 ms timeout (its line at 400), the next one started at once
    // and took 6 ms, then the schedule goes on from that start.
    assert!(!fails(&[0, 150, 400, 406, 556, 706]));
    // Three checks within one interval: catch-up.
    assert!(fails(&[0, 150, 400, 406, 410, 560]));
    // A stall of 4 s.
    assert!(fails(&[0, 150, 4300, 4450]));
}
