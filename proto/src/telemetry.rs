//! Prometheus metrics, shared by the coordinator and the party: serving a
//! registry at `/metrics` on a listen address of its own, and the small
//! vocabulary both sides label their series with.
//!
//! Each process part (a coordinator, a party) owns its own
//! [`prometheus::Registry`] rather than a global one, so that a coordinator
//! and parties sharing a process (tests, `confide-bench`) keep apart.
//! Labels never carry secrets or row data, and their values come from
//! bounded sets: party and data-set names (enrolled, configured), stage
//! names (the protocols'), and the reason classes below. Series labelled by
//! job exist only while the job runs (their owners remove them when it ends).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{Encoder, Registry, TextEncoder};

/// `[metrics]` in the coordinator's or a party's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served (plain HTTP, no TLS: bind it to loopback
    /// or a monitoring network). Absent: no metrics endpoint.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// Called before each scrape, to set the gauges read off state (connected
/// parties, jobs by state, the privacy ledger).
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// The registry in the Prometheus text format (version 0.0.4).
pub fn render(registry: &Registry) -> Result<String, String> {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).map_err(|e| format!("cannot encode metrics: {e}"))?;
    String::from_utf8(out).map_err(|e| format!("cannot encode metrics: {e}"))
}

/// A running `/metrics` endpoint.
pub struct MetricsServer {
    /// The address it listens on (the port chosen when the config said 0).
    pub local_addr: SocketAddr,
    join: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Stops serving.
    pub fn stop(self) {
        self.join.abort();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.join.abort();
    }
}

/// Serves `registry` at `GET /metrics` on `listen`, calling `refresh` before
/// each scrape. An address that cannot be bound is an error naming it.
pub async fn serve(listen: SocketAddr, registry: Registry, refresh: Refresh) -> Result<MetricsServer, String> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("metrics.listen: cannot listen on {listen}: {e}"))?;
    let local_addr = listener.local_addr().map_err(|e| format!("metrics.listen: {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let (registry, refresh) = (registry.clone(), refresh.clone());
            async move {
                refresh();
                match render(&registry) {
                    Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e),
                }
            }
        }),
    );
    let join = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(MetricsServer { local_addr, join })
}

/// The bounded class of a dropout's or refusal's free-text reason, for a
/// label: `timeout`, `disconnected`, `misbehaved`, `refused` or `other`.
pub fn reason_class(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("timed out") || r.contains("timeout") || r.contains("deadline") {
        "timeout"
    } else if r.contains("not connected") || r.contains("disconnected") || r.contains("closed") {
        "disconnected"
    } else if r.contains("misbehaved") || r.contains("invalid") || r.contains("does not match") {
        "misbehaved"
    } else if r.contains("refused") || r.contains("declined") || r.contains("policy") {
        "refused"
    } else {
        "other"
    }
}

/// Histogram buckets for durations from a millisecond to ten minutes.
pub const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Registers `c` in `r` and hands it back, to keep as a field.
pub fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> Result<T, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Options of a duration histogram with [`DURATION_BUCKETS`].
pub fn duration_histogram(name: &str, help: &str) -> prometheus::HistogramOpts {
    prometheus::HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fall_into_bounded_classes() {
        assert_eq!(reason_class("fit: timed out"), "timeout");
        assert_eq!(reason_class("secagg-shares: not connected"), "disconnected");
        assert_eq!(reason_class("party p1 misbehaved: a bad signature"), "misbehaved");
        assert_eq!(reason_class("refused the job: policy.max_epsilon"), "refused");
        assert_eq!(reason_class("anything else"), "other");
    }

    #[tokio::test]
    async fn serves_the_registry_in_the_text_format() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("confide_test_total", "A test counter.").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        let refreshed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r2 = refreshed.clone();
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            Arc::new(move || {
                r2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                c.inc();
            }),
        )
        .await
        .unwrap();
        let body = http_get(server.local_addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(body.contains("confide_test_total 1"), "{body}");
        assert_eq!(refreshed.load(std::sync::atomic::Ordering::SeqCst), 1);
        let taken = serve(server.local_addr, Registry::new(), Arc::new(|| {})).await.err().unwrap();
        assert!(taken.contains("metrics.listen") && taken.contains(&server.local_addr.to_string()), "{taken}");
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}
