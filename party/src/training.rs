//! The `train` and `evaluate` kinds at a party: a [`Trainer`] over the
//! party's data and the job's aggregation protocol's client side.

use std::time::Instant;

use confide_algorithms::{FitConfig, Trainer};
use confide_crypto::aggregation::{AggregationClient, LocalUpdate, StageName};
use confide_proto::messages::{ResultBody, Task, TaskBody};

use crate::plugins::{JobContext, PartyJobKind};
use crate::session::{JobHandler, TaskError};

/// The built-in kinds `train` and `evaluate`; both answer setup, fit,
/// evaluate and the protocol's steps.
#[derive(Debug, Clone, Copy)]
pub struct TrainingKind {
    name: &'static str,
}

impl TrainingKind {
    /// `train`.
    pub const TRAIN: TrainingKind = TrainingKind { name: "train" };
    /// `evaluate`.
    pub const EVALUATE: TrainingKind = TrainingKind { name: "evaluate" };
}

impl PartyJobKind for TrainingKind {
    fn name(&self) -> &'static str {
        self.name
    }

    fn handler(&self, cx: JobContext<'_>) -> Result<Box<dyn JobHandler>, String> {
        let spec = cx.spec;
        let name = &spec.aggregation.protocol;
        let protocol = cx
            .protocols
            .get(name)
            .ok_or_else(|| format!("aggregation protocol {name:?} is not available at this party"))?;
        let mut facts = spec.facts(cx.job_id, cx.limits);
        facts.min_parties = facts.min_parties.max(cx.min_parties);
        let client = protocol
            .client(&spec.aggregation.settings, &facts, cx.identity)
            .map_err(|e| format!("aggregation.{name}: {e}"))?;
        let trainer = cx.trainers.build(spec, cx.dataset, cx.party)?;
        let mut handler = TrainingHandler::new(trainer, client, protocol.stages());
        handler.share_feature_stats = spec.model.standardize;
        handler.share_fit_metrics = protocol.reveals() == confide_crypto::aggregation::Reveals::Updates;
        Ok(Box::new(handler))
    }
}

/// Answers a training job's tasks with a trainer and a protocol client.
pub struct TrainingHandler {
    trainer: Box<dyn Trainer>,
    aggregation: Box<dyn AggregationClient>,
    stages: &'static [StageName],
    /// The round whose aggregation is in progress.
    open: Option<u32>,
    /// Whether setup sends the per-feature sums (only when the job
    /// standardises its inputs: otherwise they are a side channel about the
    /// party's rows with no use).
    pub share_feature_stats: bool,
    /// Whether the fit answer carries this party's training metrics in the
    /// clear (not when the protocol hides individual updates).
    pub share_fit_metrics: bool,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl TrainingHandler {
    /// A handler over `trainer`, contributing through `aggregation`, whose
    /// protocol has `stages`.
    pub fn new(
        trainer: Box<dyn Trainer>,
        aggregation: Box<dyn AggregationClient>,
        stages: &'static [StageName],
    ) -> Self {
        TrainingHandler { trainer, aggregation, stages, open: None, share_feature_stats: true, share_fit_metrics: true }
    }
}

impl JobHandler for TrainingHandler {
    fn on_task(&mut self, task: Task) -> Result<ResultBody, TaskError> {
        let started = Instant::now();
        let round = task.round;
        match task.body {
            TaskBody::Setup => {
                let stats = if self.share_feature_stats { self.trainer.feature_stats() } else { Default::default() };
                let params = self.trainer.parameters().map_err(err)?;
                Ok(ResultBody::Setup { params, stats })
            }
            TaskBody::Fit { config, global, round_message } => {
                self.fit(round, &config, &global, &round_message, started)
            }
            TaskBody::Evaluate { global } => {
                self.trainer.set_parameters(&global).map_err(err)?;
                let outcome = self.trainer.evaluate().map_err(err)?;
                Ok(ResultBody::Evaluate {
                    num_examples: outcome.num_examples,
                    loss: outcome.loss,
                    metrics: outcome.metrics,
                })
            }
            TaskBody::Aggregation { stage, message } => {
                let Some(&name) = self.stages.iter().find(|s| s.as_str() == stage) else {
                    return Err(TaskError::CoordinatorFault(format!("the job's protocol has no step {stage:?}")));
                };
                if self.open != Some(round) {
                    return Err(TaskError::CoordinatorFault(format!(
                        "a {stage} step of round {round}, which this party is not in"
                    )));
                }
                let last = self.stages.last() == Some(&name);
                let answer = self.aggregation.on_step(round, name, message);
                if last || answer.is_err() {
                    self.open = None;
                }
                let message = answer?;
                Ok(ResultBody::Aggregation { stage, message })
            }
            TaskBody::Extension { stage, .. } => {
                Err(TaskError::CoordinatorFault(format!("a training job has no {stage} stage")))
            }
        }
    }

    fn round_open(&self) -> bool {
        self.open.is_some()
    }

    fn abandon(&mut self) {
        self.open = None;
        self.aggregation.abandon();
    }

    fn idle_work(&mut self) {
        if self.open.is_some() {
            self.aggregation.precompute();
        }
    }
}

impl TrainingHandler {
    fn fit(
        &mut self,
        round: u32,
        config: &FitConfig,
        global: &confide_algorithms::Parameters,
        round_message: &[u8],
        started: Instant,
    ) -> Result<ResultBody, TaskError> {
        self.abandon();
        // The configuration is checked here, not trusted: a zero batch size
        // or a NaN learning rate from the wire must not crash the trainer.
        let bad = config.train.validate();
        if !bad.is_empty() || config.round != round {
            let why =
                if bad.is_empty() { format!("round {} in a round {round} task", config.round) } else { bad.join("; ") };
            return Err(TaskError::CoordinatorFault(format!("fit configuration: {why}")));
        }
        self.trainer.set_parameters(global).map_err(err)?;
        let train_started = Instant::now();
        let mut outcome = self.trainer.fit(config).map_err(err)?;
        // Local training alone: lets the coordinator tell the framework's
        // share of a round from the training's.
        outcome.metrics.insert("train_ms".into(), train_started.elapsed().as_secs_f64() * 1000.0);
        let local = self.trainer.parameters().map_err(err)?;
        let train_loss = outcome.metrics.get("train_loss").copied();
        let update = LocalUpdate { global, fit: config, local, num_examples: outcome.num_examples, train_loss };
        let contribution = self.aggregation.contribute(round, round_message, update)?;
        if !self.stages.is_empty() {
            self.open = Some(round);
        }
        let mut metrics = outcome.metrics;
        metrics.insert("fit_ms".into(), started.elapsed().as_secs_f64() * 1000.0);
        if !self.share_fit_metrics {
            // The protocol hides this party's update: its loss travels inside
            // the secure sum, and its timings (a hint of its data's size) not at all.
            metrics.clear();
        }
        Ok(ResultBody::Fit { metrics, contribution })
    }
}
