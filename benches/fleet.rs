//! The fleet kill switch's reach: N real `rollbackd run` daemons on loopback (default 50,
//! `RBD_FLEET_HOSTS`), each with its own state directory and application database, one
//! real etcd; time from the put of the fleet key (the one request `kill-switch set|reset
//! --fleet` makes, made here by the bench so the clock starts at the put) to the moment
//! each host's `settings` row holds the new value, read by one open read-only connection
//! per host polled in turn. Alternating sets and resets, `RBD_FLEET_ROUNDS` rounds
//! (default 20). Prints p50 / p99 / max over every host and round, and how long the
//! `kill-switch set --fleet` command itself takes (process start to exit).
//!
//! Run: `cargo bench --bench fleet` (needs `etcd`, Debian etcd-server). Loopback only.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::etcd::{etcd_installed, Etcd};
use common::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if !etcd_installed() {
        eprintln!("SKIP fleet bench: etcd is not installed (Debian etcd-server)");
        return;
    }
    let hosts = env_usize("RBD_FLEET_HOSTS", 50);
    let rounds = env_usize("RBD_FLEET_ROUNDS", 20);
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let setups: Vec<Setup> = (0..hosts)
        .map(|i| {
            Setup::new(&format!(
                "[fleet]\nendpoints = [\"{}\"]\nhost = \"bench-{i}\"\n",
                etcd.url()
            ))
        })
        .collect();
    let started = Instant::now();
    let daemons: Vec<Daemon> = setups.iter().map(Setup::start).collect();
    for setup in &setups {
        wait_for(Duration::from_secs(60), || {
            let out = setup.cli(&["status", "--json"]);
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            status["fleet"]["link"] == "connected"
        })
        .unwrap_or_else(|| panic!("not connected; log:\n{}", setup.daemon_log()));
    }
    eprintln!(
        "{hosts} daemons up and connected in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The command operators run: once each way, timed, so the figure below can be added
    // to it; every host must have it before the rounds start.
    let mut command_ms = Vec::new();
    for (action, want) in [("set", "1"), ("reset", "0")] {
        let t = Instant::now();
        let out = setups[0].cli(&[
            "kill-switch",
            action,
            "--fleet",
            "--reason",
            "bench warm-up",
        ]);
        command_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for setup in &setups {
            wait_for(Duration::from_secs(30), || {
                rollbackd::appdb::killswitch::read(&setup.path("app.db"), "DISABLE_NEW")
                    .ok()
                    .flatten()
                    .as_deref()
                    == Some(want)
            })
            .expect("warm-up mirrored");
        }
    }
    let readers: Vec<rollbackd::appdb::settings::SettingsReader> = setups
        .iter()
        .map(|s| rollbackd::appdb::settings::SettingsReader::open(&s.path("app.db")).unwrap())
        .collect();
    let read = |i: usize| readers[i].read("DISABLE_NEW").ok().flatten();
    let etcd_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", etcd.client_port).parse().unwrap();
    let put = |value: &str, reason: &str| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let record = serde_json::json!({"value": value, "operator": "bench", "reason": reason,
                                        "at": "2026-12-03T00:00:00.000Z"});
        let body = serde_json::json!({
            "key": b64.encode("/rollbackd/kill_switch"),
            "value": b64.encode(record.to_string()),
        })
        .to_string();
        let reply = http_request_body("POST", etcd_addr, "/v3/kv/put", &body).unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    };
    let mut samples: Vec<f64> = Vec::new();
    let mut worst_rounds: Vec<f64> = Vec::new();
    for round in 0..rounds {
        let want = if round % 2 == 0 { "1" } else { "0" };
        let t0 = Instant::now();
        put(want, &format!("bench round {round}"));
        let mut seen: Vec<Option<f64>> = vec![None; hosts];
        let deadline = t0 + Duration::from_secs(30);
        while seen.iter().any(Option::is_none) {
            assert!(
                Instant::now() < deadline,
                "round {round}: not every host mirrored it in 30 s"
            );
            for (i, slot) in seen.iter_mut().enumerate() {
                if slot.is_none() && read(i).as_deref() == Some(want) {
                    *slot = Some(t0.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        let times: Vec<f64> = seen.into_iter().flatten().collect();
        worst_rounds.push(times.iter().cloned().fold(0.0, f64::max));
        samples.extend(times);
        // Let the hosts' audit writes settle before the next round.
        std::thread::sleep(Duration::from_millis(200));
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "fleet kill switch, {hosts} daemons, {rounds} rounds (set/reset alternating), \
         etcd put → each host's settings row: \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} samples; slowest host per round: median {:.1} ms; \
         `kill-switch set|reset --fleet` itself: {:.0} / {:.0} ms",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0),
        samples.len(),
        {
            let mut w = worst_rounds.clone();
            w.sort_by(|a, b| a.partial_cmp(b).unwrap());
            percentile(&w, 0.5)
        },
        command_ms[0],
        command_ms[1]
    );
    drop(daemons);
}
