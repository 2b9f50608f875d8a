//! The coordinator's Prometheus metrics (`[metrics] listen`, or
//! `--metrics-listen`), every one documented in docs/monitoring.md.
//!
//! What they may show: the coordinator's own view and nothing more. Per
//! party there are only the bytes on its stream and whether it is
//! connected, which the coordinator sees under every aggregation mode; a
//! dropout is counted by stage and reason class, not by party; losses and
//! accuracies stay in the job status, where the aggregation mode already
//! decides what exists. Series labelled by job are removed when the job
//! ends, so label cardinality stays bounded by the running jobs.

use confide_proto::status::RoundRecord;
use confide_proto::telemetry::{duration_histogram, reason_class, register};
use prometheus::{GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The coordinator's metrics, in a registry of their own.
#[derive(Clone)]
pub struct CoordinatorMetrics {
    /// Everything below, for `/metrics`.
    pub registry: Registry,
    connected_parties: IntGauge,
    party_connected: IntGaugeVec,
    jobs: IntGaugeVec,
    rounds: IntCounter,
    round_duration: Histogram,
    round_busy: Histogram,
    stage_duration: HistogramVec,
    job_round: IntGaugeVec,
    job_epsilon: GaugeVec,
    sent_bytes: IntCounterVec,
    received_bytes: IntCounterVec,
    dropouts: IntCounterVec,
    tls_refusals: IntCounterVec,
    forwarded: IntCounterVec,
}

impl CoordinatorMetrics {
    /// Registers every series (none has a value yet).
    pub fn new() -> Result<CoordinatorMetrics, prometheus::Error> {
        let r = Registry::new();
        let hist = duration_histogram;
        Ok(CoordinatorMetrics {
            connected_parties: register(
                &r,
                IntGauge::new("confide_coordinator_connected_parties", "Parties with an open stream.")?,
            )?,
            party_connected: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("confide_coordinator_party_connected", "1 while an enrolled party's stream is open."),
                    &["party"],
                )?,
            )?,
            jobs: register(&r, IntGaugeVec::new(Opts::new("confide_coordinator_jobs", "Jobs by state."), &["state"])?)?,
            rounds: register(&r, IntCounter::new("confide_coordinator_rounds_total", "Rounds completed, all jobs.")?)?,
            round_duration: register(
                &r,
                Histogram::with_opts(hist(
                    "confide_coordinator_round_duration_seconds",
                    "Wall-clock time of a round, from its first task to its checkpoint.",
                ))?,
            )?,
            round_busy: register(
                &r,
                Histogram::with_opts(hist(
                    "confide_coordinator_round_busy_seconds",
                    "The coordinator's own work in a round: aggregation, its crypto, encoding tasks.",
                ))?,
            )?,
            stage_duration: register(
                &r,
                HistogramVec::new(
                    hist("confide_coordinator_stage_duration_seconds", "Time from a stage's tasks to its last answer."),
                    &["stage"],
                )?,
            )?,
            job_round: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("confide_coordinator_job_round", "The last completed round of a running job."),
                    &["job"],
                )?,
            )?,
            job_epsilon: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "confide_coordinator_job_epsilon",
                        "Epsilon a running DP job has spent (its accountant's, at the job's delta; per record under DP-SGD, per party under party-level DP).",
                    ),
                    &["job"],
                )?,
            )?,
            sent_bytes: register(
                &r,
                IntCounterVec::new(
                    Opts::new("confide_coordinator_sent_bytes_total", "Encoded bytes sent down a party's stream."),
                    &["party"],
                )?,
            )?,
            received_bytes: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "confide_coordinator_received_bytes_total",
                        "Encoded bytes received on a party's stream.",
                    ),
                    &["party"],
                )?,
            )?,
            dropouts: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "confide_coordinator_dropouts_total",
                        "Parties dropped from a round, by stage and reason class \
                         (timeout, disconnected, misbehaved, refused, other).",
                    ),
                    &["stage", "reason"],
                )?,
            )?,
            tls_refusals: register(
                &r,
                IntCounterVec::new(
                    Opts::new("confide_coordinator_tls_handshake_refusals_total", "Connections refused, by reason."),
                    &["reason"],
                )?,
            )?,
            forwarded: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "confide_coordinator_joint_inference_forwarded_total",
                        "Joint-inference requests relayed from an edge party to the cloud tier, by service.",
                    ),
                    &["service"],
                )?,
            )?,
            registry: r,
        })
    }

    /// Sets the gauges read off state, before a scrape: connected parties
    /// (of `enrolled`) and jobs by state.
    pub fn refresh(&self, enrolled: &[String], connected: &[String], jobs: &[(String, i64)]) {
        self.connected_parties.set(connected.len() as i64);
        // A party no longer enrolled loses its series (it would otherwise
        // show its last state until a restart).
        self.party_connected.reset();
        for p in enrolled {
            self.party_connected.with_label_values(&[p.as_str()]).set(i64::from(connected.contains(p)));
        }
        for state in ["pending", "running", "succeeded", "failed", "cancelled"] {
            let n = jobs.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
            self.jobs.with_label_values(&[state]).set(n);
        }
    }

    /// A round's record, at its checkpoint.
    pub fn round_completed(&self, job: &str, record: &RoundRecord) {
        self.rounds.inc();
        let ms = |k: &str| record.metrics.get(k).copied();
        if let Some(v) = ms("round_ms") {
            self.round_duration.observe(v / 1000.0);
        }
        if let Some(v) = ms("coordinator_ms") {
            self.round_busy.observe(v / 1000.0);
        }
        for (k, v) in &record.metrics {
            if let Some(stage) = k.strip_prefix("stage_").and_then(|s| s.strip_suffix("_ms")) {
                self.stage_duration.with_label_values(&[stage]).observe(v / 1000.0);
            }
        }
        for what in record.dropped.values() {
            let (stage, reason) = what.split_once(": ").unwrap_or(("job", what.as_str()));
            // Stage names are the protocols' own, a bounded set; anything
            // else (a party excluded for its model, say) counts as "job".
            let stage = if stage.chars().all(|c| c.is_ascii_lowercase() || c == '-' || c == '_') && stage.len() <= 40 {
                stage
            } else {
                "job"
            };
            self.dropouts.with_label_values(&[stage, reason_class(reason)]).inc();
        }
        self.job_round.with_label_values(&[job]).set(i64::from(record.round));
        if let Some(eps) = ms("epsilon") {
            self.job_epsilon.with_label_values(&[job]).set(eps);
        }
    }

    /// Removes the job's series (its history stays in the job status).
    pub fn job_ended(&self, job: &str) {
        let _ = self.job_round.remove_label_values(&[job]);
        let _ = self.job_epsilon.remove_label_values(&[job]);
    }

    /// The bytes counters of `party`'s stream.
    pub fn stream_counters(&self, party: &str) -> (IntCounter, IntCounter) {
        (self.sent_bytes.with_label_values(&[party]), self.received_bytes.with_label_values(&[party]))
    }

    /// The counter of TLS handshake refusals, by reason.
    pub fn tls_refusals(&self) -> IntCounterVec {
        self.tls_refusals.clone()
    }

    /// One joint-inference request relayed for `service`.
    pub fn forwarded(&self, service: &str) {
        self.forwarded.with_label_values(&[service]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn record(round: u32, dropped: &[(&str, &str)]) -> RoundRecord {
        RoundRecord {
            round,
            metrics: [("round_ms", 250.0), ("coordinator_ms", 20.0), ("stage_fit_ms", 200.0), ("epsilon", 1.5)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            participants: vec!["a".into()],
            dropped: dropped.iter().map(|(p, w)| (p.to_string(), w.to_string())).collect(),
            completed_at: 0,
            roles: BTreeMap::new(),
        }
    }

    #[test]
    fn job_series_go_when_the_job_ends_and_labels_stay_bounded() {
        let m = CoordinatorMetrics::new().unwrap();
        m.round_completed("j1", &record(1, &[("b", "fit: timed out"), ("c", "Party c's model has 3 tensors")]));
        m.round_completed("j1", &record(2, &[]));
        let text = confide_proto::telemetry::render(&m.registry).unwrap();
        assert!(text.contains("confide_coordinator_job_round{job=\"j1\"} 2"), "{text}");
        assert!(text.contains("confide_coordinator_job_epsilon{job=\"j1\"} 1.5"), "{text}");
        assert!(text.contains("confide_coordinator_rounds_total 2"), "{text}");
        assert!(text.contains("confide_coordinator_dropouts_total{reason=\"timeout\",stage=\"fit\"} 1"), "{text}");
        assert!(text.contains("confide_coordinator_dropouts_total{reason=\"other\",stage=\"job\"} 1"), "{text}");
        assert!(text.contains("confide_coordinator_stage_duration_seconds_count{stage=\"fit\"} 2"), "{text}");
        assert!(!text.contains("party=\"b\"") && !text.contains("party=\"c\""), "{text}");
        m.job_ended("j1");
        let text = confide_proto::telemetry::render(&m.registry).unwrap();
        assert!(!text.contains("j1"), "{text}");
    }

    #[test]
    fn refresh_counts_connected_parties_and_jobs_by_state() {
        let m = CoordinatorMetrics::new().unwrap();
        m.refresh(&["a".into(), "b".into()], &["a".into()], &[("running".into(), 2)]);
        let text = confide_proto::telemetry::render(&m.registry).unwrap();
        assert!(text.contains("confide_coordinator_connected_parties 1"), "{text}");
        assert!(text.contains("confide_coordinator_party_connected{party=\"b\"} 0"), "{text}");
        assert!(text.contains("confide_coordinator_jobs{state=\"running\"} 2"), "{text}");
        assert!(text.contains("confide_coordinator_jobs{state=\"failed\"} 0"), "{text}");
        // A party removed from the federation (here while connected) loses
        // its series instead of showing its last state until a restart.
        m.refresh(&["a".into()], &["a".into(), "b".into()], &[]);
        let text = confide_proto::telemetry::render(&m.registry).unwrap();
        assert!(!text.contains("party=\"b\""), "{text}");
        assert!(text.contains("confide_coordinator_party_connected{party=\"a\"} 1"), "{text}");
    }
}
