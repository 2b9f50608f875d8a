//! The sans-IO session of one job at a party, mirroring the coordinator's.
//!
//! A [`PartySession`] takes the coordinator's tasks and the time and
//! returns results; it never touches a socket or a clock, so a party's
//! behaviour is tested on a virtual clock, and a whole federation can run in
//! one process. The job's kind provides a [`JobHandler`] that answers the
//! tasks (the training kinds: [`crate::training::TrainingHandler`]); the
//! session enforces what holds for every kind:
//!
//! * tasks belong to this job and arrive in order: a replayed or older task
//!   is refused, naming the coordinator;
//! * a coordinator fault a handler detects (a check of the protocol that
//!   failed: a round it should not have started, a survivor set it should
//!   not have sent) ends this party's part in the job: the reason is logged
//!   as `coordinator fault: …`, sent to the coordinator, and every later
//!   task of the job is refused with it, so a malicious coordinator cannot
//!   retry with another trick or hide the fault from the hospital (the
//!   privacy ledger keeps it, so an offer of the job again is refused too);
//! * a handler that panics (a buggy plug-in trainer) ends this party's part
//!   in the job, and every later task is refused with the reason;
//! * a round left open (a protocol step never came) is abandoned after
//!   twice the job's stage deadline, wiping its secrets;
//! * after the job closes, nothing more is done.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};

use confide_proto::messages::{ResultBody, Task, TaskResult};

/// Milliseconds on the driver's clock (real or virtual).
pub type Millis = u64;

/// Why a task was not done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// This party cannot do it (its data, its trainer, a peer at fault): the
    /// reason goes to the coordinator and the job goes on.
    Refused(String),
    /// The coordinator deviated from the protocol: the reason (which check
    /// failed) goes to the coordinator and this party leaves the job.
    CoordinatorFault(String),
}

impl From<String> for TaskError {
    fn from(reason: String) -> Self {
        TaskError::Refused(reason)
    }
}

impl From<confide_crypto::Error> for TaskError {
    /// A protocol error naming the coordinator is a coordinator fault; any
    /// other is a refusal.
    fn from(e: confide_crypto::Error) -> Self {
        match e {
            confide_crypto::Error::PeerMisbehaved { party, reason } if party == "coordinator" => {
                TaskError::CoordinatorFault(reason)
            }
            other => TaskError::Refused(other.to_string()),
        }
    }
}

/// Answers one job's tasks: what a job kind does at a party.
pub trait JobHandler: Send {
    /// Does `task`; the error says why not, and whose fault it is.
    fn on_task(&mut self, task: Task) -> Result<ResultBody, TaskError>;

    /// Whether a round is open (waiting for further protocol steps).
    fn round_open(&self) -> bool {
        false
    }

    /// Forgets the open round and wipes its secrets.
    fn abandon(&mut self) {}

    /// Work to do while the coordinator collects the other parties'
    /// answers (e.g. a protocol's precomputation); called after an answer
    /// sent at once, never after a held one (see [`AnswerFloor`]).
    fn idle_work(&mut self) {}

    /// This party leaves the job over a coordinator fault (`why`): a
    /// handler with a durable record (the privacy ledger) keeps it there,
    /// so that an offer of the job again does not start it afresh. An error
    /// is the record's, for the hospital's log.
    fn leave(&mut self, _why: &str) -> Result<(), String> {
        Ok(())
    }

    /// The coordinator said the job ended (`state`): a handler with a
    /// privacy ledger settles the job's reservation to the rounds it
    /// started (the settled ε when it went down). An error is the
    /// record's, for the hospital's log.
    fn job_ended(&mut self, _state: &str) -> Result<Option<f64>, String> {
        Ok(None)
    }
}

/// An event for the session.
#[derive(Debug)]
pub enum PartyInput {
    /// A task from the coordinator.
    Task(Task),
    /// The job's session ended: the coordinator closed the job, or the
    /// connection it came on ended.
    Closed {
        /// Why (empty when it succeeded).
        reason: String,
        /// How the job ended (`succeeded`, `failed`, `cancelled`) when the
        /// coordinator said so; `None` when the session ended otherwise
        /// (a reconnect: the job may go on).
        ended: Option<String>,
    },
    /// Time passed.
    Tick,
    /// The last answer went out; the handler may work ahead.
    Idle,
}

/// What the driver must do.
#[derive(Debug)]
pub enum PartyOutput {
    /// Send this result.
    Result(TaskResult),
    /// Tell the coordinator the task failed.
    Failed {
        /// The task.
        task_id: u64,
        /// Why.
        reason: String,
    },
    /// Something the hospital should see in its log.
    Note(String),
}

/// One job at this party.
pub struct PartySession {
    job_id: String,
    handler: Box<dyn JobHandler>,
    idle_after: Millis,
    last_task: Option<(u64, u32)>,
    aborted: Option<String>,
    idle_deadline: Option<Millis>,
    closed: bool,
    out: VecDeque<PartyOutput>,
    /// Which answers are held, and until how long after their task was
    /// taken up, so that how long the rows took to train on or evaluate
    /// does not show.
    answer_floor: Option<AnswerFloor>,
    /// Answers held, with when they go out.
    held: Vec<(Millis, PartyOutput)>,
}

/// The answers a DP job holds to a floor: a stage's, results and refusals
/// alike (the longer of a training job's `answer_fit_after_secs` and the
/// party's `policy.min_answer_after_secs`; the policy's for a DP
/// evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerFloor {
    /// The stage whose answers are held (`fit` or `evaluate`): the one
    /// whose time depends on the rows.
    pub stage: &'static str,
    /// How long after its task was taken up an answer goes out, at the
    /// earliest.
    pub after: Millis,
}

/// What the coordinator is told of a trainer's panic: its message can
/// quote the rows (a value, a label out of range), so it stays in this
/// party's log, as a DP job's set-up failures do.
pub(crate) const PANICKED: &str = "its trainer panicked (the message is in this party's log)";

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl PartySession {
    /// A session for `job_id` answered by `handler`; an open round is
    /// abandoned after `idle_after` ms without a task.
    pub fn new(job_id: &str, handler: Box<dyn JobHandler>, idle_after: Millis) -> Self {
        PartySession {
            job_id: job_id.to_owned(),
            handler,
            idle_after,
            last_task: None,
            aborted: None,
            idle_deadline: None,
            closed: false,
            out: VecDeque::new(),
            answer_floor: None,
            held: Vec::new(),
        }
    }

    /// Holds each fit answer until `after` ms from when its task is taken up
    /// (`handle`'s `now`): the tests' shorthand for [`Self::with_answer_floor`].
    #[cfg(test)]
    pub(crate) fn with_fit_answer_after(self, after: Option<Millis>) -> Self {
        self.with_answer_floor(after.map(|after| AnswerFloor { stage: "fit", after }))
    }

    /// Holds the answers `floor` names (see [`AnswerFloor`]).
    pub fn with_answer_floor(mut self, floor: Option<AnswerFloor>) -> Self {
        self.answer_floor = floor;
        self
    }

    /// Which answers are held, and how long from when their task is taken up.
    pub fn answer_floor(&self) -> Option<AnswerFloor> {
        self.answer_floor
    }

    /// The next queued output.
    pub fn poll_output(&mut self) -> Option<PartyOutput> {
        self.out.pop_front()
    }

    /// When the session next needs a [`PartyInput::Tick`].
    pub fn next_deadline(&self) -> Option<Millis> {
        self.held.iter().map(|(t, _)| *t).chain(self.idle_deadline).min()
    }

    /// Whether an answer is held (see [`AnswerFloor`]). The driver owes
    /// the floor this: it takes no new task until the held answers have
    /// gone out (a job's close excepted), so that no training runs past a
    /// held answer's floor and a fit's floor starts after the answer
    /// before it. (Answers to tasks handled while holding anyway wait
    /// behind the held ones, a backstop.)
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether the job has closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Feeds one event at time `now`.
    pub fn handle(&mut self, now: Millis, input: PartyInput) {
        if self.closed {
            return;
        }
        // Held answers that are due go out, in the order they were made.
        let mut released = false;
        while let Some(i) = self.held.iter().position(|(t, _)| *t <= now) {
            let (_, out) = self.held.remove(i);
            self.out.push_back(out);
            released = true;
        }
        if released && matches!(input, PartyInput::Idle) {
            // The answer goes out first; idle work would delay it.
            return;
        }
        let queued = self.out.len();
        self.handle_input(now, input);
        // While a fit's answer is held, every later answer waits behind it:
        // one sent at once (a replayed task refused, a step answered or
        // refused) would tell when training ended, or whether it failed.
        // Notes stay in this party's log and go at once.
        if let Some(last) = self.held.iter().map(|(t, _)| *t).max() {
            let later: Vec<PartyOutput> = self.out.drain(queued..).collect();
            for out in later {
                match out {
                    PartyOutput::Note(_) => self.out.push_back(out),
                    other => self.held.push((last, other)),
                }
            }
        }
    }

    /// The handler panicked: the round is abandoned, the hospital's log
    /// gets the message, and this party leaves the job for good, recorded
    /// as a coordinator fault's leaving is (an offer of it again is
    /// refused: the same plug-in would panic again, mid-round).
    fn left_after_panic(&mut self, p: &(dyn std::any::Any + Send)) {
        self.handler.abandon();
        let detail = panic_message(p);
        self.out.push_back(PartyOutput::Note(format!("leaving the job: its trainer panicked: {detail}")));
        self.aborted = Some(PANICKED.into());
        if let Err(e) = self.handler.leave(PANICKED) {
            self.out.push_back(PartyOutput::Note(format!("could not record leaving the job: {e}")));
        }
    }

    fn handle_input(&mut self, now: Millis, input: PartyInput) {
        match input {
            PartyInput::Task(task) => self.on_task(now, task),
            PartyInput::Closed { reason, ended } => {
                if let Some(state) = ended {
                    match self.handler.job_ended(&state) {
                        Ok(Some(spent)) => self.out.push_back(PartyOutput::Note(format!(
                            "the job ended ({state}) before its last round: its privacy ledger reservation is \
                             settled to ε = {spent:.4}, what the rounds it started cost"
                        ))),
                        Ok(None) => {}
                        Err(e) => self.out.push_back(PartyOutput::Note(format!(
                            "the job ended ({state}); its privacy ledger reservation stays whole: {e}"
                        ))),
                    }
                }
                self.handler.abandon();
                self.held.clear();
                self.closed = true;
                self.idle_deadline = None;
                if !reason.is_empty() {
                    self.out.push_back(PartyOutput::Note(format!("job closed: {reason}")));
                }
            }
            PartyInput::Idle => {
                // Not while an answer is held: its floor must not wait for
                // the idle work (the tick that sends it could not come).
                if self.aborted.is_none() && self.held.is_empty() {
                    let handler = &mut self.handler;
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| handler.idle_work())) {
                        self.left_after_panic(p.as_ref());
                    }
                }
            }
            PartyInput::Tick => {
                if self.idle_deadline.is_some_and(|d| now >= d) {
                    self.idle_deadline = None;
                    if self.handler.round_open() {
                        self.handler.abandon();
                        self.out.push_back(PartyOutput::Note(format!(
                            "abandoned the open round after {} s without a task from the coordinator; its secrets are wiped",
                            self.idle_after / 1000
                        )));
                    }
                }
            }
        }
    }

    fn on_task(&mut self, now: Millis, task: Task) {
        let task_id = task.task_id;
        let refuse =
            |out: &mut VecDeque<PartyOutput>, reason: String| out.push_back(PartyOutput::Failed { task_id, reason });
        if task.job_id != self.job_id {
            return refuse(
                &mut self.out,
                format!("coordinator fault: a task of job {} reached job {}", task.job_id, self.job_id),
            );
        }
        if let Some(reason) = &self.aborted {
            return refuse(&mut self.out, format!("this party left the job: {reason}"));
        }
        if let Some((last_id, last_round)) = self.last_task {
            if task_id <= last_id {
                return refuse(
                    &mut self.out,
                    format!("coordinator fault: task {task_id} replayed or out of order (the last was {last_id})"),
                );
            }
            if task.round < last_round {
                return refuse(
                    &mut self.out,
                    format!("coordinator fault: a round {} task after round {last_round}", task.round),
                );
            }
        }
        self.last_task = Some((task_id, task.round));
        let (job_id, round) = (task.job_id.clone(), task.round);
        // A fit's (or a DP evaluation's) answer waits for the floor whether
        // it is a result or a refusal: an early refusal would say that
        // training failed, and when (both are about the rows under DP).
        let floor = self.answer_floor;
        let held_task = floor.filter(|f| task.body.stage_name() == f.stage).map(|f| f.after);
        // From when the task is taken up: the driver takes none while an
        // answer is held (see `holding`), so a fit's floor starts after the
        // answer before it went out, whatever that one's training took.
        let floor_base = now;
        let handler = &mut self.handler;
        match catch_unwind(AssertUnwindSafe(|| handler.on_task(task))) {
            Ok(Ok(body)) => {
                let hold = held_task.or(floor.filter(|f| body.stage_name() == f.stage).map(|f| f.after));
                let out = PartyOutput::Result(TaskResult { job_id, round, task_id, body });
                match hold {
                    Some(after) => self.held.push((floor_base + after, out)),
                    None => self.out.push_back(out),
                }
            }
            Ok(Err(TaskError::Refused(reason))) => match held_task {
                Some(after) => self.held.push((floor_base + after, PartyOutput::Failed { task_id, reason })),
                None => refuse(&mut self.out, reason),
            },
            Ok(Err(TaskError::CoordinatorFault(why))) => {
                let reason = format!("coordinator fault: {why}");
                self.handler.abandon();
                self.aborted = Some(reason.clone());
                self.out.push_back(PartyOutput::Note(format!("{reason}; leaving the job")));
                if let Err(e) = self.handler.leave(&reason) {
                    self.out.push_back(PartyOutput::Note(format!("could not record leaving the job: {e}")));
                }
                // A fault found after training (a round message that does
                // not check) would tell when training ended: held too.
                match held_task {
                    Some(after) => self.held.push((floor_base + after, PartyOutput::Failed { task_id, reason })),
                    None => refuse(&mut self.out, reason),
                }
            }
            Err(p) => {
                self.left_after_panic(p.as_ref());
                let reason = format!("this party left the job: {PANICKED}");
                match held_task {
                    Some(after) => self.held.push((floor_base + after, PartyOutput::Failed { task_id, reason })),
                    None => refuse(&mut self.out, reason),
                }
            }
        }
        self.idle_deadline = self.handler.round_open().then_some(now + self.idle_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_proto::messages::{Envelope, SumOf, TaskBody};

    /// Answers aggregation steps; `panic_on` panics; keeps a round open after fit.
    struct Script {
        open: bool,
        abandoned: usize,
        panic_on: Option<&'static str>,
        /// What `leave` was told, shared with the test.
        left: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl JobHandler for Script {
        fn on_task(&mut self, task: Task) -> Result<ResultBody, TaskError> {
            let stage = task.body.stage_name().to_owned();
            if self.panic_on == Some(stage.as_str()) {
                panic!("bug in the plug-in");
            }
            if stage == "secagg-consistency" {
                return Err(TaskError::CoordinatorFault("left this party out of the survivors".into()));
            }
            self.open = stage != "secagg-unmask";
            if stage == "fit" {
                return Ok(ResultBody::Fit { metrics: Default::default(), contribution: Envelope::default() });
            }
            match task.body {
                TaskBody::Evaluate { .. } => {
                    return Ok(ResultBody::Evaluate { num_examples: 0, loss: 0.0, metrics: Default::default() });
                }
                TaskBody::SecureSum { .. } => return Ok(ResultBody::SecureSum { contribution: Envelope::default() }),
                _ => {}
            }
            Ok(ResultBody::Aggregation { stage, message: Envelope::default() })
        }
        fn round_open(&self) -> bool {
            self.open
        }
        fn abandon(&mut self) {
            self.open = false;
            self.abandoned += 1;
        }
        fn leave(&mut self, why: &str) -> Result<(), String> {
            self.left.lock().unwrap().push(why.to_owned());
            Ok(())
        }
        fn job_ended(&mut self, state: &str) -> Result<Option<f64>, String> {
            self.left.lock().unwrap().push(format!("ended: {state}"));
            Ok(Some(1.5))
        }
    }

    fn step(job: &str, round: u32, id: u64, stage: &str) -> PartyInput {
        let body = TaskBody::Aggregation { stage: stage.into(), message: Envelope::default() };
        PartyInput::Task(Task { job_id: job.into(), round, task_id: id, body })
    }

    fn outputs(s: &mut PartySession) -> Vec<PartyOutput> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn session(panic_on: Option<&'static str>) -> PartySession {
        session_recording(panic_on, Default::default())
    }

    fn session_recording(
        panic_on: Option<&'static str>,
        left: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> PartySession {
        PartySession::new("j", Box::new(Script { open: false, abandoned: 0, panic_on, left }), 20_000)
    }

    #[test]
    fn replayed_older_and_foreign_tasks_are_refused_naming_the_coordinator() {
        let mut s = session(None);
        s.handle(0, step("j", 2, 10, "secagg-shares"));
        assert!(matches!(outputs(&mut s)[..], [PartyOutput::Result(_)]));
        for (input, why) in [
            (step("j", 2, 10, "secagg-shares"), "replayed"),
            (step("j", 2, 9, "secagg-shares"), "replayed"),
            (step("j", 1, 11, "secagg-shares"), "a round 1 task after round 2"),
            (step("other", 2, 12, "secagg-shares"), "a task of job other"),
        ] {
            s.handle(0, input);
            let out = outputs(&mut s);
            let [PartyOutput::Failed { reason, .. }] = &out[..] else { panic!("{out:?}") };
            assert!(reason.starts_with("coordinator fault") && reason.contains(why), "{reason}");
        }
    }

    /// A DP job's fit answers wait until the floor after their task
    /// arrived (on the session's clock), whatever training took; other
    /// answers go at once; a held answer dies with the job.
    #[test]
    fn fit_answers_are_held_until_the_floor_and_other_answers_are_not() {
        let mut s = session(None).with_fit_answer_after(Some(5_000));
        s.handle(1_000, step("j", 1, 1, "fit"));
        assert!(outputs(&mut s).is_empty());
        assert_eq!(s.next_deadline(), Some(6_000));
        s.handle(5_999, PartyInput::Tick);
        assert!(outputs(&mut s).is_empty());
        s.handle(6_000, PartyInput::Tick);
        assert!(matches!(outputs(&mut s)[..], [PartyOutput::Result(_)]));
        s.handle(6_100, step("j", 1, 2, "secagg-shares"));
        assert!(matches!(outputs(&mut s)[..], [PartyOutput::Result(_)]));
        s.handle(7_000, step("j", 2, 3, "fit"));
        s.handle(7_001, PartyInput::Closed { reason: String::new(), ended: None });
        s.handle(20_000, PartyInput::Tick);
        assert!(outputs(&mut s).iter().all(|o| !matches!(o, PartyOutput::Result(_))));
    }

    /// A DP evaluation's floor holds its evaluate answers, results and
    /// refusals, and not other stages' (a fit goes at once).
    #[test]
    fn an_evaluations_floor_holds_its_evaluate_answers() {
        let floor = AnswerFloor { stage: "evaluate", after: 5_000 };
        let mut s = session(None).with_answer_floor(Some(floor));
        assert_eq!(s.answer_floor(), Some(floor));
        s.handle(0, step("j", 1, 1, "fit"));
        assert!(matches!(outputs(&mut s)[..], [PartyOutput::Result(_)]), "a fit is not held");
        s.handle(1_000, step("j", 1, 2, "evaluate"));
        assert!(outputs(&mut s).is_empty());
        s.handle(5_999, PartyInput::Tick);
        assert!(outputs(&mut s).is_empty());
        s.handle(6_000, PartyInput::Tick);
        assert!(matches!(outputs(&mut s)[..], [PartyOutput::Result(_)]));
        // The stage's real tasks: an evaluation in the clear, and its
        // secure sum (whose result is a "secure-sum").
        let global = std::sync::Arc::new(confide_algorithms::Parameters::default());
        for (id, body) in [
            (3, TaskBody::Evaluate { global: global.clone() }),
            (4, TaskBody::SecureSum { of: SumOf::Evaluation { global: global.clone() }, round_message: Vec::new() }),
        ] {
            let at = 10_000 * id;
            s.handle(at, PartyInput::Task(Task { job_id: "j".into(), round: 1, task_id: id, body }));
            assert!(outputs(&mut s).is_empty(), "task {id} held");
            s.handle(at + 5_000, PartyInput::Tick);
            assert!(matches!(outputs(&mut s)[..], [PartyOutput::Result(_)]), "task {id} released");
        }
        let mut refusing = PartySession::new("j", Box::new(Fails(|| TaskError::Refused("no rows".into()))), 20_000)
            .with_answer_floor(Some(floor));
        refusing.handle(1_000, step("j", 1, 1, "evaluate"));
        assert!(outputs(&mut refusing).is_empty(), "a refusal is held too");
        refusing.handle(6_000, PartyInput::Tick);
        assert!(matches!(outputs(&mut refusing)[..], [PartyOutput::Failed { .. }]));
    }

    /// Fails every task with the error `make` gives.
    struct Fails(fn() -> TaskError);

    impl JobHandler for Fails {
        fn on_task(&mut self, _: Task) -> Result<ResultBody, TaskError> {
            Err((self.0)())
        }
    }

    /// A session of `handler` whose fit answers wait 5 s.
    fn with_floor(handler: impl JobHandler + 'static) -> PartySession {
        PartySession::new("j", Box::new(handler), 20_000).with_fit_answer_after(Some(5_000))
    }

    /// A fit this party refuses (its training failed: about the rows under
    /// DP) is answered at the floor too, not at once.
    #[test]
    fn a_refused_fit_is_held_until_the_floor_as_a_result_is() {
        let mut s = with_floor(Fails(|| {
            TaskError::Refused("DP-SGD training failed (the reason is in this party's log)".into())
        }));
        s.handle(1_000, step("j", 1, 1, "fit"));
        assert!(outputs(&mut s).is_empty());
        s.handle(5_999, PartyInput::Tick);
        assert!(outputs(&mut s).is_empty());
        s.handle(6_000, PartyInput::Tick);
        assert!(matches!(&outputs(&mut s)[..], [PartyOutput::Failed { reason, .. }] if reason.contains("DP-SGD")));
        // Other refusals go at once.
        s.handle(6_100, step("j", 1, 2, "secagg-shares"));
        assert!(matches!(outputs(&mut s)[..], [PartyOutput::Failed { .. }]));
    }

    /// A fault found in a fit after training (a round message that does
    /// not check) is held to the floor as well: at once, it would tell when
    /// training ended.
    #[test]
    fn a_fit_refused_as_a_coordinator_fault_is_held_too() {
        let mut s = with_floor(Fails(|| {
            TaskError::CoordinatorFault("sent a round bits that the job spec does not give".into())
        }));
        s.handle(1_000, step("j", 1, 1, "fit"));
        assert!(outputs(&mut s).iter().all(|o| matches!(o, PartyOutput::Note(_))), "notes only before the floor");
        s.handle(6_000, PartyInput::Tick);
        assert!(
            matches!(&outputs(&mut s)[..], [PartyOutput::Failed { reason, .. }] if reason.contains("coordinator fault"))
        );
    }

    /// While a fit's answer is held, a later task's answer (a replayed task
    /// refused at once, a step) waits behind it: its arrival would tell
    /// when training ended. In order, at the fit's floor.
    #[test]
    fn answers_after_a_held_fit_wait_behind_it() {
        let mut s = session(None).with_fit_answer_after(Some(5_000));
        s.handle(1_000, step("j", 1, 5, "fit"));
        s.handle(1_200, step("j", 1, 5, "secagg-shares"));
        s.handle(1_300, step("j", 1, 6, "secagg-shares"));
        assert!(outputs(&mut s).is_empty(), "nothing before the floor");
        s.handle(6_000, PartyInput::Tick);
        let out = outputs(&mut s);
        assert!(
            matches!(&out[..], [PartyOutput::Result(r), PartyOutput::Failed { reason, .. }, PartyOutput::Result(_)]
                if r.task_id == 5 && reason.contains("replayed")),
            "{out:?}"
        );
    }

    #[test]
    fn a_panicking_handler_ends_the_party_s_part_in_the_job() {
        let left = std::sync::Arc::default();
        let mut s = session_recording(Some("secagg-masked-input"), std::sync::Arc::clone(&left));
        s.handle(0, step("j", 1, 1, "secagg-masked-input"));
        let out = outputs(&mut s);
        assert!(out.iter().any(
            |o| matches!(o, PartyOutput::Failed { reason, .. } if reason.contains("panicked") && !reason.contains("bug"))
        ));
        assert!(
            out.iter().any(|o| matches!(o, PartyOutput::Note(n) if n.contains("panicked: bug in the plug-in"))),
            "the message is logged here: {out:?}"
        );
        s.handle(0, step("j", 1, 2, "secagg-unmask"));
        let out = outputs(&mut s);
        let [PartyOutput::Failed { reason, .. }] = &out[..] else { panic!("{out:?}") };
        assert!(reason.contains("left the job") && reason.contains("panicked"), "{reason}");
        // Recorded (the ledger keeps it): an offer of the job again is refused.
        assert_eq!(*left.lock().unwrap(), [PANICKED]);
    }

    #[test]
    fn a_coordinator_fault_ends_the_party_s_part_in_the_job_for_good() {
        let left = std::sync::Arc::default();
        let mut s = session_recording(None, std::sync::Arc::clone(&left));
        s.handle(0, step("j", 1, 1, "secagg-shares"));
        outputs(&mut s);
        s.handle(0, step("j", 1, 2, "secagg-consistency"));
        let out = outputs(&mut s);
        // The hospital's log says so, the coordinator is told, the round's secrets are wiped.
        assert!(
            out.iter()
                .any(|o| matches!(o, PartyOutput::Note(n) if n.starts_with("coordinator fault: left this party out"))),
            "{out:?}"
        );
        assert!(out.iter().any(
            |o| matches!(o, PartyOutput::Failed { reason, .. } if reason == "coordinator fault: left this party out of the survivors")
        ));
        assert_eq!(s.next_deadline(), None, "nothing left open");
        // The handler is told, to keep it (the ledger does), so that an
        // offer of the job again is refused.
        assert_eq!(*left.lock().unwrap(), ["coordinator fault: left this party out of the survivors"]);
        // Later rounds are refused with the same reason, whatever they ask.
        for (id, stage) in [(3, "fit"), (4, "secagg-shares")] {
            s.handle(0, step("j", 2, id, stage));
            let out = outputs(&mut s);
            let [PartyOutput::Failed { reason, .. }] = &out[..] else { panic!("{out:?}") };
            assert!(reason.contains("left the job: coordinator fault: left this party out"), "{reason}");
        }
    }

    /// The handler hears that the job ended (to settle its ledger
    /// reservation) only when the coordinator said so, not when the
    /// session ends with its connection; the hospital's log says what was
    /// settled.
    #[test]
    fn only_a_job_the_coordinator_ended_settles_its_reservation() {
        let told = std::sync::Arc::default();
        let mut s = session_recording(None, std::sync::Arc::clone(&told));
        s.handle(0, PartyInput::Closed { reason: String::new(), ended: None });
        assert!(told.lock().unwrap().is_empty(), "a session that ended with its connection");
        let mut s = session_recording(None, std::sync::Arc::clone(&told));
        s.handle(0, PartyInput::Closed { reason: "cancelled".into(), ended: Some("cancelled".into()) });
        assert_eq!(*told.lock().unwrap(), ["ended: cancelled"]);
        let out = outputs(&mut s);
        assert!(
            out.iter().any(|o| matches!(o, PartyOutput::Note(n) if n.contains("settled to ε = 1.5000"))),
            "{out:?}"
        );
        assert!(s.is_closed());
    }

    #[test]
    fn an_open_round_is_abandoned_on_the_virtual_clock() {
        let mut s = session(None);
        s.handle(1_000, step("j", 1, 1, "secagg-shares"));
        outputs(&mut s);
        assert_eq!(s.next_deadline(), Some(21_000));
        s.handle(20_999, PartyInput::Tick);
        assert!(outputs(&mut s).is_empty());
        s.handle(21_000, PartyInput::Tick);
        let out = outputs(&mut s);
        assert!(matches!(&out[..], [PartyOutput::Note(n)] if n.contains("abandoned the open round")), "{out:?}");
        assert_eq!(s.next_deadline(), None);
        // A finished round leaves nothing to time out.
        s.handle(30_000, step("j", 2, 2, "secagg-unmask"));
        outputs(&mut s);
        assert_eq!(s.next_deadline(), None);
        s.handle(40_000, PartyInput::Closed { reason: "cancelled".into(), ended: Some("cancelled".into()) });
        s.handle(40_000, step("j", 3, 3, "secagg-shares"));
        assert!(outputs(&mut s).iter().all(|o| matches!(o, PartyOutput::Note(_))), "a closed job does nothing");
    }
}
