//! The sans-IO round state machine of one job.
//!
//! A [`Session`] takes inputs (party connected, answer, result, time) and
//! queues outputs (offer, task, checkpoint, finished); it never touches a
//! socket, a clock or a file. The tokio driver in [`crate::server`] feeds it
//! real events; tests feed it scripted ones on a virtual clock.
//!
//! ```text
//!  Recruiting ──all answered / deadline──▶ Setup ──▶ Fit(1) ──▶ Evaluate(1) ──▶ Fit(2) … ──▶ Done
//!      │ (resume from checkpoint r) ──────────────────▶ Fit(r+1)
//!      └─ evaluate job ─────────────────────────────────────────▶ Evaluate(1) ──▶ Done
//! ```
//! Every stage is a collection: send one task per eligible party, gather
//! answers until all have answered or the deadline passes, drop whoever
//! disconnected, timed out or misbehaved, and go on if at least
//! `parties.min` answered. Further protocol stages (secure-aggregation
//! masking and unmasking, HE decryption shares) slot in as more [`Stage`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use confide_algorithms::strategy::check_update;
use confide_algorithms::trainer::apply_feature_stats;
use confide_algorithms::{EvalResult, FeatureStats, FedAvg, FitConfig, FitResult, Metrics, Parameters, Strategy};
use confide_crypto::secagg::encoding::FixedPoint;
use confide_crypto::secagg::graph::degree_for;
use confide_crypto::secagg::protocol::{
    AdvertiseKeys, Config as SecAggConfig, EncryptedShare, MaskedInput, Server as SecAggServer, UnmaskRequest,
    UnmaskShares,
};
use confide_proto::jobspec::{JobKind, JobSpec, PrivacyMode, StrategyName};
use confide_proto::status::{JobState, PartyState, PartyStatus, RoundRecord};

/// Milliseconds on the driver's clock (real or virtual).
pub type Millis = u64;

/// A protocol stage of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Architecture agreement, initial parameters, federated feature sums.
    Setup,
    /// Local training and aggregation.
    Fit,
    /// Federated evaluation of the global model.
    Evaluate,
    /// Secure aggregation: parties exchange encrypted key shares.
    SecAggShares,
    /// Secure aggregation: parties send masked inputs.
    SecAggMasked,
    /// Secure aggregation: parties reveal the shares that remove the masks.
    SecAggUnmask,
}

impl Stage {
    /// The round metric holding this stage's duration in milliseconds.
    pub fn metric_name(self) -> &'static str {
        match self {
            Stage::Setup => "stage_setup_ms",
            Stage::Fit => "stage_fit_ms",
            Stage::Evaluate => "stage_evaluate_ms",
            Stage::SecAggShares => "stage_secagg_shares_ms",
            Stage::SecAggMasked => "stage_secagg_masked_input_ms",
            Stage::SecAggUnmask => "stage_secagg_unmask_ms",
        }
    }

    /// Lowercase name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Fit => "fit",
            Stage::Evaluate => "evaluate",
            Stage::SecAggShares => "secagg-shares",
            Stage::SecAggMasked => "secagg-masked-input",
            Stage::SecAggUnmask => "secagg-unmask",
        }
    }
}

/// What a party returned for a task.
#[derive(Debug, Clone)]
pub enum StageResult {
    /// Answer to [`Stage::Setup`].
    Setup {
        /// Initial parameters (architecture).
        params: Parameters,
        /// Feature sums over the training rows.
        stats: FeatureStats,
    },
    /// Answer to [`Stage::Fit`].
    Fit {
        /// Training examples used.
        num_examples: u64,
        /// Updated parameters.
        params: Parameters,
        /// Local metrics.
        metrics: Metrics,
    },
    /// Answer to [`Stage::Fit`] under secure aggregation: the party trained
    /// and advertises its signed round keys instead of its update.
    SecAggKeys {
        /// The signed keys.
        advert: AdvertiseKeys,
        /// The party's certificate (DER) from its TLS connection.
        certificate: Vec<u8>,
        /// Local metrics.
        metrics: Metrics,
    },
    /// Answer to [`Stage::SecAggShares`].
    SecAggShares(Vec<EncryptedShare>),
    /// Answer to [`Stage::SecAggMasked`]: the masked vector.
    SecAggMasked(Vec<u32>),
    /// Answer to [`Stage::SecAggUnmask`].
    SecAggUnmask(UnmaskShares),
    /// Answer to [`Stage::Evaluate`].
    Evaluate {
        /// Examples evaluated.
        num_examples: u64,
        /// Mean loss.
        loss: f64,
        /// Further metrics.
        metrics: Metrics,
    },
}

/// An event for the session.
#[derive(Debug, Clone)]
pub enum Input {
    /// A party (re)connected.
    Connected(String),
    /// A party's connection ended.
    Disconnected(String),
    /// A party answered the job offer.
    Answer {
        /// Who.
        party: String,
        /// Whether it takes part.
        accepted: bool,
        /// Why not.
        reason: String,
    },
    /// A party finished a task.
    Result {
        /// Who.
        party: String,
        /// Which task.
        task_id: u64,
        /// What it returned.
        result: StageResult,
    },
    /// A party could not do a task (or sent something malformed).
    TaskFailed {
        /// Who.
        party: String,
        /// Which task.
        task_id: u64,
        /// Why.
        reason: String,
    },
    /// Time passed; check deadlines.
    Tick,
    /// The user cancelled the job.
    Cancel,
}

/// A task to send to one party.
#[derive(Debug, Clone)]
pub struct TaskOut {
    /// Identifies the task; answers must echo it.
    pub task_id: u64,
    /// Round number (0 for setup).
    pub round: u32,
    /// Stage.
    pub stage: Stage,
    /// Stage configuration as JSON.
    pub config_json: String,
    /// Global parameters, shared by every party's task of the stage.
    pub params: Option<Arc<Parameters>>,
    /// The party's secure-aggregation payload for this stage.
    pub secagg: Option<SecAggPayload>,
}

/// What a party receives at each secure-aggregation stage.
#[derive(Debug, Clone)]
pub enum SecAggPayload {
    /// With the fit task: the round's public parameters.
    Round {
        /// Protocol parameters.
        config: SecAggConfig,
        /// Coordinate clip of the encoding.
        clip: f32,
        /// Weight cap of the encoding.
        max_examples: u64,
    },
    /// The neighbours' signed keys and certificates.
    Keys(Vec<(AdvertiseKeys, Vec<u8>)>),
    /// The encrypted shares addressed to the party.
    Shares(Vec<EncryptedShare>),
    /// Who survived and who dropped.
    Unmask(UnmaskRequest),
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send the job offer to `party`.
    Offer {
        /// Recipient.
        party: String,
    },
    /// Send a task to `party`.
    Task {
        /// Recipient.
        party: String,
        /// The task.
        task: TaskOut,
    },
    /// Persist a new global model (round 0: after setup) and its round record.
    Checkpoint {
        /// Round the model results from.
        round: u32,
        /// The model.
        params: Arc<Parameters>,
        /// The round's record (absent for round 0).
        record: Option<RoundRecord>,
    },
    /// The job ended.
    Finished {
        /// Succeeded, failed or cancelled.
        state: JobState,
        /// Why it failed.
        error: Option<String>,
    },
}

/// Where a session starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// A new job; `model` is the starting model of `from_job`, if any.
    Fresh {
        /// Starting model.
        model: Option<Parameters>,
    },
    /// Resuming after a coordinator restart from the checkpoint of `round`.
    Resume {
        /// Last completed round.
        round: u32,
        /// The model after that round.
        model: Parameters,
        /// Party statuses as persisted.
        parties: BTreeMap<String, PartyStatus>,
    },
}

#[derive(Debug)]
struct Collect {
    stage: Stage,
    round: u32,
    task_id: u64,
    /// When the stage's tasks went out: its duration goes into the round's
    /// metrics, so a slow stage shows in `confide job status`.
    started: Millis,
    deadline: Millis,
    waiting: BTreeSet<String>,
    setup: BTreeMap<String, (Parameters, FeatureStats)>,
    fit: BTreeMap<String, FitResult>,
    eval: BTreeMap<String, EvalResult>,
    /// Parties whose secure-aggregation message of this stage was accepted.
    answered: BTreeSet<String>,
}

/// Coordinator state of one secure-aggregation round.
struct SecAggRound {
    server: SecAggServer,
    encoding: FixedPoint,
    max_examples: u64,
    certs: BTreeMap<String, Vec<u8>>,
    fit_metrics: BTreeMap<String, Metrics>,
}

#[derive(Debug)]
enum Phase {
    Recruiting { deadline: Millis, resume_round: Option<u32> },
    Collecting(Collect),
    Done,
}

/// The state machine of one job.
pub struct Session {
    job_id: String,
    secagg: Option<SecAggRound>,
    spec: JobSpec,
    phase: Phase,
    parties: BTreeMap<String, PartyStatus>,
    connected: BTreeSet<String>,
    global: Option<Arc<Parameters>>,
    strategy: Box<dyn Strategy>,
    rounds_completed: u32,
    next_task_id: u64,
    record: Option<RoundRecord>,
    out: VecDeque<Output>,
}

/// The largest `key` any party reported (e.g. the slowest local training).
fn slowest<'a>(metrics: impl Iterator<Item = &'a Metrics>, key: &str) -> Option<f64> {
    metrics.filter_map(|m| m.get(key).copied()).reduce(f64::max)
}

/// Builds a built-in strategy a spec names, with its parameters' defaults;
/// `None` for `custom`, which only a coordinator's plugins can build.
pub fn strategy_for(spec: &JobSpec) -> Option<Box<dyn Strategy>> {
    use confide_algorithms::strategies::{Adaptive, FedAvgM, FedOpt, FedProx, Krum, Median, TrimmedMean};
    let st = &spec.strategy;
    let adaptive = |kind| {
        Box::new(FedOpt::new(
            kind,
            st.server_learning_rate.unwrap_or(0.1),
            st.beta1.unwrap_or(0.9),
            st.beta2.unwrap_or(0.99),
            st.tau.unwrap_or(1e-3),
        )) as Box<dyn Strategy>
    };
    Some(match st.name {
        StrategyName::Custom => return None,
        StrategyName::Fedavg => Box::new(FedAvg),
        StrategyName::Fedprox => Box::new(FedProx { proximal_mu: st.proximal_mu.unwrap_or(0.01) }),
        StrategyName::Fedavgm => {
            Box::new(FedAvgM::new(st.server_learning_rate.unwrap_or(1.0), st.momentum.unwrap_or(0.9)))
        }
        StrategyName::Fedadagrad => adaptive(Adaptive::Adagrad),
        StrategyName::Fedyogi => adaptive(Adaptive::Yogi),
        StrategyName::Fedadam => adaptive(Adaptive::Adam),
        StrategyName::Median => Box::new(Median),
        StrategyName::TrimmedMean => Box::new(TrimmedMean { trim_fraction: st.trim_fraction.unwrap_or(0.1) }),
        StrategyName::Krum => Box::new(Krum { byzantine: st.byzantine.unwrap_or(1) }),
    })
}

impl Session {
    /// A session for job `job_id` with `spec` and its built-in strategy
    /// (FedAvg where the spec names a custom one), started at `now`.
    pub fn new(job_id: &str, spec: JobSpec, start: Start, now: Millis) -> Session {
        let strategy = strategy_for(&spec).unwrap_or_else(|| Box::new(FedAvg));
        Session::with_strategy(job_id, spec, strategy, start, now)
    }

    /// A session run by `strategy` (built by the caller, e.g. from plugins).
    pub fn with_strategy(
        job_id: &str,
        spec: JobSpec,
        strategy: Box<dyn Strategy>,
        start: Start,
        now: Millis,
    ) -> Session {
        let deadline = now + spec.timeouts.recruit_secs * 1000;
        let mut s = Session {
            job_id: job_id.to_owned(),
            secagg: None,
            parties: BTreeMap::new(),
            connected: BTreeSet::new(),
            global: None,
            strategy,
            rounds_completed: 0,
            next_task_id: 1,
            record: None,
            out: VecDeque::new(),
            phase: Phase::Recruiting { deadline, resume_round: None },
            spec,
        };
        for name in &s.spec.parties.names {
            s.parties.insert(name.clone(), status(PartyState::Invited, None, 0));
        }
        match start {
            Start::Fresh { model } => s.global = model.map(Arc::new),
            Start::Resume { round, model, parties } => {
                s.global = Some(Arc::new(model));
                s.rounds_completed = round;
                s.next_task_id = u64::from(round + 1) << 32;
                for (name, st) in parties {
                    // Parties that were taking part are asked again; refusals and
                    // exclusions stand.
                    let state = match st.state {
                        PartyState::Refused | PartyState::Failed => st.state,
                        _ => PartyState::Invited,
                    };
                    s.parties.insert(name, PartyStatus { state, ..st });
                }
                s.phase = Phase::Recruiting { deadline, resume_round: Some(round) };
            }
        }
        s
    }

    /// The next queued output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When the session next needs a [`Input::Tick`].
    pub fn next_deadline(&self) -> Option<Millis> {
        match &self.phase {
            Phase::Recruiting { deadline, .. } => Some(*deadline),
            Phase::Collecting(c) => Some(c.deadline),
            Phase::Done => None,
        }
    }

    /// Party statuses, for persistence and display.
    pub fn parties(&self) -> &BTreeMap<String, PartyStatus> {
        &self.parties
    }

    /// Rounds completed so far.
    pub fn rounds_completed(&self) -> u32 {
        self.rounds_completed
    }

    /// Whether the job has ended.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether the rounds have started (recruitment is over).
    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Collecting(_))
    }

    /// The current stage and round, if collecting.
    pub fn current_stage(&self) -> Option<(Stage, u32)> {
        match &self.phase {
            Phase::Collecting(c) => Some((c.stage, c.round)),
            _ => None,
        }
    }

    /// Feeds one event at time `now`.
    pub fn handle(&mut self, now: Millis, input: Input) {
        if self.is_done() {
            return;
        }
        match input {
            Input::Connected(p) => self.on_connected(p),
            Input::Disconnected(p) => {
                self.connected.remove(&p);
                self.drop_from_stage(&p, "disconnected");
            }
            Input::Answer { party, accepted, reason } => self.on_answer(party, accepted, reason),
            Input::Result { party, task_id, result } => self.on_result(party, task_id, result),
            Input::TaskFailed { party, task_id, reason } => {
                if self.is_current_task(&party, task_id) {
                    self.drop_from_stage(&party, &reason);
                }
            }
            // Deadlines are checked by `advance`, which runs after every input.
            Input::Tick => {}
            Input::Cancel => self.finish(JobState::Cancelled, Some("cancelled by the administrator".into())),
        }
        self.advance(now);
    }

    fn on_connected(&mut self, p: String) {
        self.connected.insert(p.clone());
        let open_recruitment = self.spec.parties.names.is_empty() && matches!(self.phase, Phase::Recruiting { .. });
        match self.parties.get(&p).map(|s| s.state) {
            Some(PartyState::Refused | PartyState::Failed) => {}
            Some(_) => self.out.push_back(Output::Offer { party: p }),
            None if open_recruitment && self.parties.len() < 1000 => {
                self.parties.insert(p.clone(), status(PartyState::Invited, None, 0));
                self.out.push_back(Output::Offer { party: p });
            }
            None => {}
        }
    }

    fn on_answer(&mut self, party: String, accepted: bool, reason: String) {
        let Some(st) = self.parties.get_mut(&party) else {
            return;
        };
        if matches!(st.state, PartyState::Refused | PartyState::Failed) {
            return;
        }
        if accepted {
            // A party that rejoins mid-round takes part from the next stage on.
            st.state = PartyState::Accepted;
            st.detail = None;
        } else {
            st.state = PartyState::Refused;
            st.detail = Some(reason);
        }
    }

    fn is_current_task(&self, party: &str, task_id: u64) -> bool {
        matches!(&self.phase, Phase::Collecting(c) if c.task_id == task_id && c.waiting.contains(party))
    }

    fn on_result(&mut self, party: String, task_id: u64, result: StageResult) {
        if !self.is_current_task(&party, task_id) {
            return; // stale or unsolicited: ignore
        }
        let expected = self.global.as_ref().map(|g| g.spec());
        let secure = self.spec.privacy.mode == PrivacyMode::Secagg;
        let Phase::Collecting(c) = &mut self.phase else {
            return;
        };
        let sa = self.secagg.as_mut();
        let verdict: Result<(), String> = match (c.stage, result, sa) {
            (Stage::Fit, StageResult::SecAggKeys { advert, certificate, metrics }, Some(sa)) if secure => {
                if advert.party != party {
                    Err(format!("party {party} advertised keys for {}", advert.party))
                } else {
                    sa.server.on_keys(advert).map_err(|e| e.to_string()).map(|()| {
                        sa.certs.insert(party.clone(), certificate);
                        sa.fit_metrics.insert(party.clone(), metrics);
                        c.answered.insert(party.clone());
                    })
                }
            }
            (Stage::SecAggShares, StageResult::SecAggShares(shares), Some(sa)) => {
                sa.server.on_shares(&party, shares).map_err(|e| e.to_string()).map(|()| {
                    c.answered.insert(party.clone());
                })
            }
            (Stage::SecAggMasked, StageResult::SecAggMasked(values), Some(sa)) => {
                sa.server.on_masked(MaskedInput { party: party.clone(), values }).map_err(|e| e.to_string()).map(|()| {
                    c.answered.insert(party.clone());
                })
            }
            (Stage::SecAggUnmask, StageResult::SecAggUnmask(shares), Some(sa)) => {
                if shares.party != party {
                    Err(format!("party {party} sent unmask shares as {}", shares.party))
                } else {
                    sa.server.on_unmask(shares).map_err(|e| e.to_string()).map(|()| {
                        c.answered.insert(party.clone());
                    })
                }
            }
            (stage, result, _) => match (stage, result) {
                (Stage::Fit, StageResult::Fit { .. }) if secure => {
                    Err(format!("party {party} sent a plaintext update in a secure-aggregation job"))
                }
                (Stage::Setup, StageResult::Setup { params, stats }) => {
                    c.setup.insert(party.clone(), (params, stats));
                    Ok(())
                }
                (Stage::Fit, StageResult::Fit { num_examples, params, metrics }) => {
                    let r = FitResult { party: party.clone(), num_examples, params, metrics };
                    match expected.as_deref().map(|e| check_update(e, &r)) {
                        Some(Err(e)) => Err(e.to_string()),
                        _ => {
                            c.fit.insert(party.clone(), r);
                            Ok(())
                        }
                    }
                }
                (Stage::Evaluate, StageResult::Evaluate { num_examples, loss, metrics }) => {
                    if !loss.is_finite() || metrics.values().any(|v| !v.is_finite()) {
                        Err(format!("party {party} sent a bad evaluation: non-finite loss or metric"))
                    } else {
                        c.eval.insert(party.clone(), EvalResult { party: party.clone(), num_examples, loss, metrics });
                        Ok(())
                    }
                }
                (stage, _) => {
                    Err(format!("party {party} answered a {} task with another stage's result", stage.as_str()))
                }
            },
        };
        match verdict {
            Ok(()) => {
                c.waiting.remove(&party);
                if let Some(st) = self.parties.get_mut(&party) {
                    st.state = PartyState::Accepted;
                    st.detail = None;
                }
            }
            Err(reason) => self.drop_from_stage(&party, &reason),
        }
    }

    fn drop_from_stage(&mut self, party: &str, reason: &str) {
        let Phase::Collecting(c) = &mut self.phase else {
            return;
        };
        if !c.waiting.remove(party) {
            return;
        }
        let what = format!("{}: {reason}", c.stage.as_str());
        if let Some(st) = self.parties.get_mut(party) {
            st.state = PartyState::Dropped;
            st.detail = Some(format!("round {} {what}", c.round));
        }
        if let Some(rec) = self.record.as_mut() {
            rec.dropped.insert(party.to_owned(), what);
        }
    }

    /// Moves the state machine on as far as the inputs allow.
    fn advance(&mut self, now: Millis) {
        loop {
            match &self.phase {
                Phase::Done => return,
                Phase::Recruiting { deadline, resume_round } => {
                    let (deadline, resume_round) = (*deadline, *resume_round);
                    let min = self.spec.min_parties();
                    let accepted = self.count(PartyState::Accepted);
                    let undecided = self.count(PartyState::Invited);
                    let timed_out = now >= deadline;
                    if accepted + undecided < min || (timed_out && accepted < min) {
                        let why = self.describe_missing(PartyState::Accepted);
                        self.finish(
                            JobState::Failed,
                            Some(format!("only {accepted} parties accepted the job; it needs {min}. {why}")),
                        );
                        return;
                    }
                    if accepted >= min && (undecided == 0 || timed_out) {
                        for st in self.parties.values_mut().filter(|s| s.state == PartyState::Invited) {
                            st.state = PartyState::Dropped;
                            st.detail = Some("did not accept the job in time".into());
                        }
                        self.begin_first_stage(now, resume_round);
                        continue;
                    }
                    return;
                }
                Phase::Collecting(c) => {
                    if !c.waiting.is_empty() && now < c.deadline {
                        return;
                    }
                    let late: Vec<String> = c.waiting.iter().cloned().collect();
                    let secs = self.spec.timeouts.round_secs;
                    for p in late {
                        self.drop_from_stage(&p, &format!("no answer within {secs}s"));
                    }
                    let Phase::Collecting(c) = std::mem::replace(&mut self.phase, Phase::Done) else {
                        return;
                    };
                    if let Some(rec) = self.record.as_mut() {
                        rec.metrics.insert(c.stage.metric_name().into(), now.saturating_sub(c.started) as f64);
                    }
                    self.complete_stage(c, now);
                }
            }
        }
    }

    fn count(&self, state: PartyState) -> usize {
        self.parties.values().filter(|s| s.state == state).count()
    }

    fn describe_missing(&self, want: PartyState) -> String {
        let mut parts = Vec::new();
        for (name, st) in &self.parties {
            if st.state != want {
                let why = match (&st.detail, st.state) {
                    (Some(d), _) => d.clone(),
                    (None, PartyState::Invited) if !self.connected.contains(name) => "not connected".into(),
                    (None, PartyState::Invited) => "no answer".into(),
                    (None, s) => s.as_str().into(),
                };
                parts.push(format!("{name}: {why}"));
            }
        }
        if parts.is_empty() { "No party answered.".into() } else { format!("Missing: {}.", parts.join("; ")) }
    }

    fn begin_first_stage(&mut self, now: Millis, resume_round: Option<u32>) {
        match (resume_round, self.spec.kind, self.global.is_some()) {
            (Some(r), _, _) => self.begin(Stage::Fit, r + 1, now),
            (None, JobKind::Evaluate, _) => self.begin(Stage::Evaluate, 1, now),
            (None, JobKind::Train, true) => self.begin(Stage::Fit, 1, now),
            (None, JobKind::Train, false) => self.begin(Stage::Setup, 0, now),
        }
    }

    fn begin(&mut self, stage: Stage, round: u32, now: Millis) {
        if stage != Stage::Evaluate || self.record.is_none() {
            self.record = Some(RoundRecord {
                round,
                metrics: Metrics::new(),
                participants: Vec::new(),
                dropped: BTreeMap::new(),
                completed_at: 0,
            });
        }
        let task_id = self.next_task_id;
        self.next_task_id += 1;
        let eligible: Vec<String> = self
            .parties
            .iter()
            .filter(|(_, s)| matches!(s.state, PartyState::Accepted | PartyState::Dropped))
            .map(|(n, _)| n.clone())
            .collect();
        let mut waiting = BTreeSet::new();
        for p in eligible {
            // A party dropped from an earlier stage is asked again once it is
            // connected: a reconnecting party has been re-offered the job
            // first, and the stream keeps that order.
            if self.connected.contains(&p) {
                waiting.insert(p);
            } else {
                let what = format!("{}: not connected", stage.as_str());
                if let Some(st) = self.parties.get_mut(&p) {
                    st.state = PartyState::Dropped;
                    st.detail = Some(format!("round {round} {what}"));
                }
                if let Some(rec) = self.record.as_mut() {
                    rec.dropped.entry(p).or_insert(what);
                }
            }
        }
        if self.below_min(stage, round, waiting.len()) {
            return;
        }
        let mut payloads = BTreeMap::new();
        if stage == Stage::Fit && self.spec.privacy.mode == PrivacyMode::Secagg {
            match self.start_secagg(round, &waiting) {
                Ok(payload) => {
                    payloads = waiting.iter().map(|p| (p.clone(), payload.clone())).collect();
                }
                Err(e) => {
                    self.finish(JobState::Failed, Some(format!("round {round} secure aggregation: {e}")));
                    return;
                }
            }
        }
        self.dispatch(stage, round, task_id, now, waiting, payloads);
    }

    /// Sends one task per party in `waiting` and starts collecting answers.
    fn dispatch(
        &mut self,
        stage: Stage,
        round: u32,
        task_id: u64,
        now: Millis,
        waiting: BTreeSet<String>,
        mut payloads: BTreeMap<String, SecAggPayload>,
    ) {
        let config_json = match stage {
            Stage::Fit => {
                let fit = self.strategy.configure_fit(round, &FitConfig { round, train: self.spec.training.clone() });
                serde_json::to_string(&fit).unwrap_or_default()
            }
            _ => "{}".into(),
        };
        let params = if matches!(stage, Stage::Fit | Stage::Evaluate) { self.global.clone() } else { None };
        for p in &waiting {
            self.out.push_back(Output::Task {
                party: p.clone(),
                task: TaskOut {
                    task_id,
                    round,
                    stage,
                    config_json: config_json.clone(),
                    params: params.clone(),
                    secagg: payloads.remove(p),
                },
            });
        }
        self.phase = Phase::Collecting(Collect {
            stage,
            round,
            task_id,
            started: now,
            deadline: now + self.spec.timeouts.round_secs * 1000,
            waiting,
            setup: BTreeMap::new(),
            fit: BTreeMap::new(),
            eval: BTreeMap::new(),
            answered: BTreeSet::new(),
        });
    }

    /// The public parameters of a secure-aggregation round over `invited`:
    /// the graph degree grows like log n (complete graph up to 20 parties),
    /// the threshold is the configured fraction of the degree.
    fn start_secagg(&mut self, round: u32, invited: &BTreeSet<String>) -> Result<SecAggPayload, String> {
        let sa = self.spec.privacy.secagg();
        let global = self.global.as_ref().ok_or("no global model")?;
        let parties: Vec<String> = invited.iter().cloned().collect();
        let n = parties.len();
        let degree = degree_for(n, 20, 3.0);
        let k = degree.min(n.saturating_sub(1));
        let threshold = ((sa.threshold * k as f64).ceil() as usize).clamp(2, k.max(2));
        let mut seed_input = self.job_id.as_bytes().to_vec();
        seed_input.extend_from_slice(&round.to_le_bytes());
        let graph_seed: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&seed_input).into()
        };
        let config = SecAggConfig {
            job: self.job_id.clone(),
            round,
            parties,
            threshold,
            degree,
            graph_seed,
            bits: sa.bits,
            dim: global.num_values() + 1,
        };
        let server = SecAggServer::new(config.clone()).map_err(|e| e.to_string())?;
        let encoding = FixedPoint::new(sa.bits, 0, sa.clip, n).map_err(|e| e.to_string())?;
        self.secagg = Some(SecAggRound {
            server,
            encoding,
            max_examples: sa.max_examples,
            certs: BTreeMap::new(),
            fit_metrics: BTreeMap::new(),
        });
        Ok(SecAggPayload::Round { config, clip: sa.clip, max_examples: sa.max_examples })
    }

    fn below_min(&mut self, stage: Stage, round: u32, answered: usize) -> bool {
        let min = self.spec.min_parties();
        if answered >= min {
            return false;
        }
        let dropped = self
            .record
            .as_ref()
            .map(|r| r.dropped.iter().map(|(p, w)| format!("{p} ({w})")).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        self.finish(
            JobState::Failed,
            Some(format!(
                "round {round} {}: only {answered} parties took part, the job needs {min}; missing: {dropped}",
                stage.as_str()
            )),
        );
        true
    }

    fn complete_stage(&mut self, c: Collect, now: Millis) {
        match c.stage {
            Stage::Setup => self.complete_setup(c, now),
            Stage::Fit => self.complete_fit(c, now),
            Stage::Evaluate => self.complete_evaluate(c, now),
            Stage::SecAggShares | Stage::SecAggMasked | Stage::SecAggUnmask => self.complete_secagg(c, now),
        }
    }

    fn complete_setup(&mut self, c: Collect, now: Millis) {
        let mut results = c.setup.into_iter();
        let Some((first, (reference, stats))) = results.next() else {
            self.below_min(Stage::Setup, 0, 0);
            return;
        };
        let spec = reference.spec();
        let mut merged = stats;
        let mut agreed = vec![first];
        for (party, (params, stats)) in results {
            let mismatch = if params.spec() != spec {
                Some(format!("its model architecture differs from {}'s", agreed[0]))
            } else {
                merged.merge(&stats).err().map(|e| e.to_string())
            };
            match mismatch {
                Some(why) => {
                    if let Some(st) = self.parties.get_mut(&party) {
                        st.state = PartyState::Failed;
                        st.detail = Some(format!("setup: {why}"));
                    }
                    if let Some(rec) = self.record.as_mut() {
                        rec.dropped.insert(party, format!("setup: {why}"));
                    }
                }
                None => agreed.push(party),
            }
        }
        if self.below_min(Stage::Setup, 0, agreed.len()) {
            return;
        }
        let mut global = reference;
        if self.spec.model.standardize
            && let Err(e) = apply_feature_stats(&mut global, &merged)
        {
            self.finish(JobState::Failed, Some(format!("setup: {e}")));
            return;
        }
        let global = Arc::new(global);
        self.global = Some(global.clone());
        self.out.push_back(Output::Checkpoint { round: 0, params: global, record: None });
        self.record = None;
        self.begin(Stage::Fit, 1, now);
    }

    /// Moves a secure-aggregation round to its next stage, or finishes it.
    fn complete_secagg(&mut self, c: Collect, now: Millis) {
        if c.stage != Stage::SecAggUnmask && self.below_min(c.stage, c.round, c.answered.len()) {
            return;
        }
        let Some(mut sa) = self.secagg.take() else {
            self.finish(JobState::Failed, Some("secure aggregation state lost".into()));
            return;
        };
        let task_id = self.next_task_id;
        self.next_task_id += 1;
        let fail =
            |e: confide_crypto::Error| format!("round {} secure aggregation ({}): {e}", c.round, c.stage.as_str());
        let next = match c.stage {
            Stage::Fit => sa.server.close_keys().map(|live| {
                let payloads = live
                    .iter()
                    .map(|p| {
                        let keys = sa.server.keys_for(p).unwrap_or_default();
                        let with_certs = keys
                            .into_iter()
                            .map(|k| {
                                let cert = sa.certs.get(&k.party).cloned().unwrap_or_default();
                                (k, cert)
                            })
                            .collect();
                        (p.clone(), SecAggPayload::Keys(with_certs))
                    })
                    .collect::<BTreeMap<_, _>>();
                (Stage::SecAggShares, live, payloads)
            }),
            Stage::SecAggShares => sa.server.close_shares().map(|live| {
                let payloads =
                    live.iter().map(|p| (p.clone(), SecAggPayload::Shares(sa.server.shares_for(p)))).collect();
                (Stage::SecAggMasked, live, payloads)
            }),
            Stage::SecAggMasked => sa.server.close_masked().map(|req| {
                let live = req.survivors.clone();
                let payloads = live.iter().map(|p| (p.clone(), SecAggPayload::Unmask(req.clone()))).collect();
                (Stage::SecAggUnmask, live, payloads)
            }),
            _ => {
                let result = sa.server.finish().map_err(fail);
                self.complete_secure_fit(c.round, sa, result, now);
                return;
            }
        };
        match next {
            Ok((stage, live, payloads)) => {
                self.secagg = Some(sa);
                let waiting: BTreeSet<String> = live.into_iter().collect();
                self.dispatch(stage, c.round, task_id, now, waiting, payloads);
            }
            Err(e) => self.finish(JobState::Failed, Some(fail(e))),
        }
    }

    /// Decodes the unmasked sum and aggregates it.
    fn complete_secure_fit(
        &mut self,
        round: u32,
        sa: SecAggRound,
        result: Result<(Vec<u32>, Vec<String>), String>,
        now: Millis,
    ) {
        let (sum, survivors) = match result {
            Ok(x) => x,
            Err(e) => {
                self.finish(JobState::Failed, Some(e));
                return;
            }
        };
        let Some(global) = self.global.clone() else { return };
        let Some((&weight, values)) = sum.split_last() else { return };
        let total = f64::from(weight);
        let decoded = match sa.encoding.decode_sum(values, survivors.len()) {
            Ok(d) if total > 0.0 => d,
            Ok(_) => {
                self.finish(JobState::Failed, Some(format!("round {round} secure aggregation: zero total examples")));
                return;
            }
            Err(e) => {
                self.finish(JobState::Failed, Some(format!("round {round} secure aggregation: {e}")));
                return;
            }
        };
        // Parties encoded n_i/max_examples · Δ_i, so Σ n_i Δ_i = decoded · max_examples.
        let weighted: Vec<f64> = decoded.iter().map(|v| v * sa.max_examples as f64).collect();
        match self.strategy.aggregate_secure_sum(round, &global, &weighted, total) {
            Ok(next) => self.global = Some(Arc::new(next)),
            Err(e) => {
                self.finish(JobState::Failed, Some(format!("round {round} aggregation: {e}")));
                return;
            }
        }
        if let Some(rec) = self.record.as_mut() {
            rec.participants = survivors.clone();
            let n = sa.fit_metrics.len().max(1) as f64;
            if let Some(first) = sa.fit_metrics.values().next() {
                for key in first.keys() {
                    let vals: Vec<f64> = sa.fit_metrics.values().filter_map(|m| m.get(key).copied()).collect();
                    if vals.len() == sa.fit_metrics.len() {
                        // Examples per party stay secret: a plain mean of the metrics.
                        rec.metrics.insert(key.clone(), vals.iter().sum::<f64>() / n);
                    }
                }
            }
            rec.metrics.insert("train_examples".into(), total);
            if let Some(max) = slowest(sa.fit_metrics.values(), "train_ms") {
                rec.metrics.insert("train_ms_max".into(), max);
            }
        }
        for p in &survivors {
            if let Some(st) = self.parties.get_mut(p) {
                st.last_round = round;
            }
        }
        let every = self.spec.evaluation.every;
        if round.is_multiple_of(every) || round >= self.spec.rounds {
            self.begin(Stage::Evaluate, round, now);
        } else {
            self.finish_round(round, now);
        }
    }

    fn complete_fit(&mut self, c: Collect, now: Millis) {
        if self.spec.privacy.mode == PrivacyMode::Secagg {
            self.complete_secagg(c, now);
            return;
        }
        let results: Vec<FitResult> = c.fit.into_values().collect();
        if self.below_min(Stage::Fit, c.round, results.len()) {
            return;
        }
        let Some(global) = self.global.clone() else {
            self.finish(JobState::Failed, Some("no global model to aggregate into".into()));
            return;
        };
        match self.strategy.aggregate_fit(c.round, &global, &results) {
            Ok(next) => self.global = Some(Arc::new(next)),
            Err(e) => {
                self.finish(JobState::Failed, Some(format!("round {} aggregation: {e}", c.round)));
                return;
            }
        }
        let total: u64 = results.iter().map(|r| r.num_examples).sum();
        if let Some(rec) = self.record.as_mut() {
            rec.participants = results.iter().map(|r| r.party.clone()).collect();
            // Example-weighted means of the training metrics every party reported.
            if let Some(first) = results.first() {
                for key in first.metrics.keys() {
                    if results.iter().all(|r| r.metrics.contains_key(key)) {
                        let s: f64 = results.iter().map(|r| r.metrics[key] * r.num_examples as f64).sum();
                        rec.metrics.insert(key.clone(), s / total.max(1) as f64);
                    }
                }
            }
            rec.metrics.insert("train_examples".into(), total as f64);
            if let Some(max) = slowest(results.iter().map(|r| &r.metrics), "train_ms") {
                rec.metrics.insert("train_ms_max".into(), max);
            }
        }
        for r in &results {
            if let Some(st) = self.parties.get_mut(&r.party) {
                st.last_round = c.round;
            }
        }
        let every = self.spec.evaluation.every;
        if c.round.is_multiple_of(every) || c.round >= self.spec.rounds {
            self.begin(Stage::Evaluate, c.round, now);
        } else {
            self.finish_round(c.round, now);
        }
    }

    fn complete_evaluate(&mut self, c: Collect, now: Millis) {
        let results: Vec<EvalResult> = c.eval.into_values().collect();
        if self.below_min(Stage::Evaluate, c.round, results.len()) {
            return;
        }
        match self.strategy.aggregate_evaluate(c.round, &results) {
            Ok(m) => {
                if let Some(rec) = self.record.as_mut() {
                    if rec.participants.is_empty() {
                        rec.participants = results.iter().map(|r| r.party.clone()).collect();
                    }
                    rec.metrics.extend(m);
                }
            }
            Err(e) => {
                self.finish(JobState::Failed, Some(format!("round {} evaluation: {e}", c.round)));
                return;
            }
        }
        self.finish_round(c.round, now);
    }

    fn finish_round(&mut self, round: u32, now: Millis) {
        let Some(global) = self.global.clone() else {
            return;
        };
        let record = self.record.take();
        self.rounds_completed = round;
        self.out.push_back(Output::Checkpoint { round, params: global, record });
        if round >= self.spec.rounds {
            self.finish(JobState::Succeeded, None);
        } else {
            self.begin(Stage::Fit, round + 1, now);
        }
    }

    fn finish(&mut self, state: JobState, error: Option<String>) {
        self.phase = Phase::Done;
        self.out.push_back(Output::Finished { state, error });
    }
}

fn status(state: PartyState, detail: Option<String>, last_round: u32) -> PartyStatus {
    PartyStatus { state, detail, last_round }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::Tensor;
    use confide_proto::Limits;

    fn spec(names: &[&str], min: usize, rounds: u32, extra: &str) -> JobSpec {
        let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let text = format!(
            "name = \"t\"\nkind = \"train\"\nrounds = {rounds}\n{extra}\n[parties]\nnames = [{}]\nmin = {min}\ndataset = \"d\"\n\
             [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n[timeouts]\nround_secs = 10\nrecruit_secs = 5\n",
            names.join(",")
        );
        JobSpec::parse(&text, "test", &Limits::default()).unwrap()
    }

    fn params(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }

    struct H {
        s: Session,
        now: Millis,
        outputs: Vec<Output>,
    }

    impl H {
        fn new(spec: JobSpec, start: Start) -> H {
            H { s: Session::new("job-t", spec, start, 0), now: 0, outputs: Vec::new() }
        }
        fn feed(&mut self, input: Input) {
            self.s.handle(self.now, input);
            while let Some(o) = self.s.poll_output() {
                self.outputs.push(o);
            }
        }
        fn take(&mut self) -> Vec<Output> {
            std::mem::take(&mut self.outputs)
        }
        fn connect_and_accept(&mut self, parties: &[&str]) {
            for p in parties {
                self.feed(Input::Connected((*p).into()));
            }
            for p in parties {
                self.feed(Input::Answer { party: (*p).into(), accepted: true, reason: String::new() });
            }
        }
        /// Tasks of the current stage: (party, task).
        fn tasks(&mut self) -> Vec<(String, TaskOut)> {
            self.take()
                .into_iter()
                .filter_map(|o| match o {
                    Output::Task { party, task } => Some((party, task)),
                    _ => None,
                })
                .collect()
        }
        fn setup(&mut self, tasks: &[(String, TaskOut)], init: &[f32]) {
            for (p, t) in tasks {
                assert_eq!(t.stage, Stage::Setup);
                let result = StageResult::Setup { params: params(init), stats: FeatureStats::default() };
                self.feed(Input::Result { party: p.clone(), task_id: t.task_id, result });
            }
        }
        fn fit(&mut self, party: &str, task: &TaskOut, n: u64, v: &[f32]) {
            let result = StageResult::Fit { num_examples: n, params: params(v), metrics: Metrics::new() };
            self.feed(Input::Result { party: party.into(), task_id: task.task_id, result });
        }
        fn eval(&mut self, party: &str, task: &TaskOut, n: u64, acc: f64) {
            let result = StageResult::Evaluate {
                num_examples: n,
                loss: 1.0 - acc,
                metrics: [("accuracy".to_string(), acc)].into(),
            };
            self.feed(Input::Result { party: party.into(), task_id: task.task_id, result });
        }
    }

    fn finished(outputs: &[Output]) -> Option<(JobState, Option<String>)> {
        outputs.iter().find_map(|o| match o {
            Output::Finished { state, error } => Some((*state, error.clone())),
            _ => None,
        })
    }

    #[test]
    fn full_job_aggregates_the_weighted_mean_each_round() {
        let mut h = H::new(spec(&["a", "b", "c"], 3, 2, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        assert_eq!(t.len(), 3);
        h.setup(&t, &[0.0, 0.0]);
        let cp = h.take();
        assert!(matches!(&cp[0], Output::Checkpoint { round: 0, record: None, .. }));
        let fit: Vec<_> = cp
            .into_iter()
            .filter_map(|o| if let Output::Task { party, task } = o { Some((party, task)) } else { None })
            .collect();
        assert!(fit.iter().all(|(_, t)| t.stage == Stage::Fit && t.round == 1));
        h.now = 40;
        h.fit("a", &fit[0].1, 1, &[1.0, 1.0]);
        h.fit("b", &fit[1].1, 2, &[4.0, 1.0]);
        assert!(h.tasks().is_empty(), "no evaluation before the last fit result");
        h.now = 250;
        h.fit("c", &fit[2].1, 1, &[3.0, 5.0]);
        let ev = h.tasks();
        assert!(ev.iter().all(|(_, t)| t.stage == Stage::Evaluate));
        // (1*1 + 2*4 + 1*3)/4 = 3, (1 + 2 + 5)/4 = 2
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![3.0, 2.0]);
        h.eval("a", &ev[0].1, 10, 0.5);
        h.eval("b", &ev[1].1, 30, 1.0);
        h.now = 265;
        h.eval("c", &ev[2].1, 10, 0.5);
        let out = h.take();
        let Output::Checkpoint { round: 1, record: Some(rec), .. } = &out[0] else { panic!("{out:?}") };
        assert_eq!(rec.metrics["accuracy"], 0.8);
        // Each stage's duration on the session's clock: fit from 0 to 250 ms
        // (the slowest party), evaluation from 250 to 265 ms.
        assert_eq!(rec.metrics["stage_fit_ms"], 250.0);
        assert_eq!(rec.metrics["stage_evaluate_ms"], 15.0);
        assert_eq!(rec.participants, vec!["a", "b", "c"]);
        assert_eq!(h.s.rounds_completed(), 1);
        assert!(finished(&out).is_none());
    }

    fn through_setup(h: &mut H, parties: &[&str]) -> Vec<(String, TaskOut)> {
        h.connect_and_accept(parties);
        let t = h.tasks();
        h.setup(&t, &[0.0]);
        h.tasks()
    }

    #[test]
    fn party_lost_mid_round_is_dropped_and_the_round_completes() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.feed(Input::Disconnected("c".into()));
        h.fit("b", &fit[1].1, 1, &[4.0]);
        let ev = h.tasks();
        assert_eq!(ev.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![3.0]);
        h.eval("a", &ev[0].1, 1, 1.0);
        h.eval("b", &ev[1].1, 1, 1.0);
        let out = h.take();
        let Output::Checkpoint { record: Some(rec), .. } = &out[0] else { panic!() };
        assert_eq!(rec.dropped["c"], "fit: disconnected");
        assert_eq!(finished(&out), Some((JobState::Succeeded, None)));
        assert_eq!(h.s.parties()["c"].state, PartyState::Dropped);
    }

    #[test]
    fn a_party_lost_between_stages_is_dropped_at_the_next_one() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 2, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        for (i, (p, t)) in fit.iter().enumerate() {
            h.fit(p, t, 1, &[i as f32]);
        }
        let ev = h.tasks();
        h.eval("c", &ev[2].1, 1, 1.0);
        h.feed(Input::Disconnected("c".into()));
        h.eval("a", &ev[0].1, 1, 1.0);
        h.eval("b", &ev[1].1, 1, 1.0);
        let out = h.take();
        let fit2: Vec<&str> = out
            .iter()
            .filter_map(|o| if let Output::Task { party, .. } = o { Some(party.as_str()) } else { None })
            .collect();
        assert_eq!(fit2, vec!["a", "b"]);
        assert_eq!(h.s.parties()["c"].state, PartyState::Dropped);
        assert_eq!(h.s.parties()["c"].detail.as_deref(), Some("round 2 fit: not connected"));
    }

    #[test]
    fn below_the_minimum_the_job_fails_naming_the_missing_party() {
        let mut h = H::new(spec(&["a", "b", "c"], 3, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.fit("b", &fit[1].1, 1, &[2.0]);
        h.feed(Input::Disconnected("c".into()));
        let (state, err) = finished(&h.take()).unwrap();
        assert_eq!(state, JobState::Failed);
        let err = err.unwrap();
        assert!(err.contains("c (fit: disconnected)") && err.contains("needs 3"), "{err}");
    }

    #[test]
    fn a_silent_party_times_out_on_the_virtual_clock() {
        let mut h = H::new(spec(&["a", "b"], 1, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        assert_eq!(h.s.next_deadline(), Some(10_000));
        h.now = 9_999;
        h.feed(Input::Tick);
        assert!(h.tasks().is_empty());
        h.now = 10_000;
        h.feed(Input::Tick);
        let ev = h.tasks();
        // b is still connected, so it is asked to evaluate; only a's update was aggregated.
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![2.0]);
        assert!(h.s.parties()["b"].detail.as_deref().unwrap().contains("no answer within 10s"));
    }

    #[test]
    fn a_nan_update_drops_the_party_by_name() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b", "c"]);
        h.fit("a", &fit[0].1, 1, &[2.0]);
        h.fit("b", &fit[1].1, 1, &[f32::NAN]);
        h.fit("c", &fit[2].1, 3, &[6.0]);
        let ev = h.tasks();
        // (1*2 + 3*6)/4 = 5: b's update is left out; b may still evaluate.
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![5.0]);
        let d = h.s.parties()["b"].detail.clone().unwrap();
        assert!(d.contains("party b sent a bad update") && d.contains("NaN"), "{d}");
    }

    #[test]
    fn refusals_fail_recruitment_with_the_reason() {
        let mut h = H::new(spec(&["a", "b"], 2, 1, ""), Start::Fresh { model: None });
        h.feed(Input::Connected("a".into()));
        h.feed(Input::Connected("b".into()));
        h.feed(Input::Answer { party: "a".into(), accepted: true, reason: String::new() });
        h.feed(Input::Answer {
            party: "b".into(),
            accepted: false,
            reason: "policy forbids privacy mode \"none\"".into(),
        });
        let (state, err) = finished(&h.take()).unwrap();
        assert_eq!(state, JobState::Failed);
        assert!(err.unwrap().contains("b: policy forbids privacy mode"));
        assert_eq!(h.s.parties()["b"].state, PartyState::Refused);
    }

    #[test]
    fn recruitment_deadline_starts_with_enough_parties_or_fails() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b"]);
        assert!(h.tasks().is_empty(), "waits for c until the deadline");
        h.now = 5_000;
        h.feed(Input::Tick);
        assert_eq!(h.tasks().len(), 2);
        assert_eq!(h.s.parties()["c"].state, PartyState::Dropped);

        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a"]);
        h.now = 5_000;
        h.feed(Input::Tick);
        let err = finished(&h.take()).unwrap().1.unwrap();
        assert!(err.contains("b: not connected") && err.contains("c: not connected"), "{err}");
    }

    #[test]
    fn setup_excludes_a_party_with_another_architecture() {
        let mut h = H::new(spec(&["a", "b", "c"], 2, 1, ""), Start::Fresh { model: None });
        h.connect_and_accept(&["a", "b", "c"]);
        let t = h.tasks();
        h.setup(&t[..2], &[0.0]);
        let result = StageResult::Setup { params: params(&[0.0, 0.0]), stats: FeatureStats::default() };
        h.feed(Input::Result { party: "c".into(), task_id: t[2].1.task_id, result });
        let fit = h.tasks();
        assert_eq!(fit.len(), 2);
        assert_eq!(h.s.parties()["c"].state, PartyState::Failed);
    }

    #[test]
    fn stale_and_unsolicited_results_are_ignored() {
        let mut h = H::new(spec(&["a", "b"], 2, 2, ""), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a", "b"]);
        h.fit("a", &TaskOut { task_id: 999, ..fit[0].1.clone() }, 1, &[100.0]);
        h.fit("x", &fit[0].1, 1, &[100.0]);
        h.fit("a", &fit[0].1, 1, &[1.0]);
        h.fit("a", &fit[0].1, 1, &[100.0]); // duplicate
        h.fit("b", &fit[1].1, 1, &[3.0]);
        let ev = h.tasks();
        assert_eq!(ev[0].1.params.as_ref().unwrap().tensors()[0].data, vec![2.0]);
    }

    #[test]
    fn resume_starts_at_the_next_round_with_the_checkpoint() {
        let parties: BTreeMap<String, PartyStatus> = [
            ("a".to_string(), status(PartyState::Accepted, None, 3)),
            ("b".to_string(), status(PartyState::Refused, Some("no".into()), 0)),
        ]
        .into();
        let start = Start::Resume { round: 3, model: params(&[7.0]), parties };
        let mut h = H::new(spec(&["a", "b"], 1, 5, ""), start);
        h.feed(Input::Connected("a".into()));
        assert!(matches!(h.take()[0], Output::Offer { .. }));
        h.feed(Input::Answer { party: "a".into(), accepted: true, reason: String::new() });
        let t = h.tasks();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].1.stage, t[0].1.round), (Stage::Fit, 4));
        assert_eq!(t[0].1.params.as_ref().unwrap().tensors()[0].data, vec![7.0]);
    }

    #[test]
    fn evaluation_cadence_and_cancel() {
        let mut h = H::new(spec(&["a"], 1, 3, "[evaluation]\nevery = 2"), Start::Fresh { model: None });
        let fit = through_setup(&mut h, &["a"]);
        h.fit("a", &fit[0].1, 1, &[1.0]);
        let out = h.take();
        assert!(matches!(out[0], Output::Checkpoint { round: 1, .. }), "round 1 is not evaluated");
        let Output::Task { task, .. } = &out[1] else { panic!() };
        assert_eq!((task.stage, task.round), (Stage::Fit, 2));
        h.feed(Input::Cancel);
        assert_eq!(finished(&h.take()).unwrap().0, JobState::Cancelled);
        h.feed(Input::Connected("a".into()));
        assert!(h.take().is_empty(), "a finished session ignores input");
    }
}

/// Secure aggregation driven through the session, with real SecAgg+ clients
/// standing in for the parties, on the virtual clock.
#[cfg(test)]
mod secagg_tests {
    use super::*;
    use confide_algorithms::Tensor;
    use confide_crypto::secagg::protocol::Client;
    use confide_proto::Limits;
    use rand_core::OsRng;

    use confide_crypto::secagg::testing::{InsecureTagSigner as Tag, InsecureTagVerifier as TagCheck};

    const PARTIES: [&str; 4] = ["a", "b", "c", "d"];

    fn spec(min: usize) -> JobSpec {
        let text = format!(
            "name = \"s\"\nkind = \"train\"\nrounds = 1\n[parties]\nnames = [\"a\", \"b\", \"c\", \"d\"]\nmin = {min}\n\
             dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
             [privacy]\nmode = \"secagg\"\nmax_examples = 100\nclip = 2.0\n[timeouts]\nround_secs = 10\n"
        );
        JobSpec::parse(&text, "t", &Limits::default()).unwrap()
    }

    fn params(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }

    /// Each party's examples and trained parameters.
    fn local(p: &str) -> (u64, Vec<f32>) {
        match p {
            "a" => (10, vec![1.0, -1.0]),
            "b" => (30, vec![0.5, 0.5]),
            "c" => (20, vec![-1.0, 1.5]),
            _ => (40, vec![0.25, 0.0]),
        }
    }

    fn tasks(out: Vec<Output>) -> Vec<(String, TaskOut)> {
        out.into_iter()
            .filter_map(|o| if let Output::Task { party, task } = o { Some((party, task)) } else { None })
            .collect()
    }

    struct Run {
        s: Session,
        clients: BTreeMap<String, (Client, Vec<u32>)>,
    }

    impl Run {
        fn feed(&mut self, input: Input) -> Vec<Output> {
            self.s.handle(0, input);
            std::iter::from_fn(|| self.s.poll_output()).collect()
        }

        fn answer(&mut self, party: &str, task_id: u64, result: StageResult) -> Vec<Output> {
            self.feed(Input::Result { party: party.into(), task_id, result })
        }

        /// Recruits, runs setup, and returns the secure fit tasks.
        fn start(min: usize) -> (Run, Vec<(String, TaskOut)>) {
            let mut r =
                Run { s: Session::new("job-s", spec(min), Start::Fresh { model: None }, 0), clients: BTreeMap::new() };
            for p in PARTIES {
                r.feed(Input::Connected(p.into()));
            }
            let mut out = Vec::new();
            for p in PARTIES {
                out = r.feed(Input::Answer { party: p.into(), accepted: true, reason: String::new() });
            }
            let mut fit = Vec::new();
            for (p, t) in tasks(out) {
                let result = StageResult::Setup { params: params(&[0.0, 0.0]), stats: FeatureStats::default() };
                fit = tasks(r.answer(&p, t.task_id, result));
            }
            (r, fit)
        }

        /// A party trains and advertises keys.
        fn fit(&mut self, p: &str, t: &TaskOut) -> Vec<Output> {
            let Some(SecAggPayload::Round { config, clip, max_examples }) = &t.secagg else { panic!("{t:?}") };
            let (n, l) = local(p);
            let global: Vec<f32> = t.params.as_ref().unwrap().flat_values().collect();
            let scale = n as f32 / *max_examples as f32;
            let u: Vec<f32> = l.iter().zip(&global).map(|(l, g)| (l - g) * scale).collect();
            let mut input = FixedPoint::new(config.bits, 0, *clip, config.parties.len()).unwrap().encode(&u);
            input.push(n as u32);
            let (c, advert) = Client::new(config.clone(), p, &Tag(p.into()), &mut OsRng).unwrap();
            self.clients.insert(p.into(), (c, input));
            let result = StageResult::SecAggKeys { advert, certificate: vec![], metrics: Metrics::new() };
            self.answer(p, t.task_id, result)
        }

        fn step(&mut self, p: &str, t: &TaskOut) -> Vec<Output> {
            let (c, input) = self.clients.get_mut(p).unwrap();
            let result = match t.secagg.as_ref().unwrap() {
                SecAggPayload::Keys(keys) => {
                    let adverts: Vec<_> = keys.iter().map(|(k, _)| k.clone()).collect();
                    StageResult::SecAggShares(c.on_keys(&adverts, &TagCheck, &mut OsRng).unwrap())
                }
                SecAggPayload::Shares(s) => StageResult::SecAggMasked(c.on_shares(s, input.clone()).unwrap().values),
                SecAggPayload::Unmask(req) => StageResult::SecAggUnmask(c.on_unmask(req).unwrap()),
                SecAggPayload::Round { .. } => unreachable!(),
            };
            self.answer(p, t.task_id, result)
        }
    }

    fn expected(parties: &[&str]) -> Vec<f32> {
        let total: u64 = parties.iter().map(|p| local(p).0).sum();
        (0..2).map(|j| parties.iter().map(|p| local(p).0 as f32 * local(p).1[j]).sum::<f32>() / total as f32).collect()
    }

    #[test]
    fn a_party_lost_at_the_masked_input_stage_is_left_out_of_an_exact_sum() {
        let (mut r, fit) = Run::start(3);
        assert_eq!(fit.len(), 4);
        let mut next = Vec::new();
        for (p, t) in &fit {
            next = tasks(r.fit(p, t));
        }
        assert!(next.iter().all(|(_, t)| t.stage == Stage::SecAggShares));
        let mut masked = Vec::new();
        for (p, t) in &next {
            masked = tasks(r.step(p, t));
        }
        assert!(masked.iter().all(|(_, t)| t.stage == Stage::SecAggMasked));
        let mut unmask = Vec::new();
        for (p, t) in masked.iter().filter(|(p, _)| p != "c") {
            unmask = tasks(r.step(p, t));
        }
        assert!(unmask.is_empty(), "still waiting for c");
        unmask = tasks(r.feed(Input::Disconnected("c".into())));
        assert_eq!(unmask.len(), 3);
        let mut eval = Vec::new();
        for (p, t) in &unmask {
            eval = tasks(r.step(p, t));
        }
        assert!(eval.iter().all(|(_, t)| t.stage == Stage::Evaluate), "{eval:?}");
        let got: Vec<f32> = eval[0].1.params.as_ref().unwrap().flat_values().collect();
        let want = expected(&["a", "b", "d"]);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
        assert_eq!(r.s.record.as_ref().unwrap().dropped["c"], "secagg-masked-input: disconnected");
        assert_eq!(r.s.record.as_ref().unwrap().participants, vec!["a", "b", "d"]);
        let metrics = &r.s.record.as_ref().unwrap().metrics;
        for stage in [Stage::Fit, Stage::SecAggShares, Stage::SecAggMasked, Stage::SecAggUnmask] {
            assert!(metrics.contains_key(stage.metric_name()), "{} missing from {metrics:?}", stage.metric_name());
        }
    }

    #[test]
    fn too_few_unmask_answers_fail_the_job_below_threshold() {
        let (mut r, fit) = Run::start(2);
        let mut next = Vec::new();
        for (p, t) in &fit {
            next = tasks(r.fit(p, t));
        }
        let mut masked = Vec::new();
        for (p, t) in &next {
            masked = tasks(r.step(p, t));
        }
        let mut unmask = Vec::new();
        for (p, t) in &masked {
            unmask = tasks(r.step(p, t));
        }
        // Only a answers; b, c, d vanish: no party's self-mask can be rebuilt.
        r.step("a", &unmask[0].1);
        let mut out = Vec::new();
        for p in ["b", "c", "d"] {
            out = r.feed(Input::Disconnected(p.into()));
        }
        let err = out
            .iter()
            .find_map(
                |o| if let Output::Finished { state: JobState::Failed, error } = o { error.clone() } else { None },
            )
            .expect("the job fails");
        assert!(err.contains("below threshold"), "{err}");
        assert!(!out.iter().any(|o| matches!(o, Output::Checkpoint { .. })), "no model from a partial sum");
    }

    #[test]
    fn a_plaintext_update_or_forged_shares_drop_the_party_by_name() {
        let (mut r, fit) = Run::start(3);
        // d sends its parameters in the clear instead of keys.
        let plain = StageResult::Fit { num_examples: 5, params: params(&[1.0, 1.0]), metrics: Metrics::new() };
        let d_task = fit.iter().find(|(p, _)| p == "d").unwrap().1.task_id;
        r.answer("d", d_task, plain);
        assert!(r.s.parties()["d"].detail.as_deref().unwrap().contains("plaintext update"));
        let mut next = Vec::new();
        for (p, t) in fit.iter().filter(|(p, _)| p != "d") {
            next = tasks(r.fit(p, t));
        }
        assert_eq!(next.len(), 3);
        // c forwards shares that claim to come from a.
        let (c, _) = r.clients.get_mut("c").unwrap();
        let SecAggPayload::Keys(keys) = next[2].1.secagg.clone().unwrap() else { panic!() };
        let adverts: Vec<_> = keys.iter().map(|(k, _)| k.clone()).collect();
        let mut forged = c.on_keys(&adverts, &TagCheck, &mut OsRng).unwrap();
        forged[0].from = "a".into();
        r.answer("c", next[2].1.task_id, StageResult::SecAggShares(forged));
        assert!(r.s.parties()["c"].detail.as_deref().unwrap().contains("party c misbehaved"), "{:?}", r.s.parties());
    }
}
