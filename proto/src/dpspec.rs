//! The `[dp]` table of a job spec: differential privacy for a training job.
//!
//! ```toml
//! [dp]
//! level = "example"        # DP-SGD at each party; or "party" (DP-FedAvg, below)
//! target_epsilon = 4.0     # or noise_multiplier = 1.1 (both: checked against each other)
//! delta = 1e-5
//! sampling_rate = 0.05     # q: each row is in a step's sample with this probability
//! max_grad_norm = 1.0      # C: each row's gradient is clipped to this L2 norm
//! accountant = "rdp"
//! feature_ranges = [[0, 30], [9, 40]]   # public ranges, when model.standardize
//! ```
//!
//! `level = "party"` is DP-FedAvg: each party clips its update to
//! `update_clip`; neighbouring data sets differ by one party's whole data
//! set. Under `aggregation.protocol = "none"` the coordinator adds discrete
//! Gaussian noise to the sum (central); under a protocol that sums
//! (`secagg`) each party adds its share of the noise before masking, the
//! distributed discrete Gaussian ([`confide_dp::ddg`]), calibrated for the
//! fewest honest survivors the protocol's threat model allows.
//!
//! Every party derives the mechanism and its ε from this table alone (the
//! steps per round are ⌈local_epochs / q⌉, the divisor of each step's noisy
//! sum is `training.batch_size`), so what a round costs never depends on
//! what the coordinator sends.

use confide_algorithms::{DpSgdPlan, FeatureStats, TrainConfig};
use confide_dp::ddg::{AdaptiveClip, DdgConfig, MAX_PADDED_DIM, events_up_to};
use confide_dp::dpsgd::{MAX_NOISE_MULTIPLIER, step_event};
use confide_dp::pld::PldAccountant;
use confide_dp::rdp::{DpEvent, RdpAccountant, calibrate_by, integer_orders};
use serde::{Deserialize, Serialize};

/// Most DP-SGD steps a job may take (rounds × steps per round).
pub const MAX_DP_STEPS: u64 = 10_000_000;

/// The `[dp]` table as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDp {
    /// `example` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// The ε the whole job may cost each party's data set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// z = σ / C (computed from `target_epsilon` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// δ (default 1e-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// q.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    /// example: C (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// party: each party's update is clipped to this L2 norm (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_clip: Option<f64>,
    /// party, distributed: the most trained values the model may have
    /// (default 2^26). The mechanism's rounding costs a little more privacy
    /// the longer the vector, and ε must follow from the spec before anyone
    /// has seen the model, so it is accounted at the worst size up to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_values: Option<u64>,
    /// party, distributed: adaptive clipping towards this quantile of the
    /// parties' update norms (`update_clip` is then the first round's clip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clip_quantile: Option<f64>,
    /// Adaptive clipping: η of the geometric update (default 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clip_rate: Option<f64>,
    /// Adaptive clipping: the noise on the count of unclipped updates, in
    /// counts (default max(parties / 20, noise_multiplier); above z/2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_count_stddev: Option<f64>,
    /// Each party answers a fit task no sooner than this many seconds after
    /// it arrived, so that how long its training took (a hint of its data
    /// set's size) does not show unless training takes longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_fit_after_secs: Option<f64>,
    /// `rdp` (default) or `pld` (tighter; not for distributed noise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accountant: Option<String>,
    /// Public `[low, high]` range of each feature, for standardisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_ranges: Option<Vec<[f64; 2]>>,
}

/// The largest `target_epsilon` a spec (or `job validate
/// --target-epsilon`) may ask for.
pub const MAX_TARGET_EPSILON: f64 = 100.0;

/// The largest `clip_count_stddev`: 10^6, far above any federation's
/// count of parties.
pub const MAX_CLIP_COUNT_STDDEV: f64 = 1e6;

/// Time an answer held to its floor (`answer_fit_after_secs`) has left to
/// reach the coordinator before the round's deadline, at least: seconds.
pub const FIT_ANSWER_MARGIN_SECS: f64 = 1.0;

/// Whether a fit answer held `floor_secs` (rounded up to the millisecond,
/// as a party holds it) still leaves [`FIT_ANSWER_MARGIN_SECS`] before a
/// deadline of `round_secs`.
pub fn answer_floor_fits(floor_secs: f64, round_secs: u64) -> bool {
    (floor_secs * 1000.0).ceil() + FIT_ANSWER_MARGIN_SECS * 1000.0 <= round_secs as f64 * 1000.0
}

/// β of conditional randomized rounding (the paper's e^{−1/2}).
pub const DDG_BETA: f64 = 0.606_530_659_712_633_4;

/// Standard deviations of the noisy sum the modulus holds (KLS's k = 4).
pub const DDG_K_STDDEVS: f64 = 4.0;

/// What a summing protocol fixes for distributed noise (party level under
/// `secagg`): all of it from the spec, so every party derives the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistributedNoise {
    /// Bits of the modulus the sum lives in.
    pub bits: u32,
    /// The most parties a round can have (the parties the spec names).
    pub max_parties: usize,
    /// The fewest honest parties whose noise is in any sum the protocol
    /// reveals: the job's `parties.min` less the corrupt parties the
    /// protocol's threat model allows (they can subtract their own noise).
    pub honest_parties: usize,
}

impl DistributedNoise {
    /// The mechanism at clip `clip`, noise multiplier `z`, for `dim` values.
    pub fn config(&self, clip: f64, z: f64, dim: usize) -> DdgConfig {
        DdgConfig {
            clip,
            noise_multiplier: z,
            dim,
            bits: self.bits,
            max_parties: self.max_parties,
            honest_parties: self.honest_parties,
            beta: DDG_BETA,
            k_stddevs: DDG_K_STDDEVS,
        }
    }
}

/// Who is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpLevel {
    /// Each record, by DP-SGD at each party.
    Example,
    /// Each party's whole data set, by clipped updates and noise added to
    /// their sum: by the coordinator (central DP-FedAvg) or by the parties
    /// before masking (distributed).
    Party,
}

impl DpLevel {
    /// The name in specs and job status.
    pub fn as_str(self) -> &'static str {
        match self {
            DpLevel::Example => "example",
            DpLevel::Party => "party",
        }
    }
}

/// What a job's noisy releases are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpRelease {
    /// A training job's updates (DP-SGD steps, or noisy sums of updates).
    Training,
    /// An evaluate job's result: each party's count of rows and of rows
    /// classified correctly, with discrete Gaussian noise
    /// ([`confide_dp::evaluation`]); one release per job.
    Evaluation,
}

/// Which accountant turns a job's releases into (ε, δ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountantKind {
    /// Rényi DP ([`confide_dp::rdp`]): every mechanism, the distributed one
    /// included; the default.
    Rdp,
    /// The privacy loss distribution ([`confide_dp::pld`]): tighter, for
    /// DP-SGD and central noise (the distributed mechanism has no PLD).
    Pld,
}

impl AccountantKind {
    /// The name in specs and job status.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountantKind::Rdp => "rdp",
            AccountantKind::Pld => "pld",
        }
    }

    /// An empty accountant of this kind; `values` bounds the noised values
    /// of one release (the PLD's lattice slack needs it).
    pub fn empty(self, values: usize) -> Accountant {
        match self {
            AccountantKind::Rdp => Accountant::Rdp(empty_accountant()),
            AccountantKind::Pld => Accountant::Pld(PldAccountant::new(values as u64)),
        }
    }
}

/// A job's accountant, of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Accountant {
    /// Rényi DP over the discrete Gaussian's integer orders.
    Rdp(RdpAccountant),
    /// The privacy loss distribution.
    Pld(PldAccountant),
}

impl Accountant {
    /// Composes `count` releases of the worst of `events` (one per model
    /// size for distributed noise); a mechanism that could not be built, or
    /// that this accountant cannot bound, costs ∞.
    fn compose(&mut self, events: Result<Vec<DpEvent>, String>, count: u64) {
        let infinite = DpEvent::Gaussian { noise_multiplier: 0.0 };
        match self {
            Accountant::Rdp(acc) => {
                if events.map_err(|_| ()).and_then(|e| acc.compose_worst(&e, count).map_err(|_| ())).is_err() {
                    let _ = acc.compose(&infinite, 1);
                }
            }
            Accountant::Pld(acc) => {
                // A PLD describes one mechanism: anything else costs ∞.
                let single = events.ok().filter(|e| e.len() == 1);
                if single.and_then(|e| acc.compose(&e[0], count).ok()).is_none() {
                    let _ = acc.compose(&infinite, 1);
                }
            }
        }
    }

    /// ε at `delta` (∞ when nothing bounds it).
    pub fn epsilon(&self, delta: f64) -> f64 {
        match self {
            Accountant::Rdp(acc) => acc.epsilon(delta).map(|(e, _)| e).unwrap_or(f64::INFINITY),
            Accountant::Pld(acc) => acc.epsilon(delta).unwrap_or(f64::INFINITY),
        }
    }
}

/// Differential privacy of a training job, validated, with the noise
/// multiplier resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DpSpec {
    /// Who is protected.
    pub level: DpLevel,
    /// The target ε, when the spec gave one.
    pub target_epsilon: Option<f64>,
    /// z = σ / C.
    pub noise_multiplier: f64,
    /// δ.
    pub delta: f64,
    /// q (1 at party level: every party's update in every round).
    pub sampling_rate: f64,
    /// C: the per-row gradient norm (example level) or the per-party update
    /// norm (party level).
    pub clip: f64,
    /// Public feature ranges that standardise the inputs instead of the
    /// data's own statistics.
    pub feature_ranges: Option<Vec<[f64; 2]>>,
    /// Party level under a summing protocol: the distributed discrete
    /// Gaussian's parameters (derived from the spec, not written in `[dp]`).
    pub distributed: Option<DistributedNoise>,
    /// `max_model_values` as written (distributed noise).
    pub max_model_values: Option<usize>,
    /// Adaptive clipping (distributed noise): `clip` is the first round's.
    pub adaptive: Option<AdaptiveClip>,
    /// The floor on a fit answer's time, in seconds (see [`RawDp`]).
    pub answer_fit_after_secs: Option<f64>,
    /// The accountant that states ε.
    pub accountant: AccountantKind,
    /// What is released: training updates, or an evaluation's counts.
    pub release: DpRelease,
}

impl DpSpec {
    /// Noisy releases in one round of `training`: ⌈local_epochs / q⌉ DP-SGD
    /// steps (example level), or the one noisy sum (party level).
    pub fn steps_per_round(&self, training: &TrainConfig) -> u64 {
        match self.release {
            DpRelease::Training => steps_per_round(self.level, training.local_epochs, self.sampling_rate),
            DpRelease::Evaluation => 1,
        }
    }

    /// The DP-SGD plan every party trains with (example level), for a job
    /// of `rounds` rounds.
    pub fn plan(&self, training: &TrainConfig, rounds: u32) -> Option<DpSgdPlan> {
        (self.level == DpLevel::Example && self.release == DpRelease::Training).then(|| DpSgdPlan {
            max_grad_norm: self.clip,
            noise_multiplier: self.noise_multiplier,
            sampling_rate: self.sampling_rate,
            expected_batch_size: training.batch_size,
            steps_per_round: self.steps_per_round(training),
            rounds,
        })
    }

    /// An accountant that has composed `rounds` rounds of `training`.
    pub fn accountant(&self, training: &TrainConfig, rounds: u32) -> Accountant {
        let mut acc = self.accountant.empty(self.model_values_bound());
        self.compose_rounds(&mut acc, training, rounds);
        acc
    }

    /// Composes `rounds` more rounds into `acc`.
    pub fn compose_rounds(&self, acc: &mut Accountant, training: &TrainConfig, rounds: u32) {
        let steps = self.steps_per_round(training).saturating_mul(u64::from(rounds));
        acc.compose(self.release_events(self.noise_multiplier), steps);
    }

    /// The distributed mechanism for a model of `dim` values (party level
    /// under a summing protocol).
    pub fn ddg_config(&self, dim: usize) -> Option<DdgConfig> {
        let d = self.distributed.filter(|_| self.level == DpLevel::Party)?;
        Some(d.config(self.clip, self.noise_multiplier, dim))
    }

    /// The most trained values a model may have under distributed noise:
    /// what the noise is accounted for (and what the protocol enforces);
    /// with the PLD accountant, the values each release noises (its
    /// lattice slack).
    pub fn model_values_bound(&self) -> usize {
        if self.release == DpRelease::Evaluation {
            // An evaluation noises two counts, whatever the model.
            return 2;
        }
        self.max_model_values.unwrap_or(MAX_PADDED_DIM)
    }

    fn release_events(&self, z: f64) -> Result<Vec<DpEvent>, String> {
        self.release_events_at(Sensitivity::of(self.level, self.adaptive.is_some()), z)
    }

    fn release_events_at(&self, sensitivity: Sensitivity, z: f64) -> Result<Vec<DpEvent>, String> {
        if self.release == DpRelease::Evaluation {
            return Ok(vec![confide_dp::evaluation::event(z)]);
        }
        release_events(sensitivity, self.sampling_rate, self.clip, self.distributed, self.model_values_bound(), z)
    }

    /// The ε `rounds` rounds cost each party's data set, at this δ: for
    /// each record (example level) or for each party's whole data set
    /// (party level), as the level states.
    pub fn epsilon(&self, training: &TrainConfig, rounds: u32) -> f64 {
        self.accountant(training, rounds).epsilon(self.delta)
    }

    /// The ε `rounds` rounds cost each *record*, what a hospital's ledger
    /// charges. At party level a record changed (or added, or removed)
    /// moves its party's clipped update anywhere in the clip ball, so by up
    /// to twice the clip while the party stays in the sum: the same releases
    /// at twice the sensitivity (adding or removing the whole party moves it
    /// by the clip at most, which is what [`DpSpec::epsilon`] states).
    pub fn record_epsilon(&self, training: &TrainConfig, rounds: u32) -> f64 {
        if self.level == DpLevel::Example {
            return self.epsilon(training, rounds);
        }
        // One contribution replaced by another: what adaptive clipping's
        // party-level ε states too.
        let events = self.release_events_at(Sensitivity::ReplacedContribution, self.noise_multiplier);
        let steps = self.steps_per_round(training).saturating_mul(u64::from(rounds));
        steps_epsilon(self.accountant, self.model_values_bound(), events, steps, self.delta)
    }

    /// The standardisation the public ranges give: each feature's range
    /// maps to [−1, 1] (mean (lo+hi)/2, std (hi−lo)/2).
    pub fn range_stats(&self) -> Option<FeatureStats> {
        let ranges = self.feature_ranges.as_ref()?;
        // count 1, sum = mean, sum_sq = mean² + std², so mean_std() gives them back.
        let mean: Vec<f64> = ranges.iter().map(|[lo, hi]| (lo + hi) / 2.0).collect();
        let sum_sq = ranges.iter().zip(&mean).map(|([lo, hi], m)| m * m + ((hi - lo) / 2.0).powi(2)).collect();
        Some(FeatureStats { count: 1, sum: mean, sum_sq })
    }

    /// Back to the table (noise multiplier resolved, target kept).
    pub fn to_raw(&self) -> RawDp {
        if self.release == DpRelease::Evaluation {
            return RawDp {
                level: Some(self.level.as_str().into()),
                target_epsilon: self.target_epsilon,
                noise_multiplier: Some(self.noise_multiplier),
                delta: Some(self.delta),
                accountant: Some(self.accountant.as_str().into()),
                ..RawDp::default()
            };
        }
        RawDp {
            level: Some(self.level.as_str().into()),
            target_epsilon: self.target_epsilon,
            noise_multiplier: Some(self.noise_multiplier),
            delta: Some(self.delta),
            sampling_rate: (self.level == DpLevel::Example).then_some(self.sampling_rate),
            max_grad_norm: (self.level == DpLevel::Example).then_some(self.clip),
            update_clip: (self.level == DpLevel::Party).then_some(self.clip),
            accountant: Some(self.accountant.as_str().into()),
            max_model_values: self.max_model_values.map(|m| m as u64),
            adaptive_clip_quantile: self.adaptive.map(|a| a.target_quantile),
            adaptive_clip_rate: self.adaptive.map(|a| a.learning_rate),
            clip_count_stddev: self.adaptive.map(|a| a.count_stddev),
            answer_fit_after_secs: self.answer_fit_after_secs,
            feature_ranges: self.feature_ranges.clone(),
        }
    }
}

/// An accountant over the orders the discrete Gaussian is bounded at.
pub fn empty_accountant() -> RdpAccountant {
    RdpAccountant::with_orders(integer_orders()).unwrap_or_default()
}

/// What one release's sensitivity is measured against, at each level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sensitivity {
    /// Example level: one record added or removed (DP-SGD's clip).
    Record,
    /// Party level, fixed clip: the party's contribution against none (its
    /// data replaced by no data, whose update is zero): the clip.
    Contribution,
    /// Party level under adaptive clipping: each contribution carries
    /// (b − ½)·κ, so a party with no data sends (0, +κ/2), not zero. Its
    /// data against no data moves the contribution by up to √(C² + κ²),
    /// more than the joint clip C' = √(C² + κ²/4); after the lattice's
    /// rounding, by up to the sum of both vectors' bounds. Accounted as
    /// two contributions apart: twice the sensitivity.
    ReplacedContribution,
}

impl Sensitivity {
    /// The sensitivity of `level`'s releases, with or without adaptive clipping.
    pub fn of(level: DpLevel, adaptive: bool) -> Sensitivity {
        match (level, adaptive) {
            (DpLevel::Example, _) => Sensitivity::Record,
            (DpLevel::Party, false) => Sensitivity::Contribution,
            (DpLevel::Party, true) => Sensitivity::ReplacedContribution,
        }
    }
}

/// The accountant's events of one noisy release at noise multiplier `z`:
/// the mechanism is one of them, at `level`'s sensitivity. One for DP-SGD's step and central noise;
/// for distributed noise one per rotated length a model of up to
/// `max_values` values can have (`ddg::events_up_to`), since the
/// mechanism's rounding depends on the size and ε must follow from the spec
/// alone, before anyone has seen a model.
fn release_events(
    level: Sensitivity,
    q: f64,
    clip: f64,
    distributed: Option<DistributedNoise>,
    max_values: usize,
    z: f64,
) -> Result<Vec<DpEvent>, String> {
    let events = match distributed {
        Some(d) if level != Sensitivity::Record => {
            events_up_to(&d.config(clip, z, max_values), max_values).map_err(|e| e.to_string())?
        }
        _ => vec![step_event(q, z)],
    };
    Ok(if level == Sensitivity::ReplacedContribution {
        events.into_iter().map(DpEvent::at_double_sensitivity).collect()
    } else {
        events
    })
}

fn steps_per_round(level: DpLevel, local_epochs: u32, q: f64) -> u64 {
    match level {
        DpLevel::Example => (f64::from(local_epochs) / q).ceil() as u64,
        DpLevel::Party => 1,
    }
}

/// ε of `steps` releases at (z, δ).
fn steps_epsilon(
    kind: AccountantKind,
    values: usize,
    events: Result<Vec<DpEvent>, String>,
    steps: u64,
    delta: f64,
) -> f64 {
    let mut acc = kind.empty(values);
    acc.compose(events, steps);
    acc.epsilon(delta)
}

/// The smallest noise multiplier with which `rounds` rounds of `training`
/// at `level`, sampling rate `q` and clip `clip` (with `distributed` noise,
/// when the protocol sums) cost at most `target` at `delta`.
#[allow(clippy::too_many_arguments)]
pub fn noise_for_target(
    kind: AccountantKind,
    target: f64,
    delta: f64,
    level: DpLevel,
    adaptive: bool,
    q: f64,
    clip: f64,
    distributed: Option<DistributedNoise>,
    max_values: usize,
    training: &TrainConfig,
    rounds: u32,
) -> Result<f64, String> {
    let steps = steps_per_round(level, training.local_epochs, q).saturating_mul(u64::from(rounds));
    if steps == 0 {
        return Err("no noisy release to calibrate (0 rounds)".into());
    }
    let eps = |z: f64| {
        let events = release_events(Sensitivity::of(level, adaptive), q, clip, distributed, max_values, z);
        Ok(steps_epsilon(kind, max_values, events, steps, delta))
    };
    let z = calibrate_by(target, &format!("at δ = {delta} over {steps} releases"), eps).map_err(|e| {
        let hint = if distributed.is_some() {
            " (with distributed noise the lattice's rounding costs privacy that more noise cannot buy back: give the \
             sum more bits, aggregation.secagg.bits, or bound the model, dp.max_model_values)"
        } else {
            ""
        };
        format!("{e}{hint}")
    })?;
    // Calibration ran on the requested z; noise is drawn at z rounded up
    // onto the sampler's grid (2^-20 up to z = 64, coarser above), never
    // less, so the target holds.
    if z > MAX_NOISE_MULTIPLIER {
        return Err(format!(
            "ε = {target} over {steps} steps needs noise_multiplier {z:.3}, above the largest ({MAX_NOISE_MULTIPLIER}); \
             raise target_epsilon or sampling_rate, or train fewer rounds or epochs"
        ));
    }
    Ok(z)
}

/// The refusal for a `[dp]` table with neither way of choosing the noise.
const NOISE_REQUIRED: &str = "give noise_multiplier or target_epsilon";

impl RawDp {
    /// Every `(field, message)` problem (relative to `dp`), or the typed table.
    /// `distributed`: what the job's summing protocol fixes for distributed
    /// noise at party level (`None` under `protocol = "none"`).
    pub fn validate(
        &self,
        training: &TrainConfig,
        rounds: u32,
        distributed: Option<DistributedNoise>,
    ) -> Result<DpSpec, Vec<(String, String)>> {
        let mut e: Vec<(String, String)> = Vec::new();
        let mut err = |f: &str, m: String| e.push((f.to_owned(), m));
        let level = match self.level.as_deref().unwrap_or("example") {
            "example" => DpLevel::Example,
            "party" => DpLevel::Party,
            other => {
                err("level", format!("unknown level {other:?} (example, party)"));
                DpLevel::Example
            }
        };
        let pld_refusal = (distributed.is_some() && level == DpLevel::Party).then_some(
            "the distributed discrete Gaussian has only its RDP bound (Kairouz, Liu, Steinke 2021), no PLD: use \
             accountant = \"rdp\"",
        );
        let (accountant, delta) = self.accountant_and_delta(pld_refusal, &mut err);
        let (q, c) = match level {
            DpLevel::Example => {
                if self.update_clip.is_some() {
                    err("update_clip", "only applies to level = \"party\" (use max_grad_norm)".into());
                }
                match self.sampling_rate {
                    None => err("sampling_rate", "required: the probability that a row is in a step's sample".into()),
                    Some(q) if !(q.is_finite() && q > 0.0 && q <= 1.0) => {
                        err("sampling_rate", format!("must be in (0, 1] (got {q})"))
                    }
                    Some(_) => {}
                }
                (self.sampling_rate.unwrap_or(f64::NAN), ("max_grad_norm", self.max_grad_norm.unwrap_or(1.0)))
            }
            DpLevel::Party => {
                for (field, set) in
                    [("sampling_rate", self.sampling_rate.is_some()), ("max_grad_norm", self.max_grad_norm.is_some())]
                {
                    if set {
                        err(
                            field,
                            "only applies to level = \"example\" (party level clips updates: update_clip)".into(),
                        );
                    }
                }
                (1.0, ("update_clip", self.update_clip.unwrap_or(1.0)))
            }
        };
        let (clip_field, c) = c;
        if !(c.is_finite() && (confide_dp::MIN_CLIP..=1e6).contains(&c)) {
            err(clip_field, format!("must be in [{:e}, 1e6] (got {c})", confide_dp::MIN_CLIP));
        }
        self.check_noise(&mut err);
        if let Some(ranges) = &self.feature_ranges {
            if ranges.is_empty() || ranges.len() > 1_000_000 {
                err("feature_ranges", "1 to 1000000 [low, high] pairs".into());
            }
            if let Some((i, [lo, hi])) =
                ranges.iter().enumerate().find(|(_, [lo, hi])| !(lo.is_finite() && hi.is_finite() && lo < hi))
            {
                err(&format!("feature_ranges[{i}]"), format!("[{lo}, {hi}] is not a finite range with low < high"));
            } else if let Some((i, [lo, hi])) = ranges.iter().enumerate().find(|(_, r)| !standardises(r)) {
                // The standardisation travels as a mean and a std in f32,
                // through sums (mean² + std²): a range too narrow for its
                // distance from zero, or beyond f32, would come out as
                // another standardisation than the one documented.
                err(
                    &format!("feature_ranges[{i}]"),
                    format!(
                        "[{lo}, {hi}] cannot be standardised to [-1, 1]: too narrow for its distance from zero \
                         (shift the feature) or beyond f32"
                    ),
                );
            }
        }
        if let Some(t) = self.answer_fit_after_secs
            && !(t.is_finite() && t > 0.0 && t <= 86_400.0)
        {
            err("answer_fit_after_secs", format!("must be in (0, 86400] seconds (got {t})"));
        }
        let bounds_values = (distributed.is_some() && level == DpLevel::Party) || accountant == AccountantKind::Pld;
        let max_values = match self.max_model_values {
            Some(m) if !bounds_values => {
                err(
                    "max_model_values",
                    format!(
                        "only applies to party-level DP under a protocol that sums, or with accountant = \"pld\" \
                         (got {m})"
                    ),
                );
                MAX_PADDED_DIM
            }
            Some(m) if m == 0 || m > MAX_PADDED_DIM as u64 => {
                err("max_model_values", format!("must be 1..={MAX_PADDED_DIM} (got {m})"));
                MAX_PADDED_DIM
            }
            Some(m) => m as usize,
            None => MAX_PADDED_DIM,
        };
        let steps = if q.is_finite() && q > 0.0 {
            steps_per_round(level, training.local_epochs, q).saturating_mul(u64::from(rounds))
        } else {
            0
        };
        if steps > MAX_DP_STEPS {
            err("sampling_rate", format!("rounds × ⌈local_epochs / q⌉ = {steps} steps; the limit is {MAX_DP_STEPS}"));
        }
        // Adaptive clipping's settings that need no noise multiplier, each
        // named, before any calibration runs (found by review: they came
        // after it, one at a time).
        match (self.adaptive_clip_quantile, self.adaptive_clip_rate, self.clip_count_stddev) {
            (None, rate, stddev) => {
                for (field, set) in [("adaptive_clip_rate", rate.is_some()), ("clip_count_stddev", stddev.is_some())] {
                    if set {
                        err(field, "only applies with adaptive_clip_quantile".into());
                    }
                }
            }
            (Some(quantile), rate, _) => {
                if level != DpLevel::Party {
                    err(
                        "adaptive_clip_quantile",
                        "adaptive clipping is for party-level DP (level = \"party\"); DP-SGD's clip is fixed".into(),
                    );
                }
                if !(quantile > 0.0 && quantile < 1.0) {
                    err("adaptive_clip_quantile", format!("must be in (0, 1) (got {quantile})"));
                }
                if let Some(rate) = rate.filter(|r| !(r.is_finite() && *r > 0.0 && *r <= 10.0)) {
                    err("adaptive_clip_rate", format!("must be in (0, 10] (got {rate})"));
                }
            }
        }
        if !e.is_empty() {
            return Err(e);
        }
        let adaptive = self.adaptive_clip_quantile.is_some();
        let sensitivity = Sensitivity::of(level, adaptive);
        let eps = |z: f64| {
            let events = release_events(sensitivity, q, c, distributed, max_values, z);
            steps_epsilon(accountant, max_values, events, steps, delta)
        };
        let over = format!(" over {steps} steps");
        let noise_multiplier = self.resolve_noise(&over, eps, |target| {
            noise_for_target(
                accountant,
                target,
                delta,
                level,
                adaptive,
                q,
                c,
                distributed,
                max_values,
                training,
                rounds,
            )
        })?;
        if accountant == AccountantKind::Pld && adaptive && max_values < 2 {
            // The coordinator noises the model's values and the count.
            return Err(vec![(
                "max_model_values".into(),
                "must be at least 2 under adaptive clipping: the count of updates within the clip is noised beside \
                 the model's values"
                    .into(),
            )]);
        }
        // (The settings checked above are valid here.)
        let adaptive = match self.adaptive_clip_quantile {
            None => None,
            Some(quantile) => {
                let parties = distributed.map_or(0, |d| d.max_parties) as f64;
                let rate = self.adaptive_clip_rate.unwrap_or(0.2);
                let stddev = self.clip_count_stddev.unwrap_or((parties / 20.0).max(noise_multiplier));
                let a = AdaptiveClip { target_quantile: quantile, learning_rate: rate, count_stddev: stddev };
                if !(stddev.is_finite() && stddev > noise_multiplier / 2.0) || a.joint(c, noise_multiplier).is_none() {
                    return Err(vec![(
                        "clip_count_stddev".into(),
                        format!(
                            "must exceed noise_multiplier / 2 = {} (got {stddev}): the count's noise comes out of \
                             the same budget as the updates'",
                            noise_multiplier / 2.0
                        ),
                    )]);
                }
                // Far above the parties' count, the count's noise drowns it
                // (and its coordinate, z·C'/σ_b, underflows): the clip
                // would wander at random.
                if stddev > MAX_CLIP_COUNT_STDDEV {
                    return Err(vec![(
                        "clip_count_stddev".into(),
                        format!("must be at most {MAX_CLIP_COUNT_STDDEV} (got {stddev})"),
                    )]);
                }
                Some(a)
            }
        };
        let spec = DpSpec {
            level,
            target_epsilon: self.target_epsilon,
            noise_multiplier,
            delta,
            sampling_rate: q,
            clip: c,
            feature_ranges: self.feature_ranges.clone(),
            distributed: distributed.filter(|_| level == DpLevel::Party),
            max_model_values: self.max_model_values.map(|m| m as usize),
            adaptive,
            accountant,
            answer_fit_after_secs: self.answer_fit_after_secs,
            release: DpRelease::Training,
        };
        // A job whose ε per record nothing bounds (a mechanism that cannot
        // be built at these settings, or one this accountant cannot bound)
        // is refused here, not reserved as ε = ∞ in the hospitals' ledgers,
        // which charge `record_epsilon`.
        if !spec.record_epsilon(training, rounds).is_finite() {
            let field = if self.noise_multiplier.is_some() { "noise_multiplier" } else { "target_epsilon" };
            return Err(vec![(
                field.into(),
                format!(
                    "noise_multiplier {noise_multiplier}: the accountant bounds no ε per record{over} at these \
                     settings (a distributed mechanism without room in its bits; under accountant = \"pld\", the \
                     lattice's slack at this multiplier for max_model_values values: lower max_model_values, raise \
                     the multiplier or use accountant = \"rdp\")"
                ),
            )]);
        }
        Ok(spec)
    }

    /// The accountant (`pld_refusal`: why the job's mechanism has no PLD)
    /// and δ, each checked.
    fn accountant_and_delta(
        &self,
        pld_refusal: Option<&str>,
        err: &mut impl FnMut(&str, String),
    ) -> (AccountantKind, f64) {
        let accountant = match (self.accountant.as_deref().unwrap_or("rdp"), pld_refusal) {
            ("rdp", _) => AccountantKind::Rdp,
            ("pld", Some(why)) => {
                err("accountant", why.into());
                AccountantKind::Rdp
            }
            ("pld", None) => AccountantKind::Pld,
            (other, _) => {
                err("accountant", format!("unknown accountant {other:?} (rdp, pld)"));
                AccountantKind::Rdp
            }
        };
        let delta = self.delta.unwrap_or(1e-5);
        if !(delta.is_finite() && delta > 0.0 && delta <= 1e-3) {
            err("delta", format!("must be in (0, 1e-3] (got {delta})"));
        }
        (accountant, delta)
    }

    /// `noise_multiplier` and `target_epsilon`: each in range, one at least.
    fn check_noise(&self, err: &mut impl FnMut(&str, String)) {
        if let Some(z) = self.noise_multiplier
            && !(z.is_finite() && z > 0.0 && z <= MAX_NOISE_MULTIPLIER)
        {
            err("noise_multiplier", format!("must be in (0, {MAX_NOISE_MULTIPLIER}] (got {z})"));
        }
        if let Some(t) = self.target_epsilon
            && !(t.is_finite() && t > 0.0 && t <= MAX_TARGET_EPSILON)
        {
            err("target_epsilon", format!("must be in (0, {MAX_TARGET_EPSILON}] (got {t})"));
        }
        if self.noise_multiplier.is_none() && self.target_epsilon.is_none() {
            err("noise_multiplier", NOISE_REQUIRED.into());
        }
    }

    /// The noise multiplier: as given (refused if it costs more than a
    /// target also given, `eps(z)` being its cost, `over` what), or
    /// `calibrate(target)`.
    fn resolve_noise(
        &self,
        over: &str,
        eps: impl Fn(f64) -> f64,
        calibrate: impl FnOnce(f64) -> Result<f64, String>,
    ) -> Result<f64, Vec<(String, String)>> {
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(z), Some(target)) => {
                let cost = eps(z);
                // (Fails closed on a NaN cost.)
                let within = cost <= target * (1.0 + 1e-9);
                if !within {
                    return Err(vec![(
                        "noise_multiplier".into(),
                        format!("noise_multiplier {z} costs ε = {cost:.4}{over}, above target_epsilon {target}"),
                    )]);
                }
                Ok(z)
            }
            (Some(z), None) => Ok(z),
            (None, Some(target)) => calibrate(target).map_err(|m| vec![("target_epsilon".into(), m)]),
            // `check_noise` has refused this already; kept so the match is total.
            (None, None) => Err(vec![("noise_multiplier".into(), NOISE_REQUIRED.into())]),
        }
    }

    /// The `[dp]` table of an evaluate job: example level, `noise_multiplier`
    /// or `target_epsilon`, `delta` and `accountant`; nothing about training
    /// applies. The job releases each party's noisy counts once.
    pub fn validate_evaluation(&self) -> Result<DpSpec, Vec<(String, String)>> {
        let mut e: Vec<(String, String)> = Vec::new();
        let mut err = |f: &str, m: String| e.push((f.to_owned(), m));
        match self.level.as_deref().unwrap_or("example") {
            "example" => {}
            "party" => err(
                "level",
                "an evaluation protects each row (level = \"example\"): its counts move by one per row".into(),
            ),
            other => err("level", format!("unknown level {other:?} (example)")),
        }
        let training_only = [
            ("sampling_rate", self.sampling_rate.is_some()),
            ("max_grad_norm", self.max_grad_norm.is_some()),
            ("update_clip", self.update_clip.is_some()),
            ("max_model_values", self.max_model_values.is_some()),
            ("adaptive_clip_quantile", self.adaptive_clip_quantile.is_some()),
            ("adaptive_clip_rate", self.adaptive_clip_rate.is_some()),
            ("clip_count_stddev", self.clip_count_stddev.is_some()),
            ("answer_fit_after_secs", self.answer_fit_after_secs.is_some()),
            ("feature_ranges", self.feature_ranges.is_some()),
        ];
        for (field, set) in training_only {
            if set {
                err(field, "only applies to train jobs (an evaluation releases noisy counts, no gradients)".into());
            }
        }
        // The counts' noise is a discrete Gaussian of a few units (σ = z√2),
        // where the PLD's continuous curve, and its lattice slack (a bound for
        // DP-SGD's σ of about 2^20 units), understate ε; RDP takes the
        // discrete Gaussian's exact zCDP.
        let pld_refusal = "an evaluation's counts carry discrete Gaussian noise of a few units, where the PLD \
                           accountant's continuous curve understates ε: use accountant = \"rdp\"";
        let (accountant, delta) = self.accountant_and_delta(Some(pld_refusal), &mut err);
        self.check_noise(&mut err);
        if !e.is_empty() {
            return Err(e);
        }
        let eps = |z: f64| steps_epsilon(accountant, 2, Ok(vec![confide_dp::evaluation::event(z)]), 1, delta);
        let noise_multiplier = self.resolve_noise("", eps, |target| {
            let z = calibrate_by(target, &format!("at δ = {delta} for one evaluation"), |z| Ok(eps(z)))
                .map_err(|m| m.to_string())?;
            if z > MAX_NOISE_MULTIPLIER {
                return Err(format!(
                    "ε = {target} needs noise_multiplier {z:.3}, above the largest ({MAX_NOISE_MULTIPLIER})"
                ));
            }
            Ok(z)
        })?;
        Ok(DpSpec {
            level: DpLevel::Example,
            target_epsilon: self.target_epsilon,
            noise_multiplier,
            delta,
            sampling_rate: 1.0,
            clip: (confide_dp::evaluation::COUNTS_SENSITIVITY_SQ as f64).sqrt(),
            feature_ranges: None,
            distributed: None,
            max_model_values: None,
            adaptive: None,
            answer_fit_after_secs: None,
            accountant,
            release: DpRelease::Evaluation,
        })
    }
}

/// Whether a public range survives the standardisation's round trip
/// ([`DpSpec::range_stats`], then `FeatureStats::mean_std`, then f32): its
/// half-width back within 10^-3 of itself and above the 10^-8 below which
/// a feature passes through unscaled, its mean within 10^-3 of the
/// half-width in f32, both finite in f32.
fn standardises(&[lo, hi]: &[f64; 2]) -> bool {
    let (mean, half) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
    let back = ((mean * mean + half * half) - mean * mean).max(0.0).sqrt();
    // The mean as f32 (what the model carries) within 10^-3 of the half-width too.
    let mean_f32 = f64::from(mean as f32);
    half > 1e-8
        && (back - half).abs() <= 1e-3 * half
        && (mean_f32 - mean).abs() <= 1e-3 * half
        && mean_f32.is_finite()
        && (half as f32).is_finite()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(extra: &str) -> RawDp {
        toml::from_str(&format!("sampling_rate = 0.05\n{extra}")).unwrap()
    }

    #[test]
    fn a_target_epsilon_resolves_to_the_smallest_noise_that_meets_it() {
        let training = TrainConfig { local_epochs: 1, ..TrainConfig::default() };
        let dp = raw("target_epsilon = 2.0").validate(&training, 10, None).unwrap();
        let eps = dp.epsilon(&training, 10);
        assert!(eps <= 2.0 && eps > 1.99, "{eps}");
        // Small targets need large z, where the accountant's orders matter:
        // calibration and accounting use the same ones.
        for target in [0.5, 0.1] {
            let dp = raw(&format!("target_epsilon = {target}")).validate(&training, 20, None).unwrap();
            let eps = dp.epsilon(&training, 20);
            assert!(eps <= target && eps > 0.99 * target, "{target}: {eps} at z = {}", dp.noise_multiplier);
        }
        assert_eq!(dp.steps_per_round(&training), 20);
        // Round trip: both settings, checked against each other.
        let again = dp.to_raw().validate(&training, 10, None).unwrap();
        assert_eq!(again, dp);
        // A noise multiplier that overshoots its target is refused.
        let low = raw("target_epsilon = 2.0\nnoise_multiplier = 0.5").validate(&training, 10, None).unwrap_err();
        assert_eq!(low[0].0, "noise_multiplier");
        assert!(low[0].1.contains("above target_epsilon"), "{low:?}");
    }

    #[test]
    fn every_bad_setting_is_named() {
        let training = TrainConfig::default();
        let bad: RawDp = toml::from_str(
            "level = \"group\"\naccountant = \"prv\"\ndelta = 0.5\nsampling_rate = 2.0\nmax_grad_norm = -1.0\n\
             noise_multiplier = 2000.0\nfeature_ranges = [[1.0, 0.0]]",
        )
        .unwrap();
        let fields: Vec<String> = bad.validate(&training, 1, None).unwrap_err().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            ["level", "accountant", "delta", "sampling_rate", "max_grad_norm", "noise_multiplier", "feature_ranges[0]"]
        );
        let none: RawDp = toml::from_str("sampling_rate = 0.1").unwrap();
        assert_eq!(none.validate(&training, 1, None).unwrap_err()[0].0, "noise_multiplier");
        // Ranges the f32 standardisation cannot carry are named: too narrow
        // for their distance from zero, or beyond f32; ordinary ones pass.
        let ranges = |r: &str| {
            let text = format!("sampling_rate = 0.1\nnoise_multiplier = 1.0\nfeature_ranges = {r}");
            toml::from_str::<RawDp>(&text).unwrap().validate(&training, 1, None).err().map(|e| e[0].clone())
        };
        assert_eq!(ranges("[[0.0, 30.0], [-1e3, 1e3], [1e4, 10001.0]]"), None);
        for bad in [
            "[[0.0, 1.0], [1e9, 1000000001.0]]",
            "[[0.0, 1.0], [-1e300, 1e300]]",
            "[[0.0, 1.0], [1e8, 100000001.0]]",
            "[[0.0, 1.0], [1e4, 10000.01]]",
        ] {
            let (field, why) = ranges(bad).unwrap_or_else(|| panic!("{bad} passed"));
            assert_eq!(field, "feature_ranges[1]", "{bad}: {why}");
            assert!(why.contains("cannot be standardised"), "{bad}: {why}");
        }
        let unreachable =
            raw("target_epsilon = 0.01").validate(&TrainConfig { local_epochs: 50, ..training }, 1000, None);
        assert!(unreachable.is_err());
        // A clip so small its lattice step nears f64's subnormal range.
        let clipped = |c: &str| {
            let text = format!("sampling_rate = 0.1\nnoise_multiplier = 1.0\nmax_grad_norm = {c}");
            toml::from_str::<RawDp>(&text).unwrap().validate(&training, 1, None).err().map(|e| e[0].0.clone())
        };
        assert_eq!(clipped("1e-6"), None);
        for tiny in ["9e-7", "1e-300", "5e-324"] {
            assert_eq!(clipped(tiny).as_deref(), Some("max_grad_norm"), "{tiny}");
        }
        // A count noise far above any federation's count.
        let noise = Some(DistributedNoise { bits: 32, max_parties: 40, honest_parties: 30 });
        let counted = |sd: &str| {
            let text = format!(
                "level = \"party\"\nnoise_multiplier = 1.0\nadaptive_clip_quantile = 0.5\nclip_count_stddev = {sd}"
            );
            toml::from_str::<RawDp>(&text).unwrap().validate(&training, 1, noise).err().map(|e| e[0].0.clone())
        };
        assert_eq!(counted("1e6"), None);
        assert_eq!(counted("1e308").as_deref(), Some("clip_count_stddev"));
        // Adaptive clipping's settings are each named, before calibration.
        let all_wrong: RawDp = toml::from_str(
            "noise_multiplier = 1.0\nsampling_rate = 0.1\nadaptive_clip_quantile = 1.5\nadaptive_clip_rate = 20.0",
        )
        .unwrap();
        let e = all_wrong.validate(&training, 1, None).unwrap_err();
        let fields: Vec<&str> = e.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["adaptive_clip_quantile", "adaptive_clip_quantile", "adaptive_clip_rate"], "{e:?}");
        let stray: RawDp = toml::from_str(
            "noise_multiplier = 1.0\nsampling_rate = 0.1\nadaptive_clip_rate = 0.2\nclip_count_stddev = 3.0",
        )
        .unwrap();
        let e = stray.validate(&training, 1, None).unwrap_err();
        assert_eq!(e.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), ["adaptive_clip_rate", "clip_count_stddev"]);
        // A noise multiplier whose ε nothing bounds (the PLD's lattice
        // slack for a model of up to 2^26 values, at adaptive clipping's
        // halved multiplier, needs more grid than it has) is refused, not
        // reserved as ∞; with the model bounded it is accepted.
        let party: RawDp = toml::from_str(
            "level = \"party\"\nnoise_multiplier = 1.0\naccountant = \"pld\"\nadaptive_clip_quantile = 0.5",
        )
        .unwrap();
        let e = party.validate(&training, 1, None).unwrap_err();
        assert_eq!(e[0].0, "noise_multiplier", "{e:?}");
        assert!(e[0].1.contains("bounds no ε") && e[0].1.contains("max_model_values"), "{e:?}");
        let bounded = RawDp { max_model_values: Some(100), ..party.clone() };
        assert!(bounded.validate(&training, 1, None).unwrap().epsilon(&training, 1).is_finite());
        // Under PLD the model needs room beside the adaptive clip's count.
        let one = RawDp { max_model_values: Some(1), ..party.clone() };
        assert_eq!(one.validate(&training, 1, None).unwrap_err()[0].0, "max_model_values");
        // With a fixed clip the party-level ε is finite at this multiplier,
        // but a record's (twice the sensitivity) is not: refused too.
        let fixed = RawDp { adaptive_clip_quantile: None, noise_multiplier: Some(0.7), ..party };
        let e = fixed.validate(&training, 1, None).unwrap_err();
        assert!(e[0].1.contains("per record"), "{e:?}");
        let spec = bounded.validate(&training, 1, None).unwrap();
        let party_level = DpSpec { noise_multiplier: 0.7, adaptive: None, max_model_values: None, ..spec };
        assert!(party_level.epsilon(&training, 1).is_finite(), "the party-level ε is finite there");
        assert!(!party_level.record_epsilon(&training, 1).is_finite());
    }

    #[test]
    fn the_pld_accountant_is_selectable_tighter_and_refused_for_distributed_noise() {
        let training = TrainConfig { local_epochs: 1, ..TrainConfig::default() };
        let rdp = raw("noise_multiplier = 1.1").validate(&training, 10, None).unwrap();
        let pld = raw("noise_multiplier = 1.1\naccountant = \"pld\"\nmax_model_values = 10000")
            .validate(&training, 10, None)
            .unwrap();
        assert_eq!((rdp.accountant, pld.accountant), (AccountantKind::Rdp, AccountantKind::Pld));
        let (e_rdp, e_pld) = (rdp.epsilon(&training, 10), pld.epsilon(&training, 10));
        assert!(e_pld < e_rdp * 0.9, "PLD {e_pld} vs RDP {e_rdp}");
        assert!(matches!(pld.accountant(&training, 3), Accountant::Pld(_)));
        assert_eq!(pld.to_raw().validate(&training, 10, None).unwrap(), pld);
        // A target is met under the PLD with less noise than under RDP.
        let target = |acc: &str| {
            raw(&format!("target_epsilon = 2.0\naccountant = \"{acc}\"")).validate(&training, 10, None).unwrap()
        };
        let (t_rdp, t_pld) = (target("rdp"), target("pld"));
        assert!(t_pld.noise_multiplier < t_rdp.noise_multiplier);
        assert!(t_pld.epsilon(&training, 10) <= 2.0 * (1.0 + 1e-9));
        // max_model_values without the PLD or distributed noise is refused.
        let err = raw("noise_multiplier = 1.1\nmax_model_values = 10").validate(&training, 10, None);
        assert_eq!(err.unwrap_err()[0].0, "max_model_values");
        // The distributed discrete Gaussian has no PLD.
        let d = DistributedNoise { bits: 32, max_parties: 10, honest_parties: 5 };
        let party: RawDp = toml::from_str("level = \"party\"\nnoise_multiplier = 1.0\naccountant = \"pld\"").unwrap();
        let errs = party.validate(&training, 10, Some(d)).unwrap_err();
        assert!(errs.iter().any(|(f, m)| f == "accountant" && m.contains("RDP")), "{errs:?}");
    }

    #[test]
    fn party_level_has_one_release_per_round_and_its_own_clip() {
        let training = TrainConfig { local_epochs: 3, ..TrainConfig::default() };
        let party: RawDp = toml::from_str("level = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 0.5").unwrap();
        let dp = party.validate(&training, 10, None).unwrap();
        assert_eq!((dp.level, dp.clip, dp.sampling_rate), (DpLevel::Party, 0.5, 1.0));
        assert_eq!(dp.steps_per_round(&training), 1);
        assert!(dp.plan(&training, 10).is_none());
        // Ten unsampled Gaussian releases at z = 1: α·10/2 per order.
        let Accountant::Rdp(acc) = dp.accountant(&training, 10) else { panic!("rdp by default") };
        assert_eq!(acc.rdp()[0], 10.0);
        assert_eq!(dp.to_raw().validate(&training, 10, None).unwrap(), dp);
        let bad: RawDp =
            toml::from_str("level = \"party\"\nnoise_multiplier = 1.0\nsampling_rate = 0.1\nmax_grad_norm = 1.0")
                .unwrap();
        let fields: Vec<String> = bad.validate(&training, 1, None).unwrap_err().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["sampling_rate", "max_grad_norm"]);
        let example: RawDp = toml::from_str("sampling_rate = 0.1\nnoise_multiplier = 1.0\nupdate_clip = 1.0").unwrap();
        assert_eq!(example.validate(&training, 1, None).unwrap_err()[0].0, "update_clip");
    }

    /// Distributed noise is accounted with its own bound at the worst model
    /// size: at 32 bits the lattice is so fine that it costs what central
    /// noise costs (to 10^-3), at 16 bits visibly more; a target calibrates.
    #[test]
    fn distributed_noise_has_its_own_accounting() {
        let training = TrainConfig::default();
        let party: RawDp = toml::from_str("level = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 0.5").unwrap();
        let bounded = RawDp { max_model_values: Some(1 << 20), ..party.clone() };
        let central = party.validate(&training, 10, None).unwrap();
        let noise = |bits| DistributedNoise { bits, max_parties: 10, honest_parties: 8 };
        let wide = party.validate(&training, 10, Some(noise(32))).unwrap();
        let narrow = bounded.validate(&training, 10, Some(noise(16))).unwrap();
        let (c, w, n) = (central.epsilon(&training, 10), wide.epsilon(&training, 10), narrow.epsilon(&training, 10));
        assert!(w >= c && w < c * 1.001, "central {c}, 32-bit distributed {w}");
        assert!(n > w * 1.001, "16 bits: {n} vs {w}");
        assert_eq!(wide.ddg_config(1000).map(|d| (d.dim, d.honest_parties, d.bits)), Some((1000, 8, 32)));
        assert!(central.ddg_config(1000).is_none());
        // At 16 bits, a target needs a bounded model: the rounding of a
        // 2^26-value vector alone costs more than ε = 2 over ten rounds.
        let target: RawDp = toml::from_str("level = \"party\"\ntarget_epsilon = 2.0").unwrap();
        let err = target.validate(&training, 10, Some(noise(16))).unwrap_err();
        assert!(err[0].1.contains("dp.max_model_values"), "{err:?}");
        let target = RawDp { max_model_values: Some(1 << 20), ..target };
        let dp = target.validate(&training, 10, Some(noise(16))).unwrap();
        let eps = dp.epsilon(&training, 10);
        assert!(eps <= 2.0 && eps > 1.99, "{eps} at z = {}", dp.noise_multiplier);
        // Checked against each other after the round trip, with the same noise.
        let raw = dp.to_raw();
        assert_eq!(raw.validate(&training, 10, Some(noise(16))).unwrap(), dp);
    }

    /// Adaptive clipping rides in the distributed release, takes its
    /// defaults from the spec, and is refused elsewhere or with a count
    /// noise that leaves nothing for the updates. Its party-level ε is a
    /// fixed clip's at twice the sensitivity: a party with no data sends
    /// (0, +κ/2), not zero, so its data against none moves the contribution
    /// by more than the joint clip (what a record costs, the same bound,
    /// is unchanged).
    #[test]
    fn adaptive_clipping_is_for_distributed_noise_and_checked() {
        let training = TrainConfig::default();
        let noise = Some(DistributedNoise { bits: 32, max_parties: 40, honest_parties: 30 });
        let raw: RawDp =
            toml::from_str("level = \"party\"\nnoise_multiplier = 1.0\nadaptive_clip_quantile = 0.5").unwrap();
        let dp = raw.validate(&training, 5, noise).unwrap();
        let want = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: 2.0 };
        assert_eq!(dp.adaptive, Some(want));
        let fixed = RawDp { adaptive_clip_quantile: None, ..raw.clone() }.validate(&training, 5, noise).unwrap();
        assert!(dp.epsilon(&training, 5) > 1.5 * fixed.epsilon(&training, 5));
        assert_eq!(dp.epsilon(&training, 5), fixed.record_epsilon(&training, 5));
        assert_eq!(dp.record_epsilon(&training, 5), fixed.record_epsilon(&training, 5));
        // A target is met at the adaptive job's own sensitivity.
        let aimed = RawDp { noise_multiplier: None, target_epsilon: Some(4.0), ..raw.clone() };
        let aimed = aimed.validate(&training, 5, noise).unwrap();
        let eps = aimed.epsilon(&training, 5);
        assert!(eps <= 4.0 && eps > 3.99, "{eps}");
        assert_eq!(dp.to_raw().validate(&training, 5, noise).unwrap(), dp);
        let field = |r: RawDp, n| r.validate(&training, 5, n).unwrap_err()[0].0.clone();
        // Central noise too (σ_b defaults to z there); DP-SGD: no.
        let central = raw.validate(&training, 5, None).unwrap();
        assert_eq!(central.adaptive.map(|a| a.count_stddev), Some(1.0));
        let example = RawDp { level: None, sampling_rate: Some(0.1), ..raw.clone() };
        assert_eq!(field(example, None), "adaptive_clip_quantile");
        assert_eq!(field(RawDp { clip_count_stddev: Some(0.5), ..raw.clone() }, noise), "clip_count_stddev");
        // Negative: its square would pass, but it does not exceed z/2.
        assert_eq!(field(RawDp { clip_count_stddev: Some(-5.0), ..raw.clone() }, noise), "clip_count_stddev");
        assert_eq!(field(RawDp { adaptive_clip_quantile: Some(1.0), ..raw.clone() }, noise), "adaptive_clip_quantile");
        assert_eq!(field(RawDp { adaptive_clip_rate: Some(0.0), ..raw.clone() }, noise), "adaptive_clip_rate");
        let orphan = RawDp { adaptive_clip_quantile: None, adaptive_clip_rate: Some(0.1), ..raw };
        assert_eq!(field(orphan, noise), "adaptive_clip_rate");
    }

    #[test]
    fn public_ranges_standardise_to_minus_one_one() {
        let dp = raw("noise_multiplier = 1.0\nfeature_ranges = [[0.0, 10.0], [-4.0, 0.0]]")
            .validate(&TrainConfig::default(), 1, None)
            .unwrap();
        let (mean, std) = dp.range_stats().unwrap().mean_std();
        assert_eq!(mean, vec![5.0, -2.0]);
        assert_eq!(std, vec![5.0, 2.0]);
    }
}
