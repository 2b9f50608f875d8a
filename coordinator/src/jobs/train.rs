//! `train` jobs: setup, then per round a fit stage, the aggregation
//! protocol's steps, an evaluation (every `evaluation.every` rounds and after
//! the last) and a checkpoint.
//!
//! ```text
//!  setup(0) ─▶ checkpoint 0 ─▶ fit(r) ─▶ protocol steps … ─▶ aggregate ─▶ [evaluate(r)] ─▶ checkpoint r ─▶ fit(r+1) … ─▶ done
//! ```
//! The aggregation protocol is a trait object: this machine never names
//! one. What the protocol reveals (individual updates or a weighted sum)
//! decides which of the strategy's aggregation methods runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use confide_algorithms::trainer::{INPUT_MEAN, apply_feature_stats};
use confide_algorithms::{FeatureStats, FitConfig, FitResult, Metrics, Parameters, RoundContext, State};
use confide_crypto::aggregation::sum::{self, SumLayout};
use confide_crypto::aggregation::{Aggregate, Quorum, RoundInfo};
use confide_dp::rdp::RdpAccountant;
use confide_proto::dpspec::{Accountant, DpLevel};
use confide_proto::messages::{ResultBody, Stage, SumOf, TaskBody};
use confide_proto::status::JobState;

use super::Setup;
use super::evaluate::Evaluator;
use super::guard::GuardedStrategy;
use super::protocol::{ProtocolDriver, sum_of};
use crate::session::{Closed, Context, JobMachine, Start};

/// The training machine.
pub struct Training {
    strategy: GuardedStrategy,
    protocol: ProtocolDriver,
    global: Option<Arc<Parameters>>,
    /// Setup's secure sum of feature statistics is in progress, for this
    /// agreed model.
    summing_stats: Option<Parameters>,
    /// Resuming after the checkpoint of this round.
    resume: Option<u32>,
    setup: BTreeMap<String, (Parameters, FeatureStats)>,
    fit_metrics: BTreeMap<String, Metrics>,
    evaluator: Evaluator,
    /// The example-level DP accountant of a `[dp]` job: rounds whose
    /// training ran, saved with each checkpoint.
    privacy: Option<Accountant>,
    /// Central party-level DP with adaptive clipping: the next round's clip.
    central_clip: Option<f64>,
    /// The rounds `privacy` has composed, saved with each checkpoint.
    privacy_rounds: u32,
}

/// The checkpoint's key for [`Training::privacy_rounds`] (`pld_rounds` in
/// checkpoints written before the RDP accountant kept it too).
const COMPOSED_ROUNDS: &str = "composed_rounds";

/// The largest `key` any party reported (e.g. the slowest local training).
fn slowest<'a>(metrics: impl Iterator<Item = &'a Metrics>, key: &str) -> Option<f64> {
    metrics.filter_map(|m| m.get(key).copied()).reduce(f64::max)
}

impl Training {
    /// The machine for `setup`'s job: its strategy (restored from the
    /// checkpoint when resuming) and its aggregation protocol's server.
    pub fn new(setup: &Setup<'_>) -> Result<Self, String> {
        let spec = setup.spec;
        let mut strategy = GuardedStrategy::new(setup.plugins.build_strategy(spec)?)?;
        let mut protocol = ProtocolDriver::new(setup)?;
        let mut privacy = spec.dp.as_ref().map(|dp| dp.accountant(&spec.training, 0));
        let mut central_clip = None;
        let mut privacy_rounds = 0;
        let (global, resume) = match setup.start {
            Start::Fresh { model } => (model.clone().map(Arc::new), None),
            Start::Resume { round, model, state, .. } => {
                let model = model.clone().ok_or("the checkpoint to resume from has no model")?;
                strategy.call("restore", |s| s.restore(&state.section("strategy")))?;
                protocol.restore(&state.section("aggregation"))?;
                if let (Some(fresh), Some(dp)) = (privacy.as_mut(), spec.dp.as_ref()) {
                    let saved = state.section("privacy");
                    let missing = || "the checkpoint of a [dp] job has no privacy accountant".to_string();
                    // The rounds composed so far: this coordinator composes
                    // each round once, as it sends its fit tasks, so they
                    // are the rounds completed (a round cut short by a
                    // crash is not counted: docs/differential-privacy.md);
                    // a checkpoint that says more is believed (it can only
                    // raise ε), and one written before they were kept has
                    // composed the rounds it completed.
                    let composed = match saved.get(COMPOSED_ROUNDS).or_else(|| saved.get("pld_rounds")) {
                        Some(&[rounds]) if rounds >= 0.0 && rounds <= f64::from(u32::MAX) && rounds.fract() == 0.0 => {
                            rounds as u32
                        }
                        Some(other) => return Err(format!("the checkpoint's composed rounds are {other:?}")),
                        None if matches!(fresh, Accountant::Rdp(_)) => *round,
                        None => return Err(missing()),
                    };
                    privacy_rounds = composed;
                    *fresh = dp.accountant(&spec.training, composed);
                    // The RDP curve the checkpoint kept, where it is higher
                    // than the spec's for those rounds: the job goes on
                    // reporting what it reported. Where it is lower (a job
                    // checkpointed before adaptive clipping's sensitivity
                    // was doubled), the spec's: a resumed job never reports
                    // less than its rounds cost. A curve over other orders
                    // is kept whole if its ε is the higher. (The PLD's
                    // state is its rounds alone.)
                    if let Accountant::Rdp(now) = fresh {
                        let (orders, rdp) = saved.get("orders").zip(saved.get("rdp")).ok_or_else(missing)?;
                        let kept = RdpAccountant::from_parts(orders.to_vec(), rdp.to_vec())
                            .map_err(|e| format!("the checkpoint's privacy accountant: {e}"))?;
                        if kept.orders() == now.orders() {
                            now.raise_to(&kept).map_err(|e| format!("the checkpoint's privacy accountant: {e}"))?;
                        } else {
                            // (An ε that cannot be computed counts as ∞.)
                            let eps = |a: &RdpAccountant| {
                                a.epsilon(dp.delta)
                                    .map_or(f64::INFINITY, |(e, _)| if e.is_nan() { f64::INFINITY } else { e })
                            };
                            if eps(&kept) > eps(now) {
                                *now = kept;
                            }
                        }
                    }
                    // The adaptive clip (none before its first update), as
                    // the distributed path restores it: only under adaptive
                    // clipping, within its range of the spec's first clip.
                    match saved.get("clip") {
                        Some(&[clip])
                            if dp.adaptive.is_some() && confide_dp::ddg::AdaptiveClip::in_range(dp.clip, clip) =>
                        {
                            central_clip = Some(clip)
                        }
                        Some(other) => {
                            let allowed = match dp.adaptive {
                                Some(_) => format!(
                                    "a first clip of {}, and the clip stays within {} of it",
                                    dp.clip,
                                    confide_dp::ddg::AdaptiveClip::RANGE
                                ),
                                None => "no adaptive clipping".into(),
                            };
                            return Err(format!("the checkpoint's adaptive clip is {other:?}: the spec has {allowed}"));
                        }
                        None => {}
                    }
                }
                (Some(Arc::new(model)), Some(*round))
            }
        };
        Ok(Training {
            strategy,
            protocol,
            global,
            summing_stats: None,
            resume,
            setup: BTreeMap::new(),
            fit_metrics: BTreeMap::new(),
            evaluator: Evaluator::default(),
            privacy,
            central_clip,
            privacy_rounds,
        })
    }

    fn fail(&self, cx: &mut Context<'_>, error: String) {
        cx.finish(JobState::Failed, Some(error));
    }

    fn begin_setup(&mut self, cx: &mut Context<'_>) {
        cx.begin_round(0);
        let to = cx.available(Stage::Setup, 0);
        cx.collect(Stage::Setup, 0, vec![(to, TaskBody::Setup)], Quorum::JobMinimum);
    }

    fn complete_setup(&mut self, cx: &mut Context<'_>) {
        let results = std::mem::take(&mut self.setup);
        // The architecture most parties sent is the model's (honest parties
        // all derive it from the spec): whichever party's name sorts first
        // used to set it, so that one odd party could get every honest one
        // excluded, blamed for differing from it (found by review). With no
        // majority the job fails, naming the parties of each.
        let mut by_architecture: Vec<(Vec<confide_algorithms::params::TensorSpec>, Vec<&str>)> = Vec::new();
        for (party, (params, _)) in &results {
            let spec = params.spec();
            match by_architecture.iter_mut().find(|(s, _)| *s == spec) {
                Some((_, parties)) => parties.push(party),
                None => by_architecture.push((spec, vec![party])),
            }
        }
        let most = by_architecture.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
        let largest: Vec<&(Vec<confide_algorithms::params::TensorSpec>, Vec<&str>)> =
            by_architecture.iter().filter(|(_, p)| p.len() == most).collect();
        if largest.len() > 1 {
            let groups: Vec<String> = largest.iter().map(|(_, p)| p.join(", ")).collect();
            return self.fail(
                cx,
                format!(
                    "setup: the parties sent different model architectures and none is the majority's ({})",
                    groups.join(" against ")
                ),
            );
        }
        let Some((spec, majority)) = largest.first().map(|(s, p)| (s.clone(), p.len())) else {
            cx.below_min(Stage::Setup, 0, 0);
            return;
        };
        let total = results.len();
        // The statistics count only where they standardise the inputs in
        // the clear; then each party's must have the model's feature count
        // (not the first party's: one odd party could otherwise get the
        // honest ones excluded through them, found by review).
        let uses_stats = cx.spec().model.standardize && cx.spec().dp.is_none() && !self.protocol.hides_values();
        let features = spec.iter().find(|t| t.name == INPUT_MEAN).and_then(|t| t.num_values()).unwrap_or(0);
        // Agreed starting models by their values' digest, with how many
        // parties sent each: in name order.
        let mut starts: Vec<([u8; 32], Parameters, usize)> = Vec::new();
        let mut merged = confide_algorithms::FeatureStats::default();
        let mut agreed = Vec::new();
        for (party, (params, stats)) in results {
            let mismatch = if params.spec() != spec {
                Some(format!("its model architecture differs from the one {majority} of the {total} parties sent"))
            } else if let Err(why) = params.check_finite() {
                // Its model may become everyone's starting point: one that
                // is not finite would have the honest parties diverge and
                // be dropped in its place (found by review).
                Some(format!("its starting model is not finite: {why}"))
            } else if !uses_stats {
                None
            } else if features > 0 && stats.sum.len() != features {
                Some(format!("feature statistics over {} features; the model has {features}", stats.sum.len()))
            } else {
                merged.merge(&stats).err().map(|e| e.to_string())
            };
            match mismatch {
                Some(why) => cx.exclude(&party, &format!("setup: {why}")),
                None => {
                    let digest = confide_crypto::aggregation::model_digest(&params);
                    match starts.iter_mut().find(|(d, _, _)| *d == digest) {
                        Some((_, _, n)) => *n += 1,
                        None => starts.push((digest, params, 1)),
                    }
                    agreed.push(party);
                }
            }
        }
        // The starting model most parties sent (honest parties derive it
        // from the spec's seed, so they agree): the first party by name
        // used to choose it alone, with any values of the right shape
        // (found by review). With no such majority (trainers that start at
        // random), the first party's, as before.
        let most = starts.iter().map(|(_, _, n)| *n).max().unwrap_or(0);
        let reference = starts.into_iter().find(|(_, _, n)| *n == most).map(|(_, params, _)| params);
        let Some(reference) = reference else {
            cx.below_min(Stage::Setup, 0, 0);
            return;
        };
        if cx.below_min(Stage::Setup, 0, agreed.len()) {
            return;
        }
        if !cx.spec().model.standardize {
            return self.set_initial_model(cx, reference);
        }
        // Under [dp] no statistic of the rows is asked for: the spec's
        // public ranges standardise the inputs.
        if let Some(dp) = &cx.spec().dp {
            return match dp.range_stats() {
                Some(stats) => self.standardize(cx, reference, &stats),
                None => self.fail(cx, "setup: [dp] with model.standardize needs dp.feature_ranges".into()),
            };
        }
        if !self.protocol.hides_values() {
            return self.standardize(cx, reference, &merged);
        }
        // The feature sums, summed through the protocol: the coordinator
        // learns the federation's, no party's.
        let features = reference.get(INPUT_MEAN).map(|t| t.data.len()).unwrap_or_default();
        if features == 0 {
            return self.fail(cx, format!("setup: the model lacks {INPUT_MEAN}, which standardisation needs"));
        }
        let round_message = match self.protocol.begin_sum(0, &agreed, &SumLayout::feature_stats(features)) {
            Ok(m) => m,
            Err(e) => return self.fail(cx, format!("setup: {e}")),
        };
        self.summing_stats = Some(reference);
        let task = TaskBody::SecureSum { of: SumOf::FeatureStats, round_message };
        cx.collect(Stage::Setup, 0, vec![(agreed, task)], Quorum::JobMinimum);
    }

    /// A step of setup's secure sum closed.
    fn advance_stats(&mut self, cx: &mut Context<'_>, closed: &Closed) {
        let aggregate = match self.protocol.advance(cx, closed) {
            Ok(None) => return,
            Ok(Some(a)) => a,
            Err(e) => return self.fail(cx, format!("setup: {e}")),
        };
        let Some(reference) = self.summing_stats.take() else {
            return self.fail(cx, "setup: a feature-statistics sum without a model".into());
        };
        let stats = sum_of(cx, 0, self.protocol.name(), aggregate)
            .and_then(|(sums, _)| sum::feature_stats_from_sum(&sums).map_err(|e| e.to_string()));
        match stats {
            Ok(stats) => self.standardize(cx, reference, &stats),
            Err(e) => self.fail(cx, format!("setup: {e}")),
        }
    }

    fn standardize(&mut self, cx: &mut Context<'_>, mut model: Parameters, stats: &FeatureStats) {
        match apply_feature_stats(&mut model, stats) {
            Ok(()) => self.set_initial_model(cx, model),
            Err(e) => self.fail(cx, format!("setup: {e}")),
        }
    }

    fn set_initial_model(&mut self, cx: &mut Context<'_>, global: Parameters) {
        let global = Arc::new(global);
        self.global = Some(global.clone());
        cx.take_record();
        let state = self.state(cx);
        cx.checkpoint(0, Some(global), None, state);
    }

    /// What is saved with each checkpoint: the strategy's state.
    fn state(&mut self, cx: &mut Context<'_>) -> State {
        match self.strategy.call("state", |s| s.state()) {
            Ok(s) => {
                let mut state = State::new();
                state.insert_section("strategy", s);
                match self.protocol.state() {
                    Ok(p) => state.insert_section("aggregation", p),
                    Err(e) => {
                        self.fail(cx, e);
                        return State::new();
                    }
                }
                if let Some(acc) = &self.privacy {
                    let mut saved = State::new();
                    match acc {
                        Accountant::Rdp(acc) => {
                            saved.insert("orders", acc.orders().to_vec());
                            saved.insert("rdp", acc.rdp().to_vec());
                        }
                        // Under its earlier name too, for a coordinator
                        // from before `composed_rounds`.
                        Accountant::Pld(_) => saved.insert("pld_rounds", vec![f64::from(self.privacy_rounds)]),
                    }
                    saved.insert(COMPOSED_ROUNDS, vec![f64::from(self.privacy_rounds)]);
                    if let Some(clip) = self.central_clip {
                        saved.insert("clip", vec![clip]);
                    }
                    state.insert_section("privacy", saved);
                }
                state
            }
            Err(e) => {
                self.fail(cx, e);
                State::new()
            }
        }
    }

    fn begin_fit(&mut self, cx: &mut Context<'_>, round: u32) {
        let Some(global) = self.global.clone() else {
            self.fail(cx, "no global model to train from".into());
            return;
        };
        cx.begin_round(round);
        self.fit_metrics.clear();
        let available = cx.available(Stage::Fit, round);
        let spec = cx.spec().clone();
        let ctx = RoundContext { round, rounds: spec.rounds, available: &available, min_parties: spec.min_parties() };
        let base = FitConfig { round, train: spec.training.clone() };
        let plan =
            match self.strategy.call(&format!("round {round} configure_fit"), |s| Ok(s.configure_fit(&ctx, &base))) {
                Ok(plan) => plan,
                Err(e) => return self.fail(cx, e),
            };
        // Group the parties by configuration: one task (encoded once) per group.
        let mut groups: Vec<(Vec<String>, FitConfig)> = Vec::new();
        let mut selected: BTreeSet<String> = BTreeSet::new();
        for i in plan {
            if available.binary_search(&i.party).is_err() || selected.contains(&i.party) {
                let why = if selected.contains(&i.party) { "twice" } else { "but it is not available" };
                return self
                    .fail(cx, format!("round {round}: {} selected party {} {why}", self.strategy.who(), i.party));
            }
            selected.insert(i.party.clone());
            match groups.iter_mut().find(|(_, c)| *c == i.config) {
                Some((to, _)) => to.push(i.party),
                None => groups.push((vec![i.party], i.config)),
            }
        }
        // Party-level DP: how long training takes must not be a round's
        // choice (the parties refuse other epochs or batch sizes than the
        // spec's): a strategy that changes them fails the job here, named,
        // before the round is spent.
        if spec.dp.as_ref().is_some_and(|d| d.level == confide_proto::dpspec::DpLevel::Party)
            && let Some((_, c)) = groups.iter().find(|(_, c)| {
                (c.train.local_epochs, c.train.batch_size) != (spec.training.local_epochs, spec.training.batch_size)
            })
        {
            return self.fail(
                cx,
                format!(
                    "round {round}: {} configured {} local epochs of batches of {} in a party-level DP job \
                     whose [training] sets {} of {} (the parties refuse other epochs or batch sizes)",
                    self.strategy.who(),
                    c.train.local_epochs,
                    c.train.batch_size,
                    spec.training.local_epochs,
                    spec.training.batch_size
                ),
            );
        }
        // Sorted: protocols index the round's parties by their order.
        let selected: Vec<String> = selected.into_iter().collect();
        // One configuration for everyone, or none: protocols that hide the
        // updates refuse a round where parties were configured differently.
        let fit = match groups.as_slice() {
            [(_, config)] => Some(config),
            _ => None,
        };
        let info = RoundInfo { round, parties: &selected, global: &global, fit };
        let round_message = match self.protocol.begin_round(&info) {
            Ok(m) => m,
            Err(e) => return self.fail(cx, e),
        };
        let tasks = groups
            .into_iter()
            .map(|(to, config)| {
                (to, TaskBody::Fit { config, global: global.clone(), round_message: round_message.clone() })
            })
            .collect();
        // The round's training is about to run at the parties: it is spent.
        let spec = cx.spec().clone();
        if let (Some(acc), Some(dp)) = (self.privacy.as_mut(), spec.dp.as_ref()) {
            dp.compose_rounds(acc, &spec.training, 1);
            self.privacy_rounds += 1;
        }
        cx.collect(Stage::Fit, round, tasks, Quorum::JobMinimum);
    }

    /// The fit stage or a protocol step closed: the next step, or the aggregate.
    fn advance_protocol(&mut self, cx: &mut Context<'_>, closed: &Closed) {
        match self.protocol.advance(cx, closed) {
            Ok(None) => {}
            Ok(Some(aggregate)) => self.aggregate(cx, closed.round, aggregate),
            Err(e) => self.fail(cx, e),
        }
    }

    fn aggregate(&mut self, cx: &mut Context<'_>, round: u32, aggregate: Aggregate) {
        let Some(global) = self.global.clone() else {
            return self.fail(cx, "no global model to aggregate into".into());
        };
        let mut metrics = Metrics::new();
        let (next, participants) = match aggregate {
            Aggregate::Updates(updates) if cx.spec().dp.as_ref().is_some_and(|d| d.level == DpLevel::Party) => {
                // Central DP-FedAvg: only the noisy sum of clipped updates
                // reaches the strategy.
                if cx.below_min(Stage::Fit, round, updates.len()) {
                    return;
                }
                let spec = cx.spec().clone();
                let Some(dp) = spec.dp.as_ref() else { return };
                let denominator =
                    if spec.parties.names.is_empty() { spec.min_parties() } else { spec.parties.names.len() };
                let participants: Vec<String> = updates.iter().map(|u| u.party.clone()).collect();
                let clip = self.central_clip.unwrap_or(dp.clip);
                let adaptive = dp.adaptive.as_ref();
                // The round's clip is public (a function of earlier noisy counts).
                if adaptive.is_some() {
                    metrics.insert("dp_clip".into(), clip);
                }
                let next = super::central_dp::noisy_update_sum(
                    &global,
                    &updates,
                    clip,
                    dp.noise_multiplier,
                    denominator,
                    adaptive,
                )
                .and_then(|(sum, weight, count)| {
                    // Adaptive clipping: the next round's clip from the noisy
                    // count (post-processing), checkpointed with the accountant.
                    if let (Some(a), Some(count)) = (adaptive, count) {
                        self.central_clip = Some(a.next_clip(dp.clip, clip, count, updates.len()));
                    }
                    self.strategy.call(&format!("round {round} aggregation"), |s| {
                        s.aggregate_secure_sum(round, &global, &sum, weight)
                    })
                });
                (next, participants)
            }
            Aggregate::Updates(updates) => {
                let results: Vec<FitResult> = updates
                    .into_iter()
                    .map(|u| FitResult {
                        metrics: self.fit_metrics.remove(&u.party).unwrap_or_default(),
                        party: u.party,
                        num_examples: u.num_examples,
                        params: u.params,
                    })
                    .collect();
                if cx.below_min(Stage::Fit, round, results.len()) {
                    return;
                }
                // In u128: counts are the parties' word, and a u64 sum could wrap.
                let total: u128 = results.iter().map(|r| u128::from(r.num_examples)).sum();
                // Example-weighted means of the training metrics every party reported.
                if let Some(first) = results.first() {
                    for key in first.metrics.keys() {
                        if results.iter().all(|r| r.metrics.contains_key(key)) {
                            let s: f64 = results.iter().map(|r| r.metrics[key] * r.num_examples as f64).sum();
                            metrics.insert(key.clone(), s / total.max(1) as f64);
                        }
                    }
                }
                metrics.insert("train_examples".into(), total as f64);
                if let Some(max) = slowest(results.iter().map(|r| &r.metrics), "train_ms") {
                    metrics.insert("train_ms_max".into(), max);
                }
                let participants: Vec<String> = results.iter().map(|r| r.party.clone()).collect();
                let next = self
                    .strategy
                    .call(&format!("round {round} aggregation"), |s| s.aggregate_fit(round, &global, &results));
                (next, participants)
            }
            Aggregate::WeightedSum {
                weighted_delta_sum,
                total_examples,
                mean_train_loss,
                misbehaved,
                contributors,
            } => {
                // Caught cheating while the sum was rebuilt: out of the job.
                for (party, why) in misbehaved {
                    cx.exclude(&party, &format!("round {round} {}: {why}", self.protocol.name()));
                }
                // Only what the protocol aggregated: parties send no metrics
                // of their own in the clear when it hides their updates.
                if let Some(loss) = mean_train_loss {
                    metrics.insert("train_loss".into(), loss);
                }
                metrics.insert("train_examples".into(), total_examples);
                let next = self.strategy.call(&format!("round {round} aggregation"), |s| {
                    s.aggregate_secure_sum(round, &global, &weighted_delta_sum, total_examples)
                });
                (next, contributors)
            }
            Aggregate::Sum { .. } => {
                return self.fail(
                    cx,
                    format!(
                        "round {round}: protocol {} answered a fit round with a sum of statistics",
                        self.protocol.name()
                    ),
                );
            }
        };
        match next {
            // A model that is not finite is never kept, checkpointed or sent:
            // no update was, so the rule (or a weight) made it so.
            Ok(model) => match model.check_finite() {
                Ok(()) => self.global = Some(Arc::new(model)),
                Err(why) => {
                    let who = self.strategy.who().to_owned();
                    return self.fail(cx, format!("round {round}: {who} made a model that is not finite: {why}"));
                }
            },
            Err(e) => return self.fail(cx, e),
        }
        for p in &participants {
            cx.contributed(p, round);
        }
        let spec = cx.spec().clone();
        if let (Some(acc), Some(dp)) = (&self.privacy, &spec.dp) {
            metrics.insert("epsilon".into(), acc.epsilon(dp.delta));
            // What each hospital's ledger charges a record for these rounds.
            if dp.level == DpLevel::Party {
                metrics.insert("record_epsilon".into(), dp.record_epsilon(&spec.training, self.privacy_rounds));
            }
        }
        if let Some(rec) = cx.record() {
            rec.participants = participants;
            rec.metrics.extend(metrics);
        }
        // A [dp] job has no federated evaluation: the parties' metrics on
        // their rows would be un-noised statistics the DP does not cover.
        if spec.dp.is_none() && (round.is_multiple_of(spec.evaluation.every) || round >= spec.rounds) {
            if let Some(g) = self.global.clone()
                && let Err(e) = self.evaluator.begin(cx, &mut self.protocol, round, &g)
            {
                self.fail(cx, e);
            }
        } else {
            self.end_round(cx, round);
        }
    }

    fn end_round(&mut self, cx: &mut Context<'_>, round: u32) {
        let Some(global) = self.global.clone() else { return };
        let record = cx.take_record();
        let state = self.state(cx);
        cx.checkpoint(round, Some(global), record, state);
    }
}

impl JobMachine for Training {
    fn start(&mut self, cx: &mut Context<'_>) {
        let rounds = cx.spec().rounds;
        match (self.resume, self.global.is_some()) {
            // The job had finished its rounds when the coordinator stopped.
            (Some(r), _) if r >= rounds => cx.finish(JobState::Succeeded, None),
            (Some(r), _) => self.begin_fit(cx, r + 1),
            (None, true) => self.begin_fit(cx, 1),
            (None, false) => self.begin_setup(cx),
        }
    }

    fn on_result(&mut self, cx: &mut Context<'_>, party: &str, result: ResultBody) -> Result<(), String> {
        let Some((stage, _)) = cx.stage() else { return Err("no stage is open".into()) };
        if self.evaluator.summing() || (stage == Stage::Evaluate) {
            return self.evaluator.on_result(cx, &mut self.protocol, party, result);
        }
        match (stage, result) {
            (Stage::Setup, ResultBody::Setup { params, stats }) if self.summing_stats.is_none() => {
                self.setup.insert(party.to_owned(), (params, stats));
                Ok(())
            }
            (Stage::Setup, ResultBody::SecureSum { contribution }) if self.summing_stats.is_some() => {
                self.protocol.on_message(cx, party, contribution)
            }
            (Stage::Fit, ResultBody::Fit { metrics, contribution }) => {
                // Bounded here, on arrival, so the party is dropped by name:
                // the strategies check them again, where a bad one would fail
                // the whole job (found by review).
                confide_algorithms::strategy::check_reported_metrics(party, &metrics).map_err(|e| e.to_string())?;
                if self.protocol.hides_values() && !metrics.is_empty() {
                    return Err(format!(
                        "party {party} sent training metrics in the clear; this job's protocol hides them"
                    ));
                }
                self.protocol.on_message(cx, party, contribution)?;
                self.fit_metrics.insert(party.to_owned(), metrics);
                Ok(())
            }
            (Stage::Aggregation(expected), ResultBody::Aggregation { stage, message }) => {
                if stage != expected.as_str() {
                    return Err(format!("party {party} answered the {expected} step as {stage}"));
                }
                self.protocol.on_message(cx, party, message)
            }
            (stage, result) => {
                Err(format!("party {party} answered a {stage} task with a {} result", result.stage_name()))
            }
        }
    }

    fn on_closed(&mut self, cx: &mut Context<'_>, closed: Closed) {
        if self.evaluator.summing() || closed.stage == Stage::Evaluate {
            return match self.evaluator.on_closed(cx, &mut self.protocol, &mut self.strategy, &closed) {
                Ok(true) => self.end_round(cx, closed.round),
                Ok(false) => {}
                Err(e) => self.fail(cx, e),
            };
        }
        if self.summing_stats.is_some() {
            return self.advance_stats(cx, &closed);
        }
        match closed.stage {
            Stage::Setup => self.complete_setup(cx),
            Stage::Fit | Stage::Aggregation(_) => self.advance_protocol(cx, &closed),
            Stage::Evaluate => {}
            Stage::Extension(s) => self.fail(cx, format!("a training job has no {s} stage")),
        }
    }

    fn on_persisted(&mut self, cx: &mut Context<'_>, round: u32) {
        if round >= cx.spec().rounds {
            cx.finish(JobState::Succeeded, None);
        } else {
            self.begin_fit(cx, round + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::Plugins;
    use confide_proto::Limits;
    use confide_proto::jobspec::JobSpec;

    const ADAPTIVE: &str = "name = \"t\"\nkind = \"train\"\nrounds = 6\n[dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\n\
        update_clip = 1.0\nadaptive_clip_quantile = 0.5\n[parties]\nnames = [\"a\", \"b\", \"c\"]\ndataset = \"d\"\n\
        [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n";

    fn rdp_of(acc: &Accountant) -> RdpAccountant {
        match acc {
            Accountant::Rdp(acc) => acc.clone(),
            Accountant::Pld(_) => unreachable!("the RDP accountant is the default"),
        }
    }

    /// The ε a job resumed at `round` from `saved` reports.
    fn resumed_epsilon(spec: &Arc<JobSpec>, round: u32, saved: State) -> Result<(f64, u32), String> {
        let mut state = State::new();
        state.insert_section("privacy", saved);
        let tensor = confide_algorithms::Tensor { name: "w".into(), shape: vec![1], data: vec![0.0] };
        let model = Parameters::new(vec![tensor]).expect("model");
        let start = Start::Resume { round, model: Some(model), state, parties: BTreeMap::new() };
        let plugins =
            Plugins::new().peer_verifier(|| Ok(Box::new(confide_crypto::secagg::testing::InsecureTagVerifier)));
        let limits = Limits::default();
        let setup = Setup { job_id: "job-t", spec, start: &start, plugins: &plugins, limits: &limits };
        let t = Training::new(&setup)?;
        let eps = t.privacy.as_ref().expect("a [dp] job").epsilon(spec.dp.as_ref().expect("dp").delta);
        Ok((eps, t.privacy_rounds))
    }

    fn saved(curve: &RdpAccountant, composed: Option<u32>) -> State {
        let mut saved = State::new();
        saved.insert("orders", curve.orders().to_vec());
        saved.insert("rdp", curve.rdp().to_vec());
        if let Some(rounds) = composed {
            saved.insert(COMPOSED_ROUNDS, vec![f64::from(rounds)]);
        }
        saved
    }

    /// A checkpoint's RDP curve below what its rounds cost under the spec
    /// (an adaptive-clipping job checkpointed while its party-level ε was
    /// accounted at the contribution's sensitivity, not twice it) resumes
    /// reporting what the rounds cost; one above keeps its own; a
    /// checkpoint without its composed rounds counts the rounds it
    /// completed; a curve over other orders is kept only if its ε is the
    /// higher.
    #[test]
    fn a_resumed_job_never_reports_less_than_its_rounds_cost() {
        let spec = Arc::new(JobSpec::parse(ADAPTIVE, "test", &Limits::default()).expect("spec"));
        let dp = spec.dp.as_ref().expect("dp");
        let cost = |rounds| dp.accountant(&spec.training, rounds).epsilon(dp.delta);
        assert!(cost(3).is_finite());
        // A quarter of each order's RDP: what half the sensitivity (the
        // contribution's, against the replaced one's) gives a Gaussian
        // mechanism.
        let mut old = rdp_of(&dp.accountant(&spec.training, 3));
        let halved: Vec<f64> = old.rdp().iter().map(|r| r / 4.0).collect();
        old = RdpAccountant::from_parts(old.orders().to_vec(), halved).expect("curve");
        let old_eps = old.epsilon(dp.delta).expect("eps").0;
        assert!(old_eps < cost(3), "{old_eps} against {}", cost(3));
        assert_eq!(resumed_epsilon(&spec, 3, saved(&old, None)).expect("resumes"), (cost(3), 3));
        assert_eq!(resumed_epsilon(&spec, 3, saved(&old, Some(3))).expect("resumes"), (cost(3), 3));
        // A checkpoint that says four rounds were composed for three
        // completed (this coordinator writes none) is believed.
        assert_eq!(resumed_epsilon(&spec, 3, saved(&old, Some(4))).expect("resumes"), (cost(4), 4));
        // A curve above the spec's for its rounds is kept.
        let above = rdp_of(&dp.accountant(&spec.training, 5));
        let (eps, composed) = resumed_epsilon(&spec, 3, saved(&above, Some(3))).expect("resumes");
        assert_eq!((eps, composed), (above.epsilon(dp.delta).expect("eps").0, 3));
        assert!(eps > cost(3));
        // Another grid of orders: the higher ε of the two curves.
        let coarse = |rdp: f64| {
            let mut s = State::new();
            s.insert("orders", vec![2.0, 4.0]);
            s.insert("rdp", vec![rdp, rdp]);
            s
        };
        assert_eq!(resumed_epsilon(&spec, 3, coarse(0.0)).expect("resumes"), (cost(3), 3));
        let (eps, _) = resumed_epsilon(&spec, 3, coarse(50.0)).expect("resumes");
        let expected = RdpAccountant::from_parts(vec![2.0, 4.0], vec![50.0, 50.0]).expect("curve");
        assert_eq!(eps, expected.epsilon(dp.delta).expect("eps").0);
        assert!(eps > cost(3));
        // Composed rounds that are not a count fail the resume.
        for bad in [-1.0, 2.5, f64::NAN] {
            let mut s = saved(&old, None);
            s.insert(COMPOSED_ROUNDS, vec![bad]);
            let e = resumed_epsilon(&spec, 3, s).expect_err("refused");
            assert!(e.contains("composed rounds"), "{bad}: {e}");
        }
    }

    /// The PLD accountant's state is its composed rounds, under their
    /// earlier name (`pld_rounds`) in checkpoints from before
    /// `composed_rounds`; without either the resume fails, naming it.
    #[test]
    fn a_pld_checkpoint_resumes_from_its_rounds_under_either_name() {
        let text = ADAPTIVE
            .replace("adaptive_clip_quantile = 0.5\n", "accountant = \"pld\"\nmax_model_values = 100\n")
            .replace("noise_multiplier = 1.0", "noise_multiplier = 4.0");
        let spec = Arc::new(JobSpec::parse(&text, "test", &Limits::default()).expect("spec"));
        let dp = spec.dp.as_ref().expect("dp");
        assert!(matches!(dp.accountant(&spec.training, 0), Accountant::Pld(_)));
        let cost = dp.accountant(&spec.training, 3).epsilon(dp.delta);
        assert!(cost.is_finite() && cost > 0.0, "{cost}");
        for key in [COMPOSED_ROUNDS, "pld_rounds"] {
            let mut saved = State::new();
            saved.insert(key, vec![3.0]);
            assert_eq!(resumed_epsilon(&spec, 3, saved).expect("resumes"), (cost, 3), "{key}");
        }
        let e = resumed_epsilon(&spec, 3, State::new()).expect_err("refused");
        assert!(e.contains("no privacy accountant"), "{e}");
    }
}
