//! The protocol layer: every way the parties' updates can be combined into a
//! model, behind one pair of traits the session layer drives.
//!
//! ```text
//!  coordinator session                 wire (opaque)                party session
//!  AggregationServer                   Envelope {body, bulk}        AggregationClient
//!   begin_round(parties) ── round msg ──▶ (in the fit task) ──────▶  contribute(update) after training
//!   on_message(party, m) ◀── contribution (the fit answer) ◀──────┘
//!   close_stage() ──▶ Step{stage, msgs} ──▶ aggregation task ─────▶  on_step(stage, m) ─┐
//!   on_message(party, m) ◀──────────────── aggregation result ◀───────────────────────┘
//!   close_stage() ──▶ … ──▶ Done(Aggregate::Updates | Aggregate::WeightedSum)
//! ```
//!
//! A protocol is one [`AggregationProtocol`] (a provider, as rustls's
//! `CryptoProvider`) that validates its settings (`[aggregation.NAME]` in a
//! job spec) and builds one [`AggregationServer`] per job at the coordinator
//! and one [`AggregationClient`] per job at each party. Its messages are its
//! own types, encoded by its own module into an [`Envelope`]; the session
//! layer and the transport only carry them. Adding a protocol is a module
//! here plus one line in [`Protocols::builtin`] (or [`Protocols::with`] in a
//! build of your own); `docs/architecture.md` has the recipe.
//!
//! * [`plain`] (`none`): updates in the clear over mutual TLS.
//! * [`secagg`] (`secagg`): SecAgg+; the coordinator learns only the
//!   example-weighted sum.
//! * [`update`]: the encoding of an update into a modular sum (fixed point,
//!   example weight), written once for every protocol that sums.
//! * `he` (`he`, feature `he`): threshold-RLWE homomorphic encryption under
//!   a collective key; the coordinator adds ciphertexts and learns only the
//!   example-weighted sum.
//! * [`sum`]: secure sums of statistics (setup feature sums, evaluation
//!   metrics), so that protocols that hide updates hide these too.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use confide_algorithms::{FitConfig, Parameters};

use crate::Error;
use crate::secagg::protocol::{IdentitySigner, IdentityVerifier};

#[cfg(feature = "he")]
pub mod he;
pub mod plain;
pub mod secagg;
pub mod sum;
pub mod update;

/// The name of one step of a protocol after the fit stage (e.g.
/// `secagg-masked-input`): what job status, drop reasons, stage timings and
/// fault injection call the stage. Constants owned by the protocol's module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageName(&'static str);

impl StageName {
    /// A stage name: lowercase words joined by `-`, unique across protocols
    /// and job kinds (prefix it with the protocol's name).
    pub const fn new(name: &'static str) -> Self {
        StageName(name)
    }

    /// The name.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for StageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A large vector sent after its message in chunks (so that no message
/// exceeds the transport's size limit).
#[derive(Debug, Clone, PartialEq)]
pub enum Bulk {
    /// A model: named f32 tensors.
    Params(Arc<Parameters>),
    /// Raw 32-bit words (a masked vector in Z_{2^b}, packed at b bits when
    /// b < 32: `secagg::packing`; or a protocol's own bytes).
    Words(Vec<u32>),
}

/// A protocol's message as the session layer carries it: the body is the
/// protocol's own encoding of its own message type; at most one bulk vector
/// travels with it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Envelope {
    /// The protocol-encoded message (may be empty).
    pub body: Vec<u8>,
    /// The vector that follows it, if any.
    pub bulk: Option<Bulk>,
}

impl Envelope {
    /// A body without a vector.
    pub fn body(body: Vec<u8>) -> Self {
        Envelope { body, bulk: None }
    }

    /// Encodes a prost message as the body.
    pub fn encode(msg: &impl prost::Message) -> Self {
        Envelope::body(msg.encode_to_vec())
    }

    /// Decodes the body as `T`; a malformed body is `from`'s fault.
    pub fn decode<T: prost::Message + Default>(&self, from: &str, what: &str) -> Result<T, Error> {
        T::decode(self.body.as_slice())
            .map_err(|e| Error::PeerMisbehaved { party: from.to_owned(), reason: format!("malformed {what}: {e}") })
    }
}

/// What the coordinator learns from a round of a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reveals {
    /// Each party's update (plaintext): any strategy can run.
    Updates,
    /// Only Σ nᵢ·(localᵢ − global) and Σ nᵢ over the contributors: only
    /// strategies that aggregate from a weighted sum can run.
    WeightedSum,
}

/// What a protocol may know of the job it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFacts {
    /// Job id (bound into keys, ciphertexts and seeds).
    pub job_id: String,
    /// The parties the spec names, sorted (empty: any connected party may
    /// join). A party refuses a round with anyone else in it.
    pub party_names: Vec<String>,
    /// Most parties a job may have (the federation's limit).
    pub max_parties: usize,
    /// Fewest parties a stage needs.
    pub min_parties: usize,
    /// Most values in a model.
    pub max_values: usize,
    /// Party-level DP with distributed noise: the mechanism every party
    /// derived from the spec (its `dim` is the accounting bound; each round
    /// sets the model's own). Protocols that sum add it to each update.
    pub distributed_dp: Option<confide_dp::ddg::DdgConfig>,
    /// Distributed DP: how many rounds of noise a party draws ahead (at
    /// least 1). The party's own choice of memory against round time
    /// (`[training] dp_noise_rounds_ahead`), not part of the spec.
    pub noise_rounds_ahead: usize,
    /// Distributed DP with adaptive clipping: `distributed_dp.clip` is the
    /// first round's clip; the coordinator moves it each round.
    pub adaptive_clip: Option<confide_dp::ddg::AdaptiveClip>,
}

impl JobFacts {
    /// The facts of job `job_id` without DP: the named parties (sorted
    /// here), the federation's limits on parties and values, and the
    /// fewest parties a stage needs.
    pub fn new(
        job_id: &str,
        mut party_names: Vec<String>,
        max_parties: usize,
        min_parties: usize,
        max_values: usize,
    ) -> Self {
        party_names.sort();
        JobFacts {
            job_id: job_id.to_owned(),
            party_names,
            max_parties,
            min_parties,
            max_values,
            distributed_dp: None,
            noise_rounds_ahead: 1,
            adaptive_clip: None,
        }
    }

    /// Most parties a round can have: the named ones, else the federation's limit.
    pub fn party_bound(&self) -> usize {
        if self.party_names.is_empty() { self.max_parties } else { self.party_names.len() }
    }
}

/// How a hiding protocol's round sum decodes: weighted updates, clipped
/// updates with distributed noise (each weighing 1), or statistics.
pub(crate) enum Decoding {
    Updates(update::WeightedUpdate),
    Noisy(Box<update::NoisyUpdate>),
    Statistics(sum::WideSum),
}

impl Decoding {
    /// The round's result from its decrypted or unmasked sum over
    /// `contributors`; under adaptive clipping also the next round's clip,
    /// from the noisy count (post-processing of the release).
    pub(crate) fn aggregate(
        &self,
        job: &JobFacts,
        sum: &[u32],
        contributors: Vec<String>,
        misbehaved: Vec<(String, String)>,
    ) -> Result<(Aggregate, Option<f64>), Error> {
        Ok(match self {
            Decoding::Updates(encoding) => {
                let (weighted_delta_sum, total_examples, mean_train_loss) = encoding.decode(sum, contributors.len())?;
                let a = Aggregate::WeightedSum {
                    weighted_delta_sum,
                    total_examples,
                    mean_train_loss,
                    misbehaved,
                    contributors,
                };
                (a, None)
            }
            Decoding::Noisy(encoding) => {
                let (weighted_delta_sum, unclipped) = encoding.decode_with_count(sum, contributors.len())?;
                let next_clip = match (job.adaptive_clip, unclipped) {
                    (Some(a), Some(count)) => {
                        let first = job.distributed_dp.map_or(encoding.clip(), |t| t.clip);
                        Some(a.next_clip(first, encoding.clip(), count, contributors.len()))
                    }
                    _ => None,
                };
                let a = Aggregate::WeightedSum {
                    weighted_delta_sum,
                    // Each weighs 1: the strategy's mean divides by the
                    // contributors, which the coordinator knows anyway.
                    total_examples: contributors.len() as f64,
                    mean_train_loss: None,
                    misbehaved,
                    contributors,
                };
                (a, next_clip)
            }
            Decoding::Statistics(encoding) => {
                (Aggregate::Sum { sums: encoding.decode(sum)?, misbehaved, contributors }, None)
            }
        })
    }
}

/// A party's checks on the party list and revocation-list version of a
/// round the coordinator started, shared by the protocols that hide
/// updates: at most the federation's limit, only parties the spec names,
/// at least `need`, and bound to the revocation list this party holds
/// (returned), so a revoked certificate cannot be slipped past it.
pub(crate) fn check_round_parties(
    job: &JobFacts,
    me: &str,
    parties: &[String],
    need: usize,
    round_revocations: u64,
    peers: &dyn PeerVerifier,
) -> Result<u64, Error> {
    let fault = |reason: String| Error::PeerMisbehaved { party: "coordinator".into(), reason };
    if !parties.windows(2).all(|w| w[0] < w[1]) {
        return Err(fault("sent a round's party list that is not sorted and unique".into()));
    }
    if parties.binary_search_by(|p| p.as_str().cmp(me)).is_err() {
        return Err(fault("sent a round without this party".into()));
    }
    if parties.len() > job.max_parties {
        return Err(fault(format!("{} parties in the round; at most {}", parties.len(), job.max_parties)));
    }
    if !job.party_names.is_empty()
        && let Some(p) = parties.iter().find(|p| job.party_names.binary_search(p).is_err())
    {
        return Err(fault(format!("put {p}, which the job spec does not name, in the round")));
    }
    if parties.len() < need {
        return Err(fault(format!(
            "started a round of {} parties; this party takes part in rounds of at least {need} \
             (the job's parties.min, its own policy.min_parties, and never fewer than 3)",
            parties.len()
        )));
    }
    let revocations = peers.revocation_version();
    if round_revocations != revocations {
        return Err(fault(format!(
            "bound the round to revocation list version {round_revocations}; this party has version {revocations}"
        )));
    }
    Ok(revocations)
}

/// Distributed DP: the round's clip, as a party accepts it. Fixed by the
/// spec, or under adaptive clipping the coordinator's `sent` (ε does not
/// depend on it: the noise scales with the clip), within 2^±20 of the
/// spec's first clip.
pub(crate) fn accepted_dp_clip(job: &JobFacts, template: &confide_dp::ddg::DdgConfig, sent: f64) -> Result<f64, Error> {
    if job.adaptive_clip.is_none() {
        return Ok(template.clip);
    }
    if !confide_dp::ddg::AdaptiveClip::in_range(template.clip, sent) {
        return Err(Error::PeerMisbehaved {
            party: "coordinator".into(),
            reason: format!(
                "sent an adaptive clip of {sent} (the spec's first clip is {}; at most 2^20 times either way)",
                template.clip
            ),
        });
    }
    Ok(sent)
}

/// The adaptive DP clip a summing protocol carries from round to round, as
/// checkpoint state (nothing without adaptive clipping).
pub(crate) fn adaptive_clip_state(job: &JobFacts, clip: f64) -> confide_algorithms::State {
    let mut state = confide_algorithms::State::new();
    if job.adaptive_clip.is_some() {
        state.insert("dp_clip", vec![clip]);
    }
    state
}

/// The adaptive DP clip saved by [`adaptive_clip_state`], checked against
/// the spec's range; `None` without adaptive clipping.
pub(crate) fn restore_adaptive_clip(job: &JobFacts, state: &confide_algorithms::State) -> Result<Option<f64>, Error> {
    if job.adaptive_clip.is_none() {
        return Ok(None);
    }
    match state.get("dp_clip") {
        Some(&[clip]) if job.distributed_dp.is_some_and(|t| confide_dp::ddg::AdaptiveClip::in_range(t.clip, clip)) => {
            Ok(Some(clip))
        }
        other => {
            Err(Error::InvalidInput(format!("the checkpoint's adaptive clip is {other:?}, not a positive number")))
        }
    }
}

/// What a summing protocol offers distributed noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseCarrier {
    /// Bits of the modulus its sums live in.
    pub bits: u32,
    /// The most corrupt parties in a round of the job's largest size.
    pub corrupt_parties: usize,
    /// The most parties a job may have for the guarantee the noise is
    /// calibrated on (every revealed sum holds all but the corrupt ones of
    /// at least `parties.min` parties) to hold.
    pub max_parties: usize,
}

/// A problem with a protocol's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field: relative to the protocol's settings table unless `absolute`.
    pub field: String,
    /// Whether `field` is a path from the spec's root (e.g. `parties.min`).
    pub absolute: bool,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// A problem with one of the protocol's own settings.
    pub fn setting(field: &str, message: impl Into<String>) -> Self {
        Problem { field: field.to_owned(), absolute: false, message: message.into() }
    }

    /// A problem with another part of the spec (the protocol's requirement on it).
    pub fn spec(path: &str, message: impl Into<String>) -> Self {
        Problem { field: path.to_owned(), absolute: true, message: message.into() }
    }
}

/// Deserialises a protocol's settings table into its typed settings; a type
/// error or an unknown field is reported at its field.
pub fn parse_settings<T: serde::de::DeserializeOwned>(table: &toml::Table) -> Result<T, Vec<Problem>> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        let message = e.into_inner().to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        vec![Problem::setting(&field, message)]
    })
}

/// A party as the coordinator knows it: its certificate name and the
/// certificate (DER) it presented on its TLS connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The party's name.
    pub name: &'a str,
    /// Its TLS client certificate, DER.
    pub certificate: &'a [u8],
    /// The relay that carries its stream (`confide relay`), as the
    /// coordinator admitted it on the party's delegation; `None` when the
    /// party dialled the coordinator itself.
    pub relay: Option<&'a str>,
}

/// A round as the coordinator starts it.
#[derive(Debug, Clone, Copy)]
pub struct RoundInfo<'a> {
    /// The round, from 1.
    pub round: u32,
    /// The round's parties, sorted and unique.
    pub parties: &'a [String],
    /// The global model the parties train from.
    pub global: &'a Parameters,
    /// The fit configuration, when every party gets the same one (`None`:
    /// the strategy configured parties differently). Protocols that hide
    /// individual updates bind it, with the model, into what the parties
    /// sign, so that the coordinator cannot give one party a different
    /// model or learning rate and read its update off the sum.
    pub fit: Option<&'a FitConfig>,
}

/// A hash (BLAKE3) of what a party trains from in a round: the global model
/// (names, shapes, values) and the fit configuration. Parties and the
/// coordinator compute it independently; protocols bind it into signed
/// messages so that parties given different models or configurations
/// cannot complete a round together.
pub fn training_digest(global: &Parameters, fit: &FitConfig) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("confide training digest v1");
    hash_parameters(&mut h, global);
    // Every field, by destructuring: a new field that is not hashed here
    // does not compile.
    let FitConfig { round, train } = fit;
    let confide_algorithms::TrainConfig {
        local_epochs,
        batch_size,
        learning_rate,
        optimizer,
        momentum,
        l2,
        proximal_mu,
        seed,
        validation_fraction,
    } = train;
    h.update(&round.to_le_bytes());
    h.update(&local_epochs.to_le_bytes());
    h.update(&(*batch_size as u64).to_le_bytes());
    for x in [learning_rate, momentum, l2, proximal_mu, validation_fraction] {
        h.update(&x.to_bits().to_le_bytes());
    }
    h.update(format!("{optimizer:?}").as_bytes());
    h.update(&seed.to_le_bytes());
    *h.finalize().as_bytes()
}

/// A hash (BLAKE3) of a model alone (names, shapes, values): what a secure
/// evaluation binds.
pub fn model_digest(global: &Parameters) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("confide model digest v1");
    hash_parameters(&mut h, global);
    *h.finalize().as_bytes()
}

fn hash_parameters(h: &mut blake3::Hasher, global: &Parameters) {
    // BLAKE3: every party hashes its model each round, and BLAKE3 runs at
    // ~2.5 GB/s on one core here against SHA-256's 1.4 GB/s with the CPU's
    // SHA extensions (`cargo bench --bench secagg`: training_digest_1M).
    h.update(&(global.tensors().len() as u64).to_le_bytes());
    for t in global.tensors() {
        h.update(&(t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(&(t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&(t.data.len() as u64).to_le_bytes());
        // The values as little-endian bytes: on little-endian machines their
        // memory as it is, without a copy.
        #[cfg(target_endian = "little")]
        h.update(bytemuck::cast_slice::<f32, u8>(&t.data));
        #[cfg(not(target_endian = "little"))]
        for v in &t.data {
            h.update(&v.to_le_bytes());
        }
    }
}

/// A round that sums statistics instead of model updates (setup feature
/// sums, evaluation metrics), under a protocol that hides individual values.
#[derive(Debug, Clone, Copy)]
pub struct SumRound<'a> {
    /// The round (0 for setup).
    pub round: u32,
    /// The round's parties, sorted and unique.
    pub parties: &'a [String],
    /// What is summed; each party derives it on its own.
    pub layout: &'a sum::SumLayout,
}

/// One party's plaintext update, as [`plain`] reveals it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartyUpdate {
    /// The party.
    pub party: String,
    /// Training examples (its weight).
    pub num_examples: u64,
    /// Its locally trained model.
    pub params: Parameters,
}

/// The result of a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Aggregate {
    /// Every contributor's update, sorted by party name.
    Updates(Vec<PartyUpdate>),
    /// The example-weighted sum of the contributors' updates.
    WeightedSum {
        /// Σ nᵢ·(localᵢ − global), per model value.
        weighted_delta_sum: Vec<f64>,
        /// Σ nᵢ.
        total_examples: f64,
        /// The example-weighted mean training loss of the contributors that
        /// reported one, aggregated with the updates.
        mean_train_loss: Option<f64>,
        /// Parties caught misbehaving while the sum was rebuilt (e.g. a wrong
        /// unmask share), with why; the sum does not depend on them.
        misbehaved: Vec<(String, String)>,
        /// Whose updates are in the sum, sorted.
        contributors: Vec<String>,
    },
    /// The sum of a [`SumRound`]'s values.
    Sum {
        /// Per value of the layout, the sum over the contributors.
        sums: Vec<f64>,
        /// Parties caught misbehaving while the sum was rebuilt.
        misbehaved: Vec<(String, String)>,
        /// Whose values are in the sum, sorted.
        contributors: Vec<String>,
    },
}

/// The messages of a protocol step.
#[derive(Debug, Clone)]
pub enum Messages {
    /// The same message to each of these parties (encoded and sent once per stream).
    Same {
        /// Recipients, sorted.
        to: Vec<String>,
        /// The message.
        message: Envelope,
    },
    /// A message of its own to each party.
    PerParty(Vec<(String, Envelope)>),
}

impl Messages {
    /// The recipients.
    pub fn recipients(&self) -> Vec<String> {
        match self {
            Messages::Same { to, .. } => to.clone(),
            Messages::PerParty(v) => v.iter().map(|(p, _)| p.clone()).collect(),
        }
    }
}

/// How many answers a step needs before the protocol can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// The job's `parties.min`: below it the job fails naming the missing parties.
    JobMinimum,
    /// The protocol decides in its next `close_stage` (e.g. a reconstruction
    /// threshold per party rather than a head count).
    Protocol,
}

/// What the coordinator does after a stage closes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Another step: send these messages and collect the answers.
    Step {
        /// The step's stage.
        stage: StageName,
        /// Who gets what.
        messages: Messages,
        /// Answers it needs.
        quorum: Quorum,
    },
    /// The round's result.
    Done(Aggregate),
}

/// A protocol's coordinator side for one job. It sees only what the protocol
/// reveals; every error that names a party (`PeerMisbehaved`, `BadUpdate`)
/// drops that party from the stage, any other fails the round.
pub trait AggregationServer: Send {
    /// Starts a round; returns the message every party's fit task carries
    /// (empty when there is none).
    fn begin_round(&mut self, round: &RoundInfo<'_>) -> Result<Vec<u8>, Error>;

    /// A party's contribution (its fit answer) or its answer to the current
    /// step. A rejected message leaves the protocol's state unchanged.
    fn on_message(&mut self, from: Peer<'_>, message: Envelope) -> Result<(), Error>;

    /// The current stage closed (everyone answered or the deadline passed).
    fn close_stage(&mut self) -> Result<Progress, Error>;

    /// Starts a round that sums statistics (see [`SumRound`]); returns the
    /// message each party's task carries. Protocols that reveal individual
    /// updates need not: the session asks for statistics in the clear then.
    fn begin_sum(&mut self, _round: &SumRound<'_>) -> Result<Vec<u8>, Error> {
        Err(Error::InvalidInput("this protocol does not sum statistics".into()))
    }

    /// After [`Progress::Done`]: what parties did in the round beyond
    /// contributing, by role (shown with the round's record; e.g. who
    /// decrypted). Never anything the protocol hides.
    fn round_roles(&mut self) -> std::collections::BTreeMap<String, Vec<String>> {
        std::collections::BTreeMap::new()
    }

    /// What the server carries from round to round (an adaptive clip),
    /// saved with each checkpoint so that a resumed job goes on from it.
    /// Nothing by default.
    fn state(&self) -> confide_algorithms::State {
        confide_algorithms::State::new()
    }

    /// Restores [`AggregationServer::state`] from a checkpoint, before a
    /// resumed job's first round.
    fn restore(&mut self, _state: &confide_algorithms::State) -> Result<(), Error> {
        Ok(())
    }
}

/// A party's update after local training.
#[derive(Debug)]
pub struct LocalUpdate<'a> {
    /// The global model the round started from.
    pub global: &'a Parameters,
    /// The fit configuration the party trained with.
    pub fit: &'a FitConfig,
    /// The locally trained model.
    pub local: Parameters,
    /// Training examples used (the aggregation weight).
    pub num_examples: u64,
    /// The training loss the party reported, if any: protocols that hide
    /// individual updates aggregate it with them instead of revealing it.
    pub train_loss: Option<f64>,
}

/// A protocol's party side for one job.
pub trait AggregationClient: Send {
    /// The party's fit answer for `round`: its update in the protocol's form.
    /// `round_message` is what the coordinator's fit task carried.
    fn contribute(&mut self, round: u32, round_message: &[u8], update: LocalUpdate<'_>) -> Result<Envelope, Error>;

    /// Whether the fit answer can go before training: the protocol's first
    /// answer then binds only what the party knows before it trains (the
    /// round, the model and configuration it trains from, the round's
    /// noise), and the update leaves in a later step (see
    /// [`AggregationClient::needs_update_for`]). The party then trains
    /// while the coordinator runs the data-independent steps. `false` by
    /// default.
    fn answers_fit_before_training(&self) -> bool {
        false
    }

    /// The fit answer of a protocol that answers before training, for the
    /// round about to train from `global` with `fit`; the update follows
    /// through [`AggregationClient::supply_update`].
    fn contribute_ahead(
        &mut self,
        _round: u32,
        _round_message: &[u8],
        _global: &Parameters,
        _fit: &FitConfig,
    ) -> Result<Envelope, Error> {
        Err(Error::InvalidInput("this protocol answers a fit only after training".into()))
    }

    /// The trained update of the round whose answer went ahead, before the
    /// step that needs it. `update.global` and `update.fit` must be those
    /// the answer was given for.
    fn supply_update(&mut self, _round: u32, _update: LocalUpdate<'_>) -> Result<(), Error> {
        Err(Error::InvalidInput("this protocol answers a fit only after training".into()))
    }

    /// Whether the `stage` step of the round in progress needs the update
    /// that [`AggregationClient::supply_update`] gives (it was answered
    /// ahead, and the update is not in yet).
    fn needs_update_for(&self, _stage: StageName) -> bool {
        false
    }

    /// The party's answer to a [`SumRound`]: `values` (laid out as `layout`,
    /// which the party derived itself) in the protocol's form.
    fn contribute_sum(
        &mut self,
        _round: u32,
        _round_message: &[u8],
        _layout: &sum::SumLayout,
        _values: &[f64],
    ) -> Result<Envelope, Error> {
        Err(Error::InvalidInput("this protocol does not sum statistics".into()))
    }

    /// Work that does not depend on the party's data for the round about to
    /// train from `global` (distributed DP draws its noise here, `he` its
    /// encryption randomness), called before training, with or without DP.
    /// Nothing by default.
    fn prepare(&mut self, _global: &Parameters) {}

    /// A later step of `round`; returns the party's answer.
    fn on_step(&mut self, round: u32, stage: StageName, message: Envelope) -> Result<Envelope, Error>;

    /// Work the party can do while the coordinator collects the other
    /// parties' answers (SecAgg+ computes its masks then); the driver calls
    /// it after an answer it sends at once, not after one it held
    /// (`answer_fit_after_secs`), so it must not be needed for progress.
    /// Nothing by default.
    fn precompute(&mut self) {}

    /// Forgets the round in progress (the job closed, or the coordinator went
    /// silent), wiping its secrets.
    fn abandon(&mut self);
}

/// Checks peers' signatures against their certificates, learning the
/// certificates as the coordinator relays them (and checking each against
/// the federation CA once).
pub trait PeerVerifier: IdentityVerifier + Send {
    /// Accepts `certificate` (DER) as `party`'s after checking it.
    fn add_peer(&mut self, party: &str, certificate: &[u8]) -> Result<(), Error>;

    /// The version of the revocation list it checks against (0: none).
    /// Protocols bind it into each round, so that parties holding
    /// different lists cannot complete one together.
    fn revocation_version(&self) -> u64 {
        0
    }
}

/// Who a party is, for protocols that sign or verify.
pub struct PartyIdentity {
    /// The party's name (its certificate's).
    pub name: String,
    /// Signs with the party's certificate key.
    pub signer: Arc<dyn IdentitySigner + Send + Sync>,
    /// Verifies other parties.
    pub peers: Box<dyn PeerVerifier>,
    /// What this party released of each job (runs taken, sums decrypted),
    /// shared by its sessions of a job (the party process keeps one).
    pub released: std::sync::Arc<Released>,
}

/// What a party released of each job, kept by the party process across a
/// job's sessions, so that a coordinator that offers a running job again
/// (a new session and client) finds the record of the old one:
/// - the last run of its rounds the party took part in: a protocol whose
///   signatures bind a run number ([`secagg`]'s) takes each run once, in
///   increasing order;
/// - the contributor set of each sum a party helped decrypt, by round and
///   kind (a fit's update, a setup's statistics, an evaluation): a
///   protocol that decrypts ([`he`]'s) decrypts a round's sum of a kind
///   again only over the same contributors, so that two sums of one round
///   never differ by one party's values, whatever the coordinator varies
///   in between (the model's bits, the session).
///
/// Kept in memory by the party process.
#[derive(Debug, Default)]
pub struct Released {
    runs: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    sums: std::sync::Mutex<std::collections::BTreeMap<SumKey, [u8; 32]>>,
}

/// A sum a party helped decrypt: job, round and kind.
type SumKey = (String, u32, &'static str);

impl Released {
    /// Records that the party takes part in `run` of `job`; refused, with
    /// the last run it took, when that is `run` or later.
    pub fn take_run(&self, job: &str, run: u64) -> Result<(), u64> {
        let mut taken = self.runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match taken.get_mut(job) {
            Some(last) if run <= *last => Err(*last),
            Some(last) => {
                *last = run;
                Ok(())
            }
            None => {
                taken.insert(job.to_owned(), run);
                Ok(())
            }
        }
    }

    /// Records that the party helps decrypt the `kind` sum of `round` of
    /// `job` over `contributors`; refused when it helped decrypt that sum
    /// over another set (false then).
    #[must_use]
    pub fn decrypt_once(&self, job: &str, round: u32, kind: &'static str, contributors: &[String]) -> bool {
        let mut h = blake3::Hasher::new_derive_key("confide released sum contributors v1");
        for c in contributors {
            h.update(&(c.len() as u64).to_le_bytes());
            h.update(c.as_bytes());
        }
        let set = *h.finalize().as_bytes();
        let mut sums = self.sums.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match sums.entry((job.to_owned(), round, kind)) {
            std::collections::btree_map::Entry::Occupied(e) => *e.get() == set,
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(set);
                true
            }
        }
    }
}

impl std::fmt::Debug for PartyIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartyIdentity").field("name", &self.name).finish_non_exhaustive()
    }
}

/// An aggregation protocol: its name in job specs and policies, its
/// settings, its stages, and its two sides.
pub trait AggregationProtocol: Send + Sync + 'static {
    /// The name in `[aggregation] protocol` and in party policies.
    fn name(&self) -> &'static str;

    /// What it guarantees, in one line (for `confide job validate` and errors).
    fn describe(&self) -> &'static str;

    /// Its steps after the fit stage, in order.
    fn stages(&self) -> &'static [StageName];

    /// What the coordinator learns.
    fn reveals(&self) -> Reveals;

    /// Checks `settings` (the spec's `[aggregation.NAME]` table, empty when absent).
    fn validate(&self, settings: &toml::Table, job: &JobFacts) -> Vec<Problem>;

    /// What the protocol will do for a job with these settings, a line each
    /// (its parameters and what they guarantee), for `confide job validate`.
    fn explain(&self, _settings: &toml::Table, _job: &JobFacts) -> Vec<String> {
        Vec::new()
    }

    /// For party-level DP with distributed noise: the modulus bits of the
    /// protocol's sums and how many of a round's parties its threat model
    /// lets be corrupt (they can subtract their own noise). `None` (the
    /// default): the protocol cannot carry distributed noise. A protocol
    /// that returns it must encode updates with [`update::NoisyUpdate`]
    /// when `job.distributed_dp` is set.
    fn noise_carrier(&self, _settings: &toml::Table, _job: &JobFacts) -> Option<NoiseCarrier> {
        None
    }

    /// The fraction of the parties that may be corrupt (colluding with
    /// the coordinator and deviating from the protocol as they like) under
    /// which these settings' guarantees hold, including the distributed-DP
    /// noise calibrated from it. `None` (the default): the protocol makes
    /// no such claim. A protocol whose guarantee holds only for colluders
    /// that follow it states 0 (`he`). A party's
    /// `policy.min_corrupt_fraction` refuses settings below its floor.
    fn tolerated_corrupt_fraction(&self, _settings: &toml::Table) -> Option<f64> {
        None
    }

    /// Whether a job that names no parties counts its colluders only
    /// within each round (there is no federation size to count from), so
    /// that a coordinator gathering them into one round is not covered. A
    /// party whose policy sets `min_corrupt_fraction` refuses such a job.
    /// The default assumes so of any protocol that states a tolerated
    /// fraction (it fails closed); a protocol that counts them across the
    /// federation's limit says otherwise.
    fn counts_colluders_per_round_without_names(&self) -> bool {
        true
    }

    /// The coordinator side for one job. `peers` checks the parties'
    /// certificates (the ones they present on their TLS connections) and
    /// their signatures, for protocols that verify what they relay.
    fn server(
        &self,
        settings: &toml::Table,
        job: &JobFacts,
        peers: Box<dyn PeerVerifier>,
    ) -> Result<Box<dyn AggregationServer>, Error>;

    /// A party's side for one job.
    fn client(
        &self,
        settings: &toml::Table,
        job: &JobFacts,
        party: PartyIdentity,
    ) -> Result<Box<dyn AggregationClient>, Error>;
}

/// The protocols a build knows, by name.
#[derive(Clone)]
pub struct Protocols {
    by_name: BTreeMap<&'static str, Arc<dyn AggregationProtocol>>,
}

impl std::fmt::Debug for Protocols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Default for Protocols {
    fn default() -> Self {
        Protocols::builtin().clone()
    }
}

impl Protocols {
    /// The protocols built into Confide: `none`, `secagg` and (feature `he`) `he`.
    pub fn builtin() -> &'static Protocols {
        static BUILTIN: OnceLock<Protocols> = OnceLock::new();
        BUILTIN.get_or_init(|| {
            let protocols = Protocols { by_name: BTreeMap::new() }.with(plain::Plain).with(secagg::SecAggPlus);
            #[cfg(feature = "he")]
            let protocols = protocols.with(he::ThresholdHe);
            protocols
        })
    }

    /// These protocols and `protocol` (replacing one of the same name).
    pub fn with(mut self, protocol: impl AggregationProtocol) -> Self {
        self.by_name.insert(protocol.name(), Arc::new(protocol));
        self
    }

    /// The protocol called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn AggregationProtocol>> {
        self.by_name.get(name)
    }

    /// Every protocol's name, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.by_name.keys().copied().collect()
    }

    /// The stage `name` of any protocol (to check configuration naming one).
    pub fn stage(&self, name: &str) -> Option<StageName> {
        self.by_name.values().flat_map(|p| p.stages().iter().copied()).find(|s| s.as_str() == name)
    }
}
