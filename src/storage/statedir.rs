//! Which state directory rollbackd trusts, checked in one place.
//!
//! The state directory holds what rollbackd acts on and what operators rely on: its own
//! database, the lock, the control socket and the audit trail. If another user can write
//! there, that user can plant a symlink (`analytics/audit.log -> /root/secret`, and the
//! daemon truncates and appends to root's file) or a control socket of their own (and the
//! CLI prints "rolled back" while nothing happened). So rollbackd trusts a state directory
//! only if:
//!
//! - the directory is owned by the process's effective uid and is not writable by group or
//!   others (if `state_dir` itself is a symlink, the link must be ours or root's too);
//! - each of its own entries — `rollbackd.db` and its `-wal`/`-shm`/`-journal`,
//!   `rollbackd.lock`, `rollbackd.sock`, `analytics/` and everything directly in
//!   `analytics/` — is not a symlink, is owned by the effective uid, and is not writable
//!   by group or others (the socket may have group bits: mode 0660 is how a group is let
//!   in).
//!
//! Other files in the state directory (the application's database may live there) are not
//! rollbackd's and are not checked.
//!
//! [`prepare`] is what every entry point that acts on the state calls (through
//! [`crate::daemon::service::try_lock_state`]): `run`, `demo`, and the operator commands carried
//! out without a daemon. It creates a missing state directory with mode 0750 and never
//! changes the mode of one that exists: a directory it did not create is checked, not
//! "fixed".

use std::fmt;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the directories rollbackd creates (the state directory and `analytics/`).
pub const DIR_MODE: u32 = 0o750;

/// The entries of the state directory that are rollbackd's own.
const OWN_ENTRIES: &[&str] = &[
    "rollbackd.db",
    "rollbackd.db-wal",
    "rollbackd.db-shm",
    "rollbackd.db-journal",
    "rollbackd.lock",
    "rollbackd.sock",
    "analytics",
];

/// The state directory, or something in it, is not safe to use. `config_level`: the
/// configured directory itself is the problem (exit 78); otherwise something in it is
/// (exit 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted {
    pub path: PathBuf,
    pub message: String,
    pub config_level: bool,
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Untrusted {}

impl Untrusted {
    /// The CLI exit status: 78 for the configured directory, 1 for its contents.
    pub fn exit_status(&self) -> u8 {
        if self.config_level {
            crate::exit::CONFIG
        } else {
            crate::exit::FAILURE
        }
    }
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// `uid 0 (root)`, or `uid 1234` when the uid has no name.
pub fn describe_uid(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// Creates `path` (and missing parents) with mode [`DIR_MODE`] if it does not exist.
/// Returns whether it created it. An existing directory is left exactly as it is;
/// something else in its place is an error (as with `create_dir_all`).
pub fn create_dir(path: &Path) -> io::Result<bool> {
    if fs::symlink_metadata(path).is_ok() {
        return match fs::metadata(path) {
            Ok(metadata) if metadata.is_dir() => Ok(false),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", path.display()),
            )),
            Err(error) => Err(error),
        };
    }
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
    {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(error),
    }
}

/// Creates the state directory if it is missing (mode 0750), then [`check`]s it.
pub fn prepare(state_dir: &Path) -> anyhow::Result<()> {
    // Something already there (even not a directory) is for `check` to judge and name.
    if fs::symlink_metadata(state_dir).is_err() {
        create_dir(state_dir).map_err(|error| {
            anyhow::anyhow!(
                "cannot create the state directory {}: {error}",
                state_dir.display()
            )
        })?;
    }
    check(state_dir)
}

/// Refuses a state directory that another user could have written to (see the module
/// documentation). I/O errors while looking are errors too: what cannot be checked is not
/// trusted.
pub fn check(state_dir: &Path) -> anyhow::Result<()> {
    let euid = euid();
    check_dir(state_dir, euid)?;
    for name in OWN_ENTRIES {
        let path = state_dir.join(name);
        let Some(metadata) = lstat(&path)? else {
            continue;
        };
        let group_may_write = *name == "rollbackd.sock";
        check_entry(&path, &metadata, euid, group_may_write)?;
        if *name == "analytics" && metadata.is_dir() {
            let entries = fs::read_dir(&path).map_err(|error| {
                anyhow::anyhow!("cannot list {} to check it: {error}", path.display())
            })?;
            for entry in entries {
                let entry = entry.map_err(|error| {
                    anyhow::anyhow!("cannot list {} to check it: {error}", path.display())
                })?;
                let inner = entry.path();
                if let Some(metadata) = lstat(&inner)? {
                    check_entry(&inner, &metadata, euid, false)?;
                }
            }
        }
    }
    Ok(())
}

/// The uids a CLI may believe on the control socket at `socket`: root, itself, and the
/// owner of the socket's directory when that directory is one nobody else can write (so
/// only its owner or root can have put the socket there). The daemon runs only in a state
/// directory its own user owns, so that owner is the daemon's user — `rollbackd` under the
/// packaged unit, while on-call runs the CLI as root.
pub fn trusted_socket_uids(socket: &Path) -> Vec<u32> {
    let mut uids = vec![0, euid()];
    if let Some(dir) = socket.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(metadata) = fs::metadata(dir) {
            if metadata.is_dir() && metadata.mode() & 0o022 == 0 {
                uids.push(metadata.uid());
            }
        }
    }
    uids.sort_unstable();
    uids.dedup();
    uids
}

fn lstat(path: &Path) -> anyhow::Result<Option<Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(metadata) => Ok(Some(metadata)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(anyhow::anyhow!(
            "cannot check {} in the state directory: {error}",
            path.display()
        )),
    }
}

fn check_dir(state_dir: &Path, euid: u32) -> anyhow::Result<()> {
    let shown = state_dir.display();
    let untrusted = |message: String| Untrusted {
        path: state_dir.to_path_buf(),
        message,
        config_level: true,
    };
    // A symlinked state_dir is followed, but the link must be ours or root's: a link
    // planted in a shared directory would otherwise point us anywhere.
    let link = lstat(state_dir)?;
    if let Some(link) = link.as_ref().filter(|m| m.file_type().is_symlink()) {
        if link.uid() != euid && link.uid() != 0 {
            return Err(untrusted(format!(
                "refusing the state directory {shown}: it is a symlink owned by {}; rollbackd \
                 trusts only a state directory its own user ({}) owns and nobody else can write. \
                 Fix: point state_dir at the real directory, or replace the link with one of your own",
                describe_uid(link.uid()),
                describe_uid(euid),
            ))
            .into());
        }
    }
    let metadata = fs::metadata(state_dir)
        .map_err(|error| anyhow::anyhow!("cannot check the state directory {shown}: {error}"))?;
    if !metadata.is_dir() {
        return Err(untrusted(format!(
            "the state directory {shown} is not a directory; set state_dir to a directory"
        ))
        .into());
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if metadata.uid() != euid || mode & 0o022 != 0 {
        return Err(untrusted(format!(
            "refusing the state directory {shown}: it is owned by {} with mode {mode:04o}{}; \
             rollbackd trusts only a state directory its own user ({}) owns and nobody else \
             can write. Fix: give rollbackd a directory of its own (e.g. `install -d -m 0750 \
             DIR`), or, after checking what is in it, `chown {}: {dir} && chmod 0750 {dir}`",
            describe_uid(metadata.uid()),
            writable_by(mode),
            describe_uid(euid),
            chown_user(euid),
            dir = shell_word(state_dir),
        ))
        .into());
    }
    Ok(())
}

fn check_entry(
    path: &Path,
    metadata: &Metadata,
    euid: u32,
    group_may_write: bool,
) -> anyhow::Result<()> {
    let shown = path.display();
    let untrusted = |message: String| Untrusted {
        path: path.to_path_buf(),
        message,
        config_level: false,
    };
    if metadata.file_type().is_symlink() {
        let target = fs::read_link(path)
            .map(|t| format!(" -> {}", t.display()))
            .unwrap_or_default();
        return Err(untrusted(format!(
            "refusing the state directory: {shown} is a symlink{target} (owned by {}); rollbackd \
             never follows links in its state directory. Fix: find out who put it there, then \
             `rm {}`",
            describe_uid(metadata.uid()),
            shell_word(path),
        ))
        .into());
    }
    let mode = metadata.permissions().mode() & 0o7777;
    let forbidden = if group_may_write { 0o002 } else { 0o022 };
    if metadata.uid() != euid || mode & forbidden != 0 {
        let fix_mode = if group_may_write { "o-w" } else { "go-w" };
        return Err(untrusted(format!(
            "refusing the state directory: {shown} is owned by {} with mode {mode:04o}{}; \
             rollbackd trusts only files in its state directory that its own user ({}) owns \
             and nobody else can write. Fix: after checking how it got there, `chown {}: {p} \
             && chmod {fix_mode} {p}` (or remove it)",
            describe_uid(metadata.uid()),
            writable_by(mode & forbidden),
            describe_uid(euid),
            chown_user(euid),
            p = shell_word(path),
        ))
        .into());
    }
    Ok(())
}

/// ` (writable by group and others)`, or nothing.
fn writable_by(mode: u32) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => " (writable by group and others)",
        (true, false) => " (writable by its group)",
        (false, true) => " (writable by others)",
        (false, false) => "",
    }
}

fn chown_user(uid: u32) -> String {
    user_name(uid).unwrap_or_else(|| uid.to_string())
}

/// `path` as one shell word: as is when it is plain, else single-quoted.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// `getpwuid_r`, or `None` if the uid has no entry (or the lookup fails).
pub fn user_name(uid: u32) -> Option<String> {
    // SAFETY: sysconf has no preconditions.
    let suggested = unsafe { libc::sysconf(libc::_SC_GETPW_R_SIZE_MAX) };
    let mut buffer_len = usize::try_from(suggested)
        .ok()
        .filter(|len| *len > 0)
        .unwrap_or(1024);
    loop {
        let mut buffer = vec![0 as libc::c_char; buffer_len];
        // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids); it is only
        // read after getpwuid_r reports success.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to live memory of the stated size.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buffer_len < 1 << 20 {
            buffer_len *= 2;
            continue;
        }
        if rc != 0 || found.is_null() || entry.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buffer`.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn untrusted(result: anyhow::Result<()>) -> Untrusted {
        let err = result.expect_err("should be refused");
        err.downcast_ref::<Untrusted>()
            .unwrap_or_else(|| panic!("not an Untrusted error: {err:#}"))
            .clone()
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_fresh_directory_is_created_0750_and_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("a/state");
        prepare(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o7777;
        // The umask may take bits away, never add them.
        assert_eq!(mode & !DIR_MODE, 0, "mode {mode:o}");
        assert!(mode & 0o700 == 0o700);
    }

    #[test]
    fn a_0700_or_0750_directory_of_ours_is_trusted_and_left_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o700, 0o750] {
            let state = tmp.path().join(format!("s{mode:o}"));
            fs::create_dir(&state).unwrap();
            chmod(&state, mode);
            prepare(&state).unwrap();
            assert_eq!(
                fs::metadata(&state).unwrap().permissions().mode() & 0o7777,
                mode
            );
        }
    }

    #[test]
    fn a_group_or_other_writable_directory_is_refused_not_fixed() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o770, 0o777, 0o1777, 0o702] {
            let state = tmp.path().join(format!("s{mode:o}"));
            fs::create_dir(&state).unwrap();
            chmod(&state, mode);
            let refusal = untrusted(prepare(&state));
            assert!(refusal.config_level);
            assert_eq!(refusal.exit_status(), 78);
            assert!(
                refusal.message.contains(&format!("mode {mode:04o}")),
                "{}",
                refusal.message
            );
            assert!(
                refusal.message.contains("chmod 0750"),
                "{}",
                refusal.message
            );
            assert!(
                refusal.message.contains(&state.display().to_string()),
                "{}",
                refusal.message
            );
            assert_eq!(
                fs::metadata(&state).unwrap().permissions().mode() & 0o7777,
                mode
            );
        }
    }

    #[test]
    fn a_symlink_among_the_own_entries_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "secret\n").unwrap();
        for name in [
            "rollbackd.db",
            "rollbackd.db-wal",
            "rollbackd.lock",
            "analytics",
        ] {
            let state = tmp.path().join(format!("state-{name}"));
            prepare(&state).unwrap();
            symlink(&victim, state.join(name)).unwrap();
            let refusal = untrusted(check(&state));
            assert!(!refusal.config_level);
            assert_eq!(refusal.exit_status(), 1);
            assert!(
                refusal.message.contains("is a symlink"),
                "{}",
                refusal.message
            );
            assert!(refusal.message.contains(name), "{}", refusal.message);
        }
        let state = tmp.path().join("state-audit");
        fs::create_dir_all(state.join("analytics")).unwrap();
        chmod(&state, 0o750);
        chmod(&state.join("analytics"), 0o750);
        symlink(&victim, state.join("analytics/audit.log")).unwrap();
        let refusal = untrusted(check(&state));
        assert!(
            refusal.message.contains("analytics/audit.log is a symlink"),
            "{}",
            refusal.message
        );
        assert_eq!(fs::read(&victim).unwrap(), b"secret\n");
    }

    #[test]
    fn writable_entries_are_refused_except_a_group_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        prepare(&state).unwrap();
        let db = state.join("rollbackd.db");
        fs::write(&db, "").unwrap();
        chmod(&db, 0o664);
        let refusal = untrusted(check(&state));
        assert!(
            refusal.message.contains("rollbackd.db"),
            "{}",
            refusal.message
        );
        assert!(
            refusal.message.contains("chmod go-w"),
            "{}",
            refusal.message
        );
        chmod(&db, 0o644);
        check(&state).unwrap();

        let analytics = state.join("analytics");
        create_dir(&analytics).unwrap();
        let artifact = analytics.join("rollback_x.json");
        fs::write(&artifact, "{}").unwrap();
        chmod(&artifact, 0o666);
        let refusal = untrusted(check(&state));
        assert!(
            refusal.message.contains("writable by group and others"),
            "{}",
            refusal.message
        );
        chmod(&artifact, 0o640);
        check(&state).unwrap();

        // Files that are not rollbackd's are not its business.
        let app_db = state.join("orchestrator.db");
        fs::write(&app_db, "").unwrap();
        chmod(&app_db, 0o666);
        check(&state).unwrap();

        let socket = state.join("rollbackd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        chmod(&socket, 0o660);
        check(&state).unwrap();
        chmod(&socket, 0o666);
        untrusted(check(&state));
    }

    #[test]
    fn a_symlinked_state_dir_of_our_own_is_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        prepare(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        check(&link).unwrap();
    }

    #[test]
    fn socket_trust_includes_the_owner_of_a_private_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o750);
        let uids = trusted_socket_uids(&dir.join("rollbackd.sock"));
        assert!(uids.contains(&0) && uids.contains(&euid()));
        // A shared directory adds no one (here its owner is us anyway, so the list is
        // the same; what matters is that no third uid appears).
        chmod(&dir, 0o1777);
        let mut expected = vec![0, euid()];
        expected.dedup();
        assert_eq!(trusted_socket_uids(&dir.join("rollbackd.sock")), expected);
    }

    #[test]
    fn shell_words() {
        assert_eq!(
            shell_word(Path::new("/var/lib/rollbackd")),
            "/var/lib/rollbackd"
        );
        assert_eq!(shell_word(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(shell_word(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }
}
