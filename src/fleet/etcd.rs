//! [`FleetStore`] on etcd v3 through its JSON gateway (`/v3/kv/range`, `/v3/kv/put`,
//! `/v3/watch`, `/v3/lease/*` on the client URL; etcd 3.4 serves it at `/v3/`), over the
//! reqwest client rollbackd already has. The gRPC client (`etcd-client`) would compile
//! protobufs at build time and need `protoc` on every machine that builds rollbackd; the
//! gateway needs nothing but HTTP. Keys and values are base64 in the gateway's JSON,
//! 64-bit integers are strings.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::store::{Claim, FleetError, FleetStore, Kv, LeaseId, Watch, WatchEvent};
use crate::adapters::BoxFuture;
use crate::config::{FleetAuth, FleetTls};

/// The most one unary request may take (connect included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The most a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A reply or a watch message larger than this is refused (a host list of 10,000 hosts
/// at ~300 bytes is 3 MB; base64 makes it 4).
const MAX_BODY: usize = 32 << 20;

/// etcd v3 through the JSON gateway, with the endpoints tried in turn.
pub struct EtcdGateway {
    endpoints: Vec<String>,
    tls: FleetTls,
    /// The client, or why it cannot be built (a TLS file missing, unreadable or not PEM):
    /// then every request fails with that reason — the host shows as cut off from the
    /// fleet and goes on guarding itself — and the files are read again at the next
    /// request, so mending them needs no restart.
    client: std::sync::Mutex<Built>,
    /// etcd user authentication (`[fleet] username`, `password_file`), and the token
    /// etcd gave for it, sent with every request.
    auth: Option<FleetAuth>,
    token: std::sync::Mutex<Option<String>>,
    /// The endpoint that answered last: tried first.
    current: AtomicUsize,
}

/// Whether etcd refused a request for its token (expired, revoked, none sent, or issued
/// before a change to users or roles — a password rotation — which etcd reports on the
/// next read or write as "revision of auth store is old"): worth one new
/// `authenticate` (as etcd's own Go client does for both), unlike a refusal by role
/// ("permission denied"). A lease renewal is not checked against the token: the
/// refusal shows on the next read or write.
fn token_refused(message: &str) -> bool {
    message.contains("invalid auth token")
        || message.contains("user name is empty")
        || message.contains("revision of auth store is old")
}

/// The client and the TLS files it was built from, as they were then.
struct Built {
    client: Result<reqwest::Client, String>,
    files: Vec<Option<FileStamp>>,
    /// Files found changed but unusable while the client built before still works: not
    /// tried (nor warned about) again until they change once more.
    rejected: Option<Vec<Option<FileStamp>>>,
}

/// What tells a replaced file from the one read (a rotation by rename or in place).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamps(tls: &FleetTls) -> Vec<Option<FileStamp>> {
    use std::os::unix::fs::MetadataExt;
    [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .flatten()
        .map(|path| {
            std::fs::metadata(path).ok().map(|m| FileStamp {
                inode: m.ino(),
                len: m.len(),
                modified: m.modified().ok(),
            })
        })
        .collect()
}

/// Warnings for the fleet's secret files (`key_file`, `password_file`) open to anyone but
/// their owner (any group or other permission bit): they are the host's identity to etcd.
pub fn secret_file_warnings(tls: &FleetTls, auth: Option<&FleetAuth>) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let files = [
        ("fleet.key_file", tls.key_file.as_ref()),
        ("fleet.password_file", auth.map(|a| &a.password_file)),
    ];
    files
        .into_iter()
        .filter_map(|(key, path)| {
            let path = path?;
            let mode = std::fs::metadata(path).ok()?.permissions().mode();
            (mode & 0o077 != 0).then(|| {
                format!(
                    "{key} {} has mode {:04o}: others than its owner can read or change it (chmod 600)",
                    path.display(),
                    mode & 0o7777
                )
            })
        })
        .collect()
}

/// The fleet's HTTP client with `tls` (the CA as the only root when given, this host's
/// client certificate when given). `Err` names the key and file at fault.
pub fn build_client(tls: &FleetTls) -> Result<reqwest::Client, String> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{key} {}: cannot read it: {e}", path.display()))
    };
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30));
    if let Some(path) = &tls.ca_file {
        let pem = read("fleet.ca_file", path)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "fleet.ca_file {}: not a PEM certificate: {e}",
                path.display()
            )
        })?;
        if certs.is_empty() {
            return Err(format!(
                "fleet.ca_file {}: no certificate in it",
                path.display()
            ));
        }
        // The fleet's own CA, and no other: a certificate some public CA issued for the
        // etcd host's name must not pass for etcd.
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        let mut pem = read("fleet.cert_file", cert)?;
        pem.push(b'\n');
        pem.extend(read("fleet.key_file", key)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            format!(
                "fleet.cert_file {} with fleet.key_file {}: not a PEM certificate and private key: {}",
                cert.display(),
                key.display(),
                crate::adapters::error_chain(&e)
            )
        })?;
        builder = builder.identity(identity);
    }
    builder.build().map_err(|e| {
        format!(
            "cannot build the fleet's HTTP client: {}",
            crate::adapters::error_chain(&e)
        )
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, FleetError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| FleetError::Server(format!("not base64 in a reply: {e}")))
}

/// A 64-bit integer of the gateway's JSON: a string, or (defensively) a number; absent is 0.
fn int(value: &Value) -> i64 {
    match value {
        Value::String(text) => text.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of keys starting with `prefix` (the prefix with its last byte
/// incremented, carrying; `\0` — every key — when it is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn kv_of(value: &Value) -> Result<Kv, FleetError> {
    let key = unb64(value["key"].as_str().unwrap_or(""))?;
    Ok(Kv {
        key: String::from_utf8_lossy(&key).into_owned(),
        value: unb64(value["value"].as_str().unwrap_or(""))?,
        mod_revision: int(&value["mod_revision"]),
        lease: int(&value["lease"]),
    })
}

fn revision_of(reply: &Value) -> i64 {
    int(&reply["header"]["revision"])
}

/// An error object of the gateway (`{"error": .., "message": .., "code": ..}`), if any.
fn gateway_error(reply: &Value) -> Option<String> {
    let message = reply
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| reply.get("error").and_then(Value::as_str))?;
    Some(message.to_owned())
}

impl EtcdGateway {
    /// A client for `endpoints` (client URLs such as `http://127.0.0.1:2379`). Makes no
    /// connection yet.
    pub fn new(
        endpoints: &[String],
        tls: &FleetTls,
        auth: Option<&FleetAuth>,
    ) -> Result<EtcdGateway, FleetError> {
        if endpoints.is_empty() {
            return Err(FleetError::Unreachable("no endpoints configured".into()));
        }
        // A client that cannot be built is reported by every request (the agent's link
        // error, the CLI's message), not here.
        let files = stamps(tls);
        let client = build_client(tls);
        Ok(EtcdGateway {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_owned())
                .collect(),
            tls: tls.clone(),
            client: std::sync::Mutex::new(Built {
                client,
                files,
                rejected: None,
            }),
            auth: auth.cloned(),
            token: std::sync::Mutex::new(None),
            current: AtomicUsize::new(0),
        })
    }

    /// The token to send: the one held, or a new one from `/v3/auth/authenticate` (the
    /// password file is read each time, so a changed password needs no restart).
    async fn token(&self) -> Result<Option<String>, FleetError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        if let Some(token) = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(Some(token));
        }
        let path = auth.password_file.clone();
        let password = tokio::task::spawn_blocking(move || std::fs::read_to_string(&path))
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read)
            .map_err(|e| {
                FleetError::Credentials(format!(
                    "fleet.password_file {}: cannot read it: {e}",
                    auth.password_file.display()
                ))
            })?;
        // One line; the newline an editor or `echo` leaves is not part of it.
        let password = password.strip_suffix('\n').unwrap_or(&password);
        let password = password.strip_suffix('\r').unwrap_or(password);
        let body = json!({"name": auth.username, "password": password});
        let reply = self
            .post("/v3/auth/authenticate", &body, None)
            .await
            .map_err(|err| match err {
                FleetError::Server(message) => FleetError::Credentials(format!(
                    "authenticating as {:?}: {message}",
                    auth.username
                )),
                other => other,
            })?;
        let token = reply["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                FleetError::Credentials(format!(
                    "authenticating as {:?}: no token in the reply (is etcd's auth enabled?)",
                    auth.username
                ))
            })?
            .to_owned();
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        Ok(Some(token))
    }

    /// After etcd answered `message` to a request that carried `token`: when etcd refused
    /// the token itself, forgets it (if it is still the one held: another request may have
    /// replaced it), so that the next request authenticates anew. Says whether it did.
    fn token_refused(&self, token: Option<&str>, message: &str) -> bool {
        let Some(token) = token.filter(|_| token_refused(message)) else {
            return false;
        };
        tracing::info!("fleet: etcd refused the auth token ({message}); authenticating again");
        let mut held = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_deref() == Some(token) {
            *held = None;
        }
        true
    }

    /// The client; built again first if it could not be before, or if a TLS file changed
    /// since (a certificate rotated in place or by rename: new connections use the new
    /// one, open ones go on until they close). A rotation caught half-written keeps the
    /// client that works and is tried again at the next request.
    ///
    /// The files are looked at (and read, when they changed) on the blocking pool: the
    /// fleet agent shares the runtime thread with the driver, which times the checks.
    async fn client(&self) -> Result<reqwest::Client, FleetError> {
        let (known, rejected, was_ok) = {
            let built = self.client.lock().unwrap_or_else(|p| p.into_inner());
            if !self.tls.is_set() && self.tls.key_file.is_none() {
                return built.client.clone().map_err(FleetError::Credentials);
            }
            (
                built.files.clone(),
                built.rejected.clone(),
                built.client.is_ok(),
            )
        };
        let tls = self.tls.clone();
        let (now, rebuilt) = tokio::task::spawn_blocking(move || {
            let now = stamps(&tls);
            let stale = !was_ok || (now != known && rejected.as_ref() != Some(&now));
            let rebuilt = stale.then(|| build_client(&tls));
            (now, rebuilt)
        })
        .await
        .map_err(|e| FleetError::Credentials(format!("reading the fleet's TLS files: {e}")))?;
        let mut built = self.client.lock().unwrap_or_else(|p| p.into_inner());
        match (rebuilt, built.client.is_ok()) {
            (None, _) => {}
            (Some(Ok(client)), was_ok) => {
                tracing::info!(
                    "fleet: {}",
                    if was_ok {
                        "a TLS file changed: new connections use it"
                    } else {
                        "the TLS files are usable now"
                    }
                );
                built.client = Ok(client);
                built.files = now;
                built.rejected = None;
            }
            (Some(Err(why)), true) => {
                tracing::warn!("fleet: a TLS file changed but cannot be used ({why}); keeping the client built before until it changes again");
                built.rejected = Some(now);
            }
            (Some(Err(why)), false) => {
                built.client = Err(why);
                built.files = now;
            }
        }
        built.client.clone().map_err(FleetError::Credentials)
    }

    /// [`EtcdGateway::post`] with the auth token when `[fleet] username` is set; a token
    /// etcd no longer takes is replaced once.
    async fn call(&self, path: &str, body: Value) -> Result<Value, FleetError> {
        for attempt in 0.. {
            let token = self.token().await?;
            match self.post(path, &body, token.as_deref()).await {
                Err(FleetError::Server(message))
                    if attempt == 0 && self.token_refused(token.as_deref(), &message) => {}
                other => return other,
            }
        }
        unreachable!("the loop returns by its second attempt")
    }

    /// POSTs `body` to `path` on the endpoints in turn (starting with the one that
    /// answered last) until one answers; the reply's JSON.
    async fn post(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value, FleetError> {
        let client = self.client().await?;
        let first = self.current.load(Ordering::Relaxed);
        let mut last_error = String::new();
        for step in 0..self.endpoints.len() {
            let index = (first + step) % self.endpoints.len();
            let url = format!("{}{path}", self.endpoints[index]);
            let mut request = client
                .post(&url)
                .timeout(REQUEST_TIMEOUT)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
            if let Some(token) = token {
                request = request.header(reqwest::header::AUTHORIZATION, token);
            }
            let response = request.send().await;
            let response = match response {
                Ok(response) => response,
                Err(err) => {
                    last_error = format!("{url}: {}", describe(&err));
                    continue;
                }
            };
            let status = response.status();
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(err) => {
                    last_error = format!("{url}: {}", describe(&err));
                    continue;
                }
            };
            self.current.store(index, Ordering::Relaxed);
            if bytes.len() > MAX_BODY {
                return Err(FleetError::Server(format!(
                    "{url}: a reply of {} bytes",
                    bytes.len()
                )));
            }
            let reply: Value = serde_json::from_slice(&bytes)
                .map_err(|e| FleetError::Server(format!("{url}: HTTP {status}, not JSON ({e})")))?;
            if let Some(message) = gateway_error(&reply) {
                return Err(FleetError::Server(format!("{url}: {message}")));
            }
            if !status.is_success() {
                return Err(FleetError::Server(format!("{url}: HTTP {status}")));
            }
            return Ok(reply);
        }
        Err(FleetError::Unreachable(last_error))
    }
}

fn describe(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "timed out".into()
    } else if err.is_connect() {
        let mut source: Option<&dyn std::error::Error> = std::error::Error::source(err);
        let mut deepest = String::from("cannot connect");
        while let Some(s) = source {
            deepest = format!("cannot connect: {s}");
            source = s.source();
        }
        deepest
    } else {
        // The whole chain: "error sending request" alone hides the TLS alert (a client
        // certificate etcd refused arrives after the handshake, on the first read).
        crate::adapters::error_chain(err)
    }
}

impl FleetStore for EtcdGateway {
    fn get(&self, key: &str) -> BoxFuture<'_, Result<(Option<Kv>, i64), FleetError>> {
        let body = json!({"key": b64(key.as_bytes())});
        Box::pin(async move {
            let reply = self.call("/v3/kv/range", body).await?;
            let kv = match reply["kvs"].as_array().and_then(|kvs| kvs.first()) {
                Some(kv) => Some(kv_of(kv)?),
                None => None,
            };
            Ok((kv, revision_of(&reply)))
        })
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<(Vec<Kv>, i64), FleetError>> {
        let body = json!({
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix.as_bytes())),
        });
        Box::pin(async move {
            let reply = self.call("/v3/kv/range", body).await?;
            let kvs = reply["kvs"]
                .as_array()
                .map(|kvs| kvs.iter().map(kv_of).collect::<Result<Vec<_>, _>>())
                .transpose()?
                .unwrap_or_default();
            Ok((kvs, revision_of(&reply)))
        })
    }

    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'_, Result<(Option<Kv>, i64), FleetError>> {
        let mut body = json!({
            "key": b64(key.as_bytes()),
            "value": b64(&value),
            "prev_kv": true,
        });
        if let Some(lease) = lease {
            body["lease"] = Value::String(lease.to_string());
        }
        Box::pin(async move {
            let reply = self.call("/v3/kv/put", body).await?;
            let previous = match reply.get("prev_kv") {
                Some(kv) if kv.is_object() => Some(kv_of(kv)?),
                _ => None,
            };
            Ok((previous, revision_of(&reply)))
        })
    }

    fn claim(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
        create: bool,
    ) -> BoxFuture<'_, Result<Claim, FleetError>> {
        let key = b64(key.as_bytes());
        let put =
            json!({"request_put": {"key": key, "value": b64(&value), "lease": lease.to_string()}});
        let range = json!({"request_range": {"key": key}});
        // Ours already (the common case: an update), else free (a first registration).
        let ours = json!({
            "compare": [{"key": key, "target": "LEASE", "result": "EQUAL", "lease": lease.to_string()}],
            "success": [put],
            "failure": [range],
        });
        let free = json!({
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [put],
            "failure": [range],
        });
        Box::pin(async move {
            let attempts = if create { vec![ours, free] } else { vec![ours] };
            let mut found = None;
            for txn in attempts {
                let reply = self.call("/v3/kv/txn", txn).await?;
                // `succeeded: false` is the zero value the gateway leaves out.
                if reply["succeeded"].as_bool() == Some(true) {
                    return Ok(Claim::Written(revision_of(&reply)));
                }
                found = match reply["responses"][0]["response_range"]["kvs"]
                    .as_array()
                    .and_then(|kvs| kvs.first())
                {
                    Some(kv) => Some(kv_of(kv)?),
                    None => None,
                };
                if let Some(kv) = &found {
                    if kv.lease != lease {
                        return Ok(Claim::Held(kv.clone()));
                    }
                }
            }
            Ok(match found {
                // Taken by this very lease between the two transactions: ours.
                Some(kv) => Claim::Written(kv.mod_revision),
                None => Claim::Lost,
            })
        })
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, FleetError>> {
        let body = json!({"TTL": ttl.as_secs().max(1).to_string()});
        Box::pin(async move {
            let reply = self.call("/v3/lease/grant", body).await?;
            match int(&reply["ID"]) {
                0 => Err(FleetError::Server("a lease grant without an ID".into())),
                id => Ok(id),
            }
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, FleetError>> {
        let body = json!({"ID": lease.to_string()});
        Box::pin(async move {
            // A stream in gRPC; through the gateway one request is one renewal.
            let reply = self.call("/v3/lease/keepalive", body).await?;
            // An expired or unknown lease is renewed with no TTL.
            match int(&reply["result"]["TTL"]) {
                ttl if ttl > 0 => Ok(Duration::from_secs(ttl as u64)),
                _ => Err(FleetError::LeaseExpired(lease)),
            }
        })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), FleetError>> {
        let body = json!({"ID": lease.to_string()});
        Box::pin(async move { self.call("/v3/lease/revoke", body).await.map(|_| ()) })
    }

    fn watch(
        &self,
        key: &str,
        prefix: bool,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<Box<dyn Watch>, FleetError>> {
        let mut create = json!({
            "key": b64(key.as_bytes()),
            "start_revision": start_revision.to_string(),
        });
        if prefix {
            create["range_end"] = Value::String(b64(&prefix_end(key.as_bytes())));
        }
        let body = json!({"create_request": create});
        Box::pin(async move {
            let client = self.client().await?;
            let token = self.token().await?;
            let first = self.current.load(Ordering::Relaxed);
            let mut last_error = String::new();
            for step in 0..self.endpoints.len() {
                let index = (first + step) % self.endpoints.len();
                let url = format!("{}/v3/watch", self.endpoints[index]);
                // No overall timeout: the stream stays open. The connection and the
                // first message (`created`) are bounded; a watch that goes quiet is
                // noticed by the caller's heartbeat.
                let response = match tokio::time::timeout(REQUEST_TIMEOUT, {
                    let request = client
                        .post(&url)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.to_string());
                    match &token {
                        Some(token) => request.header(reqwest::header::AUTHORIZATION, token),
                        None => request,
                    }
                    .send()
                })
                .await
                {
                    Ok(Ok(response)) => response,
                    Ok(Err(err)) => {
                        last_error = format!("{url}: {}", describe(&err));
                        continue;
                    }
                    Err(_) => {
                        last_error = format!("{url}: timed out");
                        continue;
                    }
                };
                if !response.status().is_success() {
                    return Err(FleetError::Server(format!(
                        "{url}: HTTP {}",
                        response.status()
                    )));
                }
                let mut watch = GatewayWatch {
                    response,
                    buffer: Vec::new(),
                    url: url.clone(),
                };
                // The first message says the watch was created (or why not).
                match tokio::time::timeout(REQUEST_TIMEOUT, watch.message()).await {
                    Ok(Ok(message)) if message["created"].as_bool() == Some(true) => {
                        self.current.store(index, Ordering::Relaxed);
                        let events = events_of(&message)?;
                        if !events.is_empty() {
                            // Not expected with `created`; never dropped.
                            return Err(FleetError::WatchEnded(
                                "events before the watch was created".into(),
                            ));
                        }
                        return Ok(Box::new(watch) as Box<dyn Watch>);
                    }
                    Ok(Ok(message)) => {
                        let message = message.to_string();
                        // The next attempt (the agent starts over) authenticates anew.
                        self.token_refused(token.as_deref(), &message);
                        return Err(FleetError::Server(format!(
                            "{url}: the watch was not created: {message}"
                        )));
                    }
                    Ok(Err(err)) => {
                        if let FleetError::Server(message) = &err {
                            self.token_refused(token.as_deref(), message);
                        }
                        return Err(err);
                    }
                    Err(_) => {
                        last_error = format!("{url}: no answer to the watch");
                        continue;
                    }
                }
            }
            Err(FleetError::Unreachable(last_error))
        })
    }
}

/// A watch stream of the gateway: one JSON object per line.
struct GatewayWatch {
    response: reqwest::Response,
    buffer: Vec<u8>,
    url: String,
}

impl GatewayWatch {
    /// The next message's `result`.
    async fn message(&mut self) -> Result<Value, FleetError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let message: Value = serde_json::from_slice(line).map_err(|e| {
                    FleetError::WatchEnded(format!(
                        "{}: a message that is not JSON ({e})",
                        self.url
                    ))
                })?;
                if let Some(error) = message.get("error") {
                    let text = error["message"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| error.to_string());
                    return Err(FleetError::WatchEnded(format!("{}: {text}", self.url)));
                }
                let result = message.get("result").cloned().unwrap_or(message);
                if result["canceled"].as_bool() == Some(true) {
                    let reason = result["cancel_reason"].as_str().unwrap_or("canceled");
                    let compacted = int(&result["compact_revision"]);
                    return Err(FleetError::WatchEnded(if compacted > 0 {
                        format!("{reason} (compacted to revision {compacted})")
                    } else {
                        reason.to_owned()
                    }));
                }
                return Ok(result);
            }
            if self.buffer.len() > MAX_BODY {
                return Err(FleetError::WatchEnded(format!(
                    "{}: a message over {MAX_BODY} bytes",
                    self.url
                )));
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => {
                    return Err(FleetError::WatchEnded(format!(
                        "{}: the server closed the stream",
                        self.url
                    )))
                }
                Err(err) => {
                    return Err(FleetError::WatchEnded(format!(
                        "{}: {}",
                        self.url,
                        describe(&err)
                    )))
                }
            }
        }
    }
}

fn events_of(result: &Value) -> Result<Vec<WatchEvent>, FleetError> {
    let mut out = Vec::new();
    for event in result["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let kv = kv_of(&event["kv"])?;
        // PUT is the enum's zero value, which the gateway leaves out.
        if event["type"].as_str() == Some("DELETE") {
            out.push(WatchEvent::Delete {
                key: kv.key,
                revision: kv.mod_revision,
            });
        } else {
            out.push(WatchEvent::Put(kv));
        }
    }
    Ok(out)
}

impl Watch for GatewayWatch {
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<WatchEvent>, FleetError>> {
        Box::pin(async move {
            loop {
                let message = self.message().await?;
                let events = events_of(&message)?;
                // Progress notifications carry no events.
                if !events.is_empty() {
                    return Ok(events);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_of_a_prefix_ends_after_its_last_key() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"/rollbackd/", b"/rollbackd0"),
            (b"a", b"b"),
            (b"a\xff", b"b"),
            (b"\xff\xff", b"\0"),
        ];
        for (prefix, end) in cases {
            assert_eq!(prefix_end(prefix), end.to_vec(), "{prefix:?}");
        }
    }

    #[test]
    fn gateway_integers_are_strings_or_numbers_and_absent_is_zero() {
        let cases = [
            (json!("42"), 42),
            (json!(42), 42),
            (json!(null), 0),
            (json!("x"), 0),
        ];
        for (value, want) in cases {
            assert_eq!(int(&value), want, "{value}");
        }
    }

    #[test]
    fn watch_events_put_is_the_default_type_and_delete_is_named() {
        let result = json!({"events": [
            {"kv": {"key": b64(b"/k"), "value": b64(b"v"), "mod_revision": "7"}},
            {"type": "DELETE", "kv": {"key": b64(b"/k"), "mod_revision": "8"}},
        ]});
        assert_eq!(
            events_of(&result).unwrap(),
            vec![
                WatchEvent::Put(Kv {
                    key: "/k".into(),
                    value: b"v".to_vec(),
                    mod_revision: 7,
                    lease: 0,
                }),
                WatchEvent::Delete {
                    key: "/k".into(),
                    revision: 8
                },
            ]
        );
    }
}
