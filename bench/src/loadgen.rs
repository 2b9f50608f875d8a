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
    /// Rows the cloud tier answered (joint inference).
    pub rows_from_cloud: u64,
    /// Hard rows the edge answered itself (flagged: not forwarded).
    pub rows_edge_fallback: u64,
    /// Median latency of requests the cloud tier answered, ms.
    pub cloud_p50_ms: f64,
    /// Their 99th percentile, ms.
    pub cloud_p99_ms: f64,
    /// With labels: whether each body's (single) row was predicted right,
    /// by its first answer (`None`: never answered).
    #[serde(skip)]
    pub correct: Vec<Option<bool>>,
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
    from_cloud: u64,
    fallback: u64,
    cloud_latencies_ms: Vec<f64>,
    correct: Vec<Option<bool>>,
}

async fn one_client(
    addr: SocketAddr,
    path: String,
    bodies: Vec<Bytes>,
    labels: Option<Vec<u32>>,
    first: usize,
    until: Instant,
) -> ClientResult {
    let mut r = ClientResult {
        latencies_ms: Vec::new(),
        failures: 0,
        first_failure: None,
        versions: BTreeMap::new(),
        from_cloud: 0,
        fallback: 0,
        cloud_latencies_ms: Vec::new(),
        correct: vec![None; if labels.is_some() { bodies.len() } else { 0 }],
    };
    let mut next = first;
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
        let index = next % bodies.len().max(1);
        let body = bodies[index].clone();
        next += 1;
        let t0 = Instant::now();
        match client.request("POST", &path, body).await {
            Ok((200, answer)) => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let v = serde_json::from_slice::<serde_json::Value>(&answer).unwrap_or_default();
                match v["version"]["sequence"].as_u64() {
                    Some(seq) => {
                        *r.versions.entry(seq).or_default() += 1;
                        r.latencies_ms.push(ms);
                        let by = v["provenance"]["answered_by"].as_array().cloned().unwrap_or_default();
                        let hard = v["hard"].as_array().cloned().unwrap_or_default();
                        let cloud_rows = by.iter().filter(|b| *b == "cloud").count() as u64;
                        r.from_cloud += cloud_rows;
                        if cloud_rows > 0 {
                            r.cloud_latencies_ms.push(ms);
                        }
                        if let Some(labels) = &labels
                            && r.correct[index].is_none()
                        {
                            r.correct[index] = Some(v["predictions"][0].as_u64() == Some(u64::from(labels[index])));
                        }
                        r.fallback += by.iter().zip(&hard).filter(|(b, h)| *b == "edge" && **h == true).count() as u64;
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
    run_bodies(addr, path, vec![body], None, rows, clients, duration).await
}

/// [`run`] with requests taken in turn from `bodies` (each of `rows` rows),
/// each client starting at a different one; with `labels` (one per body of
/// one row), which bodies were predicted right.
pub async fn run_bodies(
    addr: SocketAddr,
    path: &str,
    bodies: Vec<Bytes>,
    labels: Option<Vec<u32>>,
    rows: usize,
    clients: usize,
    duration: Duration,
) -> LoadReport {
    let start = Instant::now();
    let until = start + duration;
    let spread = bodies.len() / clients.max(1);
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|c| tokio::spawn(one_client(addr, path.to_owned(), bodies.clone(), labels.clone(), c * spread, until)))
        .collect();
    let mut latencies = Vec::new();
    let (mut failures, mut first_failure, mut versions) = (0, None, BTreeMap::new());
    let (mut from_cloud, mut fallback) = (0, 0);
    let mut cloud_latencies = Vec::new();
    let mut correct: Vec<Option<bool>> = vec![None; if labels.is_some() { bodies.len() } else { 0 }];
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
                from_cloud += r.from_cloud;
                fallback += r.fallback;
                cloud_latencies.extend(r.cloud_latencies_ms);
                for (c, mine) in correct.iter_mut().zip(r.correct) {
                    if c.is_none() {
                        *c = mine;
                    }
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
    cloud_latencies.sort_by(f64::total_cmp);
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
        rows_from_cloud: from_cloud,
        rows_edge_fallback: fallback,
        cloud_p50_ms: percentile(&cloud_latencies, 0.5),
        cloud_p99_ms: percentile(&cloud_latencies, 0.99),
        correct,
    }
}

/// Request bodies covering every row of `values` in turn, `rows` per
/// request (the last wraps around to the first rows).
pub fn bodies(values: &[f32], width: usize, rows: usize) -> Vec<Bytes> {
    let total = values.len() / width.max(1);
    let rows = rows.max(1);
    (0..total.div_ceil(rows).max(1))
        .map(|b| {
            let picked: Vec<&[f32]> =
                (0..rows).map(|i| &values[((b * rows + i) % total.max(1)) * width..][..width]).collect();
            Bytes::from(serde_json::json!({ "rows": picked }).to_string())
        })
        .collect()
}

/// A request body of `rows` rows of `width` features, from `values`
/// (row-major, cycled).
pub fn body(values: &[f32], width: usize, rows: usize) -> Bytes {
    let total = values.len() / width.max(1);
    let rows: Vec<&[f32]> = (0..rows).map(|i| &values[(i % total.max(1)) * width..][..width]).collect();
    Bytes::from(serde_json::json!({ "rows": rows }).to_string())
}
