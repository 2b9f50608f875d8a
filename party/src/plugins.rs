//! What a party build knows: trainers, aggregation protocols and job kinds.
//! A researcher's own `confide-party` adds to them (see
//! `examples/custom_trainer.rs`) and calls [`crate::cli::main_with`].

use std::collections::BTreeMap;
use std::sync::Arc;

use confide_algorithms::data::DatasetSource;
use confide_crypto::aggregation::{AggregationProtocol, PartyIdentity, Protocols, StageName};
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;

use crate::session::JobHandler;
use crate::trainers::TrainerFactory;

/// What a job kind's handler is built from (on a blocking thread: building
/// may load the data set).
pub struct JobContext<'a> {
    /// The job.
    pub job_id: &'a str,
    /// Its spec, as this party accepted it.
    pub spec: &'a Arc<JobSpec>,
    /// This party's name.
    pub party: &'a str,
    /// The data set the job uses.
    pub dataset: &'a DatasetSource,
    /// The trainers of this build.
    pub trainers: &'a dyn TrainerFactory,
    /// The aggregation protocols of this build.
    pub protocols: &'a Protocols,
    /// This party's identity, for protocols that sign and verify.
    pub identity: PartyIdentity,
    /// The federation's limits.
    pub limits: &'a Limits,
    /// The fewest parties this party's policy lets it take part with
    /// (`policy.min_parties`); protocols hold every round to it.
    pub min_parties: usize,
    /// The job's reservation in the privacy ledger: a DP job's every
    /// training round goes through it. `None` only for a job without DP
    /// that reserves nothing (an evaluation outside the budget); a DP job
    /// without one is refused.
    pub budget: Option<crate::ledger::RoundGuard>,
    /// Distributed DP: rounds of noise to draw ahead
    /// (`[training] dp_noise_rounds_ahead`).
    pub noise_rounds_ahead: usize,
    /// Whether this party holds the job's data-dependent answers to a
    /// floor ([`crate::session::AnswerFloor`]): the answer held must then
    /// be the one that waits for the rows (a fit answer is not sent ahead
    /// of training).
    pub answers_held: bool,
}

/// A job kind on the party's side: builds the handler of its tasks.
pub trait PartyJobKind: Send + Sync + 'static {
    /// The name in `kind = "..."` and in `policy.job_kinds`.
    fn name(&self) -> &'static str;

    /// The extension stages its tasks may name.
    fn stages(&self) -> &'static [StageName] {
        &[]
    }

    /// The handler of one job's tasks.
    fn handler(&self, cx: JobContext<'_>) -> Result<Box<dyn JobHandler>, String>;
}

/// The trainers, protocols and job kinds of a party build.
#[derive(Clone)]
pub struct PartyPlugins {
    trainers: Option<Arc<dyn TrainerFactory>>,
    protocols: Protocols,
    kinds: BTreeMap<&'static str, Arc<dyn PartyJobKind>>,
}

impl std::fmt::Debug for PartyPlugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartyPlugins")
            .field("custom_trainers", &self.trainers.is_some())
            .field("protocols", &self.protocols)
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for PartyPlugins {
    fn default() -> Self {
        PartyPlugins { trainers: None, protocols: Protocols::default(), kinds: BTreeMap::new() }
            .job_kind(crate::training::TrainingKind::TRAIN)
            .job_kind(crate::training::TrainingKind::EVALUATE)
    }
}

impl PartyPlugins {
    /// The built-in trainers (for the party's `[models]` and threads),
    /// protocols (`none`, `secagg`, `he`) and kinds (`train`, `evaluate`).
    pub fn new() -> Self {
        PartyPlugins::default()
    }

    /// Trains with `factory` instead of the built-in trainers.
    pub fn trainers(mut self, factory: Arc<dyn TrainerFactory>) -> Self {
        self.trainers = Some(factory);
        self
    }

    /// Registers an aggregation protocol.
    pub fn protocol(mut self, protocol: impl AggregationProtocol) -> Self {
        self.protocols = self.protocols.with(protocol);
        self
    }

    /// Registers a job kind.
    pub fn job_kind(mut self, kind: impl PartyJobKind) -> Self {
        self.kinds.insert(kind.name(), Arc::new(kind));
        self
    }

    /// The trainer factory set with [`PartyPlugins::trainers`], if any.
    pub fn trainer_factory(&self) -> Option<&Arc<dyn TrainerFactory>> {
        self.trainers.as_ref()
    }

    /// The aggregation protocols.
    pub fn protocols(&self) -> &Protocols {
        &self.protocols
    }

    /// The job kind `name`.
    pub fn kind(&self, name: &str) -> Option<&Arc<dyn PartyJobKind>> {
        self.kinds.get(name)
    }

    /// Every job kind's name.
    pub fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    /// Every stage a task may name: the built-in ones, the protocols' steps
    /// and the kinds' extension stages.
    pub fn stage_names(&self) -> Vec<&'static str> {
        let mut names = vec!["setup", "fit", "evaluate"];
        for p in self.protocols.names() {
            if let Some(p) = self.protocols.get(p) {
                names.extend(p.stages().iter().map(|s| s.as_str()));
            }
        }
        for k in self.kinds.values() {
            names.extend(k.stages().iter().map(|s| s.as_str()));
        }
        names
    }
}
