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
//! Every stage is a [`Collect`]: send one task per eligible party, gather
//! answers until all have answered or the deadline passes, drop whoever
//! disconnected, timed out or misbehaved, and go on if at least
//! `parties.min` answered. Further protocol stages (secure-aggregation
//! masking and unmasking, HE decryption shares) slot in as more [`Stage`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use confide_algorithms::strategy::check_update;
use confide_algorithms::trainer::apply_feature_stats;
use confide_algorithms::{
    EvalResult, FeatureStats, FedAvg, FitConfig, FitResult, Metrics, Parameters, Strategy,
};
use confide_proto::jobspec::{JobKind, JobSpec, StrategyName};
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
}

impl Stage {
    /// Lowercase name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Fit => "fit",
            Stage::Evaluate => "evaluate",
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
    deadline: Millis,
    waiting: BTreeSet<String>,
    setup: BTreeMap<String, (Parameters, FeatureStats)>,
    fit: BTreeMap<String, FitResult>,
    eval: BTreeMap<String, EvalResult>,
}

#[derive(Debug)]
enum Phase {
    Recruiting { deadline: Millis, resume_round: Option<u32> },
    Collecting(Collect),
    Done,
}

/// The state machine of one job.
pub struct Session {
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

/// Builds the strategy a spec names.
pub fn strategy_for(spec: &JobSpec) -> Box<dyn Strategy> {
    match spec.strategy.name {
        StrategyName::Fedavg => Box::new(FedAvg),
    }
}

impl Session {
    /// A session for `spec`, started at `now`.
    pub fn new(spec: JobSpec, start: Start, now: Millis) -> Session {
        let strategy = strategy_for(&spec);
        let deadline = now + spec.timeouts.recruit_secs * 1000;
        let mut s = Session {
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
        let Some(st) = self.parties.get_mut(&party) else { return };
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
        let Phase::Collecting(c) = &mut self.phase else { return };
        let verdict: Result<(), String> = match (c.stage, result) {
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
            (stage, _) => Err(format!("party {party} answered a {} task with another stage's result", stage.as_str())),
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
        let Phase::Collecting(c) = &mut self.phase else { return };
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
                    let Phase::Collecting(c) = std::mem::replace(&mut self.phase, Phase::Done) else { return };
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
            } else if let Some(rec) = self.record.as_mut() {
                rec.dropped.entry(p).or_insert_with(|| format!("{}: not connected", stage.as_str()));
            }
        }
        let min = self.spec.min_parties();
        if waiting.len() < min {
            let dropped = self
                .record
                .as_ref()
                .map(|r| r.dropped.iter().map(|(p, w)| format!("{p} ({w})")).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            self.finish(
                JobState::Failed,
                Some(format!(
                    "round {round} {}: only {} parties available, the job needs {min}; missing: {dropped}",
                    stage.as_str(),
                    waiting.len()
                )),
            );
            return;
        }
        let config_json = match stage {
            Stage::Fit => {
                let fit = self.strategy.configure_fit(round, &FitConfig { round, train: self.spec.training.clone() });
                serde_json::to_string(&fit).unwrap_or_default()
            }
            _ => "{}".into(),
        };
        let params = if stage == Stage::Setup { None } else { self.global.clone() };
        for p in &waiting {
            self.out.push_back(Output::Task {
                party: p.clone(),
                task: TaskOut { task_id, round, stage, config_json: config_json.clone(), params: params.clone() },
            });
        }
        self.phase = Phase::Collecting(Collect {
            stage,
            round,
            task_id,
            deadline: now + self.spec.timeouts.round_secs * 1000,
            waiting,
            setup: BTreeMap::new(),
            fit: BTreeMap::new(),
            eval: BTreeMap::new(),
        });
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
                "round {round} {}: only {answered} parties answered, the job needs {min}; missing: {dropped}",
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
        if self.spec.model.standardize {
            if let Err(e) = apply_feature_stats(&mut global, &merged) {
                self.finish(JobState::Failed, Some(format!("setup: {e}")));
                return;
            }
        }
        let global = Arc::new(global);
        self.global = Some(global.clone());
        self.out.push_back(Output::Checkpoint { round: 0, params: global, record: None });
        self.record = None;
        self.begin(Stage::Fit, 1, now);
    }

    fn complete_fit(&mut self, c: Collect, now: Millis) {
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
        }
        for r in &results {
            if let Some(st) = self.parties.get_mut(&r.party) {
                st.last_round = c.round;
            }
        }
        let every = self.spec.evaluation.every;
        if c.round % every == 0 || c.round >= self.spec.rounds {
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
        let Some(global) = self.global.clone() else { return };
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
