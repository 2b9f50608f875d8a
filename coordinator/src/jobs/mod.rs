//! Job kinds: what the coordinator does with a job of each kind. A kind is a
//! [`JobKind`] registered by name with [`crate::plugins::Plugins`]; it
//! checks its specs at submission and builds one [`JobMachine`] per job,
//! which the session drives, or runs as a pipeline that starts jobs of
//! other kinds ([`Driver`]). The built-in kinds are `train`, `evaluate` and
//! `incremental`; `docs/architecture.md` shows how to add one.

use std::sync::Arc;

use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;

use crate::plugins::Plugins;
use crate::session::{JobMachine, Start};

mod central_dp;
pub mod evaluate;
pub mod guard;
mod protocol;
pub mod train;

/// What a job kind's factory gets.
pub struct Setup<'a> {
    /// The job's id.
    pub job_id: &'a str,
    /// Its validated spec.
    pub spec: &'a Arc<JobSpec>,
    /// Fresh, or resuming from a checkpoint.
    pub start: &'a Start,
    /// The strategies, protocols and kinds of this build.
    pub plugins: &'a Plugins,
    /// The federation's limits.
    pub limits: &'a Limits,
}

/// A job kind on the coordinator's side.
pub trait JobKind: Send + Sync + 'static {
    /// The name in `kind = "..."` and in party policies.
    fn name(&self) -> &'static str;

    /// Checks a spec of this kind when it is submitted, beyond the spec's own
    /// validation (e.g. that its strategy exists). Errors are `field: message`.
    fn check(&self, spec: &JobSpec, plugins: &Plugins) -> Result<(), String>;

    /// The state machine of one job.
    fn machine(&self, setup: &Setup<'_>) -> Result<Box<dyn JobMachine>, String>;

    /// How the coordinator runs jobs of this kind.
    fn driver(&self) -> Driver {
        Driver::Session
    }
}

/// How a job kind runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Driver {
    /// One session with the parties, driving the kind's [`JobMachine`].
    Session,
    /// An incremental pipeline (`crate::pipeline`): it talks to the parties
    /// only through the train and evaluate jobs it starts.
    Pipeline,
}

/// `incremental`: a pipeline that retrains a service's deployed model as
/// new data arrives, gates and deploys (see `docs/incremental.md`).
#[derive(Debug, Clone, Copy, Default)]
pub struct IncrementalKind;

impl JobKind for IncrementalKind {
    fn name(&self) -> &'static str {
        "incremental"
    }

    fn check(&self, spec: &JobSpec, plugins: &Plugins) -> Result<(), String> {
        // Its iterations are train jobs of the same spec.
        plugins.check_strategy(spec)
    }

    fn machine(&self, _: &Setup<'_>) -> Result<Box<dyn JobMachine>, String> {
        Err("an incremental pipeline runs no session of its own".into())
    }

    fn driver(&self) -> Driver {
        Driver::Pipeline
    }
}

/// `train`: federated training for `rounds` rounds.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainKind;

/// `evaluate`: one federated evaluation of an earlier job's model.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvaluateKind;

impl JobKind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }

    fn check(&self, spec: &JobSpec, plugins: &Plugins) -> Result<(), String> {
        plugins.check_strategy(spec)
    }

    fn machine(&self, setup: &Setup<'_>) -> Result<Box<dyn JobMachine>, String> {
        Ok(Box::new(train::Training::new(setup)?))
    }
}

impl JobKind for EvaluateKind {
    fn name(&self) -> &'static str {
        "evaluate"
    }

    fn check(&self, spec: &JobSpec, plugins: &Plugins) -> Result<(), String> {
        plugins.build_strategy(spec).map(drop)
    }

    fn machine(&self, setup: &Setup<'_>) -> Result<Box<dyn JobMachine>, String> {
        Ok(Box::new(evaluate::Evaluation::new(setup)?))
    }
}

/// A session for job `job_id` run by the machine of its kind.
pub fn session(
    job_id: &str,
    spec: Arc<JobSpec>,
    start: Start,
    plugins: &Plugins,
    limits: Limits,
    now: crate::session::Millis,
) -> Result<crate::session::Session, String> {
    let name = spec.kind.as_str();
    let kind = plugins.kind(name).ok_or_else(|| format!("kind: no job kind named {name:?} in this coordinator"))?;
    let setup = Setup { job_id, spec: &spec, start: &start, plugins, limits: &limits };
    let machine = guard::guarded(&format!("job kind {name}"), "machine", || kind.machine(&setup))??;
    Ok(crate::session::Session::new(job_id, spec, machine, &start, limits, now))
}
