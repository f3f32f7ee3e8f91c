//! The daemon's view of the outside world during a check: the worker health probe, the
//! operations snapshot and the `/proc` resource sample, each behind a narrow object-safe
//! trait so the driver holds `Arc<dyn ...>` and tests swap in fakes.
//!
//! **Adapters never panic and never return an error: every failure is data**
//! (`ProbeOutcome::Failed`, `SnapshotOutcome::Unavailable`, a `Sample::Wrong`, a `None`
//! field). **Every network or process operation is bounded in total by the check
//! timeout** (connect, headers and body together), and **no body or command output is
//! buffered beyond [`MAX_BODY`]**: reading stops at the cut, so a hostile endpoint costs at
//! most one timeout and one mebibyte.
//!
//! Codemap:
//! - `http`: the shared `reqwest` client set-up and the capped body reader; the HTTP
//!   probe and the HTTP snapshot source.
//! - `exec`: running an argv (never a shell) with a deadline, killing its process group
//!   on timeout; the exec probe and the command snapshot source.
//! - `tcp`: the TCP connect probe.
//! - `prometheus`: instant queries against the Prometheus HTTP API.
//! - `resources`: host memory, worker RSS and open file handles from `/proc`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ProbeSpec, SnapshotSpec};
use crate::core::check::{ProbeOutcome, Resources, SnapshotOutcome};

mod exec;
mod http;
mod prometheus;
mod resources;
mod tcp;

/// A boxed future, so the traits below stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Largest HTTP body or command stdout read, in bytes; the rest is not read (HTTP) or is
/// read and discarded (a command's stdout, so the command is not blocked on a full pipe).
pub const MAX_BODY: usize = 1 << 20;

/// How much of a command's stderr/stdout tail goes into a failure reason, in bytes.
pub const OUTPUT_TAIL_BYTES: usize = 1024;

/// Probes the active worker's health. `{worker}` in the URL, argv or address is replaced
/// with the worker id.
pub trait WorkerProbe: Send + Sync {
    fn probe<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, ProbeOutcome>;
}

/// What a snapshot is of, for the templates of its source (as Flagger's metric templates):
/// `{worker}`, `{previous}` and `{interval}` in the Prometheus queries, `snapshot_url` and
/// the `snapshot_command` argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotVars {
    /// The version checked (the active worker; during the stability watch the restored
    /// one; in the baseline range query the previous version).
    pub worker: String,
    /// The version before it; `None` (substituted as empty) when none is known.
    pub previous: Option<String>,
    /// The time since the previous check of `worker` (the first check: the check
    /// interval); the Prometheus source widens it to two scrape intervals at least.
    pub interval: Duration,
}

impl SnapshotVars {
    /// Every `{worker}`, `{previous}` and `{interval}` in `template`, with the ids passed
    /// through `encode` (`{interval}` is written as PromQL does, `30s` / `1500ms`).
    fn substitute_with(
        &self,
        template: &str,
        interval: Duration,
        encode: impl Fn(&str) -> String,
    ) -> String {
        if !template.contains('{') {
            return template.to_owned();
        }
        template
            .replace("{worker}", &encode(&self.worker))
            .replace(
                "{previous}",
                &encode(self.previous.as_deref().unwrap_or("")),
            )
            .replace("{interval}", &crate::config::show_promql_duration(interval))
    }

    /// For a URL (`snapshot_url`): the ids percent-encoded, as in `health_url`.
    pub fn substitute_url(&self, template: &str) -> String {
        self.substitute_with(template, self.interval, encode_url_component)
    }

    /// For one argv element (`snapshot_command`): the ids as they are, inside that one
    /// element (a worker id never starts with `-`, never holds whitespace).
    pub fn substitute_arg(&self, template: &str) -> String {
        self.substitute_with(template, self.interval, str::to_owned)
    }

    /// For PromQL, with `{interval}` = `interval`: the ids as they are. That is safe only
    /// because they follow the worker-id rule (`text::check_worker_id`: `A-Z a-z 0-9 . _
    /// + -`, no quote, backslash, brace or whitespace), so an id cannot end a string
    /// literal or a label matcher; an id that breaks the rule is refused here rather than
    /// put into a query. (In a regex matcher `=~"{worker}"`, `.` and `+` are regex
    /// characters: use `=`.)
    pub fn substitute_promql(&self, template: &str, interval: Duration) -> Result<String, String> {
        // Empty stands for "none known" (`check-config` before any promotion): `""`.
        for id in std::iter::once(&self.worker).chain(self.previous.as_ref()) {
            if !id.is_empty() {
                crate::text::check_worker_id(id)?;
            }
        }
        Ok(self.substitute_with(template, interval, str::to_owned))
    }
}

/// Takes the operations-manager snapshot of `vars.worker`.
pub trait SnapshotSource: Send + Sync {
    fn snapshot<'a>(&'a self, vars: &'a SnapshotVars) -> BoxFuture<'a, SnapshotOutcome>;
}

/// Samples host and worker resources. `None` when nothing at all could be read.
pub trait ResourceSampler: Send + Sync {
    fn sample<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Option<Resources>>;
}

/// The probe for `spec`, each call bounded by `timeout`.
pub fn worker_probe(spec: &ProbeSpec, timeout: Duration) -> Arc<dyn WorkerProbe> {
    match spec {
        ProbeSpec::Http(url) => Arc::new(http::HttpProbe::new(url.clone(), timeout)),
        ProbeSpec::Command(argv) => Arc::new(exec::CommandProbe::new(argv.clone(), timeout)),
        ProbeSpec::Tcp(address) => Arc::new(tcp::TcpProbe::new(address.clone(), timeout)),
    }
}

/// The snapshot source for `spec`, each call bounded by `timeout`. Without a spec every
/// snapshot is `Unavailable { reason: "no snapshot source configured" }`.
pub fn snapshot_source(spec: Option<&SnapshotSpec>, timeout: Duration) -> Arc<dyn SnapshotSource> {
    match spec {
        None => Arc::new(NoSnapshotSource),
        Some(SnapshotSpec::Http(url)) => {
            Arc::new(http::HttpSnapshotSource::new(url.clone(), timeout))
        }
        Some(SnapshotSpec::Command(argv)) => {
            Arc::new(exec::CommandSnapshotSource::new(argv.clone(), timeout))
        }
        Some(SnapshotSpec::Prometheus(spec)) => Arc::new(
            prometheus::PrometheusSnapshotSource::new(spec.clone(), timeout),
        ),
    }
}

pub use prometheus::{check_queries, range_observations, QueryCheck};

/// The `/proc` sampler; `pid_file` is a path template (`{worker}` substituted) naming a
/// file that holds the worker's pid. Without it only host memory is sampled.
pub fn resource_sampler(pid_file: Option<&str>) -> Arc<dyn ResourceSampler> {
    Arc::new(resources::ProcResourceSampler::new(
        "/proc".into(),
        pid_file.map(str::to_owned),
    ))
}

/// Replaces every `{worker}` in `template` with `worker`.
pub fn substitute_worker(template: &str, worker: &str) -> String {
    template.replace("{worker}", worker)
}

/// What [`substitute_worker_url`] percent-encodes: everything but the URL's unreserved
/// characters (RFC 3986 §2.3), so an id is one path segment or query value whatever it
/// holds.
const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Replaces every `{worker}` in the URL `template` with `worker`, percent-encoded.
/// Validation ([`crate::text::check_worker_id`]) already keeps `/`, `?`, `#` and `%` out
/// of ids; this is the second line of defence, so an id can never turn into another path
/// or a query.
pub fn substitute_worker_url(template: &str, worker: &str) -> String {
    template.replace("{worker}", &encode_url_component(worker))
}

fn encode_url_component(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, URL_COMPONENT).to_string()
}

struct NoSnapshotSource;

impl SnapshotSource for NoSnapshotSource {
    fn snapshot<'a>(&'a self, _vars: &'a SnapshotVars) -> BoxFuture<'a, SnapshotOutcome> {
        Box::pin(async {
            SnapshotOutcome::Unavailable {
                reason: "no snapshot source configured".into(),
            }
        })
    }
}

/// The reason recorded when an operation is cut at the check timeout.
fn timeout_reason(timeout: Duration) -> String {
    format!("timeout after {}", humantime::format_duration(timeout))
}

/// An error and all its sources, `: `-separated, skipping a source whose text the
/// previous message already contains (reqwest and hyper repeat each other).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A short, lossy-UTF-8 excerpt of raw bytes for a reason string.
fn excerpt(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(crate::core::check::RAW_KEEP_BYTES * 4)];
    let text = String::from_utf8_lossy(head);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        crate::core::check::truncate_raw(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_every_occurrence() {
        assert_eq!(
            substitute_worker("http://h/{worker}/x?w={worker}", "v2"),
            "http://h/v2/x?w=v2"
        );
        assert_eq!(substitute_worker("plain", "v2"), "plain");
    }

    #[test]
    fn url_substitution_encodes_the_id() {
        let template = "http://127.0.0.1:8080/{worker}/health";
        assert_eq!(
            substitute_worker_url(template, "v1.2_3-a~"),
            "http://127.0.0.1:8080/v1.2_3-a~/health"
        );
        assert_eq!(
            substitute_worker_url(template, "../../snapshot?"),
            "http://127.0.0.1:8080/..%2F..%2Fsnapshot%3F/health"
        );
        assert_eq!(
            substitute_worker_url("http://h/x?w={worker}", "a+b&c=d#e"),
            "http://h/x?w=a%2Bb%26c%3Dd%23e"
        );
    }

    #[test]
    fn timeout_reason_is_humantime() {
        assert_eq!(timeout_reason(Duration::from_secs(5)), "timeout after 5s");
        assert_eq!(
            timeout_reason(Duration::from_millis(500)),
            "timeout after 500ms"
        );
    }

    #[test]
    fn excerpt_is_lossy_and_short() {
        assert_eq!(excerpt(b""), "(empty body)");
        assert!(excerpt(b"\xff\xfeoops").contains("oops"));
        assert!(excerpt(&[b'x'; 10_000]).len() < 300);
    }
}
