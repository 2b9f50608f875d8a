//! The messages of a job's stages as both sides handle them: one [`Stage`]
//! type, a [`Task`] and a [`TaskResult`] with one body per stage, and the
//! conversions from and to their protobuf form (`TryFrom`, which checks what
//! the wire cannot: required fields, bulk vectors of the right kind, sizes).
//!
//! Bodies of aggregation-protocol steps and extension stages stay opaque
//! here ([`Envelope`]): their owning module encodes and decodes them.

use std::fmt;
use std::sync::Arc;

use confide_algorithms::{FeatureStats, FitConfig, Metrics, OptimizerKind, Parameters, TrainConfig};
pub use confide_crypto::aggregation::{Bulk, Envelope, StageName};

use crate::{Error, pb};

/// A stage of a job, the same type on the coordinator and the party.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Architecture agreement, initial parameters, federated feature sums.
    Setup,
    /// Local training; the answer is the update in the aggregation protocol's form.
    Fit,
    /// Federated evaluation of the global model.
    Evaluate,
    /// A step of the job's aggregation protocol after fit (named by the protocol).
    Aggregation(StageName),
    /// A stage of an extension job kind (named by the kind).
    Extension(StageName),
}

impl Stage {
    /// The name in job status, drop reasons, logs and `fault.exit_on_stage`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Fit => "fit",
            Stage::Evaluate => "evaluate",
            Stage::Aggregation(s) | Stage::Extension(s) => s.as_str(),
        }
    }

    /// The round metric holding this stage's duration in milliseconds
    /// (`stage_secagg_masked_input_ms`).
    pub fn metric_name(self) -> String {
        format!("stage_{}_ms", self.name().replace('-', "_"))
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a task asks.
#[derive(Debug, Clone)]
pub enum TaskBody {
    /// Report the architecture (initial parameters) and feature sums.
    Setup,
    /// Train from `global`; answer with the update in the protocol's form.
    Fit {
        /// Local training settings for the round.
        config: FitConfig,
        /// The global model.
        global: Arc<Parameters>,
        /// The aggregation protocol's round message (may be empty).
        round_message: Vec<u8>,
    },
    /// Evaluate `global` on held-out rows.
    Evaluate {
        /// The global model.
        global: Arc<Parameters>,
    },
    /// Contribute statistics to a secure sum through the job's aggregation
    /// protocol (under protocols that hide individual values).
    SecureSum {
        /// What to sum.
        of: SumOf,
        /// The protocol's round message.
        round_message: Vec<u8>,
    },
    /// A step of the aggregation protocol.
    Aggregation {
        /// The step's name.
        stage: String,
        /// The protocol's message.
        message: Envelope,
    },
    /// A stage of an extension job kind.
    Extension {
        /// The stage's name.
        stage: String,
        /// The kind's message.
        message: Envelope,
    },
}

/// What a [`TaskBody::SecureSum`] asks a party to sum.
#[derive(Debug, Clone)]
pub enum SumOf {
    /// Its per-feature sums over its training rows (setup, and only when the
    /// job standardises its inputs).
    FeatureStats,
    /// Its evaluation of `global` on held-out rows.
    Evaluation {
        /// The model to evaluate.
        global: Arc<Parameters>,
    },
}

impl TaskBody {
    /// The stage's name.
    pub fn stage_name(&self) -> &str {
        match self {
            TaskBody::Setup | TaskBody::SecureSum { of: SumOf::FeatureStats, .. } => "setup",
            TaskBody::Fit { .. } => "fit",
            TaskBody::Evaluate { .. } | TaskBody::SecureSum { of: SumOf::Evaluation { .. }, .. } => "evaluate",
            TaskBody::Aggregation { stage, .. } | TaskBody::Extension { stage, .. } => stage,
        }
    }
}

/// A task for one party.
#[derive(Debug, Clone)]
pub struct Task {
    /// The job.
    pub job_id: String,
    /// The round (0 for setup).
    pub round: u32,
    /// Identifies the task; the result echoes it.
    pub task_id: u64,
    /// What it asks.
    pub body: TaskBody,
}

/// What a party answers.
#[derive(Debug, Clone)]
pub enum ResultBody {
    /// The architecture and the feature sums.
    Setup {
        /// Initial parameters.
        params: Parameters,
        /// Sums over the training rows.
        stats: FeatureStats,
    },
    /// Training is done; the update in the protocol's form.
    Fit {
        /// Local training metrics.
        metrics: Metrics,
        /// The protocol's contribution.
        contribution: Envelope,
    },
    /// Evaluation of the global model.
    Evaluate {
        /// Examples evaluated.
        num_examples: u64,
        /// Mean loss.
        loss: f64,
        /// Further metrics.
        metrics: Metrics,
    },
    /// A contribution to a secure sum, in the protocol's form.
    SecureSum {
        /// The protocol's contribution.
        contribution: Envelope,
    },
    /// The answer to an aggregation step.
    Aggregation {
        /// The step's name.
        stage: String,
        /// The protocol's message.
        message: Envelope,
    },
    /// The answer to an extension stage.
    Extension {
        /// The stage's name.
        stage: String,
        /// The kind's message.
        message: Envelope,
    },
}

impl ResultBody {
    /// The stage's name.
    pub fn stage_name(&self) -> &str {
        match self {
            ResultBody::Setup { .. } => "setup",
            ResultBody::Fit { .. } => "fit",
            ResultBody::Evaluate { .. } => "evaluate",
            ResultBody::SecureSum { .. } => "secure-sum",
            ResultBody::Aggregation { stage, .. } | ResultBody::Extension { stage, .. } => stage,
        }
    }
}

/// A party's result of one task.
#[derive(Debug, Clone)]
pub struct TaskResult {
    /// The job.
    pub job_id: String,
    /// The round.
    pub round: u32,
    /// The task answered.
    pub task_id: u64,
    /// The answer.
    pub body: ResultBody,
}

/// Most metrics in one result, and the longest metric name.
pub const MAX_METRICS: usize = 64;
const MAX_METRIC_NAME: usize = 64;
const MAX_STAGE_NAME: usize = 64;

/// The most rows a party's set-up may count (2^40, about a trillion): with
/// the party limit, the federation's total cannot overflow.
pub const MAX_SETUP_EXAMPLES: u64 = 1 << 40;

fn violation(what: impl Into<String>) -> Error {
    Error::ProtocolViolation(what.into())
}

/// Metric names the coordinator writes itself into a round's record (its
/// timings, the privacy spent, counts): a party's result may not carry
/// them, nor any `stage_…` name, which would overwrite the real figures
/// (a fake ε in a job without DP) or add a metrics series per name.
pub const RESERVED_METRICS: &[&str] = &[
    "round_ms",
    "coordinator_ms",
    "process_cpu_ms",
    "epsilon",
    "record_epsilon",
    "delta",
    "dp_clip",
    "train_examples",
    "train_ms_max",
    "num_examples",
];

fn metrics_from(m: std::collections::HashMap<String, f64>) -> Result<Metrics, Error> {
    if m.len() > MAX_METRICS || m.keys().any(|k| k.is_empty() || k.len() > MAX_METRIC_NAME) {
        return Err(Error::LimitExceeded(format!(
            "at most {MAX_METRICS} metrics with names of 1 to {MAX_METRIC_NAME} bytes"
        )));
    }
    if let Some(k) = m.keys().find(|k| k.starts_with("stage_") || RESERVED_METRICS.contains(&k.as_str())) {
        return Err(violation(format!("metric {k:?}: a name the coordinator keeps for its own figures")));
    }
    Ok(m.into_iter().collect())
}

fn step_from(s: pb::StepMessage, bulk: Option<Bulk>) -> Result<(String, Envelope), Error> {
    if s.stage.is_empty() || s.stage.len() > MAX_STAGE_NAME {
        return Err(violation(format!("stage name of {} bytes", s.stage.len())));
    }
    Ok((s.stage, Envelope { body: s.body, bulk }))
}

fn params_of(bulk: Option<Bulk>, what: &str) -> Result<Arc<Parameters>, Error> {
    match bulk {
        Some(Bulk::Params(p)) => Ok(p),
        Some(Bulk::Words(_)) => Err(violation(format!("{what}: raw words where model parameters were expected"))),
        None => Err(violation(format!("{what} without model parameters"))),
    }
}

fn no_bulk(bulk: &Option<Bulk>, what: &str) -> Result<(), Error> {
    if bulk.is_some() { Err(violation(format!("{what} with an unexpected vector"))) } else { Ok(()) }
}

impl From<&TrainConfig> for pb::TrainConfig {
    fn from(t: &TrainConfig) -> Self {
        pb::TrainConfig {
            local_epochs: t.local_epochs,
            batch_size: t.batch_size as u64,
            learning_rate: t.learning_rate,
            optimizer: match t.optimizer {
                OptimizerKind::Adam => pb::Optimizer::Adam,
                _ => pb::Optimizer::Sgd,
            } as i32,
            momentum: t.momentum,
            l2: t.l2,
            proximal_mu: t.proximal_mu,
            seed: t.seed,
            validation_fraction: t.validation_fraction,
        }
    }
}

impl TryFrom<pb::TrainConfig> for TrainConfig {
    type Error = Error;
    fn try_from(t: pb::TrainConfig) -> Result<Self, Error> {
        let optimizer = match pb::Optimizer::try_from(t.optimizer).unwrap_or(pb::Optimizer::Unspecified) {
            pb::Optimizer::Sgd => OptimizerKind::Sgd,
            pb::Optimizer::Adam => OptimizerKind::Adam,
            pb::Optimizer::Unspecified => return Err(violation(format!("training optimizer {}", t.optimizer))),
        };
        Ok(TrainConfig {
            local_epochs: t.local_epochs,
            batch_size: usize::try_from(t.batch_size).map_err(|_| violation("batch size"))?,
            learning_rate: t.learning_rate,
            optimizer,
            momentum: t.momentum,
            l2: t.l2,
            proximal_mu: t.proximal_mu,
            seed: t.seed,
            validation_fraction: t.validation_fraction,
        })
    }
}

impl Task {
    /// The protobuf form and the vector to send after it (its bulk header is
    /// the sender's to fill in).
    pub fn to_wire(&self) -> (pb::Task, Option<Bulk>) {
        use pb::task::Body;
        let (body, bulk) = match &self.body {
            TaskBody::Setup => (Body::Setup(pb::SetupTask {}), None),
            TaskBody::Fit { config, global, round_message } => (
                Body::Fit(pb::FitTask {
                    config: Some(pb::FitConfig { round: config.round, train: Some((&config.train).into()) }),
                    round_message: round_message.clone(),
                }),
                Some(Bulk::Params(global.clone())),
            ),
            TaskBody::Evaluate { global } => (Body::Evaluate(pb::EvaluateTask {}), Some(Bulk::Params(global.clone()))),
            TaskBody::SecureSum { of, round_message } => {
                let (kind, bulk) = match of {
                    SumOf::FeatureStats => (pb::secure_sum_task::Of::FeatureStats, None),
                    SumOf::Evaluation { global } => {
                        (pb::secure_sum_task::Of::Evaluation, Some(Bulk::Params(global.clone())))
                    }
                };
                (Body::SecureSum(pb::SecureSumTask { of: kind as i32, round_message: round_message.clone() }), bulk)
            }
            TaskBody::Aggregation { stage, message } => (
                Body::Aggregation(pb::StepMessage { stage: stage.clone(), body: message.body.clone() }),
                message.bulk.clone(),
            ),
            TaskBody::Extension { stage, message } => (
                Body::Extension(pb::StepMessage { stage: stage.clone(), body: message.body.clone() }),
                message.bulk.clone(),
            ),
        };
        let msg = pb::Task {
            job_id: self.job_id.clone(),
            round: self.round,
            task_id: self.task_id,
            body: Some(body),
            bulk: None,
        };
        (msg, bulk)
    }
}

impl TryFrom<(pb::Task, Option<Bulk>)> for Task {
    type Error = Error;
    fn try_from((t, bulk): (pb::Task, Option<Bulk>)) -> Result<Self, Error> {
        use pb::task::Body;
        let body = match t.body.ok_or_else(|| violation("task without a body"))? {
            Body::Setup(_) => {
                no_bulk(&bulk, "setup task")?;
                TaskBody::Setup
            }
            Body::Fit(f) => {
                let c = f.config.ok_or_else(|| violation("fit task without a configuration"))?;
                let train = c.train.ok_or_else(|| violation("fit task without training settings"))?;
                TaskBody::Fit {
                    config: FitConfig { round: c.round, train: train.try_into()? },
                    global: params_of(bulk, "fit task")?,
                    round_message: f.round_message,
                }
            }
            Body::Evaluate(_) => TaskBody::Evaluate { global: params_of(bulk, "evaluate task")? },
            Body::SecureSum(s) => {
                let of = match pb::secure_sum_task::Of::try_from(s.of) {
                    Ok(pb::secure_sum_task::Of::FeatureStats) => {
                        no_bulk(&bulk, "feature-statistics sum task")?;
                        SumOf::FeatureStats
                    }
                    Ok(pb::secure_sum_task::Of::Evaluation) => {
                        SumOf::Evaluation { global: params_of(bulk, "evaluation sum task")? }
                    }
                    Err(_) => return Err(violation(format!("a secure sum of unknown kind {}", s.of))),
                };
                TaskBody::SecureSum { of, round_message: s.round_message }
            }
            Body::Aggregation(s) => {
                let (stage, message) = step_from(s, bulk)?;
                TaskBody::Aggregation { stage, message }
            }
            Body::Extension(s) => {
                let (stage, message) = step_from(s, bulk)?;
                TaskBody::Extension { stage, message }
            }
        };
        Ok(Task { job_id: t.job_id, round: t.round, task_id: t.task_id, body })
    }
}

impl TaskResult {
    /// The protobuf form and the vector to send after it.
    pub fn into_wire(self) -> (pb::TaskResult, Option<Bulk>) {
        use pb::task_result::Body;
        let (body, bulk) = match self.body {
            ResultBody::Setup { params, stats } => (
                Body::Setup(pb::SetupResult {
                    num_examples: stats.count,
                    feature_sum: stats.sum,
                    feature_sum_sq: stats.sum_sq,
                }),
                Some(Bulk::Params(Arc::new(params))),
            ),
            ResultBody::Fit { metrics, contribution } => (
                Body::Fit(pb::FitResult { metrics: metrics.into_iter().collect(), contribution: contribution.body }),
                contribution.bulk,
            ),
            ResultBody::Evaluate { num_examples, loss, metrics } => (
                Body::Evaluate(pb::EvaluateResult { num_examples, loss, metrics: metrics.into_iter().collect() }),
                None,
            ),
            ResultBody::SecureSum { contribution } => {
                (Body::SecureSum(pb::SecureSumResult { contribution: contribution.body }), contribution.bulk)
            }
            ResultBody::Aggregation { stage, message } => {
                (Body::Aggregation(pb::StepMessage { stage, body: message.body }), message.bulk)
            }
            ResultBody::Extension { stage, message } => {
                (Body::Extension(pb::StepMessage { stage, body: message.body }), message.bulk)
            }
        };
        let msg = pb::TaskResult {
            job_id: self.job_id,
            round: self.round,
            task_id: self.task_id,
            body: Some(body),
            bulk: None,
        };
        (msg, bulk)
    }
}

impl TryFrom<(pb::TaskResult, Option<Bulk>)> for TaskResult {
    type Error = Error;
    fn try_from((r, bulk): (pb::TaskResult, Option<Bulk>)) -> Result<Self, Error> {
        use pb::task_result::Body;
        let body = match r.body.ok_or_else(|| violation("result without a body"))? {
            Body::Setup(s) => {
                if s.feature_sum.len() != s.feature_sum_sq.len() {
                    return Err(violation(format!(
                        "feature sums of {} and {} features",
                        s.feature_sum.len(),
                        s.feature_sum_sq.len()
                    )));
                }
                // A party's statistics are checked here, naming the field,
                // before they are merged with others: one NaN or an
                // overflowing count would otherwise spoil the federation's
                // standardisation for every party.
                if s.num_examples > MAX_SETUP_EXAMPLES {
                    return Err(violation(format!(
                        "setup result: num_examples {} is above {MAX_SETUP_EXAMPLES}",
                        s.num_examples
                    )));
                }
                for (i, (sum, sum_sq)) in s.feature_sum.iter().zip(&s.feature_sum_sq).enumerate() {
                    if !sum.is_finite() || !sum_sq.is_finite() || *sum_sq < 0.0 {
                        return Err(violation(format!(
                            "setup result: feature {i}'s sum {sum} and sum of squares {sum_sq} are not finite, \
                             or the latter is negative"
                        )));
                    }
                }
                let params = params_of(bulk, "setup result")?;
                params.check_finite().map_err(|e| violation(format!("setup result: its initial model {e}")))?;
                ResultBody::Setup {
                    params: Arc::try_unwrap(params).unwrap_or_else(|p| (*p).clone()),
                    stats: FeatureStats { count: s.num_examples, sum: s.feature_sum, sum_sq: s.feature_sum_sq },
                }
            }
            Body::Fit(f) => ResultBody::Fit {
                metrics: metrics_from(f.metrics)?,
                contribution: Envelope { body: f.contribution, bulk },
            },
            Body::Evaluate(e) => {
                no_bulk(&bulk, "evaluate result")?;
                ResultBody::Evaluate { num_examples: e.num_examples, loss: e.loss, metrics: metrics_from(e.metrics)? }
            }
            Body::SecureSum(s) => ResultBody::SecureSum { contribution: Envelope { body: s.contribution, bulk } },
            Body::Aggregation(s) => {
                let (stage, message) = step_from(s, bulk)?;
                ResultBody::Aggregation { stage, message }
            }
            Body::Extension(s) => {
                let (stage, message) = step_from(s, bulk)?;
                ResultBody::Extension { stage, message }
            }
        };
        Ok(TaskResult { job_id: r.job_id, round: r.round, task_id: r.task_id, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::Tensor;

    fn global() -> Arc<Parameters> {
        Arc::new(Parameters::new(vec![Tensor { name: "w".into(), shape: vec![2], data: vec![1.0, 2.0] }]).unwrap())
    }

    /// A set-up result's statistics and model are checked at the boundary,
    /// naming the field: a NaN, a negative sum of squares, a count that
    /// could overflow the federation's, or a non-finite initial model is
    /// refused before anything is merged (found by review).
    #[test]
    fn a_setup_result_with_bad_statistics_or_model_is_refused_naming_the_field() {
        let wire = |count: u64, sum: f64, sum_sq: f64, w: f32| {
            let params =
                Parameters::new(vec![Tensor { name: "w".into(), shape: vec![2], data: vec![1.0, w] }]).unwrap();
            let result = TaskResult {
                job_id: "j".into(),
                round: 0,
                task_id: 1,
                body: ResultBody::Setup {
                    params,
                    stats: FeatureStats { count, sum: vec![1.0, sum], sum_sq: vec![1.0, sum_sq] },
                },
            };
            TaskResult::try_from(result.into_wire()).map(drop).map_err(|e| e.to_string())
        };
        assert_eq!(wire(10, 2.0, 4.0, 0.5), Ok(()));
        for (bad, field) in [
            (wire(10, f64::NAN, 4.0, 0.5), "feature 1's sum NaN"),
            (wire(10, 2.0, f64::INFINITY, 0.5), "feature 1's sum 2 and sum of squares inf"),
            (wire(10, 2.0, -1.0, 0.5), "sum of squares -1"),
            (wire(MAX_SETUP_EXAMPLES + 1, 2.0, 4.0, 0.5), "num_examples 1099511627777 is above"),
            (wire(10, 2.0, 4.0, f32::NAN), "its initial model tensor w holds NaN"),
        ] {
            assert!(bad.as_ref().is_err_and(|e| e.contains(field)), "{bad:?} lacks {field:?}");
        }
    }

    #[test]
    fn tasks_and_results_survive_the_wire() {
        let train = TrainConfig { batch_size: 7, optimizer: OptimizerKind::Adam, ..TrainConfig::default() };
        let task = Task {
            job_id: "j".into(),
            round: 3,
            task_id: 9,
            body: TaskBody::Fit {
                config: FitConfig { round: 3, train: train.clone() },
                global: global(),
                round_message: vec![1, 2],
            },
        };
        let back = Task::try_from(task.to_wire()).unwrap();
        let TaskBody::Fit { config, global: g, round_message } = back.body else { panic!() };
        assert_eq!((config.train, &*g, round_message), (train, &*global(), vec![1, 2]));

        let result = TaskResult {
            job_id: "j".into(),
            round: 3,
            task_id: 9,
            body: ResultBody::Aggregation {
                stage: "secagg-masked-input".into(),
                message: Envelope { body: vec![], bulk: Some(Bulk::Words(vec![5, 6])) },
            },
        };
        let back = TaskResult::try_from(result.into_wire()).unwrap();
        let ResultBody::Aggregation { stage, message } = back.body else { panic!() };
        assert_eq!((stage.as_str(), message.bulk), ("secagg-masked-input", Some(Bulk::Words(vec![5, 6]))));

        for of in [SumOf::FeatureStats, SumOf::Evaluation { global: global() }] {
            let body = TaskBody::SecureSum { of, round_message: vec![4] };
            let task = Task { job_id: "j".into(), round: 0, task_id: 1, body };
            let back = Task::try_from(task.to_wire()).unwrap();
            assert_eq!(back.body.stage_name(), task.body.stage_name());
            match (back.body, task.body) {
                (
                    TaskBody::SecureSum { of: SumOf::FeatureStats, round_message },
                    TaskBody::SecureSum { of: SumOf::FeatureStats, .. },
                ) => {
                    assert_eq!(round_message, vec![4]);
                }
                (
                    TaskBody::SecureSum { of: SumOf::Evaluation { global: g }, .. },
                    TaskBody::SecureSum { of: SumOf::Evaluation { .. }, .. },
                ) => {
                    assert_eq!(&*g, &*global());
                }
                other => panic!("{other:?}"),
            }
        }
        // A secure sum of an unknown kind is refused, not guessed.
        let (mut wire, bulk) = Task {
            job_id: "j".into(),
            round: 0,
            task_id: 1,
            body: TaskBody::SecureSum { of: SumOf::FeatureStats, round_message: Vec::new() },
        }
        .to_wire();
        if let Some(pb::task::Body::SecureSum(s)) = wire.body.as_mut() {
            s.of = 9;
        }
        assert!(Task::try_from((wire, bulk)).unwrap_err().to_string().contains("unknown kind 9"));
        let result = TaskResult {
            job_id: "j".into(),
            round: 0,
            task_id: 1,
            body: ResultBody::SecureSum { contribution: Envelope::body(vec![7]) },
        };
        let ResultBody::SecureSum { contribution } = TaskResult::try_from(result.into_wire()).unwrap().body else {
            panic!()
        };
        assert_eq!(contribution.body, vec![7]);
    }

    #[test]
    fn missing_bodies_vectors_and_oversized_metrics_are_violations() {
        let (mut t, _) =
            Task { job_id: "j".into(), round: 1, task_id: 1, body: TaskBody::Evaluate { global: global() } }.to_wire();
        assert!(Task::try_from((t.clone(), None)).is_err(), "evaluate without the model");
        assert!(Task::try_from((t.clone(), Some(Bulk::Words(vec![1])))).is_err());
        t.body = None;
        assert!(Task::try_from((t, None)).is_err());
        let many: std::collections::HashMap<String, f64> = (0..65).map(|i| (format!("m{i}"), 0.0)).collect();
        let r = pb::TaskResult {
            body: Some(pb::task_result::Body::Evaluate(pb::EvaluateResult {
                num_examples: 1,
                loss: 0.0,
                metrics: many,
            })),
            ..Default::default()
        };
        assert!(matches!(TaskResult::try_from((r, None)), Err(Error::LimitExceeded(_))));
        // Names the coordinator writes itself are not a party's to send.
        for name in ["epsilon", "stage_fit_ms", "stage_anything", "round_ms", "num_examples"] {
            let r = pb::TaskResult {
                body: Some(pb::task_result::Body::Evaluate(pb::EvaluateResult {
                    num_examples: 1,
                    loss: 0.0,
                    metrics: [(name.to_string(), 1.0), ("accuracy".to_string(), 0.5)].into(),
                })),
                ..Default::default()
            };
            let e = TaskResult::try_from((r, None)).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("keeps for its own figures"), "{e}");
        }
        assert_eq!(
            Stage::Aggregation(StageName::new("secagg-masked-input")).metric_name(),
            "stage_secagg_masked_input_ms"
        );
    }
}
