//! HTTP probe and HTTP snapshot source, and the pieces the Prometheus source shares: one
//! `reqwest::Client` per adapter and a body reader that stops at [`MAX_BODY`].

use std::time::Duration;

use super::{
    error_chain, excerpt, substitute_worker_url, timeout_reason, BoxFuture, SnapshotSource,
    SnapshotVars, WorkerProbe, MAX_BODY,
};
use crate::core::check::{health_body_verdict, ProbeOutcome, Snapshot, SnapshotOutcome};

/// The client every HTTP adapter uses: no proxy (the targets are local and a proxy from
/// the environment would only add a failure mode) and no redirects (a health endpoint or
/// snapshot that redirects is misconfigured, and its 3xx is reported as such) and no
/// retries (a check is one request; the next check is the retry). Building
/// can only fail in TLS set-up; the error is then reported by every call instead.
pub(super) fn build_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("rollbackd/", env!("CARGO_PKG_VERSION")))
        // reqwest's default policy retries only HTTP/2 and HTTP/3 refusals, which this
        // HTTP/1-only build never sees, yet it copied every request (URL, headers) in case:
        // with no retry at all, nothing is copied and nothing else changes.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .build()
        .map_err(|error| format!("cannot build the HTTP client: {}", error_chain(&error)))
}

/// A body read up to a limit.
pub(super) struct CappedBody {
    pub bytes: Vec<u8>,
    /// The body went on past the limit; the rest was not read.
    pub cut: bool,
}

/// Reads `response`'s body chunk by chunk and stops at `limit` bytes without reading
/// further: the response (and its connection) is dropped with the rest unread. The
/// declared Content-Length is deliberately not used to pre-allocate.
pub(super) async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<CappedBody, reqwest::Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(CappedBody { bytes, cut: true });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(CappedBody { bytes, cut: false })
}

/// `GET {url}`: healthy iff the status is 2xx and the body does not say otherwise
/// ([`health_body_verdict`]).
pub(super) struct HttpProbe {
    client: Result<reqwest::Client, String>,
    url_template: String,
    timeout: Duration,
    /// The last worker's URL, parsed: the same worker is probed every check, and parsing
    /// the URL again each time showed in the daemon's CPU profile.
    last_url: std::sync::Mutex<Option<(String, Target)>>,
}

/// A URL for reqwest: parsed once, or — when it does not parse — the text, so the
/// request fails with reqwest's own message for it, as it always did.
#[derive(Clone)]
pub(super) enum Target {
    Parsed(reqwest::Url),
    Unparsed(String),
}

impl Target {
    pub(super) fn new(url: String) -> Target {
        match reqwest::Url::parse(&url) {
            Ok(parsed) => Target::Parsed(parsed),
            Err(_) => Target::Unparsed(url),
        }
    }

    pub(super) fn get(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        match self {
            Target::Parsed(url) => client.get(url.clone()),
            Target::Unparsed(url) => client.get(url.as_str()),
        }
    }
}

impl HttpProbe {
    pub(super) fn new(url_template: String, timeout: Duration) -> Self {
        HttpProbe {
            client: build_client(),
            url_template,
            timeout,
            last_url: std::sync::Mutex::new(None),
        }
    }

    /// The URL to probe `worker` at.
    fn target(&self, worker: &str) -> Target {
        let mut last = self.last_url.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((for_worker, target)) if for_worker == worker => target.clone(),
            _ => {
                let target = Target::new(substitute_worker_url(&self.url_template, worker));
                *last = Some((worker.to_owned(), target.clone()));
                target
            }
        }
    }

    async fn probe_untimed(&self, client: &reqwest::Client, url: &Target) -> ProbeOutcome {
        let response = match url.get(client).send().await {
            Ok(response) => response,
            Err(error) => return ProbeOutcome::failed(error_chain(&error)),
        };
        let status = response.status();
        let body = match read_capped(response, MAX_BODY).await {
            Ok(body) => body,
            Err(error) => {
                return ProbeOutcome::failed(format!(
                    "HTTP {status}: reading the body failed: {}",
                    error_chain(&error)
                ))
            }
        };
        if !status.is_success() {
            return ProbeOutcome::failed(format!("HTTP {status}: {}", excerpt(&body.bytes)));
        }
        // A body cut at MAX_BODY is not a JSON object, so it cannot say "unhealthy".
        match health_body_verdict(&body.bytes) {
            None => ProbeOutcome::Ok,
            Some(reason) => ProbeOutcome::failed(format!("HTTP {status}: {reason}")),
        }
    }
}

impl WorkerProbe for HttpProbe {
    fn probe<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, ProbeOutcome> {
        Box::pin(async move {
            let client = match &self.client {
                Ok(client) => client,
                Err(reason) => return ProbeOutcome::failed(reason.clone()),
            };
            let url = self.target(worker);
            match tokio::time::timeout(self.timeout, self.probe_untimed(client, &url)).await {
                Ok(outcome) => outcome,
                Err(_) => ProbeOutcome::failed(timeout_reason(self.timeout)),
            }
        })
    }
}

/// `GET {url}` returning the snapshot JSON (SPEC §3). Only a source that could not be
/// asked (refused, timeout, non-2xx, broken body) is `Unavailable`; any 2xx body becomes
/// values, a malformed one an invalid error rate. `{worker}` and `{previous}` in the URL
/// are percent-encoded, `{interval}` is written `30s`.
pub(super) struct HttpSnapshotSource {
    client: Result<reqwest::Client, String>,
    url: String,
    /// `url` parsed once, when it holds no template.
    target: Option<Target>,
    timeout: Duration,
}

impl HttpSnapshotSource {
    pub(super) fn new(url: String, timeout: Duration) -> Self {
        HttpSnapshotSource {
            client: build_client(),
            target: (!url.contains('{')).then(|| Target::new(url.clone())),
            url,
            timeout,
        }
    }

    async fn snapshot_untimed(
        &self,
        client: &reqwest::Client,
        vars: &SnapshotVars,
    ) -> SnapshotOutcome {
        let unavailable = |reason: String| SnapshotOutcome::Unavailable { reason };
        let target = match &self.target {
            Some(target) => target.clone(),
            None => Target::new(vars.substitute_url(&self.url)),
        };
        let response = match target
            .get(client)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => return unavailable(error_chain(&error)),
        };
        let status = response.status();
        let body = match read_capped(response, MAX_BODY).await {
            Ok(body) => body,
            Err(error) => {
                return unavailable(format!(
                    "HTTP {status}: reading the body failed: {}",
                    error_chain(&error)
                ))
            }
        };
        if !status.is_success() {
            return unavailable(format!("HTTP {status}: {}", excerpt(&body.bytes)));
        }
        // A body cut at MAX_BODY is (almost always) truncated JSON, so it parses as an
        // invalid error rate carrying its first bytes: recorded, never trusted.
        if body.cut {
            tracing::debug!(url = %self.url, "snapshot body cut at {MAX_BODY} bytes");
        }
        SnapshotOutcome::Values(Snapshot::from_body(&body.bytes))
    }
}

impl SnapshotSource for HttpSnapshotSource {
    fn snapshot<'a>(&'a self, vars: &'a SnapshotVars) -> BoxFuture<'a, SnapshotOutcome> {
        Box::pin(async move {
            let client = match &self.client {
                Ok(client) => client,
                Err(reason) => {
                    return SnapshotOutcome::Unavailable {
                        reason: reason.clone(),
                    }
                }
            };
            match tokio::time::timeout(self.timeout, self.snapshot_untimed(client, vars)).await {
                Ok(outcome) => outcome,
                Err(_) => SnapshotOutcome::Unavailable {
                    reason: timeout_reason(self.timeout),
                },
            }
        })
    }
}
