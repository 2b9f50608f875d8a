//! `evaluate` jobs, and the evaluation stage training jobs share with them.

use confide_algorithms::strategy::{MAX_REPORTED_METRIC, check_reported_metrics};
use std::collections::BTreeMap;
use std::sync::Arc;

use confide_algorithms::{EvalResult, Parameters, State};
use confide_crypto::aggregation::Quorum;
use confide_crypto::aggregation::sum::{self, SumLayout};
use confide_proto::messages::{ResultBody, Stage, SumOf, TaskBody};
use confide_proto::status::JobState;

use super::Setup;
use super::guard::GuardedStrategy;
use super::protocol::{ProtocolDriver, sum_of};
use crate::session::{Closed, Context, JobMachine, Start};

/// The evaluation stage: every available party scores the global model on
/// its held-out rows; the strategy averages the results into the round's
/// metrics. Under a protocol that hides individual values the parties'
/// evaluations are summed through it instead: the coordinator learns only
/// the example-weighted means.
#[derive(Default)]
pub(crate) struct Evaluator {
    results: BTreeMap<String, EvalResult>,
    /// A secure sum is in progress.
    secure: bool,
}

impl Evaluator {
    /// Asks every available party to evaluate `global`.
    pub(crate) fn begin(
        &mut self,
        cx: &mut Context<'_>,
        protocol: &mut ProtocolDriver,
        round: u32,
        global: &Arc<Parameters>,
    ) -> Result<(), String> {
        self.results.clear();
        let to = cx.available(Stage::Evaluate, round);
        self.secure = protocol.hides_values();
        let body = if self.secure {
            let round_message = protocol.begin_sum(round, &to, &SumLayout::evaluation(global))?;
            TaskBody::SecureSum { of: SumOf::Evaluation { global: global.clone() }, round_message }
        } else {
            TaskBody::Evaluate { global: global.clone() }
        };
        cx.collect(Stage::Evaluate, round, vec![(to, body)], Quorum::JobMinimum);
        Ok(())
    }

    /// Whether the evaluation's secure sum is in progress (its protocol
    /// steps belong to it).
    pub(crate) fn summing(&self) -> bool {
        self.secure
    }

    /// One party's evaluation, or its part of the secure sum.
    pub(crate) fn on_result(
        &mut self,
        cx: &mut Context<'_>,
        protocol: &mut ProtocolDriver,
        party: &str,
        result: ResultBody,
    ) -> Result<(), String> {
        match result {
            ResultBody::Evaluate { .. } if self.secure => {
                Err(format!("party {party} sent its evaluation in the clear; this job sums evaluations securely"))
            }
            ResultBody::Evaluate { num_examples, loss, metrics } => {
                // A DP evaluation releases no loss (NaN: not reported).
                let no_loss = loss.is_nan() && cx.spec().dp.is_some();
                if !(loss.is_finite() && loss.abs() <= MAX_REPORTED_METRIC || no_loss) {
                    return Err(format!("party {party} sent a bad evaluation: loss {loss}"));
                }
                if let Err(confide_algorithms::Error::PeerMisbehaved { reason, .. }) =
                    check_reported_metrics(party, &metrics)
                {
                    return Err(format!("party {party} sent a bad evaluation: {reason}"));
                }
                // Its weight in the means is its word: capped as its
                // updates are (a party claiming 10^12 rows would decide a
                // pipeline's gate alone; found by review).
                let cap = confide_crypto::aggregation::plain::max_examples(&cx.spec().aggregation.settings);
                if num_examples > cap {
                    return Err(format!(
                        "party {party} sent a bad evaluation: {num_examples} rows; an evaluation weighs at most {cap} \
                         (aggregation.none.max_examples)"
                    ));
                }
                self.results
                    .insert(party.to_owned(), EvalResult { party: party.to_owned(), num_examples, loss, metrics });
                Ok(())
            }
            ResultBody::SecureSum { contribution } if self.secure => protocol.on_message(cx, party, contribution),
            ResultBody::Aggregation { message, .. } if self.secure => protocol.on_message(cx, party, message),
            other => Err(format!("party {party} answered an evaluate task with a {} result", other.stage_name())),
        }
    }

    /// The evaluation's stage (or a step of its secure sum) closed: true
    /// when the round's metrics are recorded, false while steps remain.
    pub(crate) fn on_closed(
        &mut self,
        cx: &mut Context<'_>,
        protocol: &mut ProtocolDriver,
        strategy: &mut GuardedStrategy,
        closed: &Closed,
    ) -> Result<bool, String> {
        let round = closed.round;
        let results: Vec<EvalResult> = if self.secure {
            let Some(aggregate) = protocol.advance(cx, closed)? else { return Ok(false) };
            self.secure = false;
            let (sums, contributors) = sum_of(cx, round, protocol.name(), aggregate)?;
            if let Some(rec) = cx.record()
                && rec.participants.is_empty()
            {
                rec.participants = contributors.clone();
            }
            if sums.first().is_some_and(|n| n.round() < 1.0) {
                return Ok(no_examples(cx));
            }
            let (num_examples, loss, metrics) =
                sum::evaluation_from_sum(&sums).map_err(|e| format!("round {round} evaluation: {e}"))?;
            // The strategy sees one result: the federation's, as summed.
            let party = format!("secure sum of {} parties", contributors.len());
            vec![EvalResult { party, num_examples, loss, metrics }]
        } else {
            std::mem::take(&mut self.results).into_values().collect()
        };
        if results.iter().all(|r| r.num_examples == 0) {
            if let Some(rec) = cx.record()
                && rec.participants.is_empty()
            {
                rec.participants = results.iter().map(|r| r.party.clone()).collect();
            }
            return Ok(no_examples(cx));
        }
        let metrics = strategy
            .call(&format!("round {round} evaluation"), |s| s.aggregate_evaluate(round, &results))
            .map_err(|e| if e.starts_with("round ") { e } else { format!("round {round} evaluation: {e}") })?;
        // A DP evaluate job states what its one release cost each row.
        let spec = cx.spec().clone();
        let epsilon = spec
            .dp
            .as_ref()
            .filter(|d| d.release == confide_proto::dpspec::DpRelease::Evaluation)
            .map(|d| d.epsilon(&spec.training, 1));
        if let Some(rec) = cx.record() {
            if rec.participants.is_empty() {
                rec.participants = results.iter().map(|r| r.party.clone()).collect();
            }
            rec.metrics.extend(metrics);
            if let Some(e) = epsilon {
                rec.metrics.insert("epsilon".into(), e);
            }
        }
        Ok(true)
    }
}

/// An evaluation over no rows at all (e.g. a pipeline's count of new rows
/// when none arrived): nothing for the strategy to average, so the round
/// records only `num_examples = 0`.
fn no_examples(cx: &mut Context<'_>) -> bool {
    if let Some(rec) = cx.record() {
        rec.metrics.insert("num_examples".into(), 0.0);
    }
    true
}

/// One federated evaluation of `from_job`'s model.
pub struct Evaluation {
    strategy: GuardedStrategy,
    protocol: ProtocolDriver,
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
        let protocol = ProtocolDriver::new(setup)?;
        Ok(Evaluation { strategy, protocol, global: Arc::new(global), evaluator: Evaluator::default(), already_done })
    }
}

impl JobMachine for Evaluation {
    fn start(&mut self, cx: &mut Context<'_>) {
        if self.already_done {
            cx.finish(JobState::Succeeded, None);
            return;
        }
        cx.begin_round(1);
        if let Err(e) = self.evaluator.begin(cx, &mut self.protocol, 1, &self.global) {
            cx.finish(JobState::Failed, Some(e));
        }
    }

    fn on_result(&mut self, cx: &mut Context<'_>, party: &str, result: ResultBody) -> Result<(), String> {
        self.evaluator.on_result(cx, &mut self.protocol, party, result)
    }

    fn on_closed(&mut self, cx: &mut Context<'_>, closed: Closed) {
        match self.evaluator.on_closed(cx, &mut self.protocol, &mut self.strategy, &closed) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                cx.finish(JobState::Failed, Some(e));
                return;
            }
        }
        let record = cx.take_record();
        cx.checkpoint(closed.round, Some(self.global.clone()), record, State::new());
    }

    fn on_persisted(&mut self, cx: &mut Context<'_>, _: u32) {
        cx.finish(JobState::Succeeded, None);
    }
}
