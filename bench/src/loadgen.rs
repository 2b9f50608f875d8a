//! An HTTP/1.1 load generator for prediction endpoints, on hyper's client:
//! `clients` keep-alive connections each send requests back to back for a
//! fixed time; every answer is checked (status 200, a JSON body with a
//! `version`) and its latency recorded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// One keep-alive HTTP/1.1 connection.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Client, String> {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client { sender, host: addr.to_string() })
    }

    /// Sends one request; returns the status and the body.
    pub async fn request(&mut self, method: &str, path: &str, body: Bytes) -> Result<(u16, Bytes), String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = self.sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, body))
    }
}

/// One request on a fresh connection: status and body as text.
pub async fn request_once(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut c = Client::connect(addr).await?;
    let (status, body) = c.request(method, path, Bytes::from(body.to_owned())).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests answered (any status).
    pub requests: u64,
    /// Requests that failed: a status other than 200, a body that is not a
    /// prediction, or a broken connection.
    pub failures: u64,
    /// The first failure, for the report.
    pub first_failure: Option<String>,
    /// Rows per request.
    pub rows_per_request: usize,
    /// Concurrent connections.
    pub clients: usize,
    /// Wall time of the run.
    pub seconds: f64,
    /// Successful requests per second.
    pub requests_per_sec: f64,
    /// Rows answered per second.
    pub rows_per_sec: f64,
    /// Median latency of successful requests, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Answers by deployment sequence (which version answered).
    pub versions: BTreeMap<u64, u64>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct ClientResult {
    latencies_ms: Vec<f64>,
    failures: u64,
    first_failure: Option<String>,
    versions: BTreeMap<u64, u64>,
}

async fn one_client(addr: SocketAddr, path: String, body: Bytes, until: Instant) -> ClientResult {
    let mut r = ClientResult { latencies_ms: Vec::new(), failures: 0, first_failure: None, versions: BTreeMap::new() };
    let fail = |r: &mut ClientResult, why: String| {
        r.failures += 1;
        r.first_failure.get_or_insert(why);
    };
    let mut client = match Client::connect(addr).await {
        Ok(c) => c,
        Err(e) => {
            fail(&mut r, e);
            return r;
        }
    };
    while Instant::now() < until {
        let t0 = Instant::now();
        match client.request("POST", &path, body.clone()).await {
            Ok((200, answer)) => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                match serde_json::from_slice::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["version"]["sequence"].as_u64())
                {
                    Some(seq) => {
                        *r.versions.entry(seq).or_default() += 1;
                        r.latencies_ms.push(ms);
                    }
                    None => fail(&mut r, format!("not a prediction: {}", String::from_utf8_lossy(&answer))),
                }
            }
            Ok((status, answer)) => fail(&mut r, format!("{status}: {}", String::from_utf8_lossy(&answer))),
            Err(e) => {
                fail(&mut r, e);
                match Client::connect(addr).await {
                    Ok(c) => client = c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }
    r
}

/// Drives `POST path` at `addr` with `body` (a request of `rows` rows) from
/// `clients` connections for `duration`.
pub async fn run(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    rows: usize,
    clients: usize,
    duration: Duration,
) -> LoadReport {
    let start = Instant::now();
    let until = start + duration;
    let tasks: Vec<_> =
        (0..clients.max(1)).map(|_| tokio::spawn(one_client(addr, path.to_owned(), body.clone(), until))).collect();
    let mut latencies = Vec::new();
    let (mut failures, mut first_failure, mut versions) = (0, None, BTreeMap::new());
    for t in tasks {
        match t.await {
            Ok(r) => {
                latencies.extend(r.latencies_ms);
                failures += r.failures;
                if first_failure.is_none() {
                    first_failure = r.first_failure;
                }
                for (k, v) in r.versions {
                    *versions.entry(k).or_default() += v;
                }
            }
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert(e.to_string());
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let ok = latencies.len() as u64;
    LoadReport {
        requests: ok + failures,
        failures,
        first_failure,
        rows_per_request: rows,
        clients,
        seconds,
        requests_per_sec: ok as f64 / seconds,
        rows_per_sec: (ok as usize * rows) as f64 / seconds,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        versions,
    }
}

/// A request body of `rows` rows of `width` features, from `values`
/// (row-major, cycled).
pub fn body(values: &[f32], width: usize, rows: usize) -> Bytes {
    let total = values.len() / width.max(1);
    let rows: Vec<&[f32]> = (0..rows).map(|i| &values[(i % total.max(1)) * width..][..width]).collect();
    Bytes::from(serde_json::json!({ "rows": rows }).to_string())
}
