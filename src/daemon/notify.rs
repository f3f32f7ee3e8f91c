//! systemd service notifications, the plain way (SPEC §6 `run`; STYLE 7): `READY=1` once
//! everything is listening, `STATUS=` lines, `WATCHDOG=1` when the unit sets
//! `WatchdogSec=`, `STOPPING=1` on shutdown.
//!
//! A thin wrapper over the `sd-notify` crate. Outside systemd (`$NOTIFY_SOCKET` unset)
//! every call does nothing. A failed notification is logged and never fatal: the daemon's
//! job is guarding the host, not reporting to systemd. The environment is read once, in
//! [`Notifier::from_env`], and never modified (`sd-notify`'s `unset_env` is always false:
//! removing variables is unsound while other threads may read the environment).

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends service notifications to systemd, if the daemon runs under it.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
    watchdog_interval: Option<Duration>,
}

impl Notifier {
    /// Enabled iff `$NOTIFY_SOCKET` is set. The watchdog interval comes from
    /// `$WATCHDOG_USEC` and `$WATCHDOG_PID` (see [`Notifier::watchdog_interval`]).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog_usec = std::env::var("WATCHDOG_USEC").ok();
        let watchdog_pid = std::env::var("WATCHDOG_PID").ok();
        Notifier {
            enabled,
            watchdog_interval: enabled
                .then(|| {
                    watchdog_interval_from(
                        watchdog_usec.as_deref(),
                        watchdog_pid.as_deref(),
                        std::process::id(),
                    )
                })
                .flatten(),
        }
    }

    /// A notifier that never sends anything (tests, `demo`).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog_interval: None,
        }
    }

    /// Whether notifications are sent at all.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// `READY=1`: start-up is complete and every listener is bound.
    pub fn ready(&self) {
        self.send(NotifyState::Ready);
    }

    /// `STATUS=...`: one line for `systemctl status`. Line breaks become spaces, since a
    /// newline would start a new (and possibly meaningful) assignment.
    pub fn status(&self, status: &str) {
        if !self.enabled {
            return;
        }
        let one_line = status.replace(['\n', '\r'], " ");
        self.send(NotifyState::Status(&one_line));
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.send(NotifyState::Stopping);
    }

    /// `WATCHDOG=1`: the driver loop is alive. Send every [`Notifier::watchdog_interval`].
    pub fn watchdog(&self) {
        self.send(NotifyState::Watchdog);
    }

    /// How often to call [`Notifier::watchdog`]: half of `$WATCHDOG_USEC` (systemd's own
    /// advice), or `None` when no watchdog is expected of us: notifications disabled,
    /// `$WATCHDOG_USEC` unset, zero or unparsable, or `$WATCHDOG_PID` set to another
    /// process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_interval
    }

    fn send(&self, state: NotifyState<'_>) {
        if !self.enabled {
            return;
        }
        if let Err(error) = notify_one(&state) {
            tracing::warn!(%error, notification = %state, "cannot notify systemd");
        }
    }
}

fn notify_one(state: &NotifyState<'_>) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if let Some(name) = std::env::var_os("NOTIFY_SOCKET")
        .as_deref()
        .and_then(|path| path.as_encoded_bytes().strip_prefix(b"@"))
    {
        return notify_abstract(name, state);
    }
    sd_notify::notify(false, std::slice::from_ref(state))
}

/// `sd-notify` 0.4 connects to `$NOTIFY_SOCKET` as a file path; systemd also allows a
/// Linux abstract socket, written `@name`. Same message format as the crate's.
#[cfg(target_os = "linux")]
fn notify_abstract(name: &[u8], state: &NotifyState<'_>) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let address = SocketAddr::from_abstract_name(name)?;
    let socket = UnixDatagram::unbound()?;
    let message = format!("{state}\n");
    let n_sent = socket.send_to_addr(message.as_bytes(), &address)?;
    if n_sent != message.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ));
    }
    Ok(())
}

/// Half of `watchdog_usec`, if the watchdog is meant for `our_pid`.
fn watchdog_interval_from(
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    our_pid: u32,
) -> Option<Duration> {
    let usec: u64 = watchdog_usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = watchdog_pid {
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_us() {
        let half = Some(Duration::from_millis(1500));
        assert_eq!(watchdog_interval_from(Some("3000000"), None, 42), half);
        assert_eq!(
            watchdog_interval_from(Some("3000000"), Some("42"), 42),
            half
        );
        assert_eq!(
            watchdog_interval_from(Some("3000000"), Some("41"), 42),
            None
        );
        assert_eq!(watchdog_interval_from(Some("3000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 42), None);
        assert_eq!(watchdog_interval_from(None, Some("42"), 42), None);
    }

    #[test]
    fn disabled_notifier_does_nothing() {
        let notifier = Notifier::disabled();
        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready();
        notifier.status("x");
        notifier.watchdog();
        notifier.stopping();
    }
}
