//! What wakes the LiveFlags thread: the kernel, when the settings database, its `-wal` or
//! its `-journal` is written, created, deleted or renamed (inotify on the directory that
//! holds them, so a file deleted and created again is still seen); a timeout (the slow
//! backstop poll, for filesystems that send no events); or a stop request.
//!
//! Watching the directory rather than the files means the watch survives the files being
//! replaced; if the directory itself goes, the watch is added again at the next wait.
//! When inotify cannot be had at all (no instances left, a kernel without it) every wait
//! is a plain timeout and the caller polls faster (see `LiveFlags`).

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchMask};

/// Why [`Wakeup::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// One of the database's files changed (or events were lost: look anyway).
    Changed,
    /// The timeout passed with nothing seen.
    Timeout,
    /// The other end of the stop socket was written to or closed.
    Stop,
}

pub struct Wakeup {
    inotify: Option<Inotify>,
    dir: PathBuf,
    /// `app.db`, `app.db-wal`, `app.db-journal`.
    names: [OsString; 3],
    watching: bool,
    stop: UnixStream,
    buffer: Vec<u8>,
}

impl Wakeup {
    /// Watches the directory of `db`; `stop` is one end of a socket pair whose other end
    /// is written to or dropped to stop the waiting thread.
    pub fn new(db: &Path, stop: UnixStream) -> Wakeup {
        let dir = match db.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file = db.file_name().map(OsString::from).unwrap_or_default();
        let with = |suffix: &str| {
            let mut name = file.clone();
            name.push(suffix);
            name
        };
        let inotify = match Inotify::init() {
            Ok(inotify) => Some(inotify),
            Err(error) => {
                tracing::warn!(
                    "inotify is not available ({error}); LiveFlags polls {} instead",
                    db.display()
                );
                None
            }
        };
        let mut wakeup = Wakeup {
            inotify,
            dir,
            names: [file.clone(), with("-wal"), with("-journal")],
            watching: false,
            stop,
            buffer: vec![0; 4096],
        };
        wakeup.watch();
        wakeup
    }

    /// Waits that are timeouts or a stop only (no file events).
    pub fn polling(stop: UnixStream) -> Wakeup {
        Wakeup {
            inotify: None,
            dir: PathBuf::new(),
            names: Default::default(),
            watching: false,
            stop,
            buffer: Vec::new(),
        }
    }

    /// Whether the kernel wakes this thread (inotify works and the directory is watched).
    pub fn is_event_driven(&self) -> bool {
        self.inotify.is_some() && self.watching
    }

    fn watch(&mut self) {
        let Some(inotify) = &self.inotify else {
            return;
        };
        if self.watching {
            return;
        }
        let mask = WatchMask::MODIFY
            | WatchMask::CLOSE_WRITE
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        match inotify.watches().add(&self.dir, mask) {
            Ok(_) => self.watching = true,
            // A missing directory is looked for again at the next wait.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), "cannot watch for settings changes ({error}); polling");
            }
        }
    }

    /// Blocks until one of the database's files changes, `timeout` passes, or a stop is
    /// asked for. Events about other files in the directory are read and ignored.
    pub fn wait(&mut self, timeout: Duration) -> Wake {
        self.watch();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self
                        .inotify
                        .as_ref()
                        .filter(|_| self.watching)
                        .map_or(-1, |i| i.as_fd().as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // ppoll: a sub-millisecond timeout (the settle steps after an event) is kept.
            let timeout = libc::timespec {
                tv_sec: left.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `fds` is a valid array of two pollfd and `timeout` a valid timespec
            // for the duration of the call; a negative fd is ignored; no signal mask.
            let ready = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &timeout,
                    std::ptr::null(),
                )
            };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!("waiting for settings changes failed: {error}");
                std::thread::sleep(left.min(Duration::from_millis(20)));
                return Wake::Timeout;
            }
            if fds[0].revents != 0 {
                return Wake::Stop;
            }
            if fds[1].revents != 0 && self.drain() {
                return Wake::Changed;
            }
            if Instant::now() >= deadline {
                return Wake::Timeout;
            }
        }
    }

    /// Reads every pending event; whether one concerns the database's files.
    fn drain(&mut self) -> bool {
        let Some(inotify) = &mut self.inotify else {
            return false;
        };
        let mut relevant = false;
        loop {
            match inotify.read_events(&mut self.buffer) {
                Ok(events) => {
                    let mut any = false;
                    for event in events {
                        any = true;
                        if event.mask.intersects(
                            EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED,
                        ) {
                            // The directory went: watch it again when it is back.
                            self.watching = false;
                            relevant = true;
                        } else if event.mask.contains(EventMask::Q_OVERFLOW)
                            || event
                                .name
                                .is_some_and(|name| self.names.iter().any(|n| n == name))
                        {
                            // Lost events count as a change: look anyway.
                            relevant = true;
                        }
                    }
                    if !any {
                        return relevant;
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return relevant,
                Err(error) => {
                    tracing::warn!("reading settings events failed: {error}");
                    self.watching = false;
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_on_the_database_files_only_and_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let (stop, stop_rx) = UnixStream::pair().unwrap();
        let mut wakeup = Wakeup::new(&db, stop_rx);
        assert!(wakeup.is_event_driven());
        // Another file in the directory: ignored until the timeout.
        std::fs::write(dir.path().join("other.txt"), "x").unwrap();
        assert_eq!(wakeup.wait(Duration::from_millis(50)), Wake::Timeout);
        std::fs::write(&db, "x").unwrap();
        assert_eq!(wakeup.wait(Duration::from_secs(10)), Wake::Changed);
        std::fs::write(dir.path().join("app.db-wal"), "x").unwrap();
        assert_eq!(wakeup.wait(Duration::from_secs(10)), Wake::Changed);
        // Deleted and created again.
        std::fs::remove_file(&db).unwrap();
        assert_eq!(wakeup.wait(Duration::from_secs(10)), Wake::Changed);
        std::fs::write(&db, "y").unwrap();
        assert_eq!(wakeup.wait(Duration::from_secs(10)), Wake::Changed);
        drop(stop);
        assert_eq!(wakeup.wait(Duration::from_secs(10)), Wake::Stop);
    }

    #[test]
    fn a_directory_that_appears_later_is_watched_then() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("later");
        let db = sub.join("app.db");
        let (_stop, stop_rx) = UnixStream::pair().unwrap();
        let mut wakeup = Wakeup::new(&db, stop_rx);
        assert!(!wakeup.is_event_driven());
        assert_eq!(wakeup.wait(Duration::from_millis(10)), Wake::Timeout);
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(wakeup.wait(Duration::from_millis(10)), Wake::Timeout);
        assert!(wakeup.is_event_driven());
        std::fs::write(&db, "x").unwrap();
        assert_eq!(wakeup.wait(Duration::from_secs(10)), Wake::Changed);
    }
}
