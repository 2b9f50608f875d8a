//! The sans-IO session of one job.
//!
//! A [`Session`] takes inputs (party connected, answer, result, checkpoint
//! persisted, time) and queues outputs (offer, tasks, checkpoint, finished);
//! it never touches a socket, a clock or a file. The driver in
//! [`crate::server`] feeds it real events; tests feed it scripted ones on a
//! virtual clock.
//!
//! The session is job-kind independent. It recruits parties, then hands
//! control to the job's [`JobMachine`] (training, evaluation, or a kind
//! registered by a build of your own), which drives *collections*: send a
//! task to each party, gather answers until all are in or the deadline
//! passes, drop whoever disconnected, timed out, failed or misbehaved (with
//! the stage and reason), and fail the job below `parties.min`. Checkpoints
//! are acknowledged by the driver before the machine goes on, so a failed
//! write fails the job with its cause.
//!
//! ```text
//!  Recruiting ──all answered / deadline──▶ machine.start ──▶ collect(stage) ──closed──▶ machine.on_closed
//!                                                  ▲              ▲      │                      │
//!                                                  │              └──────┼── next collection ◀──┤
//!                                    machine.on_persisted ◀── Persisted ◀┴── Checkpoint ◀───────┘ … ─▶ Finished
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use confide_algorithms::{Parameters, State};
use confide_crypto::aggregation::Quorum;
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_proto::messages::{ResultBody, Stage, Task, TaskBody};
use confide_proto::status::{JobState, PartyState, PartyStatus, RoundRecord};

#[cfg(test)]
mod tests;

/// Milliseconds on the driver's clock (real or virtual).
pub type Millis = u64;

/// An event for the session.
#[derive(Debug, Clone)]
pub enum Input {
    /// A party (re)connected, with the certificate (DER) of its connection.
    Connected {
        /// Who.
        party: String,
        /// Its TLS client certificate.
        certificate: Arc<[u8]>,
        /// The relay carrying its stream, if any.
        relay: Option<String>,
    },
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
        result: ResultBody,
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
    /// The checkpoint of `round` is durable.
    Persisted {
        /// Its round.
        round: u32,
    },
    /// The checkpoint of `round` could not be written: the job fails with the cause.
    PersistFailed {
        /// Its round.
        round: u32,
        /// The cause.
        reason: String,
    },
    /// Time passed; check deadlines.
    Tick,
    /// The user cancelled the job.
    Cancel,
}

impl Input {
    /// `party` connected without a certificate (tests, tools).
    pub fn connected(party: &str) -> Input {
        Input::Connected { party: party.to_owned(), certificate: Arc::from(Vec::new()), relay: None }
    }
}

/// A model and everything that must be saved with it, atomically.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Round the model results from (0: after setup).
    pub round: u32,
    /// The model (absent for a job kind without one).
    pub model: Option<Arc<Parameters>>,
    /// The round's record (absent for round 0).
    pub record: Option<RoundRecord>,
    /// The job machine's state (strategy moments, ...), restored on resume.
    pub state: State,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send the job offer to `party`.
    Offer {
        /// Recipient.
        party: String,
    },
    /// Send `task` to each of `to` (one encoding shared by all).
    Task {
        /// Recipients.
        to: Vec<String>,
        /// The stage it belongs to.
        stage: Stage,
        /// The task.
        task: Arc<Task>,
    },
    /// Persist a checkpoint, then answer [`Input::Persisted`] or [`Input::PersistFailed`].
    Checkpoint(Checkpoint),
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
        /// The model after that round (absent for a job kind without one).
        model: Option<Parameters>,
        /// The job machine's state saved with it.
        state: State,
        /// Party statuses as persisted.
        parties: BTreeMap<String, PartyStatus>,
    },
}

/// A collection that closed.
#[derive(Debug, Clone)]
pub struct Closed {
    /// Its stage.
    pub stage: Stage,
    /// Its round.
    pub round: u32,
    /// Who gave a valid answer.
    pub answered: BTreeSet<String>,
}

/// A job kind's state machine, driven by the [`Session`] through a
/// [`Context`]. It decides what to ask and what to make of the answers; the
/// session does the rest (recruitment, deadlines, drops, the minimum,
/// checkpoints' acknowledgement, party statuses).
pub trait JobMachine: Send {
    /// Recruitment is over: start (or resume) the job.
    fn start(&mut self, cx: &mut Context<'_>);

    /// A party answered the open collection. `Err(reason)` drops the party
    /// from the stage with that reason (the answer is ignored).
    fn on_result(&mut self, cx: &mut Context<'_>, party: &str, result: ResultBody) -> Result<(), String>;

    /// The open collection closed with enough answers for its quorum.
    fn on_closed(&mut self, cx: &mut Context<'_>, closed: Closed);

    /// The checkpoint of `round` is durable.
    fn on_persisted(&mut self, cx: &mut Context<'_>, round: u32);
}

#[derive(Debug)]
struct Collection {
    stage: Stage,
    round: u32,
    task_id: u64,
    /// When the stage's tasks went out: its duration goes into the round's
    /// metrics, so a slow stage shows in `confide job status`.
    started: Millis,
    deadline: Millis,
    /// Since when `parties.min` parties that answered are still connected
    /// (a head-count stage only): from then on the stage waits at most
    /// `timeouts.straggler_secs` more.
    quorum_at: Option<Millis>,
    waiting: BTreeSet<String>,
    answered: BTreeSet<String>,
    quorum: Quorum,
}

impl Collection {
    /// When the stage closes with answers missing: at its deadline, or
    /// `straggler` after its quorum answered, whichever comes first.
    fn closes_at(&self, straggler: Option<u64>) -> Millis {
        match (self.quorum_at, straggler) {
            (Some(at), Some(secs)) => self.deadline.min(at.saturating_add(secs.saturating_mul(1000))),
            _ => self.deadline,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Recruiting { deadline: Millis },
    Running,
    Persisting { round: u32 },
    Done,
}

/// Everything of a session but its machine: what a [`Context`] exposes.
pub struct Core {
    job_id: String,
    spec: Arc<JobSpec>,
    limits: Limits,
    phase: Phase,
    parties: BTreeMap<String, PartyStatus>,
    /// Parties whose status changed since [`Session::take_changed_parties`].
    changed: BTreeSet<String>,
    connected: BTreeMap<String, Arc<[u8]>>,
    /// The relay carrying each relayed party's stream.
    relays: BTreeMap<String, String>,
    collection: Option<Collection>,
    record: Option<RoundRecord>,
    rounds_completed: u32,
    next_task_id: u64,
    now: Millis,
    out: VecDeque<Output>,
}

/// A job machine's handle on the session.
pub struct Context<'a> {
    core: &'a mut Core,
}

/// The state machine of one job.
pub struct Session {
    core: Core,
    machine: Box<dyn JobMachine>,
}

impl Session {
    /// A session for job `job_id` run by `machine`, started at `now`.
    pub fn new(
        job_id: &str,
        spec: Arc<JobSpec>,
        machine: Box<dyn JobMachine>,
        start: &Start,
        limits: Limits,
        now: Millis,
    ) -> Session {
        let deadline = now + spec.timeouts.recruit_secs * 1000;
        let mut core = Core {
            job_id: job_id.to_owned(),
            limits,
            phase: Phase::Recruiting { deadline },
            parties: BTreeMap::new(),
            changed: BTreeSet::new(),
            connected: BTreeMap::new(),
            relays: BTreeMap::new(),
            collection: None,
            record: None,
            rounds_completed: 0,
            next_task_id: 1,
            now,
            out: VecDeque::new(),
            spec,
        };
        for name in core.spec.parties.names.clone() {
            core.set_party(&name, PartyState::Invited, None);
        }
        if let Start::Resume { round, parties, .. } = start {
            core.rounds_completed = *round;
            core.next_task_id = u64::from(round + 1) << 32;
            for (name, st) in parties {
                // Parties that were taking part are asked again; refusals and
                // exclusions stand.
                let state = match st.state {
                    PartyState::Refused | PartyState::Failed => st.state,
                    _ => PartyState::Invited,
                };
                core.parties.insert(name.clone(), PartyStatus { state, ..st.clone() });
                core.changed.insert(name.clone());
            }
        }
        Session { core, machine }
    }

    /// The next queued output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.core.out.pop_front()
    }

    /// When the session next needs a [`Input::Tick`].
    pub fn next_deadline(&self) -> Option<Millis> {
        match self.core.phase {
            Phase::Recruiting { deadline } => Some(deadline),
            Phase::Running => {
                self.core.collection.as_ref().map(|c| c.closes_at(self.core.spec.timeouts.straggler_secs))
            }
            Phase::Persisting { .. } | Phase::Done => None,
        }
    }

    /// Party statuses, for persistence and display.
    pub fn parties(&self) -> &BTreeMap<String, PartyStatus> {
        &self.core.parties
    }

    /// The parties whose status changed since the last call (so the driver
    /// writes only those, not every party after every event).
    pub fn take_changed_parties(&mut self) -> Vec<(String, PartyStatus)> {
        let changed = std::mem::take(&mut self.core.changed);
        changed.into_iter().filter_map(|p| self.core.parties.get(&p).map(|s| (p, s.clone()))).collect()
    }

    /// Rounds completed so far.
    pub fn rounds_completed(&self) -> u32 {
        self.core.rounds_completed
    }

    /// Whether the job has ended.
    pub fn is_done(&self) -> bool {
        self.core.phase == Phase::Done
    }

    /// Whether the rounds have started (recruitment is over).
    pub fn is_running(&self) -> bool {
        matches!(self.core.phase, Phase::Running | Phase::Persisting { .. })
    }

    /// The current stage and round, if collecting.
    pub fn current_stage(&self) -> Option<(Stage, u32)> {
        self.core.collection.as_ref().map(|c| (c.stage, c.round))
    }

    /// The round record being built (tests and tools).
    pub fn record(&self) -> Option<&RoundRecord> {
        self.core.record.as_ref()
    }

    /// Feeds one event at time `now`.
    pub fn handle(&mut self, now: Millis, input: Input) {
        if self.is_done() {
            return;
        }
        self.core.now = now;
        let Session { core, machine } = self;
        match input {
            Input::Connected { party, certificate, relay } => {
                core.on_connected(party, certificate, relay);
                // A party that answered and came back counts again.
                core.recount_quorum();
            }
            Input::Disconnected(p) => {
                core.connected.remove(&p);
                // Dropped before its relay is forgotten: a relay cutting a
                // party's stream is named with the drop.
                core.drop_from_stage(&p, "disconnected");
                core.relays.remove(&p);
                core.recount_quorum();
            }
            Input::Answer { party, accepted, reason } => core.on_answer(party, accepted, reason),
            Input::Result { party, task_id, result } => {
                if core.is_current_task(&party, task_id) {
                    let verdict = machine.on_result(&mut Context { core }, &party, result);
                    match verdict {
                        Ok(()) => core.answered(&party),
                        Err(reason) => core.drop_from_stage(&party, &reason),
                    }
                }
            }
            Input::TaskFailed { party, task_id, reason } => {
                if core.is_current_task(&party, task_id) {
                    core.drop_from_stage(&party, &reason);
                }
            }
            Input::Persisted { round } => {
                if core.phase == (Phase::Persisting { round }) {
                    core.phase = Phase::Running;
                    machine.on_persisted(&mut Context { core }, round);
                }
            }
            Input::PersistFailed { round, reason } => {
                if core.phase == (Phase::Persisting { round }) {
                    core.finish(JobState::Failed, Some(format!("round {round}: cannot save the checkpoint: {reason}")));
                }
            }
            // Deadlines are checked below, after every input.
            Input::Tick => {}
            Input::Cancel => core.finish(JobState::Cancelled, Some("cancelled by the administrator".into())),
        }
        self.advance();
    }

    /// Fails the job (e.g. a plug-in panicked while the driver ran it).
    pub fn fail(&mut self, error: String) {
        if !self.is_done() {
            self.core.finish(JobState::Failed, Some(error));
        }
    }

    /// Moves the state machine on as far as the inputs allow.
    fn advance(&mut self) {
        loop {
            let Session { core, machine } = self;
            match core.phase {
                Phase::Done | Phase::Persisting { .. } => return,
                Phase::Recruiting { deadline } => {
                    if !core.recruitment_over(deadline) {
                        return;
                    }
                    if core.phase == Phase::Done {
                        return;
                    }
                    core.phase = Phase::Running;
                    machine.start(&mut Context { core });
                }
                Phase::Running => {
                    let Some(c) = &core.collection else { return };
                    let straggler = core.spec.timeouts.straggler_secs;
                    if !c.waiting.is_empty() && core.now < c.closes_at(straggler) {
                        return;
                    }
                    let late: Vec<String> = c.waiting.iter().cloned().collect();
                    let why = match straggler {
                        Some(s) if core.now < c.deadline => {
                            format!("no answer within {s}s of the first {} answers", core.spec.min_parties())
                        }
                        _ => format!("no answer within {}s", core.spec.timeouts.round_secs),
                    };
                    for p in late {
                        core.drop_from_stage(&p, &why);
                    }
                    let Some(c) = core.collection.take() else { return };
                    let elapsed = core.now.saturating_sub(c.started) as f64;
                    // Summed: a stage can run more than once in a round (the
                    // protocol's steps for the update, then for the evaluation).
                    if let Some(rec) = core.record.as_mut() {
                        *rec.metrics.entry(c.stage.metric_name()).or_insert(0.0) += elapsed;
                    }
                    if c.quorum == Quorum::JobMinimum && core.below_min(c.stage, c.round, c.answered.len()) {
                        return;
                    }
                    machine.on_closed(
                        &mut Context { core },
                        Closed { stage: c.stage, round: c.round, answered: c.answered },
                    );
                }
            }
        }
    }
}

/// Said of a party dropped or excluded while its stream came through a
/// relay: the relay could have altered what it forwarded (it speaks for
/// its parties on what they do not sign, and can corrupt what they do), so
/// the status names it beside the party (found by review).
fn through_relay(relays: &BTreeMap<String, String>, party: &str) -> String {
    relays.get(party).map(|r| format!(" (its stream came through relay {r})")).unwrap_or_default()
}

fn status(state: PartyState, detail: Option<String>, last_round: u32) -> PartyStatus {
    PartyStatus { state, detail, last_round }
}

impl Core {
    fn set_party(&mut self, party: &str, state: PartyState, detail: Option<String>) {
        let st = self.parties.entry(party.to_owned()).or_insert_with(|| status(state, None, 0));
        st.state = state;
        st.detail = detail;
        self.changed.insert(party.to_owned());
    }

    fn on_connected(&mut self, p: String, certificate: Arc<[u8]>, relay: Option<String>) {
        self.connected.insert(p.clone(), certificate);
        match relay {
            Some(r) => self.relays.insert(p.clone(), r),
            None => self.relays.remove(&p),
        };
        let open_recruitment = self.spec.parties.names.is_empty() && matches!(self.phase, Phase::Recruiting { .. });
        match self.parties.get(&p).map(|s| s.state) {
            Some(PartyState::Refused | PartyState::Failed) => {}
            Some(_) => self.out.push_back(Output::Offer { party: p }),
            None if open_recruitment && self.parties.len() < self.limits.max_parties => {
                self.set_party(&p, PartyState::Invited, None);
                self.out.push_back(Output::Offer { party: p });
            }
            None => {}
        }
    }

    fn on_answer(&mut self, party: String, accepted: bool, reason: String) {
        match self.parties.get(&party).map(|s| s.state) {
            None | Some(PartyState::Refused | PartyState::Failed) => {}
            // A party that rejoins mid-round takes part from the next stage on.
            Some(_) if accepted => self.set_party(&party, PartyState::Accepted, None),
            Some(_) => self.set_party(&party, PartyState::Refused, Some(reason)),
        }
    }

    fn is_current_task(&self, party: &str, task_id: u64) -> bool {
        matches!(&self.collection, Some(c) if c.task_id == task_id && c.waiting.contains(party))
    }

    fn answered(&mut self, party: &str) {
        if let Some(c) = self.collection.as_mut()
            && c.waiting.remove(party)
        {
            c.answered.insert(party.to_owned());
            self.recount_quorum();
            if self.parties.get(party).is_some_and(|s| s.state != PartyState::Accepted || s.detail.is_some()) {
                self.set_party(party, PartyState::Accepted, None);
            }
        }
    }

    /// Starts the straggler cut's clock once `parties.min` parties that
    /// answered the stage are still connected, and stops it when a
    /// disconnection leaves fewer (cutting the rest then could leave the
    /// next stage below the minimum where waiting would not).
    fn recount_quorum(&mut self) {
        let min = self.spec.min_parties();
        let Some(c) = self.collection.as_mut().filter(|c| c.quorum == Quorum::JobMinimum) else { return };
        let live = c.answered.iter().filter(|p| self.connected.contains_key(*p)).count();
        c.quorum_at = (live >= min).then(|| c.quorum_at.unwrap_or(self.now));
    }

    fn drop_from_stage(&mut self, party: &str, reason: &str) {
        let Some(c) = self.collection.as_mut() else { return };
        if !c.waiting.remove(party) {
            return;
        }
        let what = format!("{}: {reason}{}", c.stage, through_relay(&self.relays, party));
        let detail = format!("round {} {what}", c.round);
        self.set_party(party, PartyState::Dropped, Some(detail));
        if let Some(rec) = self.record.as_mut() {
            rec.dropped.insert(party.to_owned(), what);
        }
    }

    /// Whether recruitment is over (enough accepted and nobody undecided, or
    /// the deadline); fails the job when it cannot reach the minimum.
    fn recruitment_over(&mut self, deadline: Millis) -> bool {
        let min = self.spec.min_parties();
        let accepted = self.count(PartyState::Accepted);
        let undecided = self.count(PartyState::Invited);
        let timed_out = self.now >= deadline;
        if accepted + undecided < min || (timed_out && accepted < min) {
            let why = self.describe_missing(PartyState::Accepted);
            self.finish(
                JobState::Failed,
                Some(format!("only {accepted} parties accepted the job; it needs {min}. {why}")),
            );
            return true;
        }
        if accepted >= min && (undecided == 0 || timed_out) {
            let late: Vec<String> =
                self.parties.iter().filter(|(_, s)| s.state == PartyState::Invited).map(|(n, _)| n.clone()).collect();
            for p in late {
                self.set_party(&p, PartyState::Dropped, Some("did not accept the job in time".into()));
            }
            return true;
        }
        false
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
                    (None, PartyState::Invited) if !self.connected.contains_key(name) => "not connected".into(),
                    (None, PartyState::Invited) => "no answer".into(),
                    (None, s) => s.as_str().into(),
                };
                parts.push(format!("{name}: {why}"));
            }
        }
        if parts.is_empty() { "No party answered.".into() } else { format!("Missing: {}.", parts.join("; ")) }
    }

    /// Fails the job when `answered` is below `parties.min`.
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
                "round {round} {stage}: only {answered} parties took part, the job needs {min}; missing: {dropped}"
            )),
        );
        true
    }

    fn finish(&mut self, state: JobState, error: Option<String>) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        self.collection = None;
        self.out.push_back(Output::Finished { state, error });
    }
}

impl Context<'_> {
    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.core.job_id
    }

    /// The job's spec.
    pub fn spec(&self) -> &Arc<JobSpec> {
        &self.core.spec
    }

    /// The federation's limits.
    pub fn limits(&self) -> &Limits {
        &self.core.limits
    }

    /// The time of the current input.
    pub fn now(&self) -> Millis {
        self.core.now
    }

    /// Who can be asked in `stage` of `round`: the parties that accepted the
    /// job (or dropped from an earlier stage) and are connected, sorted. Those
    /// that took part but are not connected are dropped from the stage, named.
    pub fn available(&mut self, stage: Stage, round: u32) -> Vec<String> {
        let core = &mut *self.core;
        let (mut live, mut gone) = (Vec::new(), Vec::new());
        for (n, s) in &core.parties {
            if matches!(s.state, PartyState::Accepted | PartyState::Dropped) {
                if core.connected.contains_key(n) { live.push(n.clone()) } else { gone.push(n.clone()) }
            }
        }
        for p in gone {
            let what = format!("{stage}: not connected");
            core.set_party(&p, PartyState::Dropped, Some(format!("round {round} {what}")));
            if let Some(rec) = core.record.as_mut() {
                rec.dropped.entry(p).or_insert(what);
            }
        }
        live
    }

    /// The open collection's stage and round.
    pub fn stage(&self) -> Option<(Stage, u32)> {
        self.core.collection.as_ref().map(|c| (c.stage, c.round))
    }

    /// The relay carrying `party`'s current connection, if any.
    pub fn relay(&self, party: &str) -> Option<&str> {
        self.core.relays.get(party).map(String::as_str)
    }

    /// The certificate (DER) `party` presented on its current connection.
    pub fn certificate(&self, party: &str) -> &[u8] {
        self.core.connected.get(party).map(|c| &c[..]).unwrap_or_default()
    }

    /// Starts round `round`'s record; drops and stage timings go into it.
    pub fn begin_round(&mut self, round: u32) {
        self.core.record = Some(RoundRecord {
            round,
            metrics: Default::default(),
            participants: Vec::new(),
            dropped: BTreeMap::new(),
            completed_at: 0,
            roles: BTreeMap::new(),
        });
    }

    /// The record of the round in progress.
    pub fn record(&mut self) -> Option<&mut RoundRecord> {
        self.core.record.as_mut()
    }

    /// Records that `party` contributed to `round`.
    pub fn contributed(&mut self, party: &str, round: u32) {
        if let Some(st) = self.core.parties.get_mut(party) {
            st.last_round = round;
            self.core.changed.insert(party.to_owned());
        }
    }

    /// Excludes `party` from the rest of the job (e.g. another architecture).
    pub fn exclude(&mut self, party: &str, reason: &str) {
        let reason = format!("{reason}{}", through_relay(&self.core.relays, party));
        self.core.set_party(party, PartyState::Failed, Some(reason.clone()));
        if let Some(rec) = self.core.record.as_mut() {
            rec.dropped.insert(party.to_owned(), reason);
        }
    }

    /// Sends tasks for `stage` of `round` and collects the answers: each
    /// `(recipients, body)` pair is one task shared by its recipients.
    /// Recipients that are not connected are dropped at once; with
    /// [`Quorum::JobMinimum`] the job fails if fewer than `parties.min` remain.
    pub fn collect(&mut self, stage: Stage, round: u32, tasks: Vec<(Vec<String>, TaskBody)>, quorum: Quorum) {
        let core = &mut *self.core;
        let task_id = core.next_task_id;
        core.next_task_id += 1;
        let mut waiting = BTreeSet::new();
        let mut sends = Vec::with_capacity(tasks.len());
        for (to, body) in tasks {
            let mut live = Vec::with_capacity(to.len());
            for p in to {
                if core.connected.contains_key(&p) {
                    waiting.insert(p.clone());
                    live.push(p);
                } else {
                    let what = format!("{stage}: not connected");
                    core.set_party(&p, PartyState::Dropped, Some(format!("round {round} {what}")));
                    if let Some(rec) = core.record.as_mut() {
                        rec.dropped.entry(p).or_insert(what);
                    }
                }
            }
            if !live.is_empty() {
                let task = Arc::new(Task { job_id: core.job_id.clone(), round, task_id, body });
                sends.push(Output::Task { to: live, stage, task });
            }
        }
        if quorum == Quorum::JobMinimum && core.below_min(stage, round, waiting.len()) {
            return;
        }
        core.out.extend(sends);
        core.collection = Some(Collection {
            stage,
            round,
            task_id,
            started: core.now,
            deadline: core.now + core.spec.timeouts.round_secs * 1000,
            quorum_at: None,
            waiting,
            answered: BTreeSet::new(),
            quorum,
        });
    }

    /// Fails the job when `answered` is below `parties.min`; true if it did.
    pub fn below_min(&mut self, stage: Stage, round: u32, answered: usize) -> bool {
        self.core.below_min(stage, round, answered)
    }

    /// Persists a checkpoint; the machine hears [`JobMachine::on_persisted`]
    /// once it is durable. A round record takes the round's place in the
    /// job's history.
    pub fn checkpoint(
        &mut self,
        round: u32,
        model: Option<Arc<Parameters>>,
        record: Option<RoundRecord>,
        state: State,
    ) {
        let core = &mut *self.core;
        if core.phase == Phase::Done {
            return;
        }
        if record.is_some() {
            core.rounds_completed = round;
        }
        core.phase = Phase::Persisting { round };
        core.out.push_back(Output::Checkpoint(Checkpoint { round, model, record, state }));
    }

    /// Takes the round record (to checkpoint it).
    pub fn take_record(&mut self) -> Option<RoundRecord> {
        self.core.record.take()
    }

    /// Ends the job.
    pub fn finish(&mut self, state: JobState, error: Option<String>) {
        self.core.finish(state, error);
    }

    /// Whether the job has ended.
    pub fn is_done(&self) -> bool {
        self.core.phase == Phase::Done
    }
}
