//! The operator's HTTP endpoint (`[http] listen`): `/metrics` (OpenMetrics text of
//! [`crate::metrics`]), `/status` (the JSON of `rollbackd status --json`) and `/healthz`.
//!
//! `/status` and `/healthz` ask the driver through the same command channel the control
//! socket uses, so the driver stays the single owner of the state and this module reads
//! nothing itself. `/healthz` is therefore a real liveness test of the driver loop: it
//! fails when the loop does not answer within a second (stuck, or shutting down).
//! Only GET (and HEAD, which hyper answers without a body) is served; other methods
//! get 405.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::{Command, Operator, Reply, Request};
use crate::metrics::Metrics;

/// How long `/healthz` waits for the driver to answer.
const HEALTH_LIMIT: Duration = Duration::from_secs(1);
/// How long `/status` waits (it reads the kill switch, which may wait on a busy database).
const STATUS_LIMIT: Duration = Duration::from_secs(5);

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
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port; see [`HttpServer::local_addr`]).
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
        Ok(HttpServer {
            listener,
            endpoint: Endpoint {
                metrics,
                commands,
                operator,
            },
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`; open connections are dropped then.
    pub async fn serve(self, shutdown: CancellationToken) {
        loop {
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
                let service = hyper::service::service_fn(move |request: HttpRequest<Incoming>| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, Infallible>(endpoint.respond(request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = connection => {}
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
                crate::metrics::CONTENT_TYPE,
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
