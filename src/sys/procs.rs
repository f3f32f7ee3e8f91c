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

/// The live processes of the hook run marked `token` (and, when `group` is given — only
/// for a hook of this boot — the members of its process group). Never this process.
pub fn hook_processes(token: &str, group: Option<Group>) -> Vec<Proc> {
    let group = group.filter(|group| group.pgid > 1 && group_is_original(*group));
    let own = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir(Path::new("/proc")) else {
        return Vec::new();
    };
    let mut found: Vec<Proc> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own && *pid > 1)
        .filter_map(stat)
        .filter(|proc| {
            group.is_some_and(|group| {
                proc.pgrp == group.pgid && proc.start_ticks >= group.leader_start_ticks
            }) || has_env(proc.pid, HOOK_RUN_ENV, token)
        })
        .collect();
    found.sort_by_key(|proc| proc.pid);
    found
}

/// False when a process with the leader's pid runs with another start time: the pid (and
/// with it any group of that id) belongs to somebody else now.
fn group_is_original(group: Group) -> bool {
    match stat(group.pgid) {
        Some(leader) => leader.start_ticks == group.leader_start_ticks,
        None => true,
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

    #[test]
    fn a_child_marked_with_the_token_is_found_and_stopped() {
        let token = format!("test-{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(HOOK_RUN_ENV, &token)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until the child has exec'd, /proc shows the parent's environment: wait for the
        // exec (bounded), as a restarted daemon finds a hook long after it started.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let found = hook_processes(&token, None);
            if !found.is_empty() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(found.iter().map(|p| p.pid).collect::<Vec<_>>(), [pid]);
        assert!(hook_processes("another-token", None).is_empty());

        // A stale record of the same pid (another start time) is not signalled: had the
        // SIGKILL gone out, it, not the SIGTERM after it, would have ended the child.
        let mut stale = found[0];
        stale.start_ticks += 1;
        signal(stale, libc::SIGKILL);
        signal(found[0], libc::SIGTERM);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(hook_processes(&token, None).is_empty());
    }

    #[test]
    fn boot_id_is_read() {
        if Path::new("/proc/sys/kernel/random/boot_id").exists() {
            assert_eq!(boot_id().map(|id| id.len()), Some(36));
        }
    }
}
