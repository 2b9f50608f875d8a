//! The party's Prometheus metrics (`[metrics] listen` in its config; off
//! unless set), every one documented in docs/monitoring.md.
//!
//! The endpoint belongs to the hospital: it shows the node's own work (its
//! stream, its tasks, its privacy ledger, its prediction services) to the
//! hospital's monitoring, plain HTTP on the address configured (loopback
//! or a monitoring network). Labels are data-set, service and stage names
//! from this party's own config and the protocols, never row data.

use std::sync::Arc;
use std::time::Duration;

use confide_proto::telemetry::{duration_histogram, register};
use prometheus::{GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The party's metrics, in a registry of their own.
#[derive(Clone)]
pub struct PartyMetrics {
    /// Everything below, for `/metrics`.
    pub registry: Registry,
    connected: IntGauge,
    sent_bytes: IntCounter,
    received_bytes: IntCounter,
    jobs: IntCounterVec,
    tasks: IntCounterVec,
    task_duration: HistogramVec,
    epsilon_spent: GaugeVec,
    delta_spent: GaugeVec,
    epsilon_budget: GaugeVec,
    inference_requests: IntCounterVec,
    inference_duration: HistogramVec,
    inference_rows: IntCounterVec,
    forwards_answered: IntCounterVec,
}

impl PartyMetrics {
    /// Registers every series.
    pub fn new() -> Result<PartyMetrics, prometheus::Error> {
        let r = Registry::new();
        let hist = duration_histogram;
        Ok(PartyMetrics {
            connected: register(
                &r,
                IntGauge::new("confide_party_connected", "1 while the coordinator stream is open.")?,
            )?,
            sent_bytes: register(
                &r,
                IntCounter::new("confide_party_sent_bytes_total", "Encoded bytes sent to the coordinator.")?,
            )?,
            received_bytes: register(
                &r,
                IntCounter::new("confide_party_received_bytes_total", "Encoded bytes received from the coordinator.")?,
            )?,
            jobs: register(
                &r,
                IntCounterVec::new(
                    Opts::new("confide_party_job_offers_total", "Job offers answered, by outcome (accepted, refused)."),
                    &["outcome"],
                )?,
            )?,
            tasks: register(
                &r,
                IntCounterVec::new(Opts::new("confide_party_tasks_total", "Task results sent, by stage."), &["stage"])?,
            )?,
            task_duration: register(
                &r,
                HistogramVec::new(
                    hist(
                        "confide_party_task_duration_seconds",
                        "Time from a task's arrival to its result sent (training, masking, encryption), by stage.",
                    ),
                    &["stage"],
                )?,
            )?,
            epsilon_spent: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "confide_party_epsilon_spent",
                        "Record-level epsilon this party's ledger has reserved against a data set (∞ after a \
                         job without DP).",
                    ),
                    &["dataset"],
                )?,
            )?,
            delta_spent: register(
                &r,
                GaugeVec::new(
                    Opts::new("confide_party_delta_spent", "Record-level delta reserved against a data set."),
                    &["dataset"],
                )?,
            )?,
            epsilon_budget: register(
                &r,
                GaugeVec::new(
                    Opts::new("confide_party_epsilon_budget", "policy.max_epsilon for a data set, when set."),
                    &["dataset"],
                )?,
            )?,
            inference_requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new("confide_party_inference_requests_total", "Prediction requests, by service and outcome."),
                    &["service", "outcome"],
                )?,
            )?,
            inference_duration: register(
                &r,
                HistogramVec::new(
                    hist("confide_party_inference_duration_seconds", "Prediction request latency, by service."),
                    &["service"],
                )?,
            )?,
            inference_rows: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "confide_party_inference_rows_total",
                        "Rows answered, by service and who answered: edge, cloud (a hard row forwarded), \
                         edge_hard (a hard row answered at the edge).",
                    ),
                    &["service", "source"],
                )?,
            )?,
            forwards_answered: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "confide_party_forwarded_requests_total",
                        "Requests other parties forwarded to this party's cloud services, by outcome: answered, \
                         refused (a request that does not check, or a prediction that failed) or busy (refused \
                         at the limit of requests answered at once).",
                    ),
                    &["outcome"],
                )?,
            )?,
            registry: r,
        })
    }

    /// Whether the coordinator stream is open.
    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    /// Brings the byte counters up to the node's totals.
    pub fn bytes(&self, sent: u64, received: u64) {
        self.sent_bytes.inc_by(sent.saturating_sub(self.sent_bytes.get()));
        self.received_bytes.inc_by(received.saturating_sub(self.received_bytes.get()));
    }

    /// A job offer answered.
    pub fn job_offer(&self, accepted: bool) {
        self.jobs.with_label_values(&[if accepted { "accepted" } else { "refused" }]).inc();
    }

    /// A task's result sent, `took` after the task arrived.
    pub fn task_done(&self, stage: &str, took: Option<Duration>) {
        self.tasks.with_label_values(&[stage]).inc();
        if let Some(t) = took {
            self.task_duration.with_label_values(&[stage]).observe(t.as_secs_f64());
        }
    }

    /// The ledger's spending per data set, and the budgets.
    pub fn ledger(&self, spent: &[(String, f64, f64)], budgets: &[(String, f64)]) {
        for (dataset, eps, delta) in spent {
            self.epsilon_spent.with_label_values(&[dataset.as_str()]).set(*eps);
            self.delta_spent.with_label_values(&[dataset.as_str()]).set(*delta);
        }
        for (dataset, max) in budgets {
            self.epsilon_budget.with_label_values(&[dataset.as_str()]).set(*max);
        }
    }

    /// One prediction request: its outcome, latency and rows by source.
    pub fn inference(&self, service: &str, ok: bool, took: Duration, rows: &[(&str, u64)]) {
        self.inference_requests.with_label_values(&[service, if ok { "ok" } else { "error" }]).inc();
        self.inference_duration.with_label_values(&[service]).observe(took.as_secs_f64());
        for (source, n) in rows {
            if *n > 0 {
                self.inference_rows.with_label_values(&[service, source]).inc_by(*n);
            }
        }
    }

    /// A request forwarded to this party's cloud tier: `outcome` is
    /// `answered`, `refused` or `busy`.
    pub fn forward_answered(&self, outcome: &str) {
        self.forwards_answered.with_label_values(&[outcome]).inc();
    }
}

/// Shared by the node, its job workers and its prediction services.
pub type SharedMetrics = Arc<PartyMetrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_follow_the_node() {
        let m = PartyMetrics::new().unwrap();
        m.set_connected(true);
        m.bytes(100, 40);
        m.bytes(150, 40);
        m.job_offer(true);
        m.task_done("fit", Some(Duration::from_millis(30)));
        m.ledger(&[("data".into(), f64::INFINITY, 1e-5)], &[("data".into(), 4.0)]);
        m.inference("svc", true, Duration::from_millis(2), &[("edge", 9), ("cloud", 1), ("edge_hard", 0)]);
        m.forward_answered("answered");
        m.forward_answered("busy");
        m.forward_answered("busy");
        let text = confide_proto::telemetry::render(&m.registry).unwrap();
        for line in [
            "confide_party_forwarded_requests_total{outcome=\"answered\"} 1",
            "confide_party_forwarded_requests_total{outcome=\"busy\"} 2",
            "confide_party_connected 1",
            "confide_party_sent_bytes_total 150",
            "confide_party_received_bytes_total 40",
            "confide_party_job_offers_total{outcome=\"accepted\"} 1",
            "confide_party_task_duration_seconds_count{stage=\"fit\"} 1",
            // Rust writes ∞ as `inf`, which Prometheus parses (Go's ParseFloat).
            "confide_party_epsilon_spent{dataset=\"data\"} inf",
            "confide_party_epsilon_budget{dataset=\"data\"} 4",
            "confide_party_inference_rows_total{service=\"svc\",source=\"cloud\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("source=\"edge_hard\""), "{text}");
    }
}
