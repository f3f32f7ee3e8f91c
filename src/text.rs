//! Text that came from outside rollbackd: what a worker id may be, what an operator's
//! reason may hold, and the one escaping every human output goes through.
//!
//! - **Worker ids** ([`check_worker_id`]) are 1–64 characters of `A-Z a-z 0-9 . _ + -`,
//!   starting with a letter or a digit. So an id is always one plain path segment, file
//!   name and argv element: no `/`, `?`, `#`, `%`, whitespace or control characters, never
//!   `.`/`..`, never something a hook could take for an option (`-x`). The same check runs
//!   in the CLI (clap, exit 2), on the control socket (a raw client's request is refused,
//!   exit 2), in the daemon's `promote`, and on every id read back from `rollbackd.db`
//!   (an invalid stored id is treated as unknown, with a warning).
//! - **Operator text** ([`check_operator_text`]: `--reason` of `rollback`, `kill-switch`
//!   and `pause`) is at most [`OPERATOR_TEXT_MAX_CHARS`] characters without control or
//!   invisible formatting characters. It is refused, not stripped: what is recorded is what
//!   the operator typed.
//! - **Escaping** ([`escape`], [`Escaped`]): text from outside that cannot be refused
//!   (health bodies, probe and hook errors, snapshot values, anything read back from the
//!   audit log or `rollbackd.db`) is shown with control characters, invisible formatting
//!   characters (bidirectional overrides, zero-width characters, line/paragraph
//!   separators) and the backslash written as escapes (`\n`, `\t`, `\r`, `\\`,
//!   `\u{1b}`), so it cannot move the cursor, retitle or clear a terminal, or forge a line.
//!   Other Unicode stays readable. The JSON files keep the raw text (serde_json escapes
//!   control characters itself); escaping is for human output only.

use std::borrow::Cow;
use std::fmt;

/// Longest worker id, in characters (all ASCII, so also bytes).
pub const WORKER_ID_MAX_LEN: usize = 64;

/// The worker id rule, for error messages and docs.
pub const WORKER_ID_RULE: &str =
    "1-64 characters of A-Z a-z 0-9 . _ + -, starting with a letter or digit";

/// Longest operator-supplied text (a `--reason`), in characters.
pub const OPERATOR_TEXT_MAX_CHARS: usize = 1024;

/// How much of a refused value an error message quotes, in characters.
const QUOTE_CHARS: usize = 40;

/// Why `id` is not a valid worker id, or `Ok` if it is. The message quotes the id
/// (escaped, cut to a few dozen characters) and states the rule.
pub fn check_worker_id(id: &str) -> Result<(), String> {
    let problem = if id.is_empty() {
        Some("it is empty".to_owned())
    } else if id.len() > WORKER_ID_MAX_LEN {
        Some(format!("it is {} characters long", id.chars().count()))
    } else if let Some(bad) = id.chars().find(|c| !is_worker_id_char(*c)) {
        Some(format!("{} is not allowed", describe_char(bad)))
    } else if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some("it must start with a letter or digit".to_owned())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(format!(
            "invalid worker id \"{}\": {problem} (a worker id is {WORKER_ID_RULE})",
            quote(id)
        )),
    }
}

/// [`check_worker_id`] as a clap value parser.
pub fn parse_worker_id(id: &str) -> Result<String, String> {
    check_worker_id(id).map(|()| id.to_owned())
}

/// Whether `id` is a valid worker id.
pub fn is_valid_worker_id(id: &str) -> bool {
    check_worker_id(id).is_ok()
}

fn is_worker_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')
}

/// Why `text` is not acceptable as operator-supplied text (`--reason`), or `Ok`.
/// `what` names it in the message (`"--reason"`).
pub fn check_operator_text(what: &str, text: &str) -> Result<(), String> {
    let chars = text.chars().count();
    if chars > OPERATOR_TEXT_MAX_CHARS {
        return Err(format!(
            "{what} is {chars} characters long; at most {OPERATOR_TEXT_MAX_CHARS} are allowed"
        ));
    }
    if let Some(bad) = text.chars().find(|c| c.is_control() || is_invisible(*c)) {
        return Err(format!(
            "{what} \"{}\" contains {}: control and invisible formatting characters are not allowed (one line of plain text)",
            quote(text),
            describe_char(bad)
        ));
    }
    Ok(())
}

/// [`check_operator_text`] for `--reason`, as a clap value parser.
pub fn parse_reason(text: &str) -> Result<String, String> {
    check_operator_text("the reason", text).map(|()| text.to_owned())
}

/// `text` with every character that could act on a terminal or hide itself written as an
/// escape (see the module docs). Borrows when there is nothing to escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    if text.chars().any(needs_escape) {
        Cow::Owned(Escaped(text).to_string())
    } else {
        Cow::Borrowed(text)
    }
}

/// `text` on one line for a report: escaped as [`escape`] does (so a newline is `\n`), and
/// cut to at most `max` characters with `…`.
pub fn one_line(text: &str, max: usize) -> String {
    let escaped = escape(text);
    if escaped.chars().count() <= max {
        return escaped.into_owned();
    }
    let mut cut: String = escaped.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Displays its text through [`escape`]'s rules without allocating.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found a char there");
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                other => write!(f, "\\u{{{:x}}}", other as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\\' || is_invisible(c)
}

/// Formatting characters that reorder or hide text: bidirectional embeddings, overrides
/// and isolates, zero-width characters, line/paragraph separators, the byte-order mark and
/// interlinear annotation marks.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// `'/'`, or `U+001B` for a character that should not be shown as itself.
fn describe_char(c: char) -> String {
    if needs_escape(c) || c.is_whitespace() {
        format!("the character U+{:04X}", c as u32)
    } else {
        format!("'{c}'")
    }
}

/// The start of `text`, escaped, for an error message.
fn quote(text: &str) -> String {
    let mut chars = text.char_indices();
    match chars.nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("{}…", Escaped(&text[..cut])),
        None => escape(text).into_owned(),
    }
}

/// The field formatter of the text journal (`--log-format text`): the message and every
/// field value go through [`Escaped`], so a worker's error text, a hook's output or an id
/// read back from disk cannot forge journal lines or act on a terminal running
/// `journalctl -f`. String fields are quoted as by the default formatter. (The JSON
/// journal needs nothing: JSON escapes control characters.)
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalFields;

impl<'w> tracing_subscriber::field::MakeVisitor<tracing_subscriber::fmt::format::Writer<'w>>
    for JournalFields
{
    type Visitor = JournalVisitor<'w>;

    fn make_visitor(&self, target: tracing_subscriber::fmt::format::Writer<'w>) -> Self::Visitor {
        JournalVisitor {
            writer: target,
            first: true,
            result: Ok(()),
        }
    }
}

/// One event's fields being written by [`JournalFields`].
pub struct JournalVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl JournalVisitor<'_> {
    fn write(&mut self, field: &tracing::field::Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        let name = field.name();
        self.result = if name == "message" {
            write!(self.writer, "{separator}{value}")
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{separator}{name}={value}")
        };
    }
}

impl tracing::field::Visit for JournalVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{}", Escaped(value)));
        } else {
            self.write(field, format_args!("\"{}\"", Escaped(value)));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.write(field, format_args!("{}", Escaped(&text)));
    }
}

impl tracing_subscriber::field::VisitOutput<fmt::Result> for JournalVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl tracing_subscriber::field::VisitFmt for JournalVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// A URL as it may be shown (journal, `check-config`, status): scheme, host and port; the
/// user and password, the path and the query are secrets as often as not (a Slack webhook's
/// path *is* its token; `https://ops:hunter2@…`), so they are replaced by `…`. Not a URL:
/// `(not a URL)`.
pub fn redact_url(url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return "(not a URL)".to_owned();
    };
    let mut shown = format!("{}://", parsed.scheme());
    if !parsed.username().is_empty() || parsed.password().is_some() {
        shown.push_str("…@");
    }
    shown.push_str(parsed.host_str().unwrap_or(""));
    if let Some(port) = parsed.port() {
        shown.push_str(&format!(":{port}"));
    }
    if parsed.path() != "/" && !parsed.path().is_empty() {
        shown.push_str("/…");
    }
    if parsed.query().is_some() {
        shown.push_str("?…");
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn worker_ids() {
        for good in [
            "v1",
            "v2",
            "blue",
            "app-2024.10.22",
            "v1.2.3+build.5",
            "release_7",
            "7",
            "A",
            &"x".repeat(64),
        ] {
            assert_eq!(check_worker_id(good), Ok(()), "{good:?}");
        }
        for (bad, says) in [
            ("", "it is empty"),
            ("../../snapshot?", "'/' is not allowed"),
            ("snapshot?", "'?' is not allowed"),
            ("a#b", "'#' is not allowed"),
            ("a%2fb", "'%' is not allowed"),
            ("a b", "U+0020"),
            ("v2\nFAKE", "U+000A"),
            ("v2\x1b[31m", "U+001B"),
            ("v2\u{202e}", "U+202E"),
            ("--delete-everything", "must start with a letter or digit"),
            ("-v", "must start with a letter or digit"),
            (".", "must start with a letter or digit"),
            ("..", "must start with a letter or digit"),
            (".hidden", "must start with a letter or digit"),
            ("_x", "must start with a letter or digit"),
            ("v:1", "':' is not allowed"),
            ("v@1", "'@' is not allowed"),
            ("{worker}", "'{' is not allowed"),
            ("vé", "'é' is not allowed"),
            (&"x".repeat(65), "65 characters long"),
        ] {
            let err = check_worker_id(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
            assert!(err.contains(WORKER_ID_RULE), "{err}");
            assert!(
                !err.contains(['\n', '\x1b']),
                "the message is safe: {err:?}"
            );
        }
        let long = "y".repeat(130_000);
        let err = check_worker_id(&long).unwrap_err();
        assert!(err.contains("130000 characters long"), "{err}");
        assert!(
            err.len() < 300,
            "a huge id is not echoed whole: {}",
            err.len()
        );
        assert_eq!(parse_worker_id("v2"), Ok("v2".to_owned()));
        assert!(!is_valid_worker_id("v2/x"));
    }

    #[test]
    fn operator_text() {
        assert_eq!(check_operator_text("--reason", "p99 regression"), Ok(()));
        assert_eq!(check_operator_text("--reason", ""), Ok(()));
        assert_eq!(
            check_operator_text("--reason", "Fehlerquote erhöht — 🚨"),
            Ok(())
        );
        assert_eq!(check_operator_text("--reason", &"r".repeat(1024)), Ok(()));
        let err = check_operator_text("--reason", &"r".repeat(1025)).unwrap_err();
        assert!(
            err.contains("1025 characters") && err.contains("1024"),
            "{err}"
        );
        for bad in [
            "a\nb",
            "\x1b[2J",
            "tab\there",
            "bell\x07",
            "rtl\u{202e}x",
            "\u{9b}",
        ] {
            let err = check_operator_text("--reason", bad).unwrap_err();
            assert!(err.starts_with("--reason"), "{err}");
            assert!(!err.contains(['\n', '\x1b', '\x07', '\u{202e}']), "{err:?}");
        }
        assert!(parse_reason("x\ny").is_err());
    }

    #[test]
    fn escaping() {
        let cases = [
            ("plain text", "plain text"),
            ("", ""),
            ("käse 🚨 — ok", "käse 🚨 — ok"),
            (
                "oops \x1b]0;PWNED\x07\x1b[2J\x1b[31mFAKE: rollback-executed",
                r"oops \u{1b}]0;PWNED\u{7}\u{1b}[2J\u{1b}[31mFAKE: rollback-executed",
            ),
            ("line\nforged", r"line\nforged"),
            ("a\r\tb", r"a\r\tb"),
            (r"C:\path", r"C:\\path"),
            ("nul\0", r"nul\u{0}"),
            ("del\x7f", r"del\u{7f}"),
            ("csi\u{9b}31m", r"csi\u{9b}31m"),
            ("evil\u{202e}txt.exe", r"evil\u{202e}txt.exe"),
            ("zero\u{200b}width", r"zero\u{200b}width"),
            ("sep\u{2028}x", r"sep\u{2028}x"),
        ];
        for (raw, shown) in cases {
            assert_eq!(escape(raw), shown, "{raw:?}");
            assert_eq!(Escaped(raw).to_string(), shown, "{raw:?}");
        }
        assert!(matches!(escape("nothing to do"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_text_journal_escapes_messages_and_fields() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JournalFields)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let hostile = "oops \x1b]0;PWNED\x07\x1b[2J\x1b[31mFAKE: rollback-executed";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                reason = %hostile,
                body = hostile,
                count = 3,
                "probe failed: {hostile}\nWARN forged line"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text.matches('\n').count(),
            1,
            "one event, one line: {text:?}"
        );
        assert!(!text.contains(['\x1b', '\x07']), "{text:?}");
        assert!(
            text.contains(r"probe failed: oops \u{1b}]0;PWNED\u{7}\u{1b}[2J\u{1b}[31mFAKE: rollback-executed\nWARN forged line"),
            "{text}"
        );
        assert!(text.contains(r#"body="oops \u{1b}]0;PWNED"#), "{text}");
        assert!(text.contains(r"reason=oops \u{1b}]0;PWNED"), "{text}");
        assert!(text.contains(" count=3"), "{text}");
    }

    proptest! {
        #[test]
        fn escaped_text_has_no_control_or_invisible_characters(text in any::<String>()) {
            let shown = escape(&text);
            prop_assert!(!shown.chars().any(|c| c.is_control() || is_invisible(c)), "{:?}", shown);
            // Nothing is lost: text without a backslash or anything to escape is unchanged.
            if !text.chars().any(needs_escape) {
                prop_assert_eq!(shown.as_ref(), text.as_str());
            }
        }

        #[test]
        fn accepted_ids_are_one_unchanged_url_path_segment(
            id in "[A-Za-z0-9][A-Za-z0-9._+-]{0,63}"
        ) {
            prop_assert_eq!(check_worker_id(&id), Ok(()));
            prop_assert!(!id.chars().any(|c| c.is_control() || c.is_whitespace()));
            prop_assert!(!id.starts_with('-') && id != "." && id != "..");
            let url = crate::adapters::substitute_worker_url(
                "http://127.0.0.1:8080/{worker}/health?w={worker}",
                &id,
            );
            let parsed = reqwest::Url::parse(&url).unwrap();
            let segments: Vec<&str> = parsed.path_segments().unwrap().collect();
            prop_assert_eq!(segments.len(), 2);
            let decoded = percent_encoding::percent_decode_str(segments[0]).decode_utf8().unwrap();
            prop_assert_eq!(decoded.as_ref(), id.as_str());
            prop_assert_eq!(parsed.host_str(), Some("127.0.0.1"));
            let query: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
            prop_assert_eq!(query, vec![("w".to_owned(), id.clone())]);
        }

        #[test]
        fn arbitrary_strings_are_accepted_only_when_they_follow_the_rule(text in any::<String>()) {
            let ok = check_worker_id(&text).is_ok();
            let rule = !text.is_empty()
                && text.len() <= WORKER_ID_MAX_LEN
                && text.chars().all(is_worker_id_char)
                && text.starts_with(|c: char| c.is_ascii_alphanumeric());
            prop_assert_eq!(ok, rule);
            if let Err(message) = check_worker_id(&text) {
                prop_assert!(!message.chars().any(|c| c.is_control()));
            }
        }
    }

    /// Issue 26, item 14: what a webhook URL may show.
    #[test]
    fn urls_are_shown_without_their_secrets() {
        assert_eq!(
            redact_url("https://ops:hunter2@hooks.example.com/services/T0/B0/SECRETTOKEN?x=1"),
            "https://…@hooks.example.com/…?…"
        );
        assert_eq!(redact_url("http://127.0.0.1:9093"), "http://127.0.0.1:9093");
        assert_eq!(redact_url("not a url"), "(not a URL)");
    }
}
