//! The party's local prediction endpoint (axum):
//!
//! * `POST /v1/services/{name}/predict` with `{"rows": [[f, ...], ...]}`
//!   answers `{"service", "probabilities", "predictions", "hard", "version",
//!   "provenance"}` (per row, who answered: the edge or, for a hard example
//!   of a service with a cloud tier, the cloud);
//! * `GET /healthz` answers `{"status": "ok", "services": {...}}` with each
//!   service's deployed version (or `ready: false`).
//!
//! Errors are JSON `{"error": "..."}` naming what is wrong: 400 for a body
//! that is not the expected JSON (with the path of the first bad value), 404
//! for a service not served here, 413 for a body or row count over the
//! limits, 415 for a body not sent as `application/json`, 421 for another
//! host name, 422 for a row of the wrong width, 503 before a first
//! deployment or for a request not read and answered in time.
//!
//! The endpoint holds at most [`MAX_CONNECTIONS`] connections (more wait
//! to be accepted), closes one that moves no byte for [`IDLE_TIMEOUT`],
//! gives a request's head [`HEADER_TIMEOUT`] and the whole request
//! [`REQUEST_TIMEOUT`] (a client dripping a byte at a time holds its slot
//! no longer), and parses at most [`MAX_PARSING`] bodies at once, on
//! blocking threads (a parsed body takes several times its size).
//!
//! Browsers: it answers only requests whose `Host` is `localhost`, an IP
//! literal or a name in `[serve] allow_hosts` (421 otherwise; no `Host` at
//! all, which no browser sends, is answered), so a web page that rebinds its own name to the endpoint's
//! address (DNS rebinding), which sends that name, gets nothing. It sends
//! no CORS headers, and a prediction must be sent as `application/json`, so
//! a page of another origin cannot make a browser post one without a
//! preflight the endpoint does not answer. It has no authentication of its
//! own: keep it internal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{Registry, RowSource, ServeError, Served};

/// Connections the endpoint holds at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that moves no byte either way for this long is closed: an
/// idle keep-alive, a client that stopped sending its request, or one that
/// does not read its answer. Longer than a request can take to answer
/// (hyper keeps reading while it runs): the longest cloud wait a deployment
/// may set is 60 s (`joint.timeout_ms`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A request's head (its line and headers) must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A request must be read and answered within this (503 otherwise): the
/// longest cloud wait (60 s) with room for the body and the model.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(100);
/// Bodies parsed at once (the rest wait): parsed JSON takes many times the
/// bytes it came in.
pub const MAX_PARSING: usize = 4;

/// The endpoint's state: the registry, and the parsing slots.
#[derive(Clone)]
struct Endpoint {
    registry: Arc<Registry>,
    parsing: Arc<Semaphore>,
}

/// How long the endpoint waits, and for how many connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub connections: usize,
    pub idle: Duration,
    pub header: Duration,
    pub request: Duration,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds { connections: MAX_CONNECTIONS, idle: IDLE_TIMEOUT, header: HEADER_TIMEOUT, request: REQUEST_TIMEOUT }
    }
}

/// The endpoint's routes over `registry`.
pub fn router(registry: Arc<Registry>) -> Router {
    router_within(registry, REQUEST_TIMEOUT)
}

fn router_within(registry: Arc<Registry>, request_timeout: Duration) -> Router {
    let limit = registry.config().max_body_bytes;
    let hosts = Arc::new(HostGuard { names: registry.config().allow_hosts.clone() });
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/services/{name}/predict", post(predict))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(request_timeout, within_request_timeout))
        .layer(axum::middleware::from_fn_with_state(hosts, host_guard))
        .with_state(Endpoint { registry, parsing: Arc::new(Semaphore::new(MAX_PARSING)) })
}

/// The `Host` names the endpoint answers for besides `localhost` and IP
/// addresses.
struct HostGuard {
    names: Vec<String>,
}

/// Refuses a request for another host name (DNS rebinding), naming it.
async fn host_guard(
    State(guard): State<Arc<HostGuard>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // No Host at all (an HTTP/1.0 health check) is no browser's: a browser
    // always sends the name it resolved.
    let Some(host) = req.headers().get(axum::http::header::HOST) else { return next.run(req).await };
    let host = host.to_str().unwrap_or("");
    if !confide_proto::net::http_host_allowed(host, &guard.names) {
        let shown: String = host.chars().take(256).collect();
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this endpoint does not answer for host {shown:?}: use localhost, an IP address or a name in \
                 [serve] allow_hosts"
            ),
        );
    }
    next.run(req).await
}

/// Ends a request that takes longer than `limit` ([`REQUEST_TIMEOUT`]) to
/// read and answer.
async fn within_request_timeout(
    State(limit): State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        // 503, not 408: a client may send a 408's request again by itself,
        // and this one may have been read whole (and forwarded).
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the request was not read and answered within {:.1} s", limit.as_secs_f64()),
        ),
    }
}

/// Binds `addr` and serves the endpoint until the process ends; returns the
/// bound address (useful with port 0).
pub async fn serve(registry: Arc<Registry>, addr: SocketAddr) -> Result<SocketAddr, String> {
    serve_with(registry, addr, Bounds::default()).await
}

/// [`serve`] within `bounds` (tests shorten them).
pub(crate) async fn serve_with(
    registry: Arc<Registry>,
    addr: SocketAddr,
    bounds: Bounds,
) -> Result<SocketAddr, String> {
    let Bounds { connections, idle, header, request } = bounds;
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("serve.listen {addr}: cannot bind: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("serve.listen {addr}: {e}"))?;
    if !bound.ip().is_loopback() && registry.config().allow_hosts.is_empty() {
        tracing::warn!(
            %bound,
            "the prediction endpoint listens beyond loopback and answers only requests that name it by IP address \
             or localhost: list the names clients use in [serve] allow_hosts"
        );
    }
    let app = router_within(registry, request);
    // An answer must be written within the request's bound and the idle
    // one of its first byte (its size is bounded).
    let answer_within = request + idle;
    confide_proto::http::serve(
        listener,
        app,
        confide_proto::http::Bounds { connections, idle, header, answer_within },
        "prediction endpoint",
    );
    Ok(bound)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn status_of(e: &ServeError) -> StatusCode {
    match e {
        ServeError::UnknownService(_) => StatusCode::NOT_FOUND,
        ServeError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        ServeError::WrongWidth { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        ServeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ServeError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn version_json(s: &Served) -> Value {
    let r = &s.deployment.record;
    json!({
        "sequence": r.sequence,
        "action": r.action.as_str(),
        "job_id": r.job_id,
        "round": r.round,
        "sha256": r.sha256,
    })
}

async fn healthz(State(endpoint): State<Endpoint>) -> Response {
    let registry = endpoint.registry;
    let services: serde_json::Map<String, Value> = registry
        .services()
        .into_iter()
        .map(|(name, served)| {
            let v = match served {
                Some(s) => {
                    json!({ "ready": true, "width": s.width, "classes": s.classes(), "version": version_json(&s) })
                }
                None => json!({ "ready": false }),
            };
            (name, v)
        })
        .collect();
    axum::Json(json!({ "status": "ok", "services": services })).into_response()
}

/// The rows of a request body, row-major, with their count and width; the
/// error names the first bad value by its path.
pub fn parse_rows(body: &[u8], max_rows: usize) -> Result<(Vec<f32>, usize, usize), ServeError> {
    let bad = |m: String| ServeError::BadRequest(m);
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut obj) = v else { return Err(bad("the body must be a JSON object with \"rows\"".into())) };
    if let Some(k) = obj.keys().find(|k| k.as_str() != "rows") {
        return Err(bad(format!("unknown field {k:?} (the body has \"rows\" only)")));
    }
    let Some(Value::Array(rows)) = obj.remove("rows") else {
        return Err(bad("rows: missing, or not an array of rows".into()));
    };
    if rows.is_empty() {
        return Err(bad("rows: empty".into()));
    }
    if rows.len() > max_rows {
        return Err(ServeError::TooLarge(format!("rows: {} rows, at most {max_rows} per request", rows.len())));
    }
    let width = match &rows[0] {
        Value::Array(r) => r.len(),
        _ => return Err(bad("rows[0]: not an array of numbers".into())),
    };
    // Every row's shape first: only then is the output sized, by values the
    // body holds (a wide first row and short ones after it asked for
    // rows × width floats up front, gigabytes from a 4 MiB body).
    for (i, row) in rows.iter().enumerate() {
        let Value::Array(row) = row else { return Err(bad(format!("rows[{i}]: not an array of numbers"))) };
        if row.len() != width {
            return Err(bad(format!("rows[{i}]: {} values, but rows[0] has {width}", row.len())));
        }
    }
    let mut out = Vec::with_capacity(rows.len() * width);
    for (i, row) in rows.iter().enumerate() {
        let Value::Array(row) = row else { return Err(bad(format!("rows[{i}]: not an array of numbers"))) };
        for (j, x) in row.iter().enumerate() {
            match x.as_f64() {
                Some(f) if f.is_finite() && f.abs() <= f64::from(f32::MAX) => out.push(f as f32),
                _ => return Err(bad(format!("rows[{i}][{j}]: {x} is not a finite number"))),
            }
        }
    }
    Ok((out, rows.len(), width))
}

async fn predict(
    State(endpoint): State<Endpoint>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let registry = endpoint.registry;
    // JSON only: a cross-origin post of another type (what a web page can
    // send without a preflight) is refused before anything else.
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the body must be sent as Content-Type: application/json");
    }
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body exceeds {} bytes ([serve] max_body_bytes)", registry.config().max_body_bytes),
            );
        }
        Err(r) => return error(r.status(), r.body_text()),
    };
    // Unknown or not yet deployed: said before the body is parsed.
    let served = match registry.current(&name) {
        Ok(s) => s,
        Err(e) => return error(status_of(&e), e.to_string()),
    };
    // Off the async threads, a few at a time.
    let parsed = match endpoint.parsing.clone().acquire_owned().await {
        Ok(slot) => {
            let max_rows = registry.config().max_rows;
            tokio::task::spawn_blocking(move || {
                let parsed = parse_rows(&body, max_rows);
                drop(slot);
                parsed
            })
            .await
            .unwrap_or_else(|e| Err(ServeError::Failed(format!("parsing the body: {e}"))))
        }
        // The semaphore is never closed.
        Err(_) => Err(ServeError::Failed("the endpoint is shutting down".into())),
    };
    let (rows, count, width) = match parsed {
        Ok(r) => r,
        Err(e) => return error(status_of(&e), e.to_string()),
    };
    if width != served.width {
        let e = ServeError::WrongWidth { service: name, what: "rows[0]".into(), got: width, expected: served.width };
        return error(status_of(&e), e.to_string());
    }
    match registry.answer(&name, rows, count, width).await {
        Ok(p) => {
            let k = p.served.classes().max(1);
            let probabilities: Vec<&[f32]> = p.probabilities.chunks(k).collect();
            let predictions: Vec<usize> = probabilities
                .iter()
                .map(|row| row.iter().enumerate().fold(0, |best, (c, &v)| if v > row[best] { c } else { best }))
                .collect();
            let r = &p.served.deployment.record;
            let answered_by: Vec<&str> = p.sources.iter().map(|s| s.as_str()).collect();
            let hard: Vec<bool> = p.sources.iter().map(|s| *s != RowSource::Edge).collect();
            axum::Json(json!({
                "service": name,
                "probabilities": probabilities,
                "predictions": predictions,
                "hard": hard,
                "version": version_json(&p.served),
                "provenance": {
                    "answered_by": answered_by,
                    "signed_by": r.admin,
                    "issued_at": r.issued_at,
                    "cloud": p.cloud,
                    "fallback": p.fallback,
                },
            }))
            .into_response()
        }
        Err(e) => error(status_of(&e), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wide first row followed by short ones is refused before anything
    /// is sized by rows × width (2M values × 4096 rows was 34 GB asked for
    /// at once, which aborts the process where it cannot be had).
    #[test]
    fn a_wide_first_row_is_refused_before_the_output_is_sized() {
        let mut body = String::from("{\"rows\":[[");
        body.push_str(&vec!["0"; 2_000_000].join(","));
        body.push(']');
        for _ in 0..4095 {
            body.push_str(",[0]");
        }
        body.push_str("]}");
        let e = parse_rows(body.as_bytes(), 4096).unwrap_err().to_string();
        assert!(e.contains("rows[1]: 1 values, but rows[0] has 2000000"), "{e}");
    }

    #[test]
    fn bad_bodies_are_named_by_the_path_of_the_first_bad_value() {
        let e = |b: &str| parse_rows(b.as_bytes(), 3).unwrap_err().to_string();
        assert!(e("nope").contains("not JSON"));
        assert!(e("[1]").contains("JSON object"));
        assert!(e("{\"rows\": [[1, 2]], \"x\": 1}").contains("unknown field \"x\""));
        assert!(e("{\"rows\": 3}").starts_with("rows:"));
        assert!(e("{\"rows\": []}").contains("empty"));
        assert!(e("{\"rows\": [[1], [2], [3], [4]]}").contains("at most 3"));
        assert!(e("{\"rows\": [[1, 2], [3]]}").contains("rows[1]: 1 values"));
        assert!(e("{\"rows\": [[1, \"a\"]]}").contains("rows[0][1]: \"a\" is not a finite number"));
        assert!(e("{\"rows\": [[1, 1e300]]}").contains("rows[0][1]"));
        assert!(e("{\"rows\": [7]}").contains("rows[0]: not an array"));
        let (v, n, w) = parse_rows(b"{\"rows\": [[1, 2.5], [3, -4]]}", 3).unwrap();
        assert_eq!((v, n, w), (vec![1.0, 2.5, 3.0, -4.0], 2, 2));
    }
}
