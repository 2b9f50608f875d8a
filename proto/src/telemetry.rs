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
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served (plain HTTP, no TLS: bind it to loopback
    /// or a monitoring network). Absent: no metrics endpoint.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Host names (besides `localhost` and IP addresses) a scrape may name
    /// in its `Host` header: the names Prometheus's targets use. Any other
    /// is refused (421), so a web page that rebinds its own name to the
    /// endpoint (DNS rebinding) reads nothing (a party's metrics hold the
    /// ε each data set has spent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
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
/// each scrape, to requests whose `Host` is `localhost`, an IP address or
/// one of `allow_hosts` (or that send none: no browser does). An address
/// that cannot be bound is an error naming it.
pub async fn serve(
    listen: SocketAddr,
    allow_hosts: Vec<String>,
    registry: Registry,
    refresh: Refresh,
) -> Result<MetricsServer, String> {
    serve_with(listen, allow_hosts, registry, refresh, MIN_REFRESH_INTERVAL).await
}

/// The shortest time between two refreshes: scrapes closer together share
/// the last one. A refresh reads files and the database (on a blocking
/// thread, not the runtime that also serves the federation's streams), so a
/// flood of scrapes must not mean a flood of reads (found by review).
pub const MIN_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// [`serve`] with refreshes at most every `min_refresh` (tests use zero).
async fn serve_with(
    listen: SocketAddr,
    allow_hosts: Vec<String>,
    registry: Registry,
    refresh: Refresh,
    min_refresh: std::time::Duration,
) -> Result<MetricsServer, String> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("metrics.listen: cannot listen on {listen}: {e}"))?;
    let local_addr = listener.local_addr().map_err(|e| format!("metrics.listen: {e}"))?;
    // When the gauges were last refreshed; held while one refresh runs, so
    // concurrent scrapes wait for it instead of starting their own.
    let last_refresh: Arc<tokio::sync::Mutex<Option<tokio::time::Instant>>> = Arc::default();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let (registry, refresh, last_refresh) = (registry.clone(), refresh.clone(), last_refresh.clone());
            async move {
                let mut last = last_refresh.lock_owned().await;
                if last.is_none_or(|t| t.elapsed() >= min_refresh) {
                    // Recorded first, and the lock held by the blocking task
                    // until the refresh ends: a scrape that hangs up meanwhile
                    // does not let the next one start a second refresh.
                    *last = Some(tokio::time::Instant::now());
                    let refreshing = tokio::task::spawn_blocking(move || {
                        refresh();
                        // And again at its end: a refresh longer than the
                        // interval must not start one per waiting scrape.
                        *last = Some(tokio::time::Instant::now());
                        drop(last);
                    });
                    if let Err(e) = refreshing.await {
                        tracing::warn!("refreshing the metrics failed: {e}");
                    }
                } else {
                    drop(last);
                }
                match render(&registry) {
                    Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e),
                }
            }
        }),
    );
    if !local_addr.ip().is_loopback() && allow_hosts.is_empty() {
        tracing::warn!(
            %local_addr,
            "the metrics endpoint listens beyond loopback and answers only scrapes that name it by IP address or \
             localhost: list the names Prometheus uses in metrics.allow_hosts"
        );
    }
    let allow_hosts = Arc::new(allow_hosts);
    let app = app.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let allow_hosts = allow_hosts.clone();
        async move {
            use axum::response::IntoResponse;
            let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or(""));
            match host {
                Some(h) if !crate::net::http_host_allowed(h, &allow_hosts) => (
                    StatusCode::MISDIRECTED_REQUEST,
                    "this metrics endpoint does not answer for that host: use localhost, an IP address or a name in \
                     metrics.allow_hosts\n",
                )
                    .into_response(),
                _ => next.run(req).await,
            }
        }
    }));
    // Bounded: silent clients must not hold this process's descriptors
    // (it also keeps the ledger, the data sets and the federation links).
    let join = crate::http::serve(listener, app, crate::http::Bounds::SMALL, "metrics endpoint");
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

    /// A scrape for another host name (a web page that rebound its own name
    /// to the endpoint) reads nothing; localhost, an IP address, a listed
    /// name or no Host at all (no browser) does.
    #[tokio::test]
    async fn serves_the_registry_in_the_text_format() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("confide_test_total", "A test counter.").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        let refreshed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r2 = refreshed.clone();
        let server = serve_with(
            "127.0.0.1:0".parse().unwrap(),
            vec!["prometheus-target.internal".into()],
            registry,
            Arc::new(move || {
                r2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                c.inc();
            }),
            std::time::Duration::ZERO,
        )
        .await
        .unwrap();
        let here = server.local_addr.to_string();
        let body = http_get(server.local_addr, "/metrics", Some(&here)).await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(body.contains("confide_test_total 1"), "{body}");
        assert_eq!(refreshed.load(std::sync::atomic::Ordering::SeqCst), 1);
        for host in [Some("localhost:9464"), Some("prometheus-target.internal:9100"), None] {
            let body = http_get(server.local_addr, "/metrics", host).await;
            assert!(body.contains("confide_test_total"), "{host:?}: {body}");
        }
        let body = http_get(server.local_addr, "/metrics", Some("attacker.example:9464")).await;
        assert!(body.starts_with("HTTP/1.1 421") && !body.contains("confide_test_total"), "{body}");
        assert_eq!(refreshed.load(std::sync::atomic::Ordering::SeqCst), 4, "no refresh for a refused scrape");
        let taken = serve(server.local_addr, Vec::new(), Registry::new(), Arc::new(|| {})).await.err().unwrap();
        // With the shipped interval, a burst of scrapes shares one refresh.
        let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c2 = counted.clone();
        let slow = Arc::new(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let throttled = serve("127.0.0.1:0".parse().unwrap(), Vec::new(), Registry::new(), slow).await.unwrap();
        let scrapes = (0..20).map(|_| http_get(throttled.local_addr, "/metrics", Some("localhost")));
        for body in futures_join_all(scrapes).await {
            assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        }
        assert_eq!(counted.load(std::sync::atomic::Ordering::SeqCst), 1, "twenty scrapes at once, one refresh");
        assert!(taken.contains("metrics.listen") && taken.contains(&server.local_addr.to_string()), "{taken}");
    }

    /// Runs every future at once (no `futures` dependency here).
    async fn futures_join_all<F: std::future::Future<Output = String> + Send + 'static>(
        fs: impl Iterator<Item = F>,
    ) -> Vec<String> {
        let handles: Vec<_> = fs.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    /// `GET path` with `Host: host`, or over HTTP/1.0 without one.
    async fn http_get(addr: SocketAddr, path: &str, host: Option<&str>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = match host {
            Some(host) => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            None => format!("GET {path} HTTP/1.0\r\n\r\n"),
        };
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}
