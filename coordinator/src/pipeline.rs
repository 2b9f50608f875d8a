//! Incremental learning pipelines (`kind = "incremental"`).
//!
//! A pipeline is bound to a service. It starts from the service's deployed
//! version and loops: count the parties' new labelled rows (an evaluate job
//! on the new batches, so the count goes through the pipeline's aggregation
//! protocol); when the trigger fires, check the version it deployed last
//! time against the one it replaced on those new rows (and roll back if it
//! is worse); train a candidate from the deployed version on all rows (a
//! train job of the pipeline's spec); score candidate and deployed version
//! on the parties' held-out rows (two evaluate jobs); deploy the candidate
//! when it beats the deployed one by `min_delta`.
//!
//! The pipeline talks to parties only through those ordinary jobs, so each
//! party applies its policy and privacy ledger to every one of them: a job
//! a party's budget cannot pay for is refused at the party before its data
//! is touched, and the pipeline pauses with that reason. Deployments are
//! signed by the coordinator under the administrator's grant (see
//! [`confide_proto::deploy::PipelineGrant`]). Every iteration is written to
//! the database as it advances, so `confide job status` shows it and a
//! restarted coordinator resumes the pipeline where it was.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use confide_algorithms::Parameters;
use confide_proto::deploy::{DeployAction, DeploymentRecord, PipelineStep, SignedGrant, spec_sha256};
use confide_proto::jobspec::{JobKind, JobSpec};
use confide_proto::pb;
use confide_proto::pipeline::{IncrementalSpec, PipelineRef, PipelineRows};
use confide_proto::status::{JobState, JobStatus, PipelineIteration};
use tracing::{info, warn};

use crate::Error;
use crate::db::unix_now;
use crate::server::Hub;
use crate::session::{Input, Start};

/// The longest grant a pipeline is started with: 366 days.
const MAX_GRANT_SECS: u64 = 366 * 86_400;

/// Checks the administrator's grant that comes with a submitted pipeline:
/// signed by an admin of this federation, for the pipeline's service,
/// spec (its SHA-256) and architecture. Returns it encoded, for storage.
pub fn check_grant(hub: &Hub, spec: &JobSpec, spec_toml: &str, msg: &pb::SignedGrant) -> Result<Vec<u8>, Error> {
    let inc = spec.incremental.as_ref().ok_or_else(|| Error::InvalidInput("not a pipeline".into()))?;
    let ca = std::fs::read(hub.pki().ca_cert()).map_err(|e| Error::io(&hub.pki().ca_cert(), e))?;
    let g = SignedGrant::verify(msg, &ca, &hub.revocation_list()).map_err(|e| Error::Refused(e.to_string()))?;
    if g.grant.service != inc.service {
        return Err(Error::Refused(format!(
            "the grant is for service {}, the pipeline's is {}",
            g.grant.service, inc.service
        )));
    }
    if g.grant.spec_sha256 != spec_sha256(spec_toml) {
        return Err(Error::Refused("the grant names another spec than the one submitted".into()));
    }
    if g.model != spec.model {
        return Err(Error::Refused("the grant's architecture is not the pipeline's [model] table".into()));
    }
    if g.grant.expires_at <= unix_now() {
        return Err(Error::Refused(format!("the grant expired at {}", g.grant.expires_at)));
    }
    crate::services::grant_still_holds(hub.db(), &inc.service, &g.grant)?;
    // The CLI signs at most 366 days; a longer grant was signed some other
    // way, and delegates for longer than any administrator means to.
    if g.grant.expires_at.saturating_sub(g.grant.issued_at) > MAX_GRANT_SECS {
        return Err(Error::Refused(format!(
            "the grant runs {} s; a grant runs at most 366 days",
            g.grant.expires_at.saturating_sub(g.grant.issued_at)
        )));
    }
    Ok(prost::Message::encode_to_vec(msg))
}

/// Why the pipeline's loop stopped.
enum Stop {
    /// `confide job cancel`.
    Cancelled,
    /// The coordinator is shutting down (its channel closed).
    Gone,
    /// Waiting cannot help (a party refused, the grant expired): the
    /// pipeline pauses with the reason until it is cancelled or the
    /// coordinator restarts.
    Pause(String),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Pause(e.to_string())
    }
}

/// One evaluation's result: rows and the metrics.
struct Scored {
    rows: u64,
    metrics: std::collections::BTreeMap<String, f64>,
    /// The parties whose evaluations were aggregated.
    parties: Vec<String>,
}

/// Why two versions' scores cannot be compared, if they cannot: each must
/// come from the same parties. A party that answered only one of the two
/// evaluations (a dropout, or a party choosing which version to score)
/// would otherwise compare two versions on different rows (found by
/// review).
fn not_comparable(a: &Scored, b: &Scored) -> Option<String> {
    let (mut x, mut y) = (a.parties.clone(), b.parties.clone());
    x.sort();
    y.sort();
    (x != y).then(|| format!("scored by different parties ({} and {})", x.join(", "), y.join(", ")))
}

struct Pipeline {
    hub: Arc<Hub>,
    id: String,
    spec: JobSpec,
    inc: IncrementalSpec,
    grant: SignedGrant,
    inputs: Receiver<crate::server::Routed>,
    /// What the parties spent computing in the current iteration (ms).
    compute_ms: u64,
}

/// Runs pipeline `id` until it ends, is cancelled or the coordinator stops.
pub(crate) fn run(hub: Arc<Hub>, id: String, spec: JobSpec, inputs: Receiver<crate::server::Routed>) {
    let fail = |hub: &Hub, why: String| {
        warn!(job = %id, "pipeline cannot run: {why}");
        let _ = hub.db().set_job_state(&id, JobState::Failed, Some(&why));
    };
    let setup = || -> Result<Pipeline, String> {
        let inc = spec.incremental.clone().ok_or("the spec has no [incremental] table")?;
        let (grant, _, _) = hub.db().pipeline(&id).map_err(|e| e.to_string())?.ok_or("the pipeline has no grant")?;
        let msg: pb::SignedGrant = prost::Message::decode(grant.as_slice()).map_err(|e| format!("grant: {e}"))?;
        let ca = std::fs::read(hub.pki().ca_cert()).map_err(|e| e.to_string())?;
        let grant = SignedGrant::verify(&msg, &ca, &hub.revocation_list()).map_err(|e| e.to_string())?;
        Ok(Pipeline { hub: hub.clone(), id: id.clone(), spec: spec.clone(), inc, grant, inputs, compute_ms: 0 })
    };
    match setup() {
        Ok(mut p) => {
            let _ = hub.db().set_job_state(&id, JobState::Running, None);
            hub.job_changed(&id);
            let end = p.run();
            p.finish(end);
        }
        Err(e) => fail(&hub, e),
    }
    hub.job_changed(&id);
    hub.job_ended(&id);
}

impl Pipeline {
    fn phase(&self, phase: &str, triggered: bool) {
        let _ = self.hub.db().set_pipeline_phase(&self.id, phase, triggered.then(unix_now));
        self.hub.job_changed(&self.id);
    }

    fn save(&self, it: &PipelineIteration) -> Result<(), Stop> {
        self.hub.db().save_iteration(&self.id, it)?;
        self.hub.job_changed(&self.id);
        Ok(())
    }

    fn finish(&mut self, end: Result<(), Stop>) {
        let db = self.hub.db();
        let state = match end {
            Ok(()) => JobState::Succeeded,
            Err(Stop::Cancelled) => JobState::Cancelled,
            Err(Stop::Gone) => return,
            Err(Stop::Pause(why)) => {
                // Paused, not failed: the job stays running (a coordinator
                // restart retries), and says why.
                warn!(job = %self.id, "pipeline paused: {why}");
                let _ = db.set_pipeline_phase(&self.id, &format!("paused: {why}"), None);
                // Wait for a cancellation (or shutdown).
                loop {
                    match self.inputs.recv().map(|r| r.input) {
                        Ok(Input::Cancel) => break,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
                JobState::Cancelled
            }
        };
        // The state first, retried: it alone decides whether a restart
        // resumes the pipeline (the phase is what the status shows), and a
        // pipeline left `running` by a failed write would resume and train
        // on the hospitals' budgets again (found by review).
        if let Err(e) = crate::driver::record_end(db, &self.id, state, None) {
            warn!(job = %self.id, "cannot record the pipeline's end: {e}");
        }
        let _ = db.set_pipeline_phase(&self.id, state.as_str(), None);
    }

    /// Sleeps `d`, or returns early on cancellation.
    fn sleep(&self, d: Duration) -> Result<(), Stop> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.inputs.recv_timeout(left).map(|r| r.input) {
                Ok(Input::Cancel) => return Err(Stop::Cancelled),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(Stop::Gone),
            }
        }
    }

    fn run(&mut self) -> Result<(), Stop> {
        let poll = Duration::from_secs_f64(self.inc.poll_secs);
        loop {
            let done = self.hub.db().iterations(&self.id)?;
            // An iteration a restart interrupted is taken up again.
            let resumed = done.last().filter(|it| it.outcome == "running").cloned();
            let number = resumed.as_ref().map_or(done.len() as u32 + 1, |it| it.iteration);
            if self.inc.max_iterations > 0 && number > self.inc.max_iterations {
                return Ok(());
            }
            if self.grant.grant.expires_at <= unix_now() {
                return Err(Stop::Pause(format!(
                    "the administrator's grant expired at {}",
                    self.grant.grant.expires_at
                )));
            }
            // The grant's administrator, revoked since (a key compromised),
            // starts no further training on the hospitals' budgets.
            if let Err(e) = self.hub.revocation_list().check("the grant's administrator", &self.grant.admin_certificate)
            {
                return Err(Stop::Pause(format!("the administrator's grant no longer holds: {e}")));
            }
            // Nor does it undo an administrator's deployment made since the
            // grant (parties refuse its deployments then).
            crate::services::grant_still_holds(self.hub.db(), &self.inc.service, &self.grant.grant)?;
            let Some(current) = crate::services::current_record(self.hub.db(), &self.inc.service)? else {
                self.phase(&format!("waiting for a first deployment of service {}", self.inc.service), false);
                self.sleep(poll)?;
                continue;
            };
            // Training starts from the deployed model: it must be this
            // pipeline's architecture (an administrator may have deployed
            // another since).
            let deployed_model: Result<confide_algorithms::ModelConfig, _> = toml::from_str(&current.architecture);
            // Nor does it put back a cloud tier an administrator has
            // changed or removed since the grant (its deployments carry
            // the grant's).
            if current.joint != self.grant.grant.joint {
                self.phase(
                    &format!(
                        "waiting: deployment {} of service {} has another cloud tier than the administrator's grant \
                         names (grant the pipeline again to follow it)",
                        current.sequence, self.inc.service
                    ),
                    false,
                );
                self.sleep(poll)?;
                continue;
            }
            if deployed_model.as_ref().ok() != Some(&self.spec.model) {
                self.phase(
                    &format!(
                        "waiting: deployment {} of service {} is not this pipeline's [model] architecture",
                        current.sequence, self.inc.service
                    ),
                    false,
                );
                self.sleep(poll)?;
                continue;
            }
            let mut it = match resumed {
                Some(it) => it,
                None => {
                    self.phase(&format!("waiting for new rows (iteration {number})"), false);
                    let (trigger, new_rows) = match self.trigger(number, &current) {
                        Ok(Some(t)) => t,
                        Ok(None) => {
                            self.sleep(poll)?;
                            continue;
                        }
                        // A count that fails (a party offline, or refusing
                        // it) is retried: nothing has started yet.
                        Err(Stop::Pause(why)) => {
                            self.phase(
                                &format!("waiting for new rows (iteration {number}): the count failed: {why}"),
                                false,
                            );
                            self.sleep(poll.max(Duration::from_secs(1)))?;
                            continue;
                        }
                        Err(other) => return Err(other),
                    };
                    let it = PipelineIteration {
                        iteration: number,
                        trigger,
                        new_rows,
                        outcome: "running".into(),
                        started_at: unix_now(),
                        ..PipelineIteration::default()
                    };
                    self.phase(&format!("iteration {number}: started"), true);
                    self.save(&it)?;
                    it
                }
            };
            let started = Instant::now();
            self.compute_ms = 0;
            match self.iteration(&mut it, current, started) {
                Ok(()) => {}
                Err(Stop::Pause(why)) => {
                    it.outcome = "paused".into();
                    it.gate = if it.gate.is_empty() { why.clone() } else { it.gate.clone() };
                    it.finished_at = unix_now();
                    self.save(&it)?;
                    return Err(Stop::Pause(format!("iteration {}: {why}", it.iteration)));
                }
                Err(other) => return Err(other),
            }
            it.finished_at = unix_now();
            it.compute_ms = Some(self.compute_ms);
            self.save(&it)?;
            info!(job = %self.id, iteration = it.iteration, outcome = %it.outcome, "pipeline iteration done");
        }
    }

    /// Whether iteration `number` should start: its reason and the new rows.
    fn trigger(&mut self, number: u32, current: &DeploymentRecord) -> Result<Option<(String, u64)>, Stop> {
        let (probe, probe_job) = self.evaluate_job(number, current, PipelineRows::New, "count")?;
        let rows = probe.as_ref().map_or(0, |s| s.rows);
        let last = self.hub.db().pipeline(&self.id)?.map_or(0, |(_, _, t)| t);
        let by_rows = self.inc.min_new_rows.is_some_and(|min| rows >= min);
        let by_period = self.inc.period_secs.is_some_and(|p| unix_now() >= last + p);
        Ok(match (by_rows, by_period) {
            (true, _) => Some((
                format!("{rows} new rows (min_new_rows {}; count job {probe_job})", self.inc.min_new_rows.unwrap_or(0)),
                rows,
            )),
            (false, true) => Some((
                format!("period of {} s ({rows} new rows; count job {probe_job})", self.inc.period_secs.unwrap_or(0)),
                rows,
            )),
            _ => {
                // A count that triggers nothing is not kept: a pipeline polls
                // for days, and each count is a job with a model file.
                self.hub.db().forget_job(&probe_job, self.hub.models_dir())?;
                None
            }
        })
    }

    fn iteration(
        &mut self,
        it: &mut PipelineIteration,
        current: DeploymentRecord,
        started: Instant,
    ) -> Result<(), Stop> {
        let n = it.iteration;
        let mut deployed = current;
        // 1. The version this pipeline deployed last, on the batch that came
        //    after it, against the version it replaced.
        if self.inc.rollback && it.check.is_empty() && it.candidate_job.is_empty() {
            it.check = self.post_deployment_check(n, &mut deployed)?;
            self.save(it)?;
        }
        // 2. A candidate, trained from the deployed version on all rows. Its
        //    id is recorded before the job exists, so that a restart in
        //    between finds it (and submits it under that id if it never
        //    started), never a second training of the iteration beside an
        //    orphan one (found by review).
        let recorded = !it.candidate_job.is_empty();
        if !recorded || !self.job_exists(&it.candidate_job)? {
            self.phase(&format!("iteration {n}: training"), false);
            let spec = self.child(JobKind::Train, n, PipelineRows::All, &deployed.job_id)?;
            if !recorded {
                it.candidate_job = crate::server::new_job_id();
                self.save(it)?;
                fault_point("pipeline-candidate-recorded");
            }
            self.submit_as(&it.candidate_job, spec, &deployed)?;
        }
        let trained = self.wait(&it.candidate_job)?;
        if trained.state != JobState::Succeeded {
            return Err(Stop::Pause(format!(
                "training job {} {}: {}",
                it.candidate_job,
                trained.state.as_str(),
                refusals(&trained)
            )));
        }
        let candidate_round = trained.model.as_ref().map_or(0, |m| m.round);
        it.candidate_round = candidate_round;
        let history = self.hub.db().job_status(&it.candidate_job, true)?.history;
        self.compute_ms += history.iter().filter_map(|r| r.metrics.get("train_ms_max")).sum::<f64>().round() as u64;
        // A coordinator killed after it deployed this candidate but before
        // it recorded so finds the candidate deployed (the deployment is on
        // record first): the iteration is deployed, not gated again against
        // the candidate itself and deployed a second time (found by review).
        if deployed.action == DeployAction::Deploy
            && deployed.job_id == it.candidate_job
            && deployed.round == candidate_round
            && let Some(step) = deployed.pipeline.as_ref().filter(|p| p.job == self.id && p.iteration == n)
        {
            it.gate = step.reason.clone();
            it.deployed_sequence = Some(deployed.sequence);
            it.outcome = "deployed".into();
            info!(job = %self.id, iteration = n, sequence = deployed.sequence, "the candidate was deployed before a restart");
            return Ok(());
        }
        // 3. The gate, on the held-out rows.
        self.phase(&format!("iteration {n}: evaluating the candidate"), false);
        let candidate =
            DeploymentRecord { job_id: it.candidate_job.clone(), round: candidate_round, ..deployed.clone() };
        let cand = self.evaluate(n, &candidate, PipelineRows::All, "gate candidate")?;
        let dep = self.evaluate(n, &deployed, PipelineRows::All, "gate deployed")?;
        let (Some(cand), Some(dep)) = (cand, dep) else {
            return Err(Stop::Pause("the parties hold no held-out rows to gate on".into()));
        };
        let metric = &self.inc.metric;
        let c = self.metric(&cand)?;
        let d = self.metric(&dep)?;
        it.candidate_metric = Some(c);
        it.deployed_metric = Some(d);
        if let Some(why) = not_comparable(&cand, &dep) {
            it.gate = format!("refused: the candidate and the deployed version were {why}");
            it.outcome = "kept".into();
            return Ok(());
        }
        let gain = self.inc.improvement(c, d);
        if gain < self.inc.min_delta {
            it.gate =
                format!("refused: {metric} {c:.4} vs deployed {d:.4} ({gain:+.4} < min_delta {})", self.inc.min_delta);
            it.outcome = "kept".into();
            return Ok(());
        }
        it.gate =
            format!("passed: {metric} {c:.4} vs deployed {d:.4} ({gain:+.4} >= min_delta {})", self.inc.min_delta);
        // 4. Deploy.
        self.phase(&format!("iteration {n}: deploying"), false);
        let mut record = crate::services::next_record(
            &self.hub,
            &self.inc.service,
            &it.candidate_job,
            candidate_round,
            &self.signer()?,
            &self.grant.grant,
        )?;
        record.pipeline = Some(self.step(n, it.gate.clone()));
        let seq = record.sequence;
        let (_, msg) = crate::services::deploy_by_pipeline(&self.hub, record, self.grant.clone())?;
        fault_point("pipeline-deployed");
        self.hub.deployed(msg);
        it.deployed_sequence = Some(seq);
        it.trigger_to_deploy_ms = Some(started.elapsed().as_millis() as u64);
        it.outcome = "deployed".into();
        info!(job = %self.id, iteration = n, service = %self.inc.service, sequence = seq, "pipeline deployed a new version");
        Ok(())
    }

    /// Compares the version this pipeline deployed with the one it
    /// replaced, on the new rows; rolls back when it is worse.
    fn post_deployment_check(&mut self, n: u32, deployed: &mut DeploymentRecord) -> Result<String, Stop> {
        // Rolled back already in this iteration (a restart came before the
        // check was recorded): its reason, not a second check.
        if deployed.action == DeployAction::Rollback
            && let Some(step) = deployed.pipeline.as_ref().filter(|p| p.job == self.id && p.iteration == n)
        {
            return Ok(step.reason.clone());
        }
        let mine =
            deployed.pipeline.as_ref().is_some_and(|p| p.job == self.id) && deployed.action == DeployAction::Deploy;
        if !mine {
            return Ok(String::new());
        }
        let Some(previous) = crate::services::previous_record(self.hub.db(), &self.inc.service)? else {
            return Ok(String::new());
        };
        self.phase(&format!("iteration {n}: checking deployment {} on the new rows", deployed.sequence), false);
        let now = self.evaluate(n, deployed, PipelineRows::New, "check deployed")?;
        let before = self.evaluate(n, &previous, PipelineRows::New, "check previous")?;
        let (Some(now), Some(before)) = (now, before) else { return Ok("no new rows to check on".into()) };
        if let Some(why) = not_comparable(&now, &before) {
            return Ok(format!("deployment {} not checked: the two versions were {why}", deployed.sequence));
        }
        let (m_now, m_before) = (self.metric(&now)?, self.metric(&before)?);
        let metric = &self.inc.metric;
        if self.inc.improvement(m_now, m_before) >= 0.0 {
            return Ok(format!(
                "deployment {} holds on {} new rows: {metric} {m_now:.4} vs previous {m_before:.4}",
                deployed.sequence, now.rows
            ));
        }
        let why = format!(
            "deployment {} dropped below the previous version on {} new rows: {metric} {m_now:.4} vs {m_before:.4}; rolled back",
            deployed.sequence, now.rows
        );
        let mut record = crate::services::rollback_for_pipeline(&self.hub, &self.inc.service, &self.signer()?)?;
        record.pipeline = Some(self.step(n, why.clone()));
        let (_, msg) = crate::services::deploy_by_pipeline(&self.hub, record.clone(), self.grant.clone())?;
        self.hub.deployed(msg);
        warn!(job = %self.id, iteration = n, service = %self.inc.service, "{why}");
        *deployed = record;
        Ok(why)
    }

    fn signer(&self) -> Result<String, Stop> {
        let signer = confide_proto::deploy::coordinator_signer(self.hub.pki());
        Ok(signer.map_err(|e| Stop::Pause(format!("the coordinator's signing key: {e}")))?.2)
    }

    fn step(&self, iteration: u32, reason: String) -> PipelineStep {
        PipelineStep { job: self.id.clone(), spec_sha256: self.grant.grant.spec_sha256.clone(), iteration, reason }
    }

    fn metric(&self, s: &Scored) -> Result<f64, Stop> {
        s.metrics.get(&self.inc.metric).copied().ok_or_else(|| {
            let known: Vec<&str> = s.metrics.keys().map(String::as_str).collect();
            Stop::Pause(format!(
                "incremental.metric: the evaluation reports no {:?} (it reports {})",
                self.inc.metric,
                known.join(", ")
            ))
        })
    }

    /// The model of a deployed version.
    fn version(&self, r: &DeploymentRecord) -> Result<Parameters, Stop> {
        let v =
            self.hub.db().model_version(&r.job_id, r.round)?.ok_or_else(|| {
                Stop::Pause(format!("the model of job {} round {} is no longer kept", r.job_id, r.round))
            })?;
        let bytes = std::fs::read(&v.path).map_err(|e| Error::io(&v.path, e))?;
        Ok(Parameters::from_safetensors(&bytes).map_err(Error::from)?)
    }

    /// A train or evaluate job of iteration `n`, from the pipeline's spec.
    fn child(&self, kind: JobKind, n: u32, rows: PipelineRows, from_job: &str) -> Result<JobSpec, Stop> {
        let mut raw = self.spec.to_raw();
        let what = match (&kind, rows) {
            (JobKind::Train, _) => "train",
            (_, PipelineRows::New) => "new rows",
            _ => "gate",
        };
        raw.name = format!("{} it{n} {what}", self.spec.name).chars().take(100).collect();
        raw.kind = kind.as_str().to_owned();
        raw.incremental = None;
        raw.from_job = Some(from_job.to_owned());
        raw.pipeline =
            Some(PipelineRef { job: self.id.clone(), iteration: n, service: self.inc.service.clone(), rows });
        if kind == JobKind::Evaluate {
            raw.rounds = 1;
            // An evaluation reveals metrics, never updates: DP applies to
            // the training jobs.
            raw.dp = None;
        }
        raw.into_spec(self.hub.limits(), self.hub.plugins().protocols()).map_err(|errors| {
            let msgs: Vec<String> = errors.into_iter().map(|(f, m)| format!("{f}: {m}")).collect();
            Stop::Pause(format!("the pipeline's {} job spec is invalid: {}", kind.as_str(), msgs.join("; ")))
        })
    }

    fn submit(&self, spec: JobSpec, from: &DeploymentRecord) -> Result<String, Stop> {
        let id = crate::server::new_job_id();
        self.submit_as(&id, spec, from)?;
        Ok(id)
    }

    /// Starts a step from the model of version `from` under an id chosen
    /// (and recorded) beforehand. The version's round is recorded with the
    /// job, so that a restart before its first checkpoint starts it from
    /// that model again, not from its job's newest.
    fn submit_as(&self, id: &str, spec: JobSpec, from: &DeploymentRecord) -> Result<(), Stop> {
        let model = self.version(from)?;
        self.hub.db().insert_job(id, &spec, Some(from.round))?;
        crate::server::log_start(id, &spec, Some(from.round));
        crate::server::spawn_job(&self.hub, id.to_owned(), spec, Start::Fresh { model: Some(model) })?;
        Ok(())
    }

    /// Whether a job of this id was ever submitted.
    fn job_exists(&self, id: &str) -> Result<bool, Stop> {
        Ok(self.hub.db().job_state(id)?.is_some())
    }

    /// Waits for job `id` to end; a cancellation of the pipeline cancels it.
    fn wait(&self, id: &str) -> Result<JobStatus, Stop> {
        loop {
            let st = self.hub.db().job_status(id, false)?;
            if st.state.is_terminal() {
                return Ok(st);
            }
            match self.inputs.recv_timeout(Duration::from_millis(10)).map(|r| r.input) {
                Ok(Input::Cancel) => {
                    self.hub.cancel(id);
                    return Err(Stop::Cancelled);
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(Stop::Gone),
            }
        }
    }

    /// Evaluates `version` on `rows`; `None` when the parties hold no such rows.
    fn evaluate(
        &mut self,
        n: u32,
        version: &DeploymentRecord,
        rows: PipelineRows,
        what: &str,
    ) -> Result<Option<Scored>, Stop> {
        Ok(self.evaluate_job(n, version, rows, what)?.0)
    }

    /// [`Self::evaluate`], with the evaluation job's id.
    fn evaluate_job(
        &mut self,
        n: u32,
        version: &DeploymentRecord,
        rows: PipelineRows,
        what: &str,
    ) -> Result<(Option<Scored>, String), Stop> {
        let spec = self.child(JobKind::Evaluate, n, rows, &version.job_id)?;
        let id = self.submit(spec, version)?;
        let st = self.wait(&id)?;
        if st.state != JobState::Succeeded {
            let why = format!("{what} evaluation job {id} {}: {}", st.state.as_str(), refusals(&st));
            if rows == PipelineRows::New && what == "count" {
                // Retried: the failed count is not kept.
                self.hub.db().forget_job(&id, self.hub.models_dir())?;
            }
            return Err(Stop::Pause(why));
        }
        let rows = st.metrics.get("num_examples").copied().unwrap_or(0.0).round() as u64;
        let parties = st.history.last().map(|r| r.participants.clone()).unwrap_or_default();
        Ok(((rows > 0).then_some(Scored { rows, metrics: st.metrics, parties }), id))
    }
}

/// Fault injection for crash tests: the process exits at once at the point
/// that `CONFIDE_COORDINATOR_EXIT_AT` names (nothing else reads it).
fn fault_point(name: &str) {
    if std::env::var("CONFIDE_COORDINATOR_EXIT_AT").is_ok_and(|v| v == name) {
        warn!("fault injection: exiting at {name}");
        std::process::exit(3);
    }
}

/// A failed job's error and the parties' refusals, for the pause reason.
fn refusals(st: &JobStatus) -> String {
    let mut parts: Vec<String> = st.error.iter().cloned().collect();
    for (party, p) in &st.parties {
        if let Some(d) = &p.detail
            && matches!(p.state, confide_proto::status::PartyState::Refused | confide_proto::status::PartyState::Failed)
        {
            parts.push(format!("party {party}: {d}"));
        }
    }
    if parts.is_empty() { "no reason given".into() } else { parts.join("; ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two versions are compared only on the same parties' scores: a party
    /// that answers one of the two evaluations (to steer the gate, or a
    /// dropout) leaves them incomparable, whatever the order of names.
    #[test]
    fn versions_are_compared_only_when_the_same_parties_scored_both() {
        let scored = |parties: &[&str]| Scored {
            rows: 10,
            metrics: Default::default(),
            parties: parties.iter().map(|p| p.to_string()).collect(),
        };
        assert_eq!(not_comparable(&scored(&["a", "b"]), &scored(&["b", "a"])), None);
        let why = not_comparable(&scored(&["a", "b"]), &scored(&["a"])).unwrap();
        assert!(why.contains("different parties (a, b and a)"), "{why}");
    }
}
