//! Runs one job's [`Session`]: on a thread of its own, so its blocking work
//! (aggregation, unmasking, SQLite writes, checkpoint fsyncs) never holds a
//! tokio worker, and a slow job never delays another.
//!
//! The thread feeds the session real events (from the party streams, through
//! a channel) and the time, and performs its outputs: offers and tasks go to
//! the parties' outbound queues, checkpoints are written durably and
//! acknowledged, the end is recorded. Whatever job machine the session
//! runs, this loop is the same.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use confide_algorithms::State;
use confide_proto::jobspec::JobSpec;
use confide_proto::messages::Stage;
use confide_proto::pb::{self, coordinator_message};
use confide_proto::status::{JobState, PartyStatus};
use confide_proto::transfer;
use tracing::{error, info, warn};

use crate::Error;
use crate::db::unix_now;
use crate::jobs::guard::panic_message;
use crate::server::{Hub, Outbound, Routed};
use crate::session::{Checkpoint, Input, Output, Session, Start};

/// A task encoded once for all its recipients: the message (with its bulk
/// header) and the vector's bytes, which every recipient's chunks slice.
#[derive(Debug)]
pub struct EncodedTask {
    /// The task message.
    pub msg: pb::Task,
    /// The bulk vector's bytes, if any.
    pub bytes: Option<Bytes>,
}

/// Encodes tasks, reusing the encoding of a model already encoded (the same
/// global model goes out with every fit and evaluate task of a stage, and
/// with each group of a stage whose parties are configured differently).
#[derive(Default)]
struct Encoder {
    /// The model last encoded, held so that pointer equality means identity.
    last: Option<(Arc<confide_algorithms::Parameters>, transfer::Encoded)>,
}

impl Encoder {
    fn encode(&mut self, task: &confide_proto::messages::Task) -> EncodedTask {
        let (mut msg, bulk) = task.to_wire();
        let Some(bulk) = bulk else { return EncodedTask { msg, bytes: None } };
        let encoded = match (&bulk, &self.last) {
            (transfer::Bulk::Params(p), Some((last, e))) if Arc::ptr_eq(p, last) => e.clone(),
            (transfer::Bulk::Params(p), _) => {
                let e = transfer::encode(task.task_id, &bulk);
                self.last = Some((p.clone(), e.clone()));
                e
            }
            (transfer::Bulk::Words(_), _) => transfer::encode(task.task_id, &bulk),
        };
        let mut header = encoded.header;
        header.transfer_id = task.task_id;
        msg.bulk = Some(header);
        EncodedTask { msg, bytes: Some(encoded.bytes) }
    }
}

/// How long party statuses may wait before they are written (they are for
/// display and resumption; a crash loses at most this much of them).
const PARTY_FLUSH: Duration = Duration::from_millis(250);

/// Records a job's end, retrying a failed write a few times: a job left
/// `running` in the database by one failed write would be resumed at the
/// next start, an administrator's cancellation undone (found by review).
pub(crate) fn record_end(db: &crate::db::Db, id: &str, state: JobState, error: Option<&str>) -> Result<(), Error> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 0;
    loop {
        match db.set_job_state(id, state, error) {
            Ok(()) => return Ok(()),
            Err(e) if attempt + 1 >= ATTEMPTS => return Err(e),
            Err(e) => {
                warn!(job = %id, attempt, "cannot record the job's end yet: {e}");
                std::thread::sleep(Duration::from_millis(100 << attempt));
                attempt += 1;
            }
        }
    }
}

/// Writes a checkpoint durably: temp file, fsync, rename, fsync directory
/// (and the job directory's entry, see below), for the model and (when
/// non-empty) the machine's state.
fn write_checkpoint(
    dir: &Path,
    job: &str,
    cp: &Checkpoint,
) -> Result<(Option<crate::db::SavedModel>, Option<PathBuf>), Error> {
    let job_dir = dir.join(job);
    // The job's directory entry durable too, or a power loss could take the
    // checkpoints with it: made with its parent synced, and synced once more
    // at this process's first checkpoint of the job (an earlier run may have
    // made it and crashed before syncing).
    static SYNCED: std::sync::Mutex<BTreeSet<PathBuf>> = std::sync::Mutex::new(BTreeSet::new());
    let first = SYNCED.lock().map(|mut synced| synced.insert(job_dir.clone())).unwrap_or(true);
    confide_proto::durable::create_dirs(&job_dir, &mut |_| {}).map_err(Error::Io)?;
    if first {
        confide_proto::durable::sync_parent(&job_dir, &mut |_| {}).map_err(Error::Io)?;
    }
    let meta: BTreeMap<String, String> =
        [("confide.job".to_string(), job.to_string()), ("confide.round".to_string(), cp.round.to_string())].into();
    let model = match &cp.model {
        Some(m) => {
            let path = job_dir.join(format!("round-{:05}.safetensors", cp.round));
            let bytes = m.to_safetensors(&meta)?;
            write_durably(&path, &bytes)?;
            let sha256 = confide_proto::deploy::model_sha256(&bytes);
            Some(crate::db::SavedModel { path, sha256, bytes: bytes.len() as u64 })
        }
        None => None,
    };
    let state = if cp.state.is_empty() {
        None
    } else {
        let path = job_dir.join(format!("round-{:05}.state.safetensors", cp.round));
        write_durably(&path, &cp.state.to_safetensors()?)?;
        Some(path)
    };
    let d = std::fs::File::open(&job_dir).map_err(|e| Error::io(&job_dir, e))?;
    d.sync_all().map_err(|e| Error::io(&job_dir, e))?;
    // Keep the previous state too; older ones are no longer referenced.
    // (Model files are versions, kept as `[models] keep_last` says.)
    if cp.round >= 2 {
        let _ = std::fs::remove_file(job_dir.join(format!("round-{:05}.state.safetensors", cp.round - 2)));
    }
    Ok((model, state))
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads a checkpoint's state file.
pub fn read_state(path: Option<&Path>) -> Result<State, Error> {
    match path {
        None => Ok(State::new()),
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            Ok(State::from_safetensors(&bytes)?)
        }
    }
}

/// Round timing for the round record: wall time from the round's first fit
/// task, the CPU time of the job's thread in it (session, aggregation,
/// encoding), and of the whole process (all threads: TLS, decoding too).
struct RoundClock {
    round: u32,
    /// The round's span (child of the job's): log lines while the round
    /// runs carry its number.
    span: tracing::Span,
    started: Instant,
    /// Wall time spent handling inputs and encoding tasks, where the
    /// thread's CPU time cannot be read.
    busy: Duration,
    thread_cpu_at_start: Option<Duration>,
    process_cpu_at_start: Option<Duration>,
}

impl RoundClock {
    fn new(round: u32) -> Self {
        RoundClock {
            round,
            span: tracing::info_span!("round", round),
            started: Instant::now(),
            busy: Duration::ZERO,
            thread_cpu_at_start: thread_cpu(),
            process_cpu_at_start: process_cpu(),
        }
    }

    /// The job thread's CPU time in the round (busy wall time as a fallback).
    fn coordinator(&self) -> Duration {
        match (self.thread_cpu_at_start, thread_cpu()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => self.busy,
        }
    }
}

/// The stage being collected: its span (child of the round's), so that a
/// slow stage shows in the logs with its job and round.
struct StageClock {
    stage: Stage,
    started: Instant,
    span: tracing::Span,
}

impl StageClock {
    fn new(stage: Stage, round: &RoundClock) -> Self {
        let span = tracing::info_span!(parent: &round.span, "stage", stage = %stage);
        StageClock { stage, started: Instant::now(), span }
    }

    /// Logs the stage's duration inside its span.
    fn finish(self) {
        let _entered = self.span.enter();
        info!(ms = self.started.elapsed().as_millis() as u64, "stage finished");
    }
}

/// Nanoseconds on CPU from a `schedstat` file (Linux).
fn schedstat(path: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// CPU time of the calling thread so far (Linux; `None` elsewhere).
pub fn thread_cpu() -> Option<Duration> {
    schedstat("/proc/thread-self/schedstat")
}

/// CPU time (user + system) of this process so far, including threads that
/// have ended, from `/proc/self/stat` (Linux; `None` elsewhere). Its
/// resolution is the kernel's clock tick (10 ms): sums over rounds are
/// exact, a single round's value is not.
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // utime and stime are the 14th and 15th fields, after the parenthesised
    // command name, in ticks of 1/100 s.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The job's thread: runs `session` until the job ends.
pub(crate) fn run_job(
    hub: Arc<Hub>,
    id: String,
    spec: Arc<JobSpec>,
    start: Start,
    rx: Receiver<crate::server::Routed>,
) {
    // Entered for the thread's life: every line the job logs names it.
    let job_span = tracing::info_span!("job", job = %id);
    let _job_entered = job_span.enter();
    let clock = Instant::now();
    let now = || clock.elapsed().as_millis() as u64;
    let mut session = match crate::jobs::session(&id, spec.clone(), start, hub.plugins(), *hub.limits(), now()) {
        Ok(s) => s,
        Err(e) => {
            warn!(job = %id, "cannot run: {e}");
            let _ = hub.db().set_job_state(&id, JobState::Failed, Some(&format!("cannot run: {e}")));
            hub.job_ended(&id);
            return;
        }
    };
    let offer = pb::JobOffer { job_id: id.clone(), spec_toml: spec.to_toml(), dataset: String::new() };
    // Inputs to handle, each party's holding its place in the party's
    // count of unread inputs until it is handled.
    let mut feedback: Vec<Routed> = hub
        .connections()
        .into_iter()
        .map(|c| Input::Connected { party: c.party, certificate: c.certificate, relay: c.relay.map(|(r, _)| r) }.into())
        .collect();
    let mut encoder = Encoder::default();
    let mut round = RoundClock::new(0);
    let mut current_stage: Option<StageClock> = None;
    let mut marked_running = false;
    let mut parties: BTreeMap<String, PartyStatus> = BTreeMap::new();
    let mut last_flush = Instant::now();
    let mut finished = false;
    let handle = |session: &mut Session, input: Input, round: &mut RoundClock, stage: &Option<StageClock>| {
        let _round_entered = round.span.enter();
        let _stage_entered = stage.as_ref().map(|s| s.span.enter());
        let t0 = Instant::now();
        let at = now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.handle(at, input)));
        if let Err(p) = r {
            error!(job = %id, "the job's session panicked: {}", panic_message(p.as_ref()));
            session.fail(format!("internal error: the job's session panicked: {}", panic_message(p.as_ref())));
        }
        round.busy += t0.elapsed();
    };
    loop {
        for routed in std::mem::take(&mut feedback) {
            handle(&mut session, routed.input, &mut round, &current_stage);
        }
        // Watchers read the database: wake them when it changed.
        let mut wrote = false;
        let mut stage_changed = false;
        while let Some(out) = session.poll_output() {
            match out {
                Output::Offer { party } => {
                    let msg = pb::JobOffer { dataset: spec.dataset_for(&party).to_owned(), ..offer.clone() };
                    if !hub.send(&party, Outbound::Msg(coordinator_message::Body::Offer(msg))) {
                        feedback.push(Input::Disconnected(party).into());
                    }
                }
                Output::Task { to, stage, task } => {
                    stage_changed = true;
                    // A later round's first task starts its clock (fit in a
                    // training job; the first stage of other kinds).
                    let new_round = task.round > round.round;
                    if new_round || current_stage.as_ref().is_none_or(|s| s.stage != stage) {
                        if let Some(s) = current_stage.take() {
                            s.finish();
                        }
                        if new_round {
                            round = RoundClock::new(task.round);
                        }
                        current_stage = Some(StageClock::new(stage, &round));
                    }
                    let t0 = Instant::now();
                    let encoded = Arc::new(encoder.encode(&task));
                    for p in to {
                        if !hub.send(&p, Outbound::Task(encoded.clone())) {
                            feedback.push(Input::Disconnected(p).into());
                        }
                    }
                    round.busy += t0.elapsed();
                }
                Output::Checkpoint(mut cp) => {
                    if let Some(s) = current_stage.take() {
                        s.finish();
                    }
                    if let Some(r) = cp.record.as_mut() {
                        r.completed_at = unix_now();
                        r.metrics.insert("round_ms".into(), round.started.elapsed().as_secs_f64() * 1000.0);
                        r.metrics.insert("coordinator_ms".into(), round.coordinator().as_secs_f64() * 1000.0);
                        if let (Some(a), Some(b)) = (round.process_cpu_at_start, process_cpu()) {
                            r.metrics.insert("process_cpu_ms".into(), b.saturating_sub(a).as_secs_f64() * 1000.0);
                        }
                    }
                    wrote = true;
                    // The parties' statuses first: an exclusion the round
                    // made (a party caught cheating) is durable before the
                    // checkpoint that follows it, so a restart between the
                    // two never invites that party back (found by review).
                    parties.extend(session.take_changed_parties());
                    let statuses = if parties.is_empty() {
                        Ok(())
                    } else {
                        hub.db().save_parties(&id, &parties).map(|()| parties.clear())
                    };
                    // No checkpoint without them (it fails as a checkpoint
                    // that cannot be written does).
                    let saved = statuses.and_then(|()| write_checkpoint(hub.models_dir(), &id, &cp)).and_then(
                        |(model, state)| {
                            hub.db().save_checkpoint(
                                &id,
                                cp.round,
                                model.as_ref(),
                                state.as_deref(),
                                cp.record.as_ref(),
                            )?;
                            // Model versions beyond the retention go, file and record.
                            let keep = hub.retention().keep_last;
                            if model.is_some() && keep > 0 {
                                for path in hub.db().forget_model_versions(&id, keep)? {
                                    let _ = std::fs::remove_file(&path);
                                }
                            }
                            Ok(())
                        },
                    );
                    match saved {
                        Ok(()) => {
                            if let Some(r) = &cp.record {
                                info!(job = %id, round = cp.round, metrics = ?r.metrics, dropped = ?r.dropped, "round completed");
                                hub.metrics().round_completed(&id, r);
                            }
                            feedback.push(Input::Persisted { round: cp.round }.into());
                        }
                        Err(e) => {
                            error!(job = %id, round = cp.round, "cannot save the checkpoint: {e}");
                            feedback.push(Input::PersistFailed { round: cp.round, reason: e.to_string() }.into());
                        }
                    }
                }
                Output::Finished { state, error } => {
                    wrote = true;
                    parties.extend(session.take_changed_parties());
                    if let Err(e) = hub.db().save_parties(&id, &parties) {
                        error!(job = %id, "cannot save party statuses: {e}");
                    }
                    parties.clear();
                    if let Err(e) = record_end(hub.db(), &id, state, error.as_deref()) {
                        error!(job = %id, "cannot record the job's end: {e}");
                    }
                    match &error {
                        Some(e) => warn!(job = %id, state = state.as_str(), "job ended: {e}"),
                        None => info!(job = %id, state = state.as_str(), "job ended"),
                    }
                    let closed = pb::JobClosed {
                        job_id: id.clone(),
                        state: pb::JobState::from(state) as i32,
                        reason: error.clone().unwrap_or_default(),
                    };
                    for p in session.parties().keys() {
                        hub.send(p, Outbound::Msg(coordinator_message::Body::Closed(closed.clone())));
                    }
                    finished = true;
                }
            }
        }
        if finished {
            break;
        }
        if session.is_running() && !marked_running {
            marked_running = true;
            wrote = true;
            let _ = hub.db().set_job_state(&id, JobState::Running, None);
        }
        parties.extend(session.take_changed_parties());
        // Statuses are written in batches: every PARTY_FLUSH, when a stage
        // begins, and when nothing is being collected.
        let due = last_flush.elapsed() >= PARTY_FLUSH || stage_changed || session.current_stage().is_none();
        if !parties.is_empty() && due {
            // Kept when the write fails: retried at the next flush, and the
            // next checkpoint, which needs them on disk, fails without them
            // (cleared regardless, an exclusion whose write failed here was
            // lost and the checkpoint after it went ahead: found by a test).
            match hub.db().save_parties(&id, &parties) {
                Ok(()) => parties.clear(),
                Err(e) => error!(job = %id, "cannot save party statuses (kept to retry): {e}"),
            }
            last_flush = Instant::now();
            wrote = true;
        }
        if wrote {
            hub.job_changed(&id);
        }
        if !feedback.is_empty() {
            continue;
        }
        let mut wait = session.next_deadline().map_or(3_600_000, |d| d.saturating_sub(now()));
        if !parties.is_empty() {
            wait = wait.min(PARTY_FLUSH.saturating_sub(last_flush.elapsed()).as_millis() as u64);
        }
        match rx.recv_timeout(Duration::from_millis(wait)) {
            Ok(routed) => feedback.push(routed),
            Err(RecvTimeoutError::Timeout) => feedback.push(Input::Tick.into()),
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // Everything already queued is handled before the next output pass.
        while let Ok(routed) = rx.try_recv() {
            feedback.push(routed);
        }
    }
    hub.job_ended(&id);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with one running job, and a second connection to it
    /// through which a test injects faults (SQLite triggers that refuse
    /// writes), as another process could hold the file.
    fn a_running_job() -> (tempfile::TempDir, crate::db::Db, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confide.db");
        let db = crate::db::Db::open(&path).unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        other.busy_timeout(Duration::from_secs(10)).unwrap();
        other
            .execute(
                "INSERT INTO jobs (id, name, kind, spec_toml, state, privacy_mode, rounds_total, created_at, updated_at)
                 VALUES ('j', 'j', 'train', '', 'running', 'none', 3, 0, 0)",
                [],
            )
            .unwrap();
        (dir, db, other)
    }

    /// Refuses the next `times` writes of a job's state (RAISE(FAIL) keeps
    /// the count's decrement, where ABORT would take it back).
    fn refuse_state_writes(other: &rusqlite::Connection, times: u32) {
        other
            .execute_batch(&format!(
                "CREATE TABLE fault (remaining INTEGER NOT NULL); INSERT INTO fault VALUES ({times});
                 CREATE TRIGGER injected_fault BEFORE UPDATE OF state ON jobs
                 WHEN (SELECT remaining FROM fault) > 0
                 BEGIN UPDATE fault SET remaining = remaining - 1; SELECT RAISE(FAIL, 'injected fault'); END;"
            ))
            .unwrap();
    }

    fn state_of(other: &rusqlite::Connection) -> (String, Option<String>, u32) {
        other
            .query_row("SELECT state, error, (SELECT remaining FROM fault) FROM jobs WHERE id = 'j'", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
    }

    /// A job's end whose first writes fail is recorded by a retry: left
    /// `running`, the job would be resumed at the next start and an
    /// administrator's cancellation undone.
    #[test]
    fn a_jobs_end_is_recorded_by_a_retry_after_failed_writes() {
        let (_dir, db, other) = a_running_job();
        refuse_state_writes(&other, 3);
        record_end(&db, "j", JobState::Cancelled, Some("cancelled by the administrator")).expect("recorded");
        assert_eq!(state_of(&other), ("cancelled".into(), Some("cancelled by the administrator".into()), 0));
    }

    /// Writes that keep failing end in the error (the caller logs it), the
    /// job's row untouched.
    #[test]
    fn a_jobs_end_that_cannot_be_written_is_an_error_after_the_retries() {
        let (_dir, db, other) = a_running_job();
        refuse_state_writes(&other, 100);
        let e = record_end(&db, "j", JobState::Failed, Some("round 2: no quorum")).expect_err("never written");
        assert!(e.to_string().contains("injected fault"), "{e}");
        // Five attempts, each refused once.
        assert_eq!(state_of(&other), ("running".into(), None, 95));
    }
}
