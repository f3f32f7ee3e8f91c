//! Processes a hook left behind, found again after a restart.
//!
//! A hook runs in its own process group with `ROLLBACKD_HOOK_RUN=<token>` in its
//! environment, and `rollbackd.db` records the token before the hook starts and the group
//! (the leader's pid and start time, and the boot) right after. After a `kill -9` the hook
//! is orphaned but still running; the restarted daemon finds it by either mark:
//!
//! - a process whose environment holds the token (children inherit it, even those that
//!   left the group), or
//! - in the same boot, a member of the recorded group that started no earlier than its
//!   leader, unless a process with the leader's pid exists with another start time (the
//!   pid was reused, so the group is somebody else's).
//!
//! Signals go through a pidfd opened and then checked against the start time seen in the
//! scan, so a pid reused between the scan and the signal is never hit.

use std::path::Path;

/// The environment variable that marks a hook's processes.
pub const HOOK_RUN_ENV: &str = "ROLLBACKD_HOOK_RUN";

/// This boot's id (`/proc/sys/kernel/random/boot_id`), if the kernel tells.
pub fn boot_id() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = text.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// One process, as `/proc/PID/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub pgrp: i32,
    /// Start time in clock ticks after boot: with the pid, names one process for good.
    pub start_ticks: u64,
}

/// `/proc/PID/stat` of a live (not zombie) process.
pub fn stat(pid: i32) -> Option<Proc> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

/// Parses `/proc/PID/stat`; `None` for a zombie or an unreadable line. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(pid: i32, text: &str) -> Option<Proc> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let state = *fields.first()?;
    if state == "Z" || state == "X" {
        return None;
    }
    Some(Proc {
        pid,
        pgrp: fields.get(5 - 3)?.parse().ok()?,
        start_ticks: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// Whether `/proc/PID/environ` holds `name=value` (false when it cannot be read: another
/// user's process, or gone).
fn has_env(pid: i32, name: &str, value: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{name}={value}");
    environ
        .split(|byte| *byte == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// The group a hook ran in, as recorded when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub pgid: i32,
    pub leader_start_ticks: u64,
}

/// The live processes of the hook run marked `token` that a restart must wait for: the
/// hook's own process (the leader of the group it was started in, `group`, checked by its
/// start time and its `token`) and, while that leader still runs, the members of its
/// process group. Never this process.
///
/// A process the hook left behind on purpose — a worker started with `setsid nohup`, in a
/// session and group of its own, or anything still running after the hook itself exited —
/// is not the hook: in a normal run rollbackd leaves such processes alone, and a restart
/// must not kill them either (it would kill the very worker the switch started). It still
/// carries `ROLLBACKD_HOOK_RUN` in its environment; that mark alone no longer makes it an
/// orphan. Without `group` (a hook of another boot, or a record from before groups were
/// kept) nothing from that run can be alive as the hook itself, so nothing is returned.
pub fn hook_processes(token: &str, group: Option<Group>) -> Vec<Proc> {
    let Some(group) = group.filter(|group| group.pgid > 1) else {
        return Vec::new();
    };
    let own = std::process::id() as i32;
    // The hook itself, still running, still the same process.
    let leader_runs = stat(group.pgid).is_some_and(|leader| {
        leader.start_ticks == group.leader_start_ticks
            && leader.pid != own
            && env_matches_or_unreadable(leader.pid, token)
    });
    if !leader_runs {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(Path::new("/proc")) else {
        return Vec::new();
    };
    let mut found: Vec<Proc> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own && *pid > 1)
        .filter_map(stat)
        .filter(|proc| proc.pgrp == group.pgid && proc.start_ticks >= group.leader_start_ticks)
        .collect();
    found.sort_by_key(|proc| proc.pid);
    found
}

/// Whether `pid` carries `ROLLBACKD_HOOK_RUN=token`, or its environment cannot be read
/// (another user's process: the start time already pinned it).
fn env_matches_or_unreadable(pid: i32, token: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(_) => has_env(pid, HOOK_RUN_ENV, token),
        Err(_) => true,
    }
}

/// Sends `signal` to `proc` if it is still the same process (same pid and start time).
pub fn signal(proc: Proc, signal: libc::c_int) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, proc.pid, 0) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENOSYS) && stat(proc.pid) == Some(proc) {
            // A kernel before 5.3: a plain kill after the check, with its small race.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(proc.pid, signal) };
        }
        return;
    }
    let fd = fd as libc::c_int;
    // The pidfd pins the process: if it is still the one scanned, the signal reaches it.
    if stat(proc.pid) == Some(proc) {
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let line = "4242 (a (weird) name) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse_stat(4242, line),
            Some(Proc {
                pid: 4242,
                pgrp: 4240,
                start_ticks: 987654
            })
        );
        let zombie = "4243 (sh) Z 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987655 0 0";
        assert_eq!(parse_stat(4243, zombie), None);
        assert_eq!(parse_stat(1, "garbage"), None);
    }

    /// Spawns `sleep 30` marked with `token`, as the leader of a process group of its
    /// own (as hooks run), and waits until it has exec'd (before that /proc shows the
    /// parent's environment).
    fn marked_leader(token: &str) -> (std::process::Child, Group) {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("sleep")
            .arg("30")
            .env(HOOK_RUN_ENV, token)
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !has_env(pid, HOOK_RUN_ENV, token) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let leader = stat(pid).unwrap();
        (
            child,
            Group {
                pgid: pid,
                leader_start_ticks: leader.start_ticks,
            },
        )
    }

    #[test]
    fn the_hook_itself_is_found_and_stopped() {
        let token = format!("test-{}", std::process::id());
        let (mut child, group) = marked_leader(&token);
        let found = hook_processes(&token, Some(group));
        assert_eq!(
            found.iter().map(|p| p.pid).collect::<Vec<_>>(),
            [group.pgid]
        );
        assert!(hook_processes("another-token", Some(group)).is_empty());
        // Without the group (another boot) nothing can be the hook.
        assert!(hook_processes(&token, None).is_empty());

        // A stale record of the same pid (another start time) is not signalled: had the
        // SIGKILL gone out, it, not the SIGTERM after it, would have ended the child.
        let mut stale = found[0];
        stale.start_ticks += 1;
        signal(stale, libc::SIGKILL);
        signal(found[0], libc::SIGTERM);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(hook_processes(&token, Some(group)).is_empty());
    }

    /// Issue 26, item 2: a worker the hook started on purpose (`setsid nohup`: its own
    /// session and group) carries the hook's mark in its environment but is not the
    /// hook. Once the hook itself is gone, nothing is an orphan.
    #[test]
    fn a_detached_descendant_of_a_finished_hook_is_not_an_orphan() {
        let token = format!("test-detached-{}", std::process::id());
        let (mut hook, group) = marked_leader(&token);
        let (mut worker, worker_group) = marked_leader(&token);
        // While the hook runs, only its own group counts, not the detached worker.
        let found: Vec<i32> = hook_processes(&token, Some(group))
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(found, [group.pgid]);
        hook.kill().unwrap();
        hook.wait().unwrap();
        assert!(hook_processes(&token, Some(group)).is_empty());
        worker.kill().unwrap();
        worker.wait().unwrap();
        let _ = worker_group;
    }

    #[test]
    fn boot_id_is_read() {
        if Path::new("/proc/sys/kernel/random/boot_id").exists() {
            assert_eq!(boot_id().map(|id| id.len()), Some(36));
        }
    }
}
