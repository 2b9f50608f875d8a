//! The `train` and `evaluate` kinds at a party: a [`Trainer`] over the
//! party's data and the job's aggregation protocol's client side.

use std::sync::Arc;
use std::time::Instant;

use confide_algorithms::trainer::{INPUT_MEAN, INPUT_STD};
use confide_algorithms::{DpSgdPlan, FitConfig, Trainer};
use confide_crypto::aggregation::sum::{self, SumLayout};
use confide_crypto::aggregation::{AggregationClient, LocalUpdate, StageName};
use confide_proto::messages::{ResultBody, SumOf, Task, TaskBody};

use confide_proto::dpspec::{AccountantKind, DpLevel, DpRelease};

use crate::ledger::RoundGuard;
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
        // A DP job without a reservation would release rounds on no
        // record: refused before the rows are read (the node reserves
        // every DP job; a caller of this seam that did not is caught here).
        if spec.dp.is_some() && cx.budget.is_none() {
            return Err("a job with [dp] needs its privacy ledger reservation; none was made".into());
        }
        let name = &spec.aggregation.protocol;
        let protocol = cx
            .protocols
            .get(name)
            .ok_or_else(|| format!("aggregation protocol {name:?} is not available at this party"))?;
        let mut facts = spec.facts(cx.job_id, cx.limits);
        facts.min_parties = facts.min_parties.max(cx.min_parties);
        facts.noise_rounds_ahead = cx.noise_rounds_ahead.max(1);
        let client = protocol
            .client(&spec.aggregation.settings, &facts, cx.identity)
            .map_err(|e| format!("aggregation.{name}: {e}"))?;
        // A pipeline's job that selected no batch: an evaluation of none;
        // without DP a training job is refused, saying so; a DP training
        // job trains on none (DP-SGD sends noise alone), since whether it
        // sets up must not depend on whether one row arrived.
        let trainer: Box<dyn Trainer> = if crate::watch::no_rows(cx.dataset) && spec.dp.is_none() {
            if spec.kind != confide_proto::jobspec::JobKind::Evaluate {
                return Err("a pipeline's training job found no batch in the watched data set".into());
            }
            Box::new(NoRows)
        } else {
            // In a DP job rows that fail their own checks are dropped,
            // for every trainer factory.
            cx.trainers.build(spec, &crate::trainers::rows_for_job(spec, cx.dataset)?, cx.party)?
        };
        let mut handler = TrainingHandler::new(trainer, client, protocol.stages());
        handler.evaluate_only = spec.kind == confide_proto::jobspec::JobKind::Evaluate;
        handler.answers_held = cx.answers_held;
        handler.standardize = spec.model.standardize;
        handler.hides_values = protocol.reveals() != confide_crypto::aggregation::Reveals::Updates;
        handler.max_plain_examples = confide_crypto::aggregation::plain::max_examples(&spec.aggregation.settings);
        if let Some(dp) = spec.dp.as_ref().filter(|d| d.release == DpRelease::Evaluation) {
            let noise = confide_dp::evaluation::NoisyCounts::new(dp.noise_multiplier).map_err(err)?;
            handler.eval_noise = Some(noise);
        } else if let Some(dp) = &spec.dp {
            if dp.level == DpLevel::Example
                && let Err(why) = handler.trainer.dp_sgd_support()
            {
                return Err(format!(
                    "the job has [dp] (DP-SGD), but this party's {} trainer cannot train with it: {why}",
                    spec.model.kind().as_str()
                ));
            }
            // The input standardisation the party trains with: the spec's
            // public ranges, or none. A global model that carries another
            // has it replaced (a tiny std can make chosen rows overflow);
            // one whose values are not finite, or whose std is not
            // positive, is refused.
            let mut inputs = handler.trainer.parameters().map_err(err)?;
            if let (Some(ranges), Some(stats)) = (&dp.feature_ranges, dp.range_stats()) {
                let features = inputs.get(INPUT_MEAN).map_or(0, |t| t.data.len());
                if ranges.len() != features {
                    return Err(format!(
                        "dp.feature_ranges gives {} ranges; this data set has {features} features",
                        ranges.len()
                    ));
                }
                confide_algorithms::trainer::apply_feature_stats(&mut inputs, &stats).map_err(err)?;
            }
            let standardisation = |p: &confide_algorithms::Parameters| {
                [INPUT_MEAN, INPUT_STD].map(|n| p.get(n).map(|t| t.data.clone()).unwrap_or_default())
            };
            handler.dp_inputs = Some(standardisation(&inputs));
            handler.dp = dp.plan(&spec.training, spec.rounds);
            handler.dp_values_bound = pld_values_bound(dp);
            if dp.level == DpLevel::Party {
                handler.set_party_level(spec, dp);
            }
        }
        // Every job but an evaluation outside the budget has a ledger entry:
        // its rounds are counted (under DP), and leaving it is recorded.
        handler.continues_earlier = cx.budget.as_ref().is_some_and(|b| b.resumed());
        handler.budget = cx.budget;
        Ok(Box::new(handler))
    }
}

/// The most values a global model may have for the PLD accountant's charge
/// to hold (none under RDP, which bounds every model size): the noise
/// covers `dp.max_model_values` values, and under central adaptive
/// clipping the coordinator noises one more, the count of updates within
/// the clip, beside the model's.
pub(crate) fn pld_values_bound(dp: &confide_proto::dpspec::DpSpec) -> Option<usize> {
    (dp.accountant == AccountantKind::Pld)
        .then(|| dp.model_values_bound().saturating_sub(usize::from(dp.adaptive.is_some())))
}

/// The norm a party-level DP job's update is clipped to before it leaves.
/// Distributed noise clips inside the encoding, which also turns a
/// non-finite update into none: the party leaves the update to it (∞
/// here). Under central adaptive clipping the coordinator (trusted with the
/// updates there) clips at a clip the party does not know, but never above
/// the spec's first clip times `AdaptiveClip::RANGE`: the party clips there,
/// so no update leaves with a norm beyond what any round may use.
pub(crate) fn party_clip(dp: &confide_proto::dpspec::DpSpec) -> f64 {
    match (dp.distributed.is_some(), dp.adaptive.is_some()) {
        (true, _) => f64::INFINITY,
        (false, true) => dp.clip * confide_dp::ddg::AdaptiveClip::RANGE,
        (false, false) => dp.clip,
    }
}

/// Answers a training job's tasks with a trainer and a protocol client.
pub struct TrainingHandler {
    trainer: Box<dyn Trainer>,
    aggregation: Box<dyn AggregationClient>,
    stages: &'static [StageName],
    /// The round whose aggregation is in progress.
    open: Option<u32>,
    /// Whether the job standardises its inputs: only then does the party
    /// contribute its per-feature sums (otherwise they are a side channel
    /// about its rows with no use).
    pub standardize: bool,
    /// Whether the protocol hides individual values: then the party sends
    /// no metric, count or statistic in the clear. Its training loss travels
    /// inside the update's sum, its feature sums and evaluations in secure
    /// sums of their own, its timings not at all.
    pub hides_values: bool,
    /// DP-SGD, derived from the accepted spec: then every round trains
    /// with it, and nothing but the noisy update leaves the party (no
    /// statistics, metrics, loss, example count or timing).
    pub dp: Option<DpSgdPlan>,
    /// Party-level DP: the L2 norm each round's update is clipped to.
    pub party_clip: Option<f64>,
    /// Party-level DP: the spec's local epochs and batch size, which every
    /// round's fit configuration must keep. They set how long training
    /// takes, and so how far an answer may run past its floor: taken from
    /// the wire, a coordinator could ask for a thousand epochs and time the
    /// data set's size off the answer. (DP-SGD takes its steps from the
    /// spec already.)
    pub party_work: Option<(u32, usize)>,
    /// Party-level DP whose aggregation encoding clips the update itself
    /// (distributed noise: `NoisyUpdate`, which also makes a non-finite
    /// update none): the party does not clip it a second time.
    pub encoding_clips: bool,
    /// With the PLD accountant: the most values a model may have, since
    /// the accountant's lattice slack was charged for that many.
    pub dp_values_bound: Option<usize>,
    /// The job's reservation in the privacy ledger.
    pub budget: Option<RoundGuard>,
    /// Under DP, the `input.mean` and `input.std` every global model must
    /// carry (derived from the spec).
    pub dp_inputs: Option<[Vec<f32>; 2]>,
    /// An evaluate job with `[dp]`: the party releases only its noisy
    /// counts of rows and of rows classified correctly, once.
    pub eval_noise: Option<confide_dp::evaluation::NoisyCounts>,
    /// The most examples a plaintext update or evaluation weighs (the
    /// coordinator refuses more: `aggregation.none.max_examples`); a party
    /// with more reports this.
    pub max_plain_examples: u64,
    /// The round last let go with its secrets wiped (`abandon`): a later
    /// step of it is refused, not taken for a coordinator fault.
    abandoned_round: Option<u32>,
    /// Whether this session opened a round: before it has, in a session
    /// that continues an earlier one, a step is of a round the earlier
    /// session began.
    opened_any: bool,
    /// The job was offered again (a reconnect, or the coordinator resumed
    /// it): an earlier session of it may have had a round open.
    pub continues_earlier: bool,
    /// An evaluate job: it evaluates one model once, and answers no
    /// request to train, set up or sum feature statistics. (A job that
    /// `policy.evaluations_outside_budget` lets run without `[dp]` and
    /// without a reservation must not become an uncharged training job.)
    pub evaluate_only: bool,
    /// The evaluate job's release was made: it has one round, so a second
    /// request in the session (averaging away DP noise) is a coordinator
    /// fault. (A DP evaluation's release is also in the ledger, which
    /// refuses it in a later session of the job.)
    eval_released: bool,
    /// The trainer has been given a model and rows to train (a fit began):
    /// from then on it holds a local model, which a set-up answer (the
    /// trainer's parameters) would hand over whole.
    trained: bool,
    /// The feature statistics went into a secure sum: they are summed once,
    /// at set-up. A second sum over other parties would give this party's
    /// statistics exactly, by difference.
    stats_summed: bool,
    /// The round of the last evaluation released (train jobs: one a round).
    last_evaluation: Option<u32>,
    /// This party holds the job's fit answers to a floor
    /// ([`crate::session::AnswerFloor`]): then training stays inside the
    /// fit stage, whose answer is the one held, and is never run ahead.
    /// True unless set otherwise (the node sets it from the job's floor).
    pub answers_held: bool,
    /// A round whose fit answer went before training
    /// ([`AggregationClient::answers_fit_before_training`]): its training,
    /// on a thread of its own, until the step that needs the update.
    ahead: Option<TrainingAhead>,
    /// A round's training panicked on its thread: the next task raises it
    /// again (see [`TrainingHandler::raise_training_panic`]).
    trainer_panicked: bool,
}

/// How a round trains (the same on the task's thread or ahead of its step).
enum HowToTrain {
    /// Ordinary training; the update weighs its examples and carries its loss.
    Plain,
    /// DP-SGD with the accepted spec's plan.
    DpSgd(DpSgdPlan),
    /// Party-level DP: ordinary training, the update clipped to `clip`
    /// around `base` (the model trained from) unless the encoding clips it.
    PartyLevel { clip: f64, base: Arc<confide_algorithms::Parameters>, encoding_clips: bool },
}

/// What a round's training gives its protocol.
struct Trained {
    local: confide_algorithms::Parameters,
    num_examples: u64,
    train_loss: Option<f64>,
}

impl Trained {
    /// The protocol's view of it: the update of a round trained from
    /// `global` with `fit`.
    fn update<'a>(self, global: &'a confide_algorithms::Parameters, fit: &'a FitConfig) -> LocalUpdate<'a> {
        LocalUpdate { global, fit, local: self.local, num_examples: self.num_examples, train_loss: self.train_loss }
    }
}

/// Trains one round as `how` says. Failures on the rows stay in this
/// party's log (every path here hides the party's values, or is DP).
fn train_round(trainer: &mut dyn Trainer, how: &HowToTrain, config: &FitConfig) -> Result<Trained, TaskError> {
    match how {
        HowToTrain::Plain => {
            let outcome = trainer.fit(config).map_err(kept_local("training"))?;
            let local = trainer.parameters().map_err(kept_local("reading the trained model"))?;
            let train_loss = outcome.metrics.get("train_loss").copied();
            Ok(Trained { local, num_examples: outcome.num_examples, train_loss })
        }
        HowToTrain::DpSgd(plan) => {
            trainer.fit_private(config, plan).map_err(kept_local("DP-SGD training"))?;
            let local = trainer.parameters().map_err(kept_local("reading the trained model"))?;
            Ok(Trained { local, num_examples: 1, train_loss: None })
        }
        HowToTrain::PartyLevel { clip, base, encoding_clips } => {
            // Whatever the training did (a diverged model included), the
            // update sent is finite and within the clip: no error message
            // depends on the rows.
            let outcome = trainer.fit(config);
            let local = outcome.and_then(|_| trainer.parameters()).unwrap_or_else(|_| base.as_ref().clone());
            let local = if *encoding_clips { local } else { clip_update(base, local, *clip) };
            Ok(Trained { local, num_examples: 1, train_loss: None })
        }
    }
}

/// What a training thread hands back: the trainer, the round's result,
/// and whether training panicked (its message is logged where it did).
type TrainerBack = (Box<dyn Trainer>, Result<Trained, TaskError>, bool);

/// A round's training running ahead of the step that sends its update.
struct TrainingAhead {
    round: u32,
    global: Arc<confide_algorithms::Parameters>,
    config: FitConfig,
    /// The round's privacy-ledger record, made durable before the update
    /// (or a refusal, which is about the rows too) leaves.
    recorded: Option<crate::ledger::RoundStarted>,
    /// The training thread, until it is joined; it hands the trainer back.
    thread: Option<std::thread::JoinHandle<TrainerBack>>,
    /// The training's result, once joined.
    trained: Option<Result<Trained, TaskError>>,
}

impl TrainingAhead {
    /// Waits for the training thread: the trainer and the result.
    fn join(&mut self) -> Option<TrainerBack> {
        let thread = self.thread.take()?;
        // The thread catches the trainer's panics; this cannot fail but for one of its own.
        Some(
            thread
                .join()
                .unwrap_or_else(|_| (Box::new(Unavailable), Err(TaskError::Refused(PANICKED_AHEAD.into())), true)),
        )
    }
}

impl Drop for TrainingAhead {
    /// A handler dropped while its round trains waits for the training, so
    /// that the job's worker (which the node counts) outlives it.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

const PANICKED_AHEAD: &str = "training panicked (the message is in this party's log)";

/// The trainer's place while it trains on a thread of its own: anything
/// asked of it then is a mistake of this handler's, said as such.
struct Unavailable;

impl Unavailable {
    fn refuse<T>() -> Result<T, confide_algorithms::Error> {
        Err(confide_algorithms::Error::InvalidInput("the trainer is training a round ahead".into()))
    }
}

impl Trainer for Unavailable {
    fn parameters(&self) -> Result<confide_algorithms::Parameters, confide_algorithms::Error> {
        Self::refuse()
    }
    fn set_parameters(&mut self, _: &confide_algorithms::Parameters) -> Result<(), confide_algorithms::Error> {
        Self::refuse()
    }
    fn feature_stats(&self) -> confide_algorithms::FeatureStats {
        confide_algorithms::FeatureStats::default()
    }
    fn fit(&mut self, _: &FitConfig) -> Result<confide_algorithms::FitOutcome, confide_algorithms::Error> {
        Self::refuse()
    }
    fn evaluate(&mut self) -> Result<confide_algorithms::EvalOutcome, confide_algorithms::Error> {
        Self::refuse()
    }
    fn predict(&self, _: &[f32]) -> Result<Vec<f32>, confide_algorithms::Error> {
        Self::refuse()
    }
}

/// A pipeline's evaluation on new rows that found none: it answers with
/// zero examples, so the sum counts none from this party.
struct NoRows;

impl Trainer for NoRows {
    fn parameters(&self) -> Result<confide_algorithms::Parameters, confide_algorithms::Error> {
        Err(confide_algorithms::Error::InvalidInput("no rows to train on".into()))
    }
    fn set_parameters(&mut self, _: &confide_algorithms::Parameters) -> Result<(), confide_algorithms::Error> {
        Ok(())
    }
    fn feature_stats(&self) -> confide_algorithms::FeatureStats {
        confide_algorithms::FeatureStats::default()
    }
    fn fit(&mut self, _: &FitConfig) -> Result<confide_algorithms::FitOutcome, confide_algorithms::Error> {
        Err(confide_algorithms::Error::InvalidInput("no rows to train on".into()))
    }
    fn evaluate(&mut self) -> Result<confide_algorithms::EvalOutcome, confide_algorithms::Error> {
        // The metrics of the built-in classifiers, over no rows: an
        // evaluation over none has the shape of one over some.
        let metrics = [("accuracy".to_string(), 0.0)].into();
        Ok(confide_algorithms::EvalOutcome { num_examples: 0, loss: 0.0, metrics })
    }
    fn predict(&self, _: &[f32]) -> Result<Vec<f32>, confide_algorithms::Error> {
        Err(confide_algorithms::Error::InvalidInput("no model rows".into()))
    }
}

/// A trainer's failure in a DP job, on the rows (training, its result, an
/// evaluation): its text can quote them (a TorchScript module's message, a
/// plug-in's), so it stays in this party's log and the coordinator is told
/// only what failed.
fn kept_local<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> TaskError {
    move |e| {
        tracing::warn!("{what} failed: {e}");
        TaskError::Refused(format!("{what} failed (the reason is in this party's log)"))
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A round or release the ledger did not start: the coordinator's fault
/// when it asked beyond the budget, this party's own (a refusal, staying in
/// the job) when the ledger could not record it.
fn refused(e: crate::ledger::StartRefused) -> TaskError {
    match e {
        crate::ledger::StartRefused::Budget(m) | crate::ledger::StartRefused::Left(m) => TaskError::CoordinatorFault(m),
        crate::ledger::StartRefused::Ledger(m) => TaskError::Refused(m),
    }
}

impl TrainingHandler {
    /// A handler over `trainer`, contributing through `aggregation`, whose
    /// protocol has `stages`.
    pub fn new(
        trainer: Box<dyn Trainer>,
        aggregation: Box<dyn AggregationClient>,
        stages: &'static [StageName],
    ) -> Self {
        TrainingHandler {
            trainer,
            aggregation,
            stages,
            open: None,
            standardize: true,
            hides_values: false,
            dp: None,
            party_clip: None,
            party_work: None,
            encoding_clips: false,
            dp_values_bound: None,
            budget: None,
            dp_inputs: None,
            eval_noise: None,
            max_plain_examples: u64::MAX,
            abandoned_round: None,
            opened_any: false,
            continues_earlier: false,
            evaluate_only: false,
            // Until the node says the job's answers are not held: a
            // handler built without that knowledge trains inside the fit
            // task, whose timing a floor then covers.
            answers_held: true,
            ahead: None,
            trainer_panicked: false,
            eval_released: false,
            trained: false,
            stats_summed: false,
            last_evaluation: None,
        }
    }
}

impl JobHandler for TrainingHandler {
    fn on_task(&mut self, task: Task) -> Result<ResultBody, TaskError> {
        let started = Instant::now();
        let round = task.round;
        if !matches!(task.body, TaskBody::Aggregation { .. }) {
            // Any other task uses the trainer (or starts a new round).
            self.trainer_back();
            self.raise_training_panic()?;
        }
        match task.body {
            TaskBody::Fit { .. } | TaskBody::Setup | TaskBody::SecureSum { of: SumOf::FeatureStats, .. }
                if self.evaluate_only =>
            {
                Err(TaskError::CoordinatorFault(
                    "asked to train, set up or sum feature statistics in an evaluate job, which only evaluates \
                     a model"
                        .into(),
                ))
            }
            TaskBody::SecureSum { .. } | TaskBody::Evaluate { .. } if self.private() => {
                Err(TaskError::CoordinatorFault(
                    "asked for statistics of the rows (feature sums or evaluation metrics) in a job with \
                     differential privacy, which covers only the noisy updates"
                        .into(),
                ))
            }
            TaskBody::Fit { .. } | TaskBody::SecureSum { of: SumOf::FeatureStats, .. } if self.eval_noise.is_some() => {
                Err(TaskError::CoordinatorFault(
                    "asked to train or to sum feature statistics in an evaluation with differential privacy, \
                     which releases only noisy counts"
                        .into(),
                ))
            }
            TaskBody::Evaluate { global } if self.eval_noise.is_some() && !self.hides_values => {
                let noisy = self.noisy_evaluation(&global)?;
                // Post-processing of the noisy counts: a count below one
                // weighs nothing; the accuracy is clamped to [0, 1].
                let examples = noisy.examples.max(0) as u64;
                let mut metrics = confide_algorithms::Metrics::new();
                if let Some(c) = noisy.correct {
                    let accuracy = if examples == 0 { 0.0 } else { (c as f64 / examples as f64).clamp(0.0, 1.0) };
                    metrics.insert("accuracy".into(), accuracy);
                }
                let num_examples = examples.min(self.max_plain_examples);
                Ok(ResultBody::Evaluate { num_examples, loss: f64::NAN, metrics })
            }
            // Set-up answers with the trainer's parameters: its starting
            // model before any training, its local model after (unclipped,
            // un-noised, unmasked). Set-up comes before the rounds; asked
            // after one, it would bare the update.
            TaskBody::Setup if self.trained => Err(TaskError::CoordinatorFault(
                "asked to set up after training: the answer would be this party's local model in the clear".into(),
            )),
            TaskBody::Setup => {
                let in_clear = self.standardize && !self.hides_values && !self.private() && self.eval_noise.is_none();
                let stats = if in_clear { self.trainer.feature_stats() } else { Default::default() };
                let params = self.trainer.parameters().map_err(err)?;
                Ok(ResultBody::Setup { params, stats })
            }
            TaskBody::SecureSum { of, round_message } => self.secure_sum(round, of, &round_message),
            TaskBody::Fit { config, global, round_message } => {
                self.fit(round, &config, &global, &round_message, started)
            }
            TaskBody::Evaluate { .. } if self.hides_values => Err(TaskError::CoordinatorFault(
                "asked for evaluation metrics in the clear, which this job's protocol sums securely".into(),
            )),
            TaskBody::Evaluate { global } => {
                self.release_evaluation(round)?;
                let outcome = self.evaluate_plainly(&global)?;
                Ok(ResultBody::Evaluate {
                    num_examples: outcome.num_examples.min(self.max_plain_examples),
                    loss: outcome.loss,
                    metrics: outcome.metrics,
                })
            }
            TaskBody::Aggregation { stage, message } => {
                let Some(&name) = self.stages.iter().find(|s| s.as_str() == stage) else {
                    return Err(TaskError::CoordinatorFault(format!("the job's protocol has no step {stage:?}")));
                };
                if self.open != Some(round) {
                    // A round this party let go itself (no task came within
                    // its deadline), or one a session before a reconnect
                    // began: not the coordinator's fault, so not a reason to
                    // leave the job for good.
                    if self.abandoned_round == Some(round) || (self.continues_earlier && !self.opened_any) {
                        return Err(TaskError::Refused(format!(
                            "a {stage} step of round {round}, which this party no longer holds (it abandoned the \
                             round after its deadline, or reconnected since); the round's secrets are wiped"
                        )));
                    }
                    return Err(TaskError::CoordinatorFault(format!(
                        "a {stage} step of round {round}, which this party is not in"
                    )));
                }
                let last = self.stages.last() == Some(&name);
                if self.aggregation.needs_update_for(name)
                    && let Err(e) = self.supply_trained(round)
                {
                    self.drop_round();
                    return Err(e);
                }
                let answer = self.aggregation.on_step(round, name, message);
                if answer.is_err() {
                    // Whatever the refusal, the round ends here for this
                    // party: its secrets (round keys, seeds, the encoded
                    // update) are wiped now, not when a later task, the
                    // job's close or the idle deadline comes, since a
                    // coordinator that sends nothing more would otherwise
                    // leave them in memory for as long as the job stays open.
                    self.drop_round();
                } else if last {
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
        // The session lets the round go (its deadline passed, the job
        // closed or faulted): a later step of it is refused, not a fault.
        if let Some(round) = self.open {
            self.abandoned_round = Some(round);
        }
        self.drop_round();
    }

    fn idle_work(&mut self) {
        // Also after a round: distributed DP draws the next round's noise then.
        self.aggregation.precompute();
    }

    fn leave(&mut self, why: &str) -> Result<(), String> {
        self.budget.as_ref().map_or(Ok(()), |b| b.leave(why))
    }

    fn job_ended(&mut self, state: &str) -> Result<Option<f64>, String> {
        self.budget.as_ref().map_or(Ok(None), |b| b.settle(state))
    }
}

impl TrainingHandler {
    /// Party-level DP's settings, from the accepted spec: the clip, whether
    /// the encoding clips, and the epochs and batch size every round keeps.
    pub(crate) fn set_party_level(
        &mut self,
        spec: &confide_proto::jobspec::JobSpec,
        dp: &confide_proto::dpspec::DpSpec,
    ) {
        self.encoding_clips = dp.distributed.is_some();
        self.party_clip = Some(party_clip(dp));
        self.party_work = Some((spec.training.local_epochs, spec.training.batch_size));
    }

    /// Forgets the open round and wipes its secrets, as a new round's task
    /// does (a step of the old round after it is the coordinator's fault).
    fn drop_round(&mut self) {
        // A round still training ahead trains on: waiting for it here would
        // hold up what the drop comes with (a refusal, a close). The next
        // task takes the trainer back first; the handler's drop waits for it.
        if self.ahead.as_ref().is_some_and(|a| a.thread.as_ref().is_none_or(|t| t.is_finished())) {
            self.trainer_back();
            self.ahead = None;
        }
        self.open = None;
        self.aggregation.abandon();
    }

    /// Whether this round's fit answer goes before training (see
    /// [`AggregationClient::answers_fit_before_training`]).
    fn trains_ahead(&self) -> bool {
        self.aggregation.answers_fit_before_training() && !self.answers_held
    }

    /// Waits for a round training ahead, if one is, and takes the trainer
    /// back; the round's result stays for the step that needs it.
    fn trainer_back(&mut self) {
        if let Some(ahead) = self.ahead.as_mut()
            && let Some((trainer, trained, panicked)) = ahead.join()
        {
            self.trainer = trainer;
            ahead.trained = Some(trained);
            self.trainer_panicked |= panicked;
        }
    }

    /// A trainer that panicked on a round's own thread ends this party's
    /// part in the job, as one that panics in a task does: the panic is
    /// raised again here, in the task the session catches, once the
    /// round's ledger record is on disk (its message was logged where it
    /// happened, since it can quote a row).
    ///
    /// Not on record, so not sent (whether training failed is about the
    /// rows): the panic is raised only once the ledger holds the round and
    /// this party's leaving on disk. Until then every task is refused as a
    /// round whose record failed is, saying only that the ledger could not
    /// write (found by review: the panic used to go out whatever the
    /// record's write did).
    fn raise_training_panic(&mut self) -> Result<(), TaskError> {
        if !self.trainer_panicked {
            return Ok(());
        }
        if let Some(recorded) = self.ahead.as_mut().and_then(|a| a.recorded.take())
            && let Err(e) = recorded.durable()
        {
            // The leaving below writes the whole ledger, this round with it.
            tracing::warn!("the privacy ledger's record of the round failed: {e}");
        }
        if let Err(e) = self.leave(crate::session::PANICKED) {
            tracing::warn!("the privacy ledger cannot record the round and this party's leaving: {e}");
            return Err(TaskError::Refused(e));
        }
        panic!("{PANICKED_AHEAD}");
    }

    /// The fit answer of `round` before its training, which then runs on a
    /// thread of its own (`how`) while the coordinator runs the protocol's
    /// data-independent steps; [`TrainingHandler::supply_trained`] hands
    /// its update over. `recorded` (the round's ledger record) is made
    /// durable before anything about the rows leaves.
    fn fit_ahead(
        &mut self,
        round: u32,
        config: &FitConfig,
        global: &Arc<confide_algorithms::Parameters>,
        round_message: &[u8],
        how: HowToTrain,
        recorded: Option<crate::ledger::RoundStarted>,
    ) -> Result<ResultBody, TaskError> {
        let contribution = match self.aggregation.contribute_ahead(round, round_message, global, config) {
            Ok(c) => c,
            Err(e) => {
                if let Some(recorded) = recorded {
                    recorded.durable().map_err(TaskError::Refused)?;
                }
                return Err(e.into());
            }
        };
        // The trainer moves to the thread through a slot, so that it is
        // still here should the thread not start. (The update is encoded
        // at the step that sends it: encoded here, as soon as a short
        // training ends, it took the cores from the other parties' fit
        // stage where parties share a machine.)
        let slot = Arc::new(std::sync::Mutex::new(Some(std::mem::replace(&mut self.trainer, Box::new(Unavailable)))));
        let (in_thread, fit) = (slot.clone(), config.clone());
        // Its lines are the job's and the round's, as on the worker.
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new().name("confide-train".into()).spawn(move || {
            let _entered = span.enter();
            let taken = in_thread.lock().map(|mut t| t.take()).ok().flatten();
            let mut trainer: Box<dyn Trainer> = taken.unwrap_or_else(|| Box::new(Unavailable));
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| train_round(trainer.as_mut(), &how, &fit))) {
                Ok(trained) => (trainer, trained, false),
                Err(p) => {
                    tracing::warn!("training panicked: {}", crate::session::panic_message(p.as_ref()));
                    (trainer, Err(TaskError::Refused(PANICKED_AHEAD.into())), true)
                }
            }
        });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                if let Some(trainer) = slot.lock().ok().and_then(|mut t| t.take()) {
                    self.trainer = trainer;
                }
                self.aggregation.abandon();
                if let Some(recorded) = recorded {
                    recorded.durable().map_err(TaskError::Refused)?;
                }
                return Err(TaskError::Refused(format!("cannot start a training thread: {e}")));
            }
        };
        self.ahead = Some(TrainingAhead {
            round,
            global: global.clone(),
            config: config.clone(),
            recorded,
            thread: Some(thread),
            trained: None,
        });
        self.open_round(round);
        Ok(ResultBody::Fit { metrics: Default::default(), contribution })
    }

    /// `round`'s aggregation is in progress, for a protocol with steps after
    /// its first answer.
    fn open_round(&mut self, round: u32) {
        if !self.stages.is_empty() {
            self.open = Some(round);
            self.opened_any = true;
        }
    }

    /// Hands the protocol the update of `round`, trained ahead: waits for
    /// the training and for the round's ledger record first.
    fn supply_trained(&mut self, round: u32) -> Result<(), TaskError> {
        self.trainer_back();
        let mut ahead = match self.ahead.take() {
            Some(a) if a.round == round => a,
            _ => return Err(TaskError::Refused(format!("no training of round {round} under way here"))),
        };
        // Not on record, so not sent: nor is a refusal (whether training
        // failed is itself about the rows).
        if let Some(recorded) = ahead.recorded.take() {
            recorded.durable().map_err(TaskError::Refused)?;
        }
        self.raise_training_panic()?;
        let trained = ahead.trained.take().unwrap_or_else(|| Err(TaskError::Refused(PANICKED_AHEAD.into())))?;
        Ok(self.aggregation.supply_update(round, trained.update(&ahead.global, &ahead.config))?)
    }

    /// This party's statistics into a secure sum: the layout is derived
    /// here, from what the party was asked and holds, never from the wire.
    fn secure_sum(&mut self, round: u32, of: SumOf, round_message: &[u8]) -> Result<ResultBody, TaskError> {
        self.drop_round();
        if !self.hides_values {
            return Err(TaskError::CoordinatorFault("asked for a secure sum under a protocol that has none".into()));
        }
        let (layout, values) = match of {
            SumOf::FeatureStats => {
                if !self.standardize {
                    return Err(TaskError::CoordinatorFault(
                        "asked for feature statistics in a job that does not standardise its inputs".into(),
                    ));
                }
                if self.stats_summed || self.trained {
                    return Err(TaskError::CoordinatorFault(
                        "asked again for the feature statistics' secure sum (or after training): it is summed \
                         once, at set-up; a second sum over other parties would give this party's statistics by \
                         difference"
                            .into(),
                    ));
                }
                self.stats_summed = true;
                let stats = self.trainer.feature_stats();
                (SumLayout::feature_stats(stats.sum.len()), sum::feature_stats_values(&stats))
            }
            SumOf::Evaluation { global } if self.eval_noise.is_some() => {
                let noisy = self.noisy_evaluation(&global)?;
                (SumLayout::evaluation(&global), sum::noisy_evaluation_values(&noisy))
            }
            SumOf::Evaluation { global } => {
                self.release_evaluation(round)?;
                let outcome = self.evaluate_plainly(&global)?;
                (SumLayout::evaluation(&global), sum::evaluation_values(&outcome)?)
            }
        };
        let contribution = self.aggregation.contribute_sum(round, round_message, &layout, &values)?;
        self.open_round(round);
        Ok(ResultBody::SecureSum { contribution })
    }

    fn fit(
        &mut self,
        round: u32,
        config: &FitConfig,
        global: &Arc<confide_algorithms::Parameters>,
        round_message: &[u8],
        started: Instant,
    ) -> Result<ResultBody, TaskError> {
        self.drop_round();
        self.trained = true;
        // The configuration is checked here, not trusted: a zero batch size
        // or a NaN learning rate from the wire must not crash the trainer.
        let bad = config.train.validate();
        if !bad.is_empty() || config.round != round {
            let why =
                if bad.is_empty() { format!("round {} in a round {round} task", config.round) } else { bad.join("; ") };
            return Err(TaskError::CoordinatorFault(format!("fit configuration: {why}")));
        }
        if let Some((epochs, batch)) = self.party_work
            && (config.train.local_epochs, config.train.batch_size) != (epochs, batch)
        {
            return Err(TaskError::CoordinatorFault(format!(
                "fit configuration: {} local epochs of batches of {} in a party-level DP job whose spec trains {epochs} \
                 of {batch} (how long training takes must not be the coordinator's choice)",
                config.train.local_epochs, config.train.batch_size
            )));
        }
        if self.private() {
            return self.fit_private(round, config, global, round_message);
        }
        self.trainer.set_parameters(global).map_err(err)?;
        // Data-independent protocol work (he: the encryption randomness) is
        // drawn before training, so that a party whose round ends early
        // (one not asked to decrypt) does not draw it inside the next round.
        self.aggregation.prepare(global);
        if self.trains_ahead() {
            return self.fit_ahead(round, config, global, round_message, HowToTrain::Plain, None);
        }
        let train_started = Instant::now();
        // Under a protocol that hides this party's update, why training
        // failed (it may quote a row) stays here too.
        let hides = self.hides_values;
        let mut outcome = self.trainer.fit(config).map_err(|e| -> TaskError {
            if hides { kept_local("training")(e) } else { err(e).into() }
        })?;
        // Local training alone: lets the coordinator tell the framework's
        // share of a round from the training's.
        outcome.metrics.insert("train_ms".into(), train_started.elapsed().as_secs_f64() * 1000.0);
        let local = self.trainer.parameters().map_err(err)?;
        let train_loss = outcome.metrics.get("train_loss").copied();
        if !hides && outcome.num_examples > self.max_plain_examples {
            tracing::info!(
                round,
                examples = outcome.num_examples,
                cap = self.max_plain_examples,
                "this party's update weighs the job's cap, not its examples (aggregation.none.max_examples)"
            );
        }
        let update = LocalUpdate { global, fit: config, local, num_examples: outcome.num_examples, train_loss };
        let contribution = self.aggregation.contribute(round, round_message, update)?;
        self.open_round(round);
        let mut metrics = outcome.metrics;
        metrics.insert("fit_ms".into(), started.elapsed().as_secs_f64() * 1000.0);
        if self.hides_values {
            // The protocol hides this party's update: its loss travels inside
            // the secure sum, and its timings (a hint of its data's size) not at all.
            metrics.clear();
        }
        Ok(ResultBody::Fit { metrics, contribution })
    }

    /// An evaluation without DP noise: in an evaluate job, once.
    /// An evaluation is released once a round (a train job evaluates each
    /// round's global model once), and once in all in an evaluate job (one
    /// model, once). Repeated within a round, over other parties, its sums
    /// would give this party's metrics by difference, exactly; across
    /// rounds that is "comparing rounds" (docs/secure-aggregation.md).
    fn release_evaluation(&mut self, round: u32) -> Result<(), TaskError> {
        let again = self.eval_released && (self.evaluate_only || self.last_evaluation.is_some_and(|r| round <= r));
        if again {
            return Err(TaskError::CoordinatorFault(
                "asked again for an evaluation: a round's model is evaluated once (an evaluate job's, once)".into(),
            ));
        }
        self.eval_released = true;
        self.last_evaluation = Some(round);
        Ok(())
    }

    /// A DP evaluation's one release: recorded in the privacy ledger first
    /// (a second request is refused), then the counts with fresh noise
    /// from an OS-seeded CSPRNG. The trainer's loss and other metrics stay
    /// here; the accuracy becomes a count of rows (exact: the trainers
    /// report `correct / n`).
    fn noisy_evaluation(
        &mut self,
        global: &confide_algorithms::Parameters,
    ) -> Result<confide_dp::evaluation::NoisyEvaluation, TaskError> {
        let Some(noise) = self.eval_noise else {
            return Err(TaskError::Refused("no differential privacy to apply".into()));
        };
        let again = || {
            TaskError::CoordinatorFault(
                "asked again for this evaluation's noisy counts: an evaluate job releases them once".into(),
            )
        };
        if self.eval_released {
            return Err(again());
        }
        // Released in an earlier session of the same job, offered again:
        // the ledger says so.
        let recorded = match &self.budget {
            Some(budget) => Some(budget.start_release_once().map_err(|e| match e {
                crate::ledger::StartRefused::Budget(_) => again(),
                other => refused(other),
            })?),
            None => None,
        };
        self.eval_released = true;
        let released = self.evaluate_noisily(global, noise);
        // Durable before any answer leaves, a refusal included (whether the
        // evaluation failed is itself about the rows).
        if let Some(recorded) = recorded {
            recorded.durable().map_err(TaskError::Refused)?;
        }
        released
    }

    fn evaluate_noisily(
        &mut self,
        global: &confide_algorithms::Parameters,
        noise: confide_dp::evaluation::NoisyCounts,
    ) -> Result<confide_dp::evaluation::NoisyEvaluation, TaskError> {
        self.trainer.set_parameters(global).map_err(err)?;
        let outcome = self.trainer.evaluate().map_err(kept_local("the evaluation"))?;
        let n = outcome.num_examples;
        let correct = outcome.metrics.get("accuracy").map(|a| (a.clamp(0.0, 1.0) * n as f64).round() as u64);
        let mut rng = confide_dp::sampler::os_seeded_rng().map_err(err)?;
        noise.release(n, correct, &mut rng).map_err(kept_local("the evaluation's release"))
    }

    /// An evaluation without DP noise. In an evaluate job (a pipeline's may
    /// run outside the budget, on rows the policy otherwise protects) the
    /// trainer's error text, which a plug-in's or TorchScript module's can
    /// make quote a row, stays in this party's log.
    fn evaluate_plainly(
        &mut self,
        global: &confide_algorithms::Parameters,
    ) -> Result<confide_algorithms::EvalOutcome, TaskError> {
        let evaluated = self.trainer.set_parameters(global).and_then(|()| self.trainer.evaluate());
        if self.evaluate_only || self.hides_values {
            evaluated.map_err(kept_local("the evaluation"))
        } else {
            evaluated.map_err(|e| err(e).into())
        }
    }

    /// Whether the job has differential privacy (either level).
    fn private(&self) -> bool {
        self.dp.is_some() || self.party_clip.is_some()
    }

    /// A round of a DP job: the round is recorded in the privacy ledger
    /// first (refused beyond what the budget allows; the record is made
    /// durable while the round trains, and waited for before the
    /// contribution is returned to be sent), then DP-SGD with the
    /// accepted spec's plan (example level), or ordinary training with the
    /// update clipped to the spec's norm (party level; the coordinator adds
    /// the noise). The update weighs 1 (the party's example count is not
    /// noised) and carries no loss or metric.
    fn fit_private(
        &mut self,
        round: u32,
        config: &FitConfig,
        global: &Arc<confide_algorithms::Parameters>,
        round_message: &[u8],
    ) -> Result<ResultBody, TaskError> {
        if let Some(bound) = self.dp_values_bound
            && global.num_values() > bound
        {
            return Err(TaskError::CoordinatorFault(format!(
                "the global model has {} values, more than the {bound} the spec's PLD accountant was charged for \
                 (dp.max_model_values, less one for adaptive clipping's count)",
                global.num_values()
            )));
        }
        // The input standardisation is the spec's, whatever the global
        // model carries: a coordinator cannot choose it (a tiny input.std
        // would make chosen rows overflow), and the aggregate's rounding
        // cannot move it. The trainer is given the model once, a copy only
        // where the standardisation differs from the spec's (a model the
        // size of the update is not copied twice a round for nothing). A
        // standardisation that no trainer would take is the coordinator's
        // fault, said as such.
        if let Some(why) = unusable_standardisation(global) {
            return Err(TaskError::CoordinatorFault(format!("the global model's {why}")));
        }
        let own = self.dp_inputs.as_ref().and_then(|fixed| with_standardisation(global, fixed));
        // The model trained from: the update's clip measures the trained
        // tensors' movement, not the standardisation's replacement.
        let base = own.map_or_else(|| global.clone(), Arc::new);
        self.trainer.set_parameters(&base).map_err(err)?;
        let recorded = match &self.budget {
            Some(budget) => Some(budget.start_round().map_err(refused)?),
            None => None,
        };
        let how = match (self.dp, self.party_clip) {
            (Some(plan), _) => HowToTrain::DpSgd(plan),
            (None, Some(clip)) => HowToTrain::PartyLevel { clip, base, encoding_clips: self.encoding_clips },
            (None, None) => return Err(TaskError::Refused("no differential privacy to apply".into())),
        };
        // Distributed noise does not depend on the data: drawn before training.
        self.aggregation.prepare(global);
        if self.trains_ahead() {
            return self.fit_ahead(round, config, global, round_message, how, recorded);
        }
        let contribution = train_round(self.trainer.as_mut(), &how, config).and_then(|trained| {
            Ok(self.aggregation.contribute(round, round_message, trained.update(global, config))?)
        });
        // Not on record, so not sent: nor is a refusal (whether training
        // failed is itself about the rows), so the record is waited for
        // whatever the round's outcome.
        if let Some(recorded) = recorded
            && let Err(e) = recorded.durable()
        {
            self.drop_round();
            return Err(TaskError::Refused(e));
        }
        let contribution = contribution?;
        self.open_round(round);
        Ok(ResultBody::Fit { metrics: Default::default(), contribution })
    }
}

/// Why `global`'s input standardisation cannot be trained with (a value
/// that is not finite, a std that is not positive), if it cannot.
fn unusable_standardisation(global: &confide_algorithms::Parameters) -> Option<String> {
    global.tensors().iter().find_map(|t| {
        let bad = match t.name.as_str() {
            INPUT_MEAN => t.data.iter().find(|v| !v.is_finite()),
            INPUT_STD => t.data.iter().find(|v| !v.is_finite() || **v <= 0.0),
            _ => None,
        }?;
        Some(format!("{} holds {bad}", t.name))
    })
}

/// `global` with its input standardisation (`input.mean`, `input.std`)
/// replaced by `fixed`, or `None` where it already holds those values, has
/// no such tensors, or has them at another length than `fixed` (left as
/// they are: the trainer refuses a model of another shape): the caller
/// then uses `global` as it is.
fn with_standardisation(
    global: &confide_algorithms::Parameters,
    fixed: &[Vec<f32>; 2],
) -> Option<confide_algorithms::Parameters> {
    let replacement = |name: &str| match name {
        INPUT_MEAN => Some(&fixed[0]),
        INPUT_STD => Some(&fixed[1]),
        _ => None,
    };
    // Bit patterns compared: the trainer gets exactly the spec's values
    // (−0.0 and 0.0 too).
    let differs = global.tensors().iter().any(|t| {
        replacement(&t.name)
            .is_some_and(|f| f.len() == t.data.len() && f.iter().zip(&t.data).any(|(a, b)| a.to_bits() != b.to_bits()))
    });
    if !differs {
        return None;
    }
    let mut own = global.clone();
    for (name, values) in own.values_mut() {
        if let Some(f) = replacement(name)
            && values.len() == f.len()
        {
            values.copy_from_slice(f);
        }
    }
    Some(own)
}

/// `global + f·(local − global)` with f = min(1, clip/‖local − global‖₂),
/// the norm over every value in f64; a non-finite update becomes no update.
/// An update within the clip is `local` itself, not a copy.
pub fn clip_update(
    global: &confide_algorithms::Parameters,
    local: confide_algorithms::Parameters,
    clip: f64,
) -> confide_algorithms::Parameters {
    // A clip that is not positive (never, from a validated spec) fails
    // closed: no update rather than an unbounded one.
    if local.spec() != global.spec() || clip.is_nan() || clip <= 0.0 {
        return global.clone();
    }
    let norm = local
        .tensors()
        .iter()
        .zip(global.tensors())
        .map(|(l, g)| confide_algorithms::params::squared_distance(&l.data, &g.data))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() {
        return global.clone();
    }
    // Slightly inside the clip, so that rounding to f32 cannot push it over.
    let limit = clip * (1.0 - 1e-6);
    if norm <= limit {
        return local;
    }
    let f = limit / norm;
    let mut out = local;
    for ((_, values), g) in out.values_mut().zip(global.tensors()) {
        for (v, gv) in values.iter_mut().zip(&g.data) {
            let g = f64::from(*gv);
            *v = (g + f * (f64::from(*v) - g)) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::{Error, EvalOutcome, FeatureStats, FitOutcome, Parameters, Tensor};
    use confide_crypto::aggregation::secagg::SecAggPlus;
    use confide_crypto::aggregation::{AggregationProtocol, JobFacts};
    use confide_crypto::secagg::testing::identity;
    use std::sync::Arc;

    /// A trainer whose statistics and evaluation are fixed.
    struct Fixed;

    impl Trainer for Fixed {
        fn parameters(&self) -> Result<Parameters, Error> {
            Parameters::new(vec![Tensor { name: "w".into(), shape: vec![1], data: vec![0.0] }])
        }
        fn set_parameters(&mut self, _: &Parameters) -> Result<(), Error> {
            Ok(())
        }
        fn feature_stats(&self) -> FeatureStats {
            FeatureStats { count: 7, sum: vec![1.0], sum_sq: vec![2.0] }
        }
        fn fit(&mut self, _: &FitConfig) -> Result<FitOutcome, Error> {
            Ok(FitOutcome { num_examples: 7, metrics: Default::default() })
        }
        fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
            Ok(EvalOutcome { num_examples: 3, loss: 0.5, metrics: [("accuracy".to_string(), 0.9)].into() })
        }
        fn predict(&self, _: &[f32]) -> Result<Vec<f32>, Error> {
            Ok(Vec::new())
        }
    }

    fn handler(standardize: bool) -> TrainingHandler {
        let names: Vec<String> = ["p0", "p1", "p2"].map(String::from).to_vec();
        let job = JobFacts::new("j", names, 10, 3, 100);
        let client = SecAggPlus.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let mut h = TrainingHandler::new(Box::new(Fixed), client, SecAggPlus.stages());
        h.standardize = standardize;
        h.hides_values = true;
        h
    }

    /// [`Fixed`] that trains with DP-SGD.
    /// It records every model it is given.
    #[derive(Default)]
    struct FixedDp {
        given: Arc<std::sync::Mutex<Vec<Parameters>>>,
        /// The plan and learning rate each DP-SGD fit ran with.
        plans: Arc<std::sync::Mutex<Vec<(DpSgdPlan, f64)>>>,
        /// An error training (with DP-SGD or without) and the evaluation
        /// fail with, quoting a row as a TorchScript module's or plug-in's
        /// message can.
        fails_with: Option<String>,
    }

    impl Trainer for FixedDp {
        fn parameters(&self) -> Result<Parameters, Error> {
            Fixed.parameters()
        }
        fn set_parameters(&mut self, p: &Parameters) -> Result<(), Error> {
            self.given.lock().unwrap().push(p.clone());
            Ok(())
        }
        fn feature_stats(&self) -> FeatureStats {
            Fixed.feature_stats()
        }
        fn fit(&mut self, c: &FitConfig) -> Result<FitOutcome, Error> {
            if let Some(e) = &self.fails_with {
                return Err(Error::InvalidInput(e.clone()));
            }
            Fixed.fit(c)
        }
        fn supports_dp_sgd(&self) -> bool {
            true
        }
        fn fit_private(&mut self, c: &FitConfig, plan: &DpSgdPlan) -> Result<FitOutcome, Error> {
            self.plans.lock().unwrap().push((*plan, c.train.learning_rate));
            if let Some(e) = &self.fails_with {
                return Err(Error::InvalidInput(e.clone()));
            }
            Ok(FitOutcome { num_examples: 7, metrics: [("train_loss".to_string(), 0.3)].into() })
        }
        fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
            if let Some(e) = &self.fails_with {
                return Err(Error::InvalidInput(e.clone()));
            }
            Fixed.evaluate()
        }
        fn predict(&self, f: &[f32]) -> Result<Vec<f32>, Error> {
            Fixed.predict(f)
        }
    }

    /// A DP-SGD plan of ten small steps.
    const SMALL_PLAN: DpSgdPlan = DpSgdPlan {
        max_grad_norm: 1.0,
        noise_multiplier: 1.0,
        sampling_rate: 0.1,
        expected_batch_size: 4,
        steps_per_round: 10,
        rounds: 10,
    };

    /// A handler for job "j" in the clear (the plain protocol) training with `trainer`.
    fn plain_handler(trainer: FixedDp) -> TrainingHandler {
        use confide_crypto::aggregation::plain::Plain;
        let job = JobFacts::new("j", Vec::new(), 10, 1, 100);
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        TrainingHandler::new(Box::new(trainer), client, Plain.stages())
    }

    /// In a DP job, even under a protocol that reveals updates, the party
    /// sends no statistic of its rows (a coordinator asking for feature
    /// sums or evaluation metrics, in the clear or summed, is refused as a
    /// fault), and its fit answer carries no metric, loss or example count.
    ///
    /// Both levels, DP-SGD and party-level: the protocol itself is handed an
    /// update that weighs 1 and carries no loss (`secagg` and `he` would
    /// sum a weight and a loss into their vectors unnoised).
    #[test]
    fn a_dp_job_sends_only_the_noisy_update() {
        for level in ["example", "party"] {
            a_dp_job_at_this_level_sends_only_the_noisy_update(level);
        }
    }

    fn a_dp_job_at_this_level_sends_only_the_noisy_update(level: &str) {
        use confide_crypto::aggregation::plain::Plain;
        let job = JobFacts::new("j", Vec::new(), 10, 1, 100);
        let inner = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let updates = Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = Box::new(Recording {
            inner,
            log: Default::default(),
            updates: updates.clone(),
            abandons: Default::default(),
        });
        let mut h = TrainingHandler::new(Box::new(FixedDp::default()), client, Plain.stages());
        if level == "example" {
            h.dp = Some(SMALL_PLAN);
        } else {
            h.party_clip = Some(2.0);
        }
        let global = Arc::new(Fixed.parameters().unwrap());
        let ResultBody::Setup { stats, .. } = h.on_task(task(0, TaskBody::Setup)).unwrap() else { panic!() };
        assert_eq!(stats, FeatureStats::default(), "no feature sums");
        for body in [
            TaskBody::Evaluate { global: global.clone() },
            TaskBody::SecureSum { of: SumOf::FeatureStats, round_message: Vec::new() },
            TaskBody::SecureSum { of: SumOf::Evaluation { global: global.clone() }, round_message: Vec::new() },
        ] {
            let err = h.on_task(task(1, body)).unwrap_err();
            assert!(matches!(&err, TaskError::CoordinatorFault(m) if m.contains("differential privacy")), "{err:?}");
        }
        let fit = || TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };

        let ResultBody::Fit { metrics, contribution } = h.on_task(task(1, fit())).unwrap() else { panic!() };
        assert!(metrics.is_empty(), "{level}: {metrics:?}");
        // The plain protocol's body is the weight (protobuf field 1, varint):
        // 1, whatever the party's row count (7 here).
        assert_eq!(contribution.body, [0x08, 0x01], "{level}: a DP update weighs 1");
        assert_eq!(*updates.lock().unwrap(), [(1, None)], "{level}: the update handed to the protocol");
    }

    /// Party-level DP trains with the spec's local epochs and batch size: a
    /// fit configuration with others (a thousand epochs of batches of one,
    /// to time the data set's size off an answer that runs past its floor)
    /// is the coordinator's fault, refused before the round is recorded.
    #[test]
    fn party_level_dp_refuses_a_fit_configuration_that_changes_the_work() {
        let text = "name = \"j\"\nkind = \"train\"\n[parties]\nnames = [\"p0\", \"p1\"]\ndataset = \"bc\"\n\
                    [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
                    [training]\nlocal_epochs = 2\nbatch_size = 16\n\
                    [dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 1.0\n";
        let spec = confide_proto::jobspec::JobSpec::parse(text, "j", &confide_proto::Limits::default()).unwrap();
        let mut h = plain_handler(FixedDp::default());
        // As `TrainingKind::handler` sets a party-level DP job up.
        h.set_party_level(&spec, spec.dp.as_ref().unwrap());
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = |local_epochs: u32, batch_size: usize| TaskBody::Fit {
            config: FitConfig {
                round: 1,
                train: confide_algorithms::TrainConfig { local_epochs, batch_size, ..spec.training.clone() },
            },
            global: global.clone(),
            round_message: Vec::new(),
        };
        for (epochs, batch) in [(1000, 1), (2, 1), (3, 16)] {
            let err = h.on_task(task(1, fit(epochs, batch))).unwrap_err();
            assert!(
                matches!(&err, TaskError::CoordinatorFault(m) if m.contains("party-level DP") && m.contains("2 of 16")),
                "{epochs} × {batch}: {err:?}"
            );
        }
        assert!(matches!(h.on_task(task(1, fit(2, 16))).unwrap(), ResultBody::Fit { .. }));
    }

    /// In a DP job, a trainer's error in DP-SGD training or in a DP
    /// evaluation can quote a row (a TorchScript module's message, a
    /// plug-in's): the coordinator is told only what failed, never the
    /// text.
    #[test]
    fn a_dp_trainers_error_text_stays_at_the_party() {
        let row = "row 17: age=63, diagnosis=malignant";
        let failing = || FixedDp { fails_with: Some(row.into()), ..Default::default() };
        let mut h = plain_handler(failing());
        h.dp = Some(SMALL_PLAN);
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        let err = h.on_task(task(1, fit)).unwrap_err();
        assert!(
            matches!(&err, TaskError::Refused(m) if m.contains("DP-SGD training failed") && !m.contains("row 17")),
            "{err:?}"
        );
        // A DP evaluate job's evaluation.
        let mut h = plain_handler(failing());
        h.eval_noise = Some(confide_dp::evaluation::NoisyCounts::new(2.0).unwrap());
        let err = h.on_task(task(1, TaskBody::Evaluate { global })).unwrap_err();
        assert!(
            matches!(&err, TaskError::Refused(m) if m.contains("evaluation failed") && !m.contains("row 17")),
            "{err:?}"
        );
    }

    /// The DP-SGD mechanism is the one planned from the accepted spec,
    /// whatever the round's fit configuration says: a coordinator that
    /// sends more epochs, a batch of one or other settings changes what is
    /// post-processing (the learning rate), never the steps, sampling rate,
    /// batch divisor or noise that fix ε.
    #[test]
    fn dp_sgd_runs_the_specs_plan_whatever_the_fit_configuration_says() {
        let text = "name = \"p\"\nkind = \"train\"\nrounds = 2\n[parties]\nnames = [\"p0\"]\nmin = 1\n\
                    dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
                    [training]\nlocal_epochs = 2\nbatch_size = 8\n\
                    [dp]\nnoise_multiplier = 1.5\nsampling_rate = 0.1\n";
        let spec = confide_proto::jobspec::JobSpec::parse(text, "p", &confide_proto::Limits::default()).unwrap();
        let planned = spec.dp.as_ref().unwrap().plan(&spec.training, spec.rounds).unwrap();
        assert_eq!(
            (planned.noise_multiplier, planned.sampling_rate, planned.expected_batch_size, planned.steps_per_round),
            (1.5, 0.1, 8, 20),
            "steps = ⌈local_epochs / q⌉"
        );
        let trainer = FixedDp::default();
        let plans = trainer.plans.clone();
        let mut h = plain_handler(trainer);
        h.dp = Some(planned);
        let global = Arc::new(Fixed.parameters().unwrap());
        let hostile = confide_algorithms::TrainConfig {
            local_epochs: 50,
            batch_size: 1,
            learning_rate: 0.5,
            ..Default::default()
        };
        h.on_task(task(
            1,
            TaskBody::Fit { config: FitConfig { round: 1, train: hostile }, global, round_message: Vec::new() },
        ))
        .unwrap();
        assert_eq!(*plans.lock().unwrap(), [(planned, 0.5)]);
    }

    /// A one-party DP-SGD training job of `rounds` rounds.
    fn dp_job(rounds: u32) -> confide_proto::jobspec::JobSpec {
        let text = format!(
            "name = \"p\"\nkind = \"train\"\nrounds = {rounds}\n[parties]\nnames = [\"p0\"]\nmin = 1\n\
             dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
             [dp]\nnoise_multiplier = 1.5\nsampling_rate = 0.1\n"
        );
        confide_proto::jobspec::JobSpec::parse(&text, "p", &confide_proto::Limits::default()).unwrap()
    }

    /// A handler for `spec` (job "j1", in the clear) training with
    /// `trainer` under the spec's DP plan, its rounds through `guard`.
    fn dp_handler(
        spec: &confide_proto::jobspec::JobSpec,
        trainer: FixedDp,
        guard: crate::ledger::RoundGuard,
    ) -> TrainingHandler {
        use confide_crypto::aggregation::plain::Plain;
        let job = JobFacts::new("j1", Vec::new(), 10, 1, 100);
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let mut h = TrainingHandler::new(Box::new(trainer), client, Plain.stages());
        h.dp = spec.dp.as_ref().unwrap().plan(&spec.training, spec.rounds);
        h.budget = Some(guard);
        h
    }

    /// A coordinator that asks for more training rounds than the spec (or
    /// re-runs one) gets each extra round charged to the ledger before any
    /// training, and refused, naming the policy, once the data set's budget
    /// cannot pay for it; the trainer never runs for a refused round.
    #[test]
    fn training_rounds_beyond_the_reservation_are_charged_first_or_refused() {
        let spec = dp_job(2);
        let dp = spec.dp.as_ref().unwrap();
        let (two, three) = (dp.epsilon(&spec.training, 2), dp.epsilon(&spec.training, 3));
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::ledger::Ledger::open(&dir.path().join("ledger.json")).unwrap();
        // Room for three rounds of this job, not four.
        let max = (three + dp.epsilon(&spec.training, 4)) / 2.0;
        let guard = ledger.reserve("j1", &spec, "d", Some(max)).unwrap();
        let trainer = FixedDp::default();
        let plans = trainer.plans.clone();
        let mut h = dp_handler(&spec, trainer, guard);
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = |round: u32| TaskBody::Fit {
            config: FitConfig { round, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        for round in 1..=3 {
            h.on_task(task(round, fit(round))).unwrap();
        }
        let charged = ledger.snapshot().datasets["d"].jobs["j1"].clone();
        assert_eq!(charged.rounds_started, 3);
        assert!((charged.epsilon - three).abs() < 1e-9 && charged.epsilon > two, "{charged:?}");
        let err = h.on_task(task(4, fit(4))).unwrap_err();
        assert!(matches!(&err, TaskError::CoordinatorFault(m) if m.contains("above the policy")), "{err:?}");
        assert_eq!(plans.lock().unwrap().len(), 3, "no training for the refused round");
        assert_eq!(ledger.snapshot().datasets["d"].jobs["j1"].rounds_started, 3);
    }

    /// The round's ledger record is written while the round trains, and
    /// the contribution is returned (to be sent) only once it is on disk: a
    /// round whose record cannot be written sends nothing and says why; the
    /// count keeps it (the safe side), and the next round goes on.
    #[test]
    fn a_round_whose_ledger_record_cannot_be_written_sends_nothing() {
        let spec = dp_job(3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let ledger = crate::ledger::Ledger::open(&path).unwrap();
        let guard = ledger.reserve("j1", &spec, "d", None).unwrap();
        let mut h = dp_handler(&spec, FixedDp::default(), guard);
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = |round: u32| TaskBody::Fit {
            config: FitConfig { round, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        assert!(matches!(h.on_task(task(1, fit(1))).unwrap(), ResultBody::Fit { .. }));
        // The write's temporary file cannot be created (a directory is in
        // its place, which stops root too).
        let blocker = path.with_extension("json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let err = h.on_task(task(2, fit(2))).unwrap_err();
        assert!(matches!(&err, TaskError::Refused(m) if m.contains("privacy ledger")), "{err:?}");
        assert_eq!(crate::ledger::Ledger::read(&path).unwrap().datasets["d"].jobs["j1"].rounds_started, 1);
        std::fs::remove_dir(&blocker).unwrap();
        assert!(matches!(h.on_task(task(3, fit(3))).unwrap(), ResultBody::Fit { .. }));
        let on_disk = crate::ledger::Ledger::read(&path).unwrap().datasets["d"].jobs["j1"].clone();
        assert_eq!(on_disk.rounds_started, 3, "the failed round is counted");
    }

    /// A ledger in `dir` whose writes take 300 ms, so that a test cannot
    /// pass by luck where a record must be on disk before an answer.
    fn slowed_ledger(dir: &std::path::Path) -> (std::path::PathBuf, Arc<crate::ledger::Ledger>) {
        let path = dir.join("ledger.json");
        let ledger = crate::ledger::Ledger::open(&path).unwrap();
        ledger.write_delay_ms.store(300, std::sync::atomic::Ordering::Relaxed);
        (path, ledger)
    }

    /// Whether a DP round or a DP evaluation failed is about the rows: the
    /// refusal leaves only once the round's ledger record is on disk, as a
    /// result would (the writer is slowed so that luck cannot pass this).
    #[test]
    fn a_failed_dp_round_or_evaluation_is_on_record_before_its_refusal_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ledger) = slowed_ledger(dir.path());
        let spec = dp_job(3);
        let failing = FixedDp { fails_with: Some("diverged".into()), ..FixedDp::default() };
        let mut h = dp_handler(&spec, failing, ledger.reserve("j1", &spec, "d", None).unwrap());
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        h.on_task(task(1, fit)).unwrap_err();
        let on_disk = crate::ledger::Ledger::read(&path).unwrap();
        assert_eq!(on_disk.datasets["d"].jobs["j1"].rounds_started, 1);
        let text = "name = \"e\"\nkind = \"evaluate\"\nfrom_job = \"j0\"\n[parties]\nnames = [\"p0\"]\nmin = 1\n\
                    dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n[dp]\nnoise_multiplier = 2.0\n";
        let eval_spec = confide_proto::jobspec::JobSpec::parse(text, "e", &confide_proto::Limits::default()).unwrap();
        let failing = FixedDp { fails_with: Some("no rows".into()), ..FixedDp::default() };
        let mut e = dp_handler(&spec, failing, ledger.reserve("e1", &eval_spec, "d", None).unwrap());
        e.dp = None;
        e.evaluate_only = true;
        e.eval_noise = Some(confide_dp::evaluation::NoisyCounts::new(2.0).unwrap());
        e.on_task(task(1, TaskBody::Evaluate { global })).unwrap_err();
        let on_disk = crate::ledger::Ledger::read(&path).unwrap();
        assert_eq!(on_disk.datasets["d"].jobs["e1"].rounds_started, 1);
    }

    /// An evaluate job without DP (a pipeline's may run outside the budget)
    /// keeps its trainer's error text, which can quote a row, in this
    /// party's log; a training job's federated evaluation still says why.
    #[test]
    fn an_evaluate_jobs_trainer_error_stays_here() {
        let failing = || FixedDp { fails_with: Some("row 7 has label \"secret\"".into()), ..FixedDp::default() };
        let global = Arc::new(Fixed.parameters().unwrap());
        let mut evaluation = plain_handler(failing());
        evaluation.evaluate_only = true;
        let e = evaluation.on_task(task(1, TaskBody::Evaluate { global: global.clone() })).unwrap_err();
        assert!(
            matches!(&e, TaskError::Refused(m) if m.contains("in this party's log") && !m.contains("secret")),
            "{e:?}"
        );
        let mut training = plain_handler(failing());
        let e = training.on_task(task(1, TaskBody::Evaluate { global })).unwrap_err();
        assert!(matches!(&e, TaskError::Refused(m) if m.contains("secret")), "{e:?}");
    }

    /// A trainer that evaluates `n` rows at accuracy 0.9 and loss 0.3.
    struct Rows(u64);

    impl Trainer for Rows {
        fn parameters(&self) -> Result<Parameters, Error> {
            Fixed.parameters()
        }
        fn set_parameters(&mut self, _: &Parameters) -> Result<(), Error> {
            Ok(())
        }
        fn feature_stats(&self) -> FeatureStats {
            Fixed.feature_stats()
        }
        fn fit(&mut self, c: &FitConfig) -> Result<FitOutcome, Error> {
            Fixed.fit(c)
        }
        fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
            Ok(EvalOutcome { num_examples: self.0, loss: 0.3, metrics: [("accuracy".to_string(), 0.9)].into() })
        }
        fn predict(&self, f: &[f32]) -> Result<Vec<f32>, Error> {
            Fixed.predict(f)
        }
    }

    /// A party-level update is clipped before it leaves: at the spec's clip
    /// (central, fixed), at the largest clip an adaptive round may use
    /// (central, adaptive: the coordinator clips again at its own), or by
    /// the encoding (distributed noise).
    #[test]
    fn a_party_level_update_never_leaves_unclipped_by_the_party() {
        let dp = |extra: &str, protocol: &str| {
            let text = format!(
                "name = \"p\"\nkind = \"train\"\n[parties]\nnames = [\"a\", \"b\", \"c\"]\ndataset = \"d\"\n\
                 [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
                 [aggregation]\nprotocol = \"{protocol}\"\n\
                 [dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 2.0\n{extra}"
            );
            confide_proto::jobspec::JobSpec::parse(&text, "p", &confide_proto::Limits::default()).unwrap().dp.unwrap()
        };
        assert_eq!(party_clip(&dp("", "none")), 2.0);
        let adaptive = party_clip(&dp("adaptive_clip_quantile = 0.5\n", "none"));
        assert_eq!(adaptive, 2.0 * confide_dp::ddg::AdaptiveClip::RANGE);
        assert!(adaptive.is_finite());
        assert_eq!(party_clip(&dp("", "secagg")), f64::INFINITY, "the encoding clips");
        // Under the PLD accountant the global model must leave room for
        // the adaptive clip's count among the values the noise covers.
        let pld = "accountant = \"pld\"\nmax_model_values = 100\n";
        assert_eq!(pld_values_bound(&dp(pld, "none")), Some(100));
        assert_eq!(pld_values_bound(&dp(&format!("{pld}adaptive_clip_quantile = 0.5\n"), "none")), Some(99));
        assert_eq!(pld_values_bound(&dp("", "none")), None, "RDP bounds every size");
    }

    /// An evaluate job with `[dp]` releases its noisy counts once: no loss,
    /// no feature sums, no training, and a replayed evaluate task is refused
    /// by the ledger, which recorded the release before it was sent.
    #[test]
    fn a_dp_evaluation_releases_noisy_counts_once_and_nothing_else() {
        use confide_crypto::aggregation::plain::Plain;
        let text = "name = \"e\"\nkind = \"evaluate\"\nfrom_job = \"j0\"\n[parties]\nnames = [\"p0\"]\nmin = 1\n\
                    dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n[dp]\nnoise_multiplier = 2.0\n";
        let spec = confide_proto::jobspec::JobSpec::parse(text, "e", &confide_proto::Limits::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::ledger::Ledger::open(&dir.path().join("ledger.json")).unwrap();
        let guard = ledger.reserve("e1", &spec, "d", Some(10.0)).unwrap();
        let job = JobFacts::new("e1", Vec::new(), 10, 1, 100);
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let mut h = TrainingHandler::new(Box::new(Rows(100_000)), client, Plain.stages());
        // As `TrainingKind::handler` sets an evaluate job up.
        h.evaluate_only = true;
        h.eval_noise = Some(confide_dp::evaluation::NoisyCounts::new(2.0).unwrap());
        h.budget = Some(guard);
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        let feature_sums = TaskBody::SecureSum { of: SumOf::FeatureStats, round_message: Vec::new() };
        for body in [TaskBody::Setup, fit, feature_sums] {
            let err = h.on_task(task(1, body)).unwrap_err();
            assert!(matches!(&err, TaskError::CoordinatorFault(m) if m.contains("only evaluates")), "{err:?}");
        }
        let ResultBody::Evaluate { num_examples, loss, metrics } =
            h.on_task(task(1, TaskBody::Evaluate { global: global.clone() })).unwrap()
        else {
            panic!()
        };
        assert!(loss.is_nan(), "no loss released");
        assert_eq!(metrics.keys().collect::<Vec<_>>(), ["accuracy"]);
        // σ = 2√2 ≈ 2.8 rows on each count: 8σ bounds hold at any seed.
        assert!(num_examples.abs_diff(100_000) < 23, "{num_examples}");
        assert!((metrics["accuracy"] - 0.9).abs() < 5e-4, "{metrics:?}");
        let again = h.on_task(task(1, TaskBody::Evaluate { global: global.clone() })).unwrap_err();
        assert!(matches!(&again, TaskError::CoordinatorFault(m) if m.contains("once")), "{again:?}");
        // Under a protocol that hides values, even noisy counts travel only
        // in the secure sum: a request for them in the clear is refused.
        let mut secure = handler(false);
        secure.eval_noise = Some(confide_dp::evaluation::NoisyCounts::new(2.0).unwrap());
        let clear = secure.on_task(task(1, TaskBody::Evaluate { global })).unwrap_err();
        assert!(matches!(&clear, TaskError::CoordinatorFault(m) if m.contains("in the clear")), "{clear:?}");
        assert_eq!(ledger.snapshot().datasets["d"].jobs["e1"].rounds_started, 1);
        // The job offered again (a new session, the same reservation): the
        // ledger remembers the release, so it is not made a second time.
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let mut again = TrainingHandler::new(Box::new(Rows(100_000)), client, Plain.stages());
        again.eval_noise = Some(confide_dp::evaluation::NoisyCounts::new(2.0).unwrap());
        again.budget = Some(ledger.reserve("e1", &spec, "d", Some(10.0)).unwrap());
        let global = Arc::new(Fixed.parameters().unwrap());
        let e = again.on_task(task(1, TaskBody::Evaluate { global })).unwrap_err();
        assert!(matches!(&e, TaskError::CoordinatorFault(m) if m.contains("once")), "{e:?}");
        assert_eq!(ledger.snapshot().datasets["d"].jobs["e1"].rounds_started, 1, "nothing more charged or released");
    }

    /// An evaluate job without `[dp]` (which `policy.evaluations_outside_budget`
    /// runs with no reservation) evaluates one model once: a coordinator
    /// that sends it set-up, training or a feature sum, or a second model to
    /// evaluate, is refused, so it cannot become an uncharged training job
    /// or a stream of queries on the rows.
    #[test]
    fn an_evaluate_job_evaluates_once_and_never_trains() {
        use confide_crypto::aggregation::plain::Plain;
        let job = JobFacts::new("e1", Vec::new(), 10, 1, 100);
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let mut h = TrainingHandler::new(Box::new(Rows(100)), client, Plain.stages());
        h.evaluate_only = true;
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        let feature_sum = TaskBody::SecureSum { of: SumOf::FeatureStats, round_message: Vec::new() };
        for body in [TaskBody::Setup, fit, feature_sum] {
            let err = h.on_task(task(1, body)).unwrap_err();
            assert!(matches!(&err, TaskError::CoordinatorFault(m) if m.contains("only evaluates")), "{err:?}");
        }
        let ResultBody::Evaluate { num_examples, .. } =
            h.on_task(task(1, TaskBody::Evaluate { global: global.clone() })).unwrap()
        else {
            panic!()
        };
        assert_eq!(num_examples, 100);
        let again = h.on_task(task(1, TaskBody::Evaluate { global })).unwrap_err();
        assert!(matches!(&again, TaskError::CoordinatorFault(m) if m.contains("once")), "{again:?}");
    }

    /// Both counts a DP evaluation releases carry noise: at σ = 1000√2 rows
    /// on each, the rows evaluated and the rows classified correctly (read
    /// back as accuracy × rows) each come out exact with probability about
    /// 2.8e-4; over three releases (each handler releases once) a count
    /// exact in all three has probability about 2e-11. Each stays within 8σ.
    /// (The test above, at a small σ, would pass with no noise at all.)
    #[test]
    fn a_dp_evaluation_adds_noise_to_both_counts_it_releases() {
        use confide_crypto::aggregation::plain::Plain;
        let sigma = 1000.0 * 2f64.sqrt();
        let (mut rows_noised, mut correct_noised) = (false, false);
        for _ in 0..3 {
            let job = JobFacts::new("e1", Vec::new(), 10, 1, 100);
            let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
            let mut h = TrainingHandler::new(Box::new(Rows(100_000)), client, Plain.stages());
            h.eval_noise = Some(confide_dp::evaluation::NoisyCounts::new(1000.0).unwrap());
            let global = Arc::new(Fixed.parameters().unwrap());
            let ResultBody::Evaluate { num_examples, metrics, .. } =
                h.on_task(task(1, TaskBody::Evaluate { global })).unwrap()
            else {
                panic!()
            };
            let correct = (metrics["accuracy"] * num_examples as f64).round();
            assert!((num_examples as f64 - 100_000.0).abs() < 8.0 * sigma, "{num_examples}");
            assert!((correct - 90_000.0).abs() < 8.0 * sigma, "{correct}");
            rows_noised |= num_examples != 100_000;
            correct_noised |= correct != 90_000.0;
        }
        assert!(rows_noised && correct_noised, "rows noised: {rows_noised}, correct rows noised: {correct_noised}");
    }

    /// An aggregation client that logs what the handler asks of it, in order,
    /// and counts the times its round is let go (`abandon`, which wipes the
    /// round's secrets); it forwards everything.
    struct Recording {
        inner: Box<dyn AggregationClient>,
        log: Arc<std::sync::Mutex<Vec<&'static str>>>,
        /// Each update's weight and training loss, as the protocol got them.
        updates: Arc<std::sync::Mutex<Vec<WeightAndLoss>>>,
        abandons: Arc<std::sync::atomic::AtomicUsize>,
    }

    /// An update's weight and training loss.
    type WeightAndLoss = (u64, Option<f64>);

    impl AggregationClient for Recording {
        fn contribute(
            &mut self,
            round: u32,
            round_message: &[u8],
            update: confide_crypto::aggregation::LocalUpdate<'_>,
        ) -> Result<confide_crypto::aggregation::Envelope, confide_crypto::Error> {
            self.log.lock().unwrap().push("contribute");
            self.updates.lock().unwrap().push((update.num_examples, update.train_loss));
            self.inner.contribute(round, round_message, update)
        }
        fn prepare(&mut self, global: &Parameters) {
            self.log.lock().unwrap().push("prepare");
            self.inner.prepare(global)
        }
        fn answers_fit_before_training(&self) -> bool {
            self.inner.answers_fit_before_training()
        }
        fn contribute_ahead(
            &mut self,
            round: u32,
            round_message: &[u8],
            global: &Parameters,
            fit: &FitConfig,
        ) -> Result<confide_crypto::aggregation::Envelope, confide_crypto::Error> {
            self.inner.contribute_ahead(round, round_message, global, fit)
        }
        fn supply_update(
            &mut self,
            round: u32,
            update: confide_crypto::aggregation::LocalUpdate<'_>,
        ) -> Result<(), confide_crypto::Error> {
            self.inner.supply_update(round, update)
        }
        fn needs_update_for(&self, stage: confide_crypto::aggregation::StageName) -> bool {
            self.inner.needs_update_for(stage)
        }
        fn on_step(
            &mut self,
            round: u32,
            stage: confide_crypto::aggregation::StageName,
            message: confide_crypto::aggregation::Envelope,
        ) -> Result<confide_crypto::aggregation::Envelope, confide_crypto::Error> {
            self.inner.on_step(round, stage, message)
        }
        fn precompute(&mut self) {
            self.inner.precompute()
        }
        fn abandon(&mut self) {
            self.abandons.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.abandon()
        }
    }

    /// Without DP too, the protocol's data-independent work (he: the
    /// encryption randomness) is asked for before training: a party that
    /// is not asked to decrypt never idles between its upload and the next
    /// round, and used to draw that randomness inside the round.
    #[test]
    fn protocol_work_is_prepared_before_training_without_dp() {
        use confide_crypto::aggregation::plain::Plain;
        let job = JobFacts::new("j", Vec::new(), 10, 1, 100);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let client =
            Box::new(Recording { inner, log: log.clone(), updates: Default::default(), abandons: Default::default() });
        let mut h = TrainingHandler::new(Box::new(Fixed), client, Plain.stages());
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global,
            round_message: Vec::new(),
        };
        assert!(matches!(h.on_task(task(1, fit)).unwrap(), ResultBody::Fit { .. }));
        assert_eq!(*log.lock().unwrap(), ["prepare", "contribute"]);
    }

    /// Under DP the party trains with the spec's input standardisation,
    /// whatever the coordinator's global model carries (a tiny `input.std`
    /// from a hostile coordinator would make chosen rows overflow), given
    /// to the trainer once a round; one that no trainer could take (not
    /// finite, a std not positive) is refused as the coordinator's fault,
    /// before the trainer sees anything.
    #[test]
    fn a_dp_party_trains_with_the_specs_standardisation_not_the_wires() {
        use confide_crypto::aggregation::plain::Plain;
        let job = JobFacts::new("j", Vec::new(), 10, 1, 100);
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let trainer = FixedDp::default();
        let given = trainer.given.clone();
        let mut h = TrainingHandler::new(Box::new(trainer), client, Plain.stages());
        h.dp = Some(DpSgdPlan {
            max_grad_norm: 1.0,
            noise_multiplier: 1.0,
            sampling_rate: 0.1,
            expected_batch_size: 4,
            steps_per_round: 1,
            rounds: 10,
        });
        h.dp_inputs = Some([vec![0.0, 2.0], vec![1.0, 3.0]]);
        let tensor = |name: &str, data: Vec<f32>| Tensor { name: name.into(), shape: vec![data.len()], data };
        let model = |mean: Vec<f32>, std: Vec<f32>| {
            Arc::new(
                Parameters::new(vec![tensor(INPUT_MEAN, mean), tensor(INPUT_STD, std), tensor("w", vec![0.0])])
                    .unwrap(),
            )
        };
        // Another mean and a tiny std; the spec's mean and a tiny std only;
        // another mean only.
        let hostile = [
            (vec![5.0, 5.0], vec![1e-30, 1e-30]),
            (vec![0.0, 2.0], vec![1e-30, 3.0]),
            (vec![0.0, -2.0], vec![1.0, 3.0]),
        ];
        for (round, (mean, std)) in (1..).zip(hostile) {
            let fit = TaskBody::Fit {
                config: FitConfig { round, train: Default::default() },
                global: model(mean, std),
                round_message: Vec::new(),
            };
            h.on_task(task(round, fit)).unwrap();
            let given = given.lock().unwrap();
            assert_eq!(given.len(), round as usize, "the trainer is given one model a round");
            let last = given.last().unwrap();
            assert_eq!(last.get(INPUT_MEAN).unwrap().data, [0.0, 2.0]);
            assert_eq!(last.get(INPUT_STD).unwrap().data, [1.0, 3.0]);
            assert_eq!(last.get("w").unwrap().data, [0.0], "the trained tensors are the wire's");
        }
        for (mean, std, named) in [
            (vec![0.0, 2.0], vec![-1.0, 3.0], "input.std holds -1"),
            (vec![0.0, 2.0], vec![1.0, f32::NAN], "input.std holds NaN"),
            (vec![f32::INFINITY, 2.0], vec![1.0, 3.0], "input.mean holds inf"),
        ] {
            let fit = TaskBody::Fit {
                config: FitConfig { round: 4, train: Default::default() },
                global: model(mean, std),
                round_message: Vec::new(),
            };
            let e = h.on_task(task(4, fit)).unwrap_err();
            assert!(matches!(&e, TaskError::CoordinatorFault(m) if m.contains(named)), "{e:?}");
            assert_eq!(given.lock().unwrap().len(), 3, "the trainer saw nothing of it");
        }
        // A global model that carries the spec's standardisation is given
        // as it is.
        let honest = model(vec![0.0, 2.0], vec![1.0, 3.0]);
        let fit = TaskBody::Fit {
            config: FitConfig { round: 4, train: Default::default() },
            global: honest.clone(),
            round_message: Vec::new(),
        };
        h.on_task(task(4, fit)).unwrap();
        assert_eq!(given.lock().unwrap().len(), 4);
        assert_eq!(given.lock().unwrap().last().unwrap(), &*honest);
    }

    /// A trainer whose training moves every trained value by +100 (not the
    /// frozen input standardisation).
    struct Jumping(Parameters);

    impl Trainer for Jumping {
        fn parameters(&self) -> Result<Parameters, Error> {
            Ok(self.0.clone())
        }
        fn set_parameters(&mut self, p: &Parameters) -> Result<(), Error> {
            self.0 = p.clone();
            Ok(())
        }
        fn feature_stats(&self) -> FeatureStats {
            Fixed.feature_stats()
        }
        fn fit(&mut self, _: &FitConfig) -> Result<FitOutcome, Error> {
            for (name, v) in self.0.values_mut() {
                if name != INPUT_MEAN && name != INPUT_STD {
                    v.iter_mut().for_each(|x| *x += 100.0);
                }
            }
            Ok(FitOutcome { num_examples: 50, metrics: [("train_loss".to_string(), 0.1)].into() })
        }
        fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
            Fixed.evaluate()
        }
        fn predict(&self, f: &[f32]) -> Result<Vec<f32>, Error> {
            Fixed.predict(f)
        }
    }

    /// Party-level DP: the party sends its update clipped to the spec's
    /// norm, weighing 1, with no metric.
    #[test]
    fn a_party_level_dp_update_is_clipped_and_bare() {
        use confide_crypto::aggregation::Bulk;
        use confide_crypto::aggregation::plain::Plain;
        let job = JobFacts::new("j", Vec::new(), 10, 1, 100);
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let start =
            Parameters::new(vec![Tensor { name: "w".into(), shape: vec![3], data: vec![0.5, 0.0, -1.0] }]).unwrap();
        let mut h = TrainingHandler::new(Box::new(Jumping(start.clone())), client, Plain.stages());
        h.party_clip = Some(2.0);
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: Arc::new(start.clone()),
            round_message: Vec::new(),
        };
        let ResultBody::Fit { metrics, contribution } = h.on_task(task(1, fit)).unwrap() else { panic!() };
        assert!(metrics.is_empty());
        assert_eq!(contribution.body, [0x08, 0x01], "weight 1");
        let Some(Bulk::Params(local)) = contribution.bulk else { panic!("no model") };
        let moved: f64 = local.tensors()[0]
            .data
            .iter()
            .zip(&start.tensors()[0].data)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(moved <= 2.0 && moved > 1.99, "{moved}");
        // Set-up asked after the round would answer with the trainer's
        // parameters, the unclipped local model: refused.
        match h.on_task(task(1, TaskBody::Setup)) {
            Err(TaskError::CoordinatorFault(why)) => assert!(why.contains("after training"), "{why}"),
            Ok(ResultBody::Setup { params, .. }) => panic!("the local model handed over: {params:?}"),
            other => panic!("{other:?}"),
        }
        // Non-finite training results become no update, not an error.
        let nan = Parameters::new(vec![Tensor { name: "w".into(), shape: vec![3], data: vec![f32::NAN; 3] }]).unwrap();
        assert_eq!(clip_update(&start, nan, 1.0), start);

        // A coordinator's own standardisation (a tiny std) is replaced by the
        // spec's, and the clip measures the trained tensors' movement only:
        // the replacement does not shrink the update.
        let with_inputs = |std: Vec<f32>| {
            Parameters::new(vec![
                Tensor { name: INPUT_MEAN.into(), shape: vec![2], data: vec![0.0, 2.0] },
                Tensor { name: INPUT_STD.into(), shape: vec![2], data: std },
                Tensor { name: "w".into(), shape: vec![3], data: vec![0.5, 0.0, -1.0] },
            ])
            .unwrap()
        };
        let spec_std = vec![1000.0, 3000.0];
        let client = Plain.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let mut h = TrainingHandler::new(Box::new(Jumping(with_inputs(spec_std.clone()))), client, Plain.stages());
        h.party_clip = Some(2.0);
        h.dp_inputs = Some([vec![0.0, 2.0], spec_std.clone()]);
        let hostile = Arc::new(with_inputs(vec![1e-30, 1e-30]));
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: hostile.clone(),
            round_message: Vec::new(),
        };
        let ResultBody::Fit { contribution, .. } = h.on_task(task(1, fit)).unwrap() else { panic!() };
        let Some(Bulk::Params(local)) = contribution.bulk else { panic!("no model") };
        assert_eq!(local.get(INPUT_STD).unwrap().data, spec_std);
        let moved: f64 = local
            .get("w")
            .unwrap()
            .data
            .iter()
            .zip(&hostile.get("w").unwrap().data)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(moved <= 2.0 && moved > 1.99, "{moved}");
    }

    /// Within the clip the update is the local model itself, bit for bit
    /// (an infinite clip included, as under central adaptive clipping); above it, it
    /// moves from the global model by just under the clip, in the same
    /// direction; a model of another shape, or a clip that is not positive,
    /// is no update.
    #[test]
    fn clip_update_keeps_a_small_update_and_scales_a_large_one() {
        let model = |data: Vec<f32>| Parameters::new(vec![Tensor { name: "w".into(), shape: vec![3], data }]).unwrap();
        let global = model(vec![0.5, 0.0, -1.0]);
        let local = model(vec![0.625, 3.0, -1.0]);
        for clip in [4.0, f64::INFINITY] {
            assert_eq!(clip_update(&global, local.clone(), clip), local, "clip {clip}");
        }
        for clip in [f64::NAN, 0.0, -1.0] {
            assert_eq!(clip_update(&global, local.clone(), clip), global, "clip {clip}");
        }
        let clipped = clip_update(&global, local.clone(), 1.0);
        let step: Vec<f64> = clipped.tensors()[0]
            .data
            .iter()
            .zip(&global.tensors()[0].data)
            .map(|(a, b)| f64::from(*a) - f64::from(*b))
            .collect();
        let norm = step.iter().map(|d| d * d).sum::<f64>().sqrt();
        assert!(norm <= 1.0 && norm > 0.999, "{norm}");
        assert!((step[1] / norm - 3.0 / 3.0026_f64).abs() < 1e-3 && step[2] == 0.0, "{step:?}");
        let other = Parameters::new(vec![Tensor { name: "v".into(), shape: vec![3], data: vec![9.0; 3] }]).unwrap();
        assert_eq!(clip_update(&global, other, 1.0), global);
    }

    fn task(round: u32, body: TaskBody) -> Task {
        Task { job_id: "j".into(), round, task_id: 1, body }
    }

    /// Under a protocol that hides values, why training failed (a
    /// trainer's message can quote a row) stays in the party's log: the
    /// refusal is generic. Under one that reveals updates it is sent.
    #[test]
    fn a_training_failure_under_a_hiding_protocol_quotes_no_row() {
        let quoting =
            || FixedDp { fails_with: Some("row 7: value \"77-secret\" is not a number".into()), ..FixedDp::default() };
        let global = Arc::new(Fixed.parameters().unwrap());
        let fit = || TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        // (Answered within the fit task, the handler's default. A round
        // that answers ahead of training: see
        // a_training_that_fails_after_the_keys_went_out_quotes_no_row.)
        let mut hiding = handler(false);
        hiding.trainer = Box::new(quoting());
        let Err(TaskError::Refused(m)) = hiding.on_task(task(1, fit())) else { panic!("refused") };
        assert!(m.contains("in this party's log") && !m.contains("77-secret"), "{m}");
        let mut revealing = plain_handler(quoting());
        let Err(TaskError::Refused(m)) = revealing.on_task(task(1, fit())) else { panic!("refused") };
        assert!(m.contains("77-secret"), "{m}");
    }

    /// A trainer that trains (moves its one weight by `step`) only once its
    /// gate opens, or fails quoting a row, and says when its fit ended.
    struct Gated {
        gate: std::sync::mpsc::Receiver<()>,
        trained: Arc<std::sync::atomic::AtomicBool>,
        fails_with: Option<String>,
        panics: bool,
        w: f32,
        step: f32,
    }

    impl Trainer for Gated {
        fn parameters(&self) -> Result<Parameters, Error> {
            Parameters::new(vec![Tensor { name: "w".into(), shape: vec![1], data: vec![self.w] }])
        }
        fn set_parameters(&mut self, p: &Parameters) -> Result<(), Error> {
            self.w = p.tensors()[0].data[0];
            Ok(())
        }
        fn feature_stats(&self) -> FeatureStats {
            FeatureStats::default()
        }
        fn fit(&mut self, _: &FitConfig) -> Result<FitOutcome, Error> {
            let opened = self.gate.recv_timeout(std::time::Duration::from_secs(30));
            self.trained.store(true, std::sync::atomic::Ordering::SeqCst);
            opened.map_err(|_| Error::InvalidInput("the test never opened the gate".into()))?;
            if let Some(e) = &self.fails_with {
                return Err(Error::InvalidInput(e.clone()));
            }
            assert!(!self.panics, "row 7: \"77-secret\"");
            self.w += self.step;
            Ok(FitOutcome { num_examples: 7, metrics: Default::default() })
        }
        fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
            Fixed.evaluate()
        }
        fn predict(&self, f: &[f32]) -> Result<Vec<f32>, Error> {
            Fixed.predict(f)
        }
    }

    /// Opens every gate: the gated trainers train.
    fn open(gates: &[std::sync::mpsc::Sender<()>]) {
        for g in gates {
            g.send(()).unwrap();
        }
    }

    /// Three parties' secagg handlers over gated trainers, a coordinator's
    /// side of the protocol, and what drives a round between them.
    struct GatedRound {
        names: Vec<String>,
        handlers: Vec<TrainingHandler>,
        gates: Vec<std::sync::mpsc::Sender<()>>,
        trained: Vec<Arc<std::sync::atomic::AtomicBool>>,
        server: Box<dyn confide_crypto::aggregation::AggregationServer>,
        global: Arc<Parameters>,
        fit: FitConfig,
    }

    impl GatedRound {
        /// `n` parties; party `i` moves its weight by `i + 1`; `failing`
        /// fails quoting a row.
        fn new(n: usize, failing: Option<usize>) -> Self {
            use confide_crypto::secagg::testing::InsecureTagVerifier;
            let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
            let job = JobFacts::new("j", names.clone(), 10, 3, 100);
            let server = SecAggPlus.server(&toml::Table::new(), &job, Box::new(InsecureTagVerifier)).unwrap();
            let (mut handlers, mut gates, mut trained) = (Vec::new(), Vec::new(), Vec::new());
            for (i, p) in names.iter().enumerate() {
                let (tx, rx) = std::sync::mpsc::channel();
                let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let fails_with = (failing == Some(i)).then(|| "row 7: value \"77-secret\" is not a number".into());
                let trainer =
                    Gated { gate: rx, trained: done.clone(), fails_with, panics: false, w: 0.0, step: i as f32 + 1.0 };
                let client = SecAggPlus.client(&toml::Table::new(), &job, identity(p)).unwrap();
                let mut h = TrainingHandler::new(Box::new(trainer), client, SecAggPlus.stages());
                h.hides_values = true;
                h.standardize = false;
                h.answers_held = false;
                handlers.push(h);
                gates.push(tx);
                trained.push(done);
            }
            let global = Arc::new(Fixed.parameters().unwrap());
            let fit = FitConfig { round: 1, train: Default::default() };
            GatedRound { names, handlers, gates, trained, server, global, fit }
        }

        fn any_trained(&self) -> bool {
            self.trained.iter().any(|t| t.load(std::sync::atomic::Ordering::SeqCst))
        }

        fn peer(name: &str) -> confide_crypto::aggregation::Peer<'_> {
            confide_crypto::aggregation::Peer { name, certificate: &[], relay: None }
        }

        /// The coordinator begins round 1: every party's fit task.
        fn fit_task(&mut self) -> TaskBody {
            let info = confide_crypto::aggregation::RoundInfo {
                round: 1,
                parties: &self.names,
                global: &self.global,
                fit: Some(&self.fit),
            };
            let round_message = self.server.begin_round(&info).unwrap();
            TaskBody::Fit { config: self.fit.clone(), global: self.global.clone(), round_message }
        }

        /// Every party's fit answer, handed to the coordinator.
        fn fit_answers(&mut self) {
            let body = self.fit_task();
            for (i, h) in self.handlers.iter_mut().enumerate() {
                let ResultBody::Fit { contribution, .. } = h.on_task(task(1, body.clone())).unwrap() else { panic!() };
                self.server.on_message(Self::peer(&self.names[i]), contribution).unwrap();
            }
        }

        /// Runs the coordinator's steps until the round's result, or until
        /// `before` names the next step (returned then); each party's
        /// refusal, by party.
        fn steps(
            &mut self,
            before: Option<StageName>,
            refusals: &mut Vec<(usize, TaskError)>,
        ) -> Option<confide_crypto::aggregation::Aggregate> {
            use confide_crypto::aggregation::{Messages, Progress};
            loop {
                let (stage, messages) = match self.server.close_stage().unwrap() {
                    Progress::Done(aggregate) => return Some(aggregate),
                    Progress::Step { stage, messages, .. } => (stage, messages),
                };
                let to: Vec<(String, confide_crypto::aggregation::Envelope)> = match messages {
                    Messages::PerParty(v) => v,
                    Messages::Same { to, message } => to.into_iter().map(|p| (p, message.clone())).collect(),
                };
                for (p, message) in to {
                    let i = self.names.iter().position(|n| *n == p).unwrap();
                    let body = TaskBody::Aggregation { stage: stage.as_str().into(), message };
                    match self.handlers[i].on_task(task(1, body)) {
                        Ok(ResultBody::Aggregation { message, .. }) => {
                            self.server.on_message(Self::peer(&p), message).unwrap()
                        }
                        Ok(other) => panic!("{other:?}"),
                        Err(e) => refusals.push((i, e)),
                    }
                }
                if Some(stage) == before {
                    return None;
                }
            }
        }
    }

    /// Under secure aggregation a party sends its round keys and deals its
    /// shares while it trains: both steps are answered before any party's
    /// training ends, and the sum is of the trained updates all the same.
    #[test]
    fn a_secagg_round_exchanges_keys_while_the_parties_train() {
        use confide_crypto::aggregation::Aggregate;
        use confide_crypto::aggregation::secagg::SHARES;
        let mut r = GatedRound::new(3, None);
        r.fit_answers();
        let mut refusals = Vec::new();
        assert!(r.steps(Some(SHARES), &mut refusals).is_none());
        assert!(refusals.is_empty(), "{refusals:?}");
        assert!(!r.any_trained(), "keys and shares went before training ended");
        open(&r.gates);
        let Some(Aggregate::WeightedSum { weighted_delta_sum, total_examples, contributors, .. }) =
            r.steps(None, &mut refusals)
        else {
            panic!("no sum")
        };
        assert!(refusals.is_empty(), "{refusals:?}");
        assert_eq!(contributors, r.names);
        assert_eq!(total_examples, 21.0);
        // Σ nᵢ·Δᵢ = 7·(1 + 2 + 3), to the encoding's precision.
        assert!((weighted_delta_sum[0] - 42.0).abs() < 1e-3, "{weighted_delta_sum:?}");
    }

    /// A training that fails after the party's keys went out is refused at
    /// the step that needs the update, quoting no row; the round goes on
    /// without that party.
    #[test]
    fn a_training_that_fails_after_the_keys_went_out_quotes_no_row() {
        use confide_crypto::aggregation::Aggregate;
        let mut r = GatedRound::new(6, Some(0));
        r.fit_answers();
        open(&r.gates);
        let mut refusals = Vec::new();
        let Some(Aggregate::WeightedSum { contributors, .. }) = r.steps(None, &mut refusals) else { panic!("no sum") };
        assert_eq!(contributors, ["p1", "p2", "p3", "p4", "p5"]);
        let [(0, TaskError::Refused(m))] = refusals.as_slice() else { panic!("{refusals:?}") };
        assert!(m.contains("in this party's log") && !m.contains("77-secret"), "{m}");
    }

    /// A DP round answered before training: its keys leave at once, but
    /// the step that needs its update waits for the round's ledger record:
    /// a refusal (about the rows too) leaves once the record is on disk
    /// (the writer is slowed so that luck cannot pass this), and a record
    /// that cannot be written sends nothing but the refusal that says so.
    #[test]
    fn a_dp_round_answered_ahead_sends_its_update_only_once_on_record() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (path, ledger) = slowed_ledger(dir.path());
        let spec = dp_job(3);
        let recorded = || crate::ledger::Ledger::read(&path).unwrap().datasets["d"].jobs["j1"].rounds_started;
        // The gated trainer has no DP-SGD: party 0 refuses, once on record.
        let mut r = GatedRound::new(3, None);
        r.handlers[0].dp = spec.dp.as_ref().unwrap().plan(&spec.training, spec.rounds);
        r.handlers[0].budget = Some(ledger.reserve("j1", &spec, "d", None).unwrap());
        r.fit_answers();
        open(&r.gates);
        let mut refusals = Vec::new();
        let _ = r.steps(Some(confide_crypto::aggregation::secagg::MASKED_INPUT), &mut refusals);
        let [(0, TaskError::Refused(m))] = refusals.as_slice() else { panic!("{refusals:?}") };
        assert!(m.contains("DP-SGD training failed"), "{m}");
        assert_eq!(recorded(), 1);
        // The record cannot be written (a directory in its temporary
        // file's place): the round's update does not leave.
        ledger.write_delay_ms.store(0, Ordering::Relaxed);
        let mut r = GatedRound::new(3, None);
        r.handlers[0].party_clip = Some(1.0);
        r.handlers[0].budget = Some(ledger.reserve("j2", &spec, "d", None).unwrap());
        std::fs::create_dir(path.with_extension("json.tmp")).unwrap();
        r.fit_answers();
        open(&r.gates);
        let mut refusals = Vec::new();
        let _ = r.steps(Some(confide_crypto::aggregation::secagg::MASKED_INPUT), &mut refusals);
        let [(0, TaskError::Refused(m))] = refusals.as_slice() else { panic!("{refusals:?}") };
        assert!(m.contains("privacy ledger"), "{m}");
    }

    /// A trainer that panics on the round's own thread ends the party's
    /// part in the job as a panic in a task does: the step that needs the
    /// update panics (the session catches it and leaves the job), without
    /// the panic's text, which can quote a row.
    #[test]
    fn a_training_that_panics_ahead_ends_the_partys_part_in_the_job() {
        let mut r = GatedRound::new(3, None);
        let (tx, rx) = std::sync::mpsc::channel();
        let trained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        r.handlers[0].trainer =
            Box::new(Gated { gate: rx, trained, fails_with: None, panics: true, w: 0.0, step: 1.0 });
        r.gates[0] = tx;
        r.fit_answers();
        open(&r.gates);
        let masked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut refusals = Vec::new();
            r.steps(None, &mut refusals)
        }));
        let p = masked.expect_err("the step went on after the trainer panicked");
        let m = crate::session::panic_message(p.as_ref());
        assert!(m.contains("training panicked") && !m.contains("77-secret"), "{m}");
    }

    /// Under DP a trainer's panic ahead of its step goes out only once the
    /// ledger holds the round and the party's leaving on disk: while the
    /// ledger cannot write, each task is refused saying only that, and
    /// nothing tells that training panicked (found by review).
    #[test]
    fn a_training_panic_ahead_goes_out_only_once_on_record() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ledger) = slowed_ledger(dir.path());
        ledger.write_delay_ms.store(0, std::sync::atomic::Ordering::Relaxed);
        let spec = dp_job(3);
        let mut r = GatedRound::new(3, None);
        let (tx, rx) = std::sync::mpsc::channel();
        let trained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        r.handlers[0].trainer =
            Box::new(Gated { gate: rx, trained, fails_with: None, panics: true, w: 0.0, step: 1.0 });
        r.gates[0] = tx;
        r.handlers[0].party_clip = Some(1.0);
        r.handlers[0].budget = Some(ledger.reserve("j1", &spec, "d", None).unwrap());
        // The ledger cannot be written (a directory in its temporary
        // file's place) from the round's start on.
        let blocker = path.with_extension("json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        r.fit_answers();
        open(&r.gates);
        let mut refusals = Vec::new();
        let _ = r.steps(Some(confide_crypto::aggregation::secagg::MASKED_INPUT), &mut refusals);
        let [(0, TaskError::Refused(m))] = refusals.as_slice() else { panic!("{refusals:?}") };
        assert!(m.contains("privacy ledger") && !m.contains("panicked"), "{m}");
        let e = r.handlers[0].on_task(task(2, TaskBody::Setup)).unwrap_err();
        assert!(
            matches!(&e, TaskError::Refused(m) if m.contains("privacy ledger") && !m.contains("panicked")),
            "{e:?}"
        );
        let on_disk = || crate::ledger::Ledger::read(&path).unwrap().datasets["d"].jobs["j1"].clone();
        assert_eq!(on_disk().rounds_started, 0);
        // Once the ledger writes, the next task raises the panic, with the
        // round and the leaving on disk.
        std::fs::remove_dir(&blocker).unwrap();
        let raised = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = r.handlers[0].on_task(task(2, TaskBody::Setup));
        }));
        let p = raised.expect_err("the panic was not raised once on record");
        assert!(crate::session::panic_message(p.as_ref()).contains("training panicked"));
        let charge = on_disk();
        assert_eq!(charge.rounds_started, 1);
        assert!(charge.left.as_deref().is_some_and(|l| l.contains("panicked")), "{charge:?}");
    }

    /// A masked-input step asked for before the shares is the
    /// coordinator's fault, refused at once through the party's session:
    /// neither the step nor the session's abandoning of the round waits
    /// for the training; nor does a close.
    #[test]
    fn a_masked_input_asked_for_before_the_shares_is_refused_without_waiting() {
        use crate::session::{PartyInput, PartyOutput, PartySession};
        let mut r = GatedRound::new(3, None);
        r.fit_answers();
        let mut session = PartySession::new("j", Box::new(r.handlers.remove(0)), 600_000);
        // Declared after the session, so dropped before it should an
        // assertion fail: the training then ends and the session's drop
        // does not wait on a gate for ever.
        let gates = std::mem::take(&mut r.gates);
        let body = TaskBody::Aggregation {
            stage: confide_crypto::aggregation::secagg::MASKED_INPUT.as_str().into(),
            message: Default::default(),
        };
        session.handle(0, PartyInput::Task(task(1, body)));
        let outputs: Vec<PartyOutput> = std::iter::from_fn(|| session.poll_output()).collect();
        assert!(
            outputs
                .iter()
                .any(|o| matches!(o, PartyOutput::Failed { reason, .. } if reason.contains("coordinator fault"))),
            "{outputs:?}"
        );
        session.handle(1, PartyInput::Closed { reason: "done".into(), ended: Some("succeeded".into()) });
        assert!(!r.any_trained(), "it waited for the training");
        open(&gates);
    }

    /// A step the party refuses ends its round at once: the round's secrets
    /// (keys, seeds, the encoded update of a party that trained inside the
    /// fit task) are wiped then, not only when a later task, the job's close
    /// or the idle deadline comes, none of which a coordinator that goes
    /// quiet after the refusal would send (found by review). A later step
    /// of the round is the coordinator's fault, as before.
    #[test]
    fn a_refused_step_wipes_the_rounds_secrets_at_once() {
        use confide_crypto::aggregation::secagg::SHARES;
        let mut r = GatedRound::new(3, None);
        // The party trains inside the fit task: its encoded update is held
        // from the fit answer on.
        r.handlers[0].answers_held = true;
        let abandons = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inner = std::mem::replace(
            &mut r.handlers[0].aggregation,
            SecAggPlus
                .client(&toml::Table::new(), &JobFacts::new("j", r.names.clone(), 10, 3, 100), identity("p0"))
                .unwrap(),
        );
        r.handlers[0].aggregation = Box::new(Recording {
            inner,
            log: Default::default(),
            updates: Default::default(),
            abandons: abandons.clone(),
        });
        open(&r.gates);
        r.fit_answers();
        let count = || abandons.load(std::sync::atomic::Ordering::SeqCst);
        let before = count();
        // A shares step that does not parse (a coordinator fault) wipes the
        // round there and then; a later step of it is the coordinator's
        // fault.
        let garbage = TaskBody::Aggregation {
            stage: SHARES.as_str().into(),
            message: confide_crypto::aggregation::Envelope::body(vec![0xff; 9]),
        };
        assert!(r.handlers[0].on_task(task(1, garbage.clone())).is_err());
        assert_eq!(count(), before + 1, "the refused step did not wipe the round");
        assert!(!r.handlers[0].round_open());
        let e = r.handlers[0].on_task(task(1, garbage)).unwrap_err();
        assert!(matches!(&e, TaskError::CoordinatorFault(m) if m.contains("not in")), "{e:?}");
    }

    /// A coordinator that sends the fit task again while the party trains
    /// ahead gets no second set of keys for the round's run: the party
    /// takes its trainer back (waiting for the training) and refuses.
    #[test]
    fn a_fit_task_replayed_while_the_party_trains_gets_no_second_keys() {
        let mut r = GatedRound::new(3, None);
        let body = r.fit_task();
        assert!(matches!(r.handlers[0].on_task(task(1, body.clone())), Ok(ResultBody::Fit { .. })));
        let gates = std::mem::take(&mut r.gates);
        let opener = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            open(&gates);
        });
        let e = r.handlers[0].on_task(task(1, body)).unwrap_err();
        assert!(matches!(&e, TaskError::Refused(m) if m.contains("already took part in run")), "{e:?}");
        assert!(r.trained[0].load(std::sync::atomic::Ordering::SeqCst));
        opener.join().unwrap();
    }

    /// A party that holds its fit answers to a floor trains inside the fit
    /// task, so that the held answer is the one that waited for the rows.
    #[test]
    fn a_party_holding_its_fit_answers_trains_before_answering() {
        let mut r = GatedRound::new(3, None);
        for h in &mut r.handlers {
            h.answers_held = true;
        }
        let gates = std::mem::take(&mut r.gates);
        let opener = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            open(&gates);
        });
        let body = r.fit_task();
        assert!(matches!(r.handlers[0].on_task(task(1, body)), Ok(ResultBody::Fit { .. })));
        assert!(r.trained[0].load(std::sync::atomic::Ordering::SeqCst), "answered before training ended");
        opener.join().unwrap();
    }

    /// Under a protocol that hides values, a coordinator asking for what
    /// the protocol would hide, in the clear or without cause, is refused
    /// as a coordinator fault, and nothing of the party's data is sent.
    #[test]
    fn nothing_the_protocol_hides_is_sent_in_the_clear() {
        let global = Arc::new(Fixed.parameters().unwrap());
        let mut h = handler(false);
        let ResultBody::Setup { stats, .. } = h.on_task(task(0, TaskBody::Setup)).unwrap() else { panic!() };
        assert_eq!(stats, FeatureStats::default(), "no feature sums in the clear");
        let err = h.on_task(task(1, TaskBody::Evaluate { global: global.clone() })).unwrap_err();
        assert!(matches!(&err, TaskError::CoordinatorFault(m) if m.contains("in the clear")), "{err:?}");
        let stats = TaskBody::SecureSum { of: SumOf::FeatureStats, round_message: Vec::new() };
        let err = h.on_task(task(0, stats)).unwrap_err();
        assert!(matches!(&err, TaskError::CoordinatorFault(m) if m.contains("does not standardise")), "{err:?}");
        // With standardisation on, setup still sends no sums in the clear.
        let mut h = handler(true);
        let ResultBody::Setup { stats, .. } = h.on_task(task(0, TaskBody::Setup)).unwrap() else { panic!() };
        assert_eq!(stats, FeatureStats::default());
        // The feature statistics go into one secure sum, at set-up: asked
        // again (over other parties, to difference), or after training,
        // they are refused.
        let stats = || TaskBody::SecureSum { of: SumOf::FeatureStats, round_message: Vec::new() };
        let again = |e: &TaskError| matches!(e, TaskError::CoordinatorFault(m) if m.contains("asked again"));
        let first = h.on_task(task(0, stats()));
        assert!(!first.as_ref().is_err_and(again), "the first is answered: {first:?}");
        assert!(h.on_task(task(0, stats())).is_err_and(|e| again(&e)), "a second sum");
        let mut h = handler(true);
        let fit = TaskBody::Fit {
            config: FitConfig { round: 1, train: Default::default() },
            global: global.clone(),
            round_message: Vec::new(),
        };
        let _ = h.on_task(task(1, fit));
        assert!(h.on_task(task(1, stats())).is_err_and(|e| again(&e)), "after training");
        // An evaluation's secure sum is released once a round in a train
        // job: asked again in the round (over other parties) it is refused.
        let evaluation =
            || TaskBody::SecureSum { of: SumOf::Evaluation { global: global.clone() }, round_message: Vec::new() };
        let mut h = handler(true);
        let first = h.on_task(task(1, evaluation()));
        assert!(!first.as_ref().is_err_and(again), "the first is answered: {first:?}");
        assert!(h.on_task(task(1, evaluation())).is_err_and(|e| again(&e)), "a second in the round");
        let next = h.on_task(task(2, evaluation()));
        assert!(!next.as_ref().is_err_and(again), "the next round's is answered: {next:?}");
    }

    /// A step of a round this party let go itself (no task within its
    /// deadline), or of a round a session before a reconnect began, is
    /// refused and the party stays in the job; only a step of a round it was
    /// never in is the coordinator's fault (which would end its part in the
    /// job for good).
    #[test]
    fn a_step_of_a_round_this_party_let_go_is_refused_not_a_fault() {
        let step =
            |round| task(round, TaskBody::Aggregation { stage: "secagg-shares".into(), message: Default::default() });
        let mut h = handler(false);
        let e = h.on_task(step(1)).unwrap_err();
        assert!(matches!(&e, TaskError::CoordinatorFault(m) if m.contains("not in")), "a first session: {e:?}");
        let mut h = handler(false);
        h.continues_earlier = true;
        let e = h.on_task(step(1)).unwrap_err();
        assert!(matches!(&e, TaskError::Refused(m) if m.contains("reconnected")), "a job offered again: {e:?}");
        h.opened_any = true;
        h.open = Some(2);
        h.abandon();
        assert_eq!((h.open, h.abandoned_round), (None, Some(2)));
        let e = h.on_task(step(2)).unwrap_err();
        assert!(matches!(&e, TaskError::Refused(m) if m.contains("abandoned")), "{e:?}");
        let e = h.on_task(step(3)).unwrap_err();
        assert!(matches!(&e, TaskError::CoordinatorFault(m) if m.contains("not in")), "{e:?}");
    }
}
