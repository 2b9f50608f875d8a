//! `evaluate` jobs, and the evaluation stage training jobs share with them.

use std::collections::BTreeMap;
use std::sync::Arc;

use confide_algorithms::{EvalResult, Parameters, State};
use confide_crypto::aggregation::Quorum;
use confide_proto::messages::{ResultBody, Stage, TaskBody};
use confide_proto::status::JobState;

use super::Setup;
use super::guard::GuardedStrategy;
use crate::session::{Closed, Context, JobMachine, Start};

/// The evaluation stage: every available party scores the global model on
/// its held-out rows; the strategy averages the results into the round's
/// metrics.
#[derive(Default)]
pub(crate) struct Evaluator {
    results: BTreeMap<String, EvalResult>,
}

impl Evaluator {
    /// Asks every available party to evaluate `global`.
    pub(crate) fn begin(&mut self, cx: &mut Context<'_>, round: u32, global: &Arc<Parameters>) {
        self.results.clear();
        let to = cx.available(Stage::Evaluate, round);
        cx.collect(
            Stage::Evaluate,
            round,
            vec![(to, TaskBody::Evaluate { global: global.clone() })],
            Quorum::JobMinimum,
        );
    }

    /// One party's evaluation.
    pub(crate) fn on_result(&mut self, party: &str, result: ResultBody) -> Result<(), String> {
        let ResultBody::Evaluate { num_examples, loss, metrics } = result else {
            return Err(format!("party {party} answered an evaluate task with a {} result", result.stage_name()));
        };
        if !loss.is_finite() || metrics.values().any(|v| !v.is_finite()) {
            return Err(format!("party {party} sent a bad evaluation: non-finite loss or metric"));
        }
        self.results.insert(party.to_owned(), EvalResult { party: party.to_owned(), num_examples, loss, metrics });
        Ok(())
    }

    /// Aggregates the evaluations into the round's record.
    pub(crate) fn finish(
        &mut self,
        cx: &mut Context<'_>,
        strategy: &mut GuardedStrategy,
        round: u32,
    ) -> Result<(), String> {
        let results: Vec<EvalResult> = std::mem::take(&mut self.results).into_values().collect();
        let metrics = strategy
            .call(&format!("round {round} evaluation"), |s| s.aggregate_evaluate(round, &results))
            .map_err(|e| if e.starts_with("round ") { e } else { format!("round {round} evaluation: {e}") })?;
        if let Some(rec) = cx.record() {
            if rec.participants.is_empty() {
                rec.participants = results.iter().map(|r| r.party.clone()).collect();
            }
            rec.metrics.extend(metrics);
        }
        Ok(())
    }
}

/// One federated evaluation of `from_job`'s model.
pub struct Evaluation {
    strategy: GuardedStrategy,
    global: Arc<Parameters>,
    evaluator: Evaluator,
    /// Resumed after its checkpoint: nothing is left to do.
    already_done: bool,
}

impl Evaluation {
    /// The machine for `setup`'s job.
    pub fn new(setup: &Setup<'_>) -> Result<Self, String> {
        let (global, already_done) = match setup.start {
            Start::Fresh { model: Some(m) } => (m.clone(), false),
            Start::Fresh { model: None } => return Err("from_job: an evaluate job needs a model to evaluate".into()),
            Start::Resume { model: Some(model), round, .. } => (model.clone(), *round >= 1),
            Start::Resume { model: None, .. } => return Err("the checkpoint to resume from has no model".into()),
        };
        let strategy = GuardedStrategy::new(setup.plugins.build_strategy(setup.spec)?)?;
        Ok(Evaluation { strategy, global: Arc::new(global), evaluator: Evaluator::default(), already_done })
    }
}

impl JobMachine for Evaluation {
    fn start(&mut self, cx: &mut Context<'_>) {
        if self.already_done {
            cx.finish(JobState::Succeeded, None);
            return;
        }
        cx.begin_round(1);
        self.evaluator.begin(cx, 1, &self.global);
    }

    fn on_result(&mut self, _: &mut Context<'_>, party: &str, result: ResultBody) -> Result<(), String> {
        self.evaluator.on_result(party, result)
    }

    fn on_closed(&mut self, cx: &mut Context<'_>, closed: Closed) {
        if let Err(e) = self.evaluator.finish(cx, &mut self.strategy, closed.round) {
            cx.finish(JobState::Failed, Some(e));
            return;
        }
        let record = cx.take_record();
        cx.checkpoint(closed.round, Some(self.global.clone()), record, State::new());
    }

    fn on_persisted(&mut self, cx: &mut Context<'_>, _: u32) {
        cx.finish(JobState::Succeeded, None);
    }
}
