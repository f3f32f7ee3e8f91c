//! A fake Prometheus query API on loopback (a std thread per connection, so it serves
//! tokio tests and tests of the real binary alike): answers `/api/v1/query` and
//! `/api/v1/query_range` from a closure over the decoded request, and records every
//! request it saw.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the fake saw it: the path and the decoded query parameters.
#[derive(Debug, Clone)]
pub struct PromRequest {
    pub path: String,
    pub params: BTreeMap<String, String>,
}

impl PromRequest {
    /// The PromQL expression (`query`).
    pub fn query(&self) -> &str {
        self.params.get("query").map(String::as_str).unwrap_or("")
    }

    pub fn is_range(&self) -> bool {
        self.path.ends_with("/query_range")
    }

    /// A number parameter (`start`, `end`; `step` as rollbackd sends it, `30s`).
    pub fn param_f64(&self, name: &str) -> f64 {
        self.params
            .get(name)
            .and_then(|v| v.trim_end_matches('s').parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// HTTP status and body.
pub type Answer = (u16, String);
type Answerer = dyn Fn(&PromRequest) -> Answer + Send + Sync;

pub struct FakePrometheus {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<PromRequest>>>,
}

impl FakePrometheus {
    pub fn start(answer: impl Fn(&PromRequest) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<Answerer> = Arc::new(answer);
        let recorded = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let answer = Arc::clone(&answer);
                let recorded = Arc::clone(&recorded);
                std::thread::spawn(move || serve(stream, &*answer, &recorded));
            }
        });
        FakePrometheus { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<PromRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// The expressions of the instant queries received, in order.
    pub fn instant_queries(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| !r.is_range())
            .map(|r| r.query().to_owned())
            .collect()
    }
}

fn serve(mut stream: TcpStream, answer: &Answerer, seen: &Mutex<Vec<PromRequest>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header == "\r\n" || header == "\n" => break,
            Ok(_) => {}
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let url = reqwest::Url::parse(&format!("http://fake{target}")).unwrap();
    let request = PromRequest {
        path: url.path().to_owned(),
        params: url.query_pairs().into_owned().collect(),
    };
    seen.lock().unwrap().push(request.clone());
    let (status, body) = answer(&request);
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// An instant vector of one series with `value`.
pub fn vector(value: &str) -> Answer {
    (
        200,
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1700000000.5,"{value}"]}}]}}}}"#
        ),
    )
}

/// An instant vector with no series.
pub fn empty_vector() -> Answer {
    (
        200,
        r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#.into(),
    )
}

/// A range result of one series with these `(unix seconds, value)` points.
pub fn matrix(points: &[(f64, String)]) -> Answer {
    let values: Vec<String> = points
        .iter()
        .map(|(at, value)| format!(r#"[{at},"{value}"]"#))
        .collect();
    (
        200,
        format!(
            r#"{{"status":"success","data":{{"resultType":"matrix","result":[{{"metric":{{}},"values":[{}]}}]}}}}"#,
            values.join(",")
        ),
    )
}

/// The API's error envelope, as Prometheus sends it for a PromQL syntax error (HTTP 400).
pub fn bad_data(message: &str) -> Answer {
    (
        400,
        format!(r#"{{"status":"error","errorType":"bad_data","error":{message:?}}}"#),
    )
}

/// The points Prometheus would return for `start..=end` every `step` seconds, each
/// `value(at)`.
pub fn steps(start: f64, end: f64, step: f64, value: impl Fn(f64) -> String) -> Vec<(f64, String)> {
    let mut points = Vec::new();
    let mut at = start;
    while at <= end + 1e-9 {
        points.push((at, value(at)));
        at += step;
    }
    points
}
