//! Incremental learning pipelines (`kind = "incremental"`): the settings of
//! a pipeline (its `[incremental]` table) and the `[pipeline]` table of the
//! train and evaluate jobs it starts, which tells a party which rows of its
//! watched data set a job uses.
//!
//! A watched data set is a directory of CSV batches (see
//! `docs/incremental.md`). Each party keeps, per pipeline, which batches an
//! iteration has trained on; a batch no iteration has trained on is *new*.
//! The coordinator never learns file names or per-party counts beyond what
//! the pipeline's aggregation protocol reveals of an evaluation.

use serde::{Deserialize, Serialize};

use crate::deploy::validate_service_name;

/// Longest poll interval and trigger period accepted (one week).
const MAX_SECS: u64 = 7 * 86_400;

/// `[incremental]`: a pipeline bound to a deployed service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalSpec {
    /// The service whose deployed version each iteration starts from and
    /// replaces when the gate passes.
    pub service: String,
    /// Trigger: at least this many new labelled rows across the parties
    /// (counted through the pipeline's aggregation protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_new_rows: Option<u64>,
    /// Trigger: at most this long between iterations, new rows or not
    /// (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_secs: Option<u64>,
    /// How often the pipeline counts new rows (seconds, default 10).
    #[serde(default = "default_poll")]
    pub poll_secs: f64,
    /// The evaluation metric the gate compares (`accuracy`, `auc`, `f1`,
    /// ... as the model's evaluation reports them; `loss` is lower-is-better).
    #[serde(default = "default_metric")]
    pub metric: String,
    /// How much the candidate must beat the deployed version by on the
    /// parties' held-out rows to be deployed.
    #[serde(default)]
    pub min_delta: f64,
    /// Stop after this many iterations (0: run until cancelled).
    #[serde(default)]
    pub max_iterations: u32,
    /// Roll back automatically when, on the next batch, the version this
    /// pipeline deployed scores below the one it replaced.
    #[serde(default = "yes")]
    pub rollback: bool,
}

fn default_poll() -> f64 {
    10.0
}

fn default_metric() -> String {
    "accuracy".into()
}

fn yes() -> bool {
    true
}

impl IncrementalSpec {
    /// Checks every field; `(field, message)` pairs, paths under `incremental`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut e = Vec::new();
        let mut err = |f: &str, m: String| e.push((format!("incremental.{f}"), m));
        if let Err(m) = validate_service_name(&self.service) {
            err("service", m);
        }
        // Each trigger checked on its own: both wrong, both are named.
        if self.min_new_rows.is_none() && self.period_secs.is_none() {
            err("min_new_rows", "give a trigger: min_new_rows, period_secs, or both".into());
        }
        if self.min_new_rows == Some(0) {
            err("min_new_rows", "must be at least 1".into());
        }
        if let Some(p) = self.period_secs.filter(|p| !(1..=MAX_SECS).contains(p)) {
            err("period_secs", format!("must be 1..={MAX_SECS} (got {p})"));
        }
        if !(self.poll_secs.is_finite() && (0.1..=MAX_SECS as f64).contains(&self.poll_secs)) {
            err("poll_secs", format!("must be 0.1..={MAX_SECS} (got {})", self.poll_secs));
        }
        let metric_ok = !self.metric.is_empty()
            && self.metric.len() <= 64
            && self.metric.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !metric_ok {
            err("metric", format!("{:?} is not a metric name", self.metric));
        }
        if !(self.min_delta.is_finite() && (-1.0..=1.0).contains(&self.min_delta)) {
            err("min_delta", format!("must be in [-1, 1] (got {})", self.min_delta));
        }
        e
    }

    /// Whether a larger value of the gate's metric is better.
    pub fn higher_is_better(&self) -> bool {
        self.metric != "loss"
    }

    /// How much better `candidate` is than `deployed` on the gate's metric
    /// (positive: better).
    pub fn improvement(&self, candidate: f64, deployed: f64) -> f64 {
        if self.higher_is_better() { candidate - deployed } else { deployed - candidate }
    }
}

/// Which rows of the watched data set a pipeline job uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineRows {
    /// Training on every batch (less each batch's held-out rows), and
    /// evaluation on the held-out rows. A train job marks the new batches as
    /// trained on by its iteration.
    All,
    /// Every row of the new batches only (counting them, and scoring
    /// versions on the next batch).
    New,
}

/// `[pipeline]`: marks a train or evaluate job started by a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineRef {
    /// The pipeline's job id.
    pub job: String,
    /// The iteration (from 1).
    pub iteration: u32,
    /// The pipeline's service (labelled hard examples of it join training).
    pub service: String,
    /// Which rows.
    pub rows: PipelineRows,
}

impl PipelineRef {
    /// Checks every field; `(field, message)` pairs, paths under `pipeline`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut e = Vec::new();
        if self.job.is_empty()
            || self.job.len() > 64
            || !self.job.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            e.push(("pipeline.job".into(), format!("{:?} is not a job id", self.job)));
        }
        if self.iteration == 0 {
            e.push(("pipeline.iteration".into(), "starts at 1".into()));
        }
        if let Err(m) = validate_service_name(&self.service) {
            e.push(("pipeline.service".into(), m));
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> IncrementalSpec {
        toml::from_str(&format!("service = \"triage\"\n{extra}")).unwrap()
    }

    fn fields(s: &IncrementalSpec) -> Vec<String> {
        s.validate().into_iter().map(|(f, _)| f).collect::<Vec<_>>()
    }

    #[test]
    fn a_pipeline_needs_a_trigger_and_sane_settings() {
        assert!(fields(&spec("min_new_rows = 100")).is_empty());
        assert!(fields(&spec("period_secs = 60")).is_empty());
        assert_eq!(fields(&spec("")), ["incremental.min_new_rows"]);
        assert_eq!(fields(&spec("min_new_rows = 0")), ["incremental.min_new_rows"]);
        assert_eq!(fields(&spec("period_secs = 0")), ["incremental.period_secs"]);
        assert_eq!(
            fields(&spec("min_new_rows = 0\nperiod_secs = 0")),
            ["incremental.min_new_rows", "incremental.period_secs"],
            "both named"
        );
        assert_eq!(fields(&spec("min_new_rows = 1\npoll_secs = 0.0")), ["incremental.poll_secs"]);
        assert_eq!(fields(&spec("min_new_rows = 1\nmetric = \"a b\"")), ["incremental.metric"]);
        assert_eq!(fields(&spec("min_new_rows = 1\nmin_delta = 2.0")), ["incremental.min_delta"]);
        let mut bad = spec("min_new_rows = 1");
        bad.service = "no spaces".into();
        assert_eq!(fields(&bad), ["incremental.service"]);
    }

    #[test]
    fn the_gate_knows_which_way_is_better() {
        let acc = spec("min_new_rows = 1");
        assert!((acc.improvement(0.9, 0.8) - 0.1).abs() < 1e-12);
        let loss = spec("min_new_rows = 1\nmetric = \"loss\"");
        assert!((loss.improvement(0.2, 0.5) - 0.3).abs() < 1e-12);
    }
}
