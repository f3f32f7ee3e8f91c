//! Rollback phase hooks against real processes: substitution without a shell, exit status,
//! bounded output, and no surviving processes after a timeout or a cancelled run.

use std::time::{Duration, Instant};

use rollbackd::sys::hooks::{run_hook, HookError, HookVars, TAIL_BYTES};

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

/// Running, i.e. neither gone nor a zombie waiting for an init that does not reap.
fn is_running(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z') || s.starts_with('X'))
        }
        Err(_) => false,
    }
}

async fn wait_until_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if !is_running(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn reason_with_shell_metacharacters_stays_one_literal_argument() {
    let vars = HookVars {
        from: "v2".into(),
        to: "v1".into(),
        reason: "error rate 42%; rm -rf / && echo $HOME `id` *".into(),
        operator: "uid:0(root)".into(),
    };
    let outcome = run_hook(
        &strings(&[
            "printf",
            "%s\\n",
            "{from}",
            "{to}",
            "{reason}",
            "by {operator}",
        ]),
        &vars,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(
        outcome.stdout_tail,
        "v2\nv1\nerror rate 42%; rm -rf / && echo $HOME `id` *\nby uid:0(root)\n"
    );
    assert_eq!(
        outcome.argv[4],
        "error rate 42%; rm -rf / && echo $HOME `id` *"
    );
}

#[tokio::test]
async fn exit_code_and_stderr_are_captured() {
    let outcome = run_hook(
        &strings(&["sh", "-c", "echo oops >&2; exit 7"]),
        &HookVars::default(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(outcome.exit_code, Some(7));
    assert_eq!(outcome.signal, None);
    assert!(!outcome.timed_out);
    assert!(!outcome.succeeded());
    assert_eq!(outcome.stderr_tail, "oops\n");
}

#[tokio::test]
async fn only_the_tail_of_a_megabyte_of_output_is_kept() {
    let script = "head -c 1048576 /dev/zero | tr '\\0' o; printf OUT-END; \
                  head -c 1048576 /dev/zero | tr '\\0' e >&2; printf ERR-END >&2";
    let outcome = run_hook(
        &strings(&["sh", "-c", script]),
        &HookVars::default(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(outcome.stdout_tail.len(), TAIL_BYTES);
    assert!(outcome.stdout_tail.ends_with("oooOUT-END"));
    assert_eq!(outcome.stderr_tail.len(), TAIL_BYTES);
    assert!(outcome.stderr_tail.ends_with("eeeERR-END"));
}

#[tokio::test]
async fn timeout_stops_the_whole_process_group() {
    let started = Instant::now();
    let outcome = run_hook(
        &strings(&["sh", "-c", "sleep 30 & echo $!; sleep 30"]),
        &HookVars::default(),
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(outcome.timed_out);
    assert!(!outcome.succeeded());
    assert_eq!(outcome.exit_code, None);
    assert_eq!(outcome.signal, Some(libc::SIGTERM));
    let grandchild: i32 = outcome
        .stdout_tail
        .trim()
        .parse()
        .expect("script echoes a pid");
    assert!(
        wait_until_gone(grandchild).await,
        "background sleep {grandchild} survived"
    );
}

#[tokio::test]
async fn timeout_escalates_to_sigkill_when_sigterm_is_ignored() {
    let started = Instant::now();
    let outcome = run_hook(
        &strings(&[
            "sh",
            "-c",
            "trap '' TERM; sleep 30 & echo $!; while :; do sleep 1; done",
        ]),
        &HookVars::default(),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    assert!(outcome.timed_out);
    assert_eq!(outcome.signal, Some(libc::SIGKILL));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    let grandchild: i32 = outcome
        .stdout_tail
        .trim()
        .parse()
        .expect("script echoes a pid");
    assert!(
        wait_until_gone(grandchild).await,
        "background sleep {grandchild} survived"
    );
}

#[tokio::test]
async fn dropping_the_run_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
    let task = tokio::spawn(async move {
        run_hook(
            &strings(&["sh", "-c", &script]),
            &HookVars::default(),
            Duration::from_secs(60),
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let grandchild: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "hook never wrote its pid file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(is_running(grandchild));
    task.abort();
    let _ = task.await;
    assert!(
        wait_until_gone(grandchild).await,
        "background sleep {grandchild} survived"
    );
}

#[tokio::test]
async fn background_process_holding_the_pipes_does_not_hold_up_the_hook() {
    let started = Instant::now();
    let outcome = run_hook(
        &strings(&["sh", "-c", "sleep 10 & echo $!"]),
        &HookVars::default(),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(outcome.succeeded(), "{outcome:?}");
    let leftover: i32 = outcome.stdout_tail.trim().parse().unwrap();
    // Left alone on purpose (it may be intended); clean up after ourselves.
    assert!(is_running(leftover));
    // SAFETY: plain kill of a process this test started.
    unsafe { libc::kill(leftover, libc::SIGKILL) };
}

#[tokio::test]
async fn missing_program_is_a_spawn_error() {
    let error = run_hook(
        &strings(&["/nonexistent/switch-worker", "{to}"]),
        &HookVars::default(),
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    match &error {
        HookError::Spawn { program, source } => {
            assert_eq!(program, "/nonexistent/switch-worker");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
    assert!(error
        .to_string()
        .starts_with("cannot start /nonexistent/switch-worker: "));
}

#[tokio::test]
async fn empty_argv_is_refused() {
    let error = run_hook(&[], &HookVars::default(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(error, HookError::Empty));
}
