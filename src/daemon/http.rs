//! The operator's HTTP endpoint (`[http] listen`): `/metrics` (OpenMetrics text of
//! [`crate::daemon::metrics`]), `/status` (the JSON of `rollbackd status --json`) and `/healthz`.
//!
//! `/status` and `/healthz` ask the driver through the same command channel the control
//! socket uses, so the driver stays the single owner of the state and this module reads
//! nothing itself. `/healthz` is therefore a real liveness test of the driver loop: it
//! fails when the loop does not answer within a second (stuck, or shutting down).
//! Only GET (and HEAD, which hyper answers without a body) is served; other methods
//! get 405.
//!
//! Anyone who can reach the port can open connections, so the endpoint must not be a way
//! to take the daemon's file descriptors (issue 8: 1,100 idle connections made the switch
//! hook fail with EMFILE). It holds at most [`connection_cap`] connections at once and
//! does not `accept` beyond that: further connections wait in the kernel's listen backlog,
//! which costs the daemon no descriptor. A connection that has not sent its request
//! headers within [`HEADER_READ_TIMEOUT`] (also between keep-alive requests) is closed,
//! and none lives longer than [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::control::{Command, Operator, Reply, Request};
use crate::daemon::metrics::Metrics;

/// How long `/healthz` waits for the driver to answer.
const HEALTH_LIMIT: Duration = Duration::from_secs(1);
/// How long `/status` waits (it reads the kill switch, which may wait on a busy database).
const STATUS_LIMIT: Duration = Duration::from_secs(5);

/// The most HTTP connections served at once, whatever the descriptor limit (a scraper
/// and a few operators need a handful).
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that has not sent complete request headers within this time (counted
/// from when the server starts waiting for them, so also between keep-alive requests) is
/// closed: idle and slow-loris connections do not hold a slot.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this: a response the client never reads does not hold
/// a slot either. In-flight responses get [`CLOSE_GRACE`] to finish.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How often "at the connection limit" may be logged.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How many HTTP connections the daemon serves at once under a soft RLIMIT_NOFILE of
/// `soft_limit`: [`MAX_CONNECTIONS`], or fewer when the limit is low, so that the
/// connections plus [`crate::sys::fdlimit::RESERVE`] stay well under the limit. 0 means the
/// limit is too low to serve the endpoint at all.
pub fn connection_cap(soft_limit: u64) -> usize {
    let spare = soft_limit.saturating_sub(crate::sys::fdlimit::RESERVE) / 2;
    usize::try_from(spare).map_or(MAX_CONNECTIONS, |spare| spare.min(MAX_CONNECTIONS))
}

/// What the handlers share.
#[derive(Clone)]
struct Endpoint {
    metrics: Metrics,
    commands: mpsc::Sender<Command>,
    operator: Operator,
}

/// The bound endpoint, ready to serve.
pub struct HttpServer {
    listener: TcpListener,
    endpoint: Endpoint,
    max_connections: usize,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port; see [`HttpServer::local_addr`]). The
    /// connection limit is [`connection_cap`] of the current soft RLIMIT_NOFILE (raise the
    /// limit first; see [`crate::sys::fdlimit`]).
    pub async fn bind(
        addr: SocketAddr,
        metrics: Metrics,
        commands: mpsc::Sender<Command>,
    ) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        // Commands from here are recorded as from this process's user, named "http".
        let operator = Operator {
            name: "http".into(),
            ..Operator::current()
        };
        // A limit that cannot be read is taken as systemd's default soft limit.
        let soft_limit = crate::sys::fdlimit::current().map_or(1024, |limit| limit.soft);
        Ok(HttpServer {
            listener,
            endpoint: Endpoint {
                metrics,
                commands,
                operator,
            },
            max_connections: connection_cap(soft_limit),
        })
    }

    /// Replaces the connection limit (at least 1).
    pub fn with_max_connections(mut self, max_connections: usize) -> HttpServer {
        self.max_connections = max_connections.max(1);
        self
    }

    /// How many connections are served at once; 0 when the descriptor limit is too low
    /// for the endpoint (then [`HttpServer::serve`] serves nothing).
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`; open connections are dropped then.
    pub async fn serve(self, shutdown: CancellationToken) {
        if self.max_connections == 0 {
            return;
        }
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut warned_full: Option<Instant> = None;
        loop {
            // A slot first, then accept: at the limit, new connections wait in the
            // kernel's backlog and cost the daemon no descriptor.
            if slots.available_permits() == 0
                && warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY)
            {
                warned_full = Some(Instant::now());
                tracing::warn!(
                    max_connections = self.max_connections,
                    "http endpoint: at its connection limit; new connections wait in the \
                     listen backlog until one closes"
                );
            }
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return, // never closed
                },
                _ = shutdown.cancelled() => return,
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file handles and the like: back off instead of spinning.
                    tracing::warn!("http endpoint: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let endpoint = self.endpoint.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                // The slot (and the descriptor) is given back when this task ends.
                let _slot = slot;
                let service = hyper::service::service_fn(move |request: HttpRequest<Incoming>| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, Infallible>(endpoint.respond(request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
                    }
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }
}

impl Endpoint {
    async fn respond(&self, request: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if !matches!(path, "/metrics" | "/status" | "/healthz") {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /status or /healthz\n",
            );
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
            response.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            return response;
        }
        match path {
            "/metrics" => response(
                StatusCode::OK,
                crate::daemon::metrics::CONTENT_TYPE,
                self.metrics.encode(),
            ),
            "/status" => match self.ask_status(STATUS_LIMIT).await {
                Ok(status) => response(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&status).unwrap_or_default() + "\n",
                ),
                Err(reason) => response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    serde_json::json!({"daemon": "not answering", "error": reason}).to_string()
                        + "\n",
                ),
            },
            _ => match self.ask_status(HEALTH_LIMIT).await {
                Ok(_) => plain(StatusCode::OK, "ok\n"),
                Err(reason) => plain(StatusCode::SERVICE_UNAVAILABLE, &format!("{reason}\n")),
            },
        }
    }

    /// Asks the driver for its status, as `rollbackd status` does through the socket.
    async fn ask_status(&self, limit: Duration) -> Result<Value, String> {
        let (replies, mut answers) = mpsc::channel(4);
        let command = Command {
            operator: self.operator.clone(),
            request: Request::Status,
            replies,
        };
        let ask = async {
            self.commands
                .send(command)
                .await
                .map_err(|_| "the driver has stopped".to_owned())?;
            loop {
                match answers.recv().await {
                    Some(Reply::Done { result }) => return Ok(result),
                    Some(Reply::Failed { message, .. }) => return Err(message),
                    Some(Reply::Progress { .. }) => continue,
                    None => return Err("the driver dropped the request".to_owned()),
                }
            }
        };
        tokio::time::timeout(limit, ask).await.unwrap_or_else(|_| {
            Err(format!(
                "the driver did not answer within {}",
                crate::config::show(limit)
            ))
        })
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.to_owned())
}
