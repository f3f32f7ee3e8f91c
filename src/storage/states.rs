//! The closed sets of names the state database and the records use: a session's state, an
//! action's kind, trigger and state, and the phase an action reached. Each is an enum with
//! its stored spelling (`as_str`, `parse`, serde as that string); `storage::store` maps
//! them to and from SQL text (`ToSql`/`FromSql`), so no caller compares strings.
//!
//! Pure (no I/O, like `core`): the Supervisor and the records use them as they are.

/// Declares an enum whose variants each have one stored spelling.
macro_rules! stored_names {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling in `rollbackd.db` and in the records.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The value a stored spelling names; `None` for a name this build does not know.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                $name::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        concat!("unknown ", stringify!($name), " {:?}"),
                        text
                    ))
                })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stored_names!(
    /// A monitoring session's state. `stability-watch`: rolled back and verified; the
    /// restored version is watched for `rollback.stability_period` before the session
    /// ends as `rolled-back`.
    SessionState {
        Monitoring => "monitoring",
        Escalated => "escalated",
        RolledBack => "rolled-back",
        Confirmed => "confirmed",
        Stopped => "stopped",
        RollbackFailed => "rollback-failed",
        StabilityWatch => "stability-watch",
    }
);

stored_names!(
    /// What an action does. (An operator's `kill-switch set|reset` is not an action: it
    /// is one write, audited, with nothing to resume.)
    ActionKind {
        Rollback => "rollback",
        Escalation => "escalation",
    }
);

stored_names!(
    /// What started an action (`fleet`: another host of the fleet rolled the active
    /// version back, `fleet.follow_verdicts`).
    ActionTrigger {
        Automatic => "automatic",
        Manual => "manual",
        Emergency => "emergency",
        Fleet => "fleet",
    }
);

stored_names!(
    /// Where an action is: its intent is `Pending` before the first side effect, `Running`
    /// while a phase is under way, then `Done` or `Failed`.
    ActionState {
        Pending => "pending",
        Running => "running",
        Done => "done",
        Failed => "failed",
    }
);

impl ActionState {
    /// Whether a restart must resume the action.
    pub fn unfinished(self) -> bool {
        matches!(self, ActionState::Pending | ActionState::Running)
    }
}

stored_names!(
    /// The step of an action that was last started, as recorded before its side effect.
    Phase {
        Pause => "pause",
        Drain => "drain",
        Switch => "switch",
        Verify => "verify",
        Resume => "resume",
        Record => "record",
        KillSwitch => "kill-switch",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spelling parses back to its value, and no two values share one: a stored row
    /// always means what was written.
    #[test]
    fn every_name_round_trips_and_is_unique() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(
            all: &[T],
            as_str: fn(T) -> &'static str,
            parse: fn(&str) -> Option<T>,
        ) {
            let mut seen = std::collections::HashSet::new();
            for &value in all {
                assert_eq!(parse(as_str(value)), Some(value));
                assert!(seen.insert(as_str(value)), "{} twice", as_str(value));
            }
            assert_eq!(parse("no-such-name"), None);
            assert_eq!(parse(""), None);
        }
        check(SessionState::ALL, SessionState::as_str, SessionState::parse);
        check(ActionKind::ALL, ActionKind::as_str, ActionKind::parse);
        check(
            ActionTrigger::ALL,
            ActionTrigger::as_str,
            ActionTrigger::parse,
        );
        check(ActionState::ALL, ActionState::as_str, ActionState::parse);
        check(Phase::ALL, Phase::as_str, Phase::parse);
    }

    /// The spellings are the contract with rows already on disk: they never change.
    #[test]
    fn stored_spellings_are_stable() {
        assert_eq!(SessionState::RollbackFailed.as_str(), "rollback-failed");
        assert_eq!(SessionState::RolledBack.as_str(), "rolled-back");
        assert_eq!(ActionKind::Escalation.as_str(), "escalation");
        assert_eq!(ActionState::Pending.as_str(), "pending");
        // storage::store spells these two in its SQL (finished actions).
        assert_eq!(ActionState::Done.as_str(), "done");
        assert_eq!(ActionState::Failed.as_str(), "failed");
        assert_eq!(Phase::Verify.as_str(), "verify");
        assert!(ActionState::Running.unfinished());
        assert!(!ActionState::Failed.unfinished());
    }
}
