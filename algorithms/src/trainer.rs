//! The party side: the [`Trainer`] trait and the configuration it receives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Parameters};

/// Named scalar metrics, e.g. `loss`, `accuracy`.
pub type Metrics = BTreeMap<String, f64>;

/// Which family of model a job trains (the tag of [`Architecture`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelKind {
    /// Multinomial logistic regression (pure Rust by default, or libtorch).
    LogisticRegression,
    /// Multi-layer perceptron with ReLU hidden layers (libtorch).
    Mlp,
    /// Small convolutional network for images such as the 8×8 digits (libtorch).
    Cnn,
    /// A TorchScript module the parties hold as a file (libtorch): bring your
    /// own architecture.
    Torchscript,
    /// A trainer registered by a party build of your own (see
    /// `examples/custom_trainer.rs`).
    Custom,
}

impl ModelKind {
    /// The name used in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::LogisticRegression => "logistic_regression",
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::Torchscript => "torchscript",
            ModelKind::Custom => "custom",
        }
    }
}

/// What trains the model at each party.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Engine {
    /// The pure-Rust trainer ([`crate::LogisticRegression`]); no libtorch needed.
    Rust,
    /// libtorch through `tch`, on a dedicated thread per job.
    Torch,
}

impl Engine {
    /// The name used in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Rust => "rust",
            Engine::Torch => "torch",
        }
    }
}

/// A model's architecture with exactly the settings that kind takes: a
/// setting of another kind cannot be expressed, so trainers never see one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Architecture {
    /// Multinomial logistic regression on `engine`.
    LogisticRegression {
        /// Pure Rust (the default) or libtorch.
        engine: Engine,
    },
    /// ReLU hidden layers of these widths (libtorch).
    Mlp {
        /// Hidden layer widths.
        hidden: Vec<usize>,
    },
    /// 3×3 convolutions with these output channels, each followed by ReLU
    /// and 2×2 max-pooling, over `[channels, height, width]` images (libtorch).
    Cnn {
        /// Output channels per convolution layer.
        channels: Vec<usize>,
        /// The input as `[channels, height, width]`; a row's features are read in that order.
        image: [usize; 3],
    },
    /// A TorchScript module: the name of the file in each party's `[models]` table.
    Torchscript {
        /// Key of the party's `[models]` table.
        file: String,
    },
    /// A trainer registered in a party build of your own, by name.
    Custom {
        /// The registered trainer's name.
        trainer: String,
    },
}

/// The model table of a job spec, validated and typed. In TOML it is the
/// flat table of [`RawModel`] (`kind = "mlp"`, `hidden = [...]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawModel", into = "RawModel")]
pub struct ModelConfig {
    /// Number of classes (labels are `0..classes`).
    pub classes: usize,
    /// Standardise features with statistics computed federatedly (sums, not rows).
    pub standardize: bool,
    /// The architecture and its settings.
    pub architecture: Architecture,
}

impl ModelConfig {
    /// A model for `classes` classes that standardises its inputs.
    pub fn new(classes: usize, architecture: Architecture) -> Self {
        ModelConfig { classes, standardize: true, architecture }
    }

    /// The pure-Rust logistic regression.
    pub fn logistic_regression(classes: usize) -> Self {
        Self::new(classes, Architecture::LogisticRegression { engine: Engine::Rust })
    }

    /// An MLP with these hidden widths.
    pub fn mlp(classes: usize, hidden: Vec<usize>) -> Self {
        Self::new(classes, Architecture::Mlp { hidden })
    }

    /// A CNN with these channels over `image`.
    pub fn cnn(classes: usize, channels: Vec<usize>, image: [usize; 3]) -> Self {
        Self::new(classes, Architecture::Cnn { channels, image })
    }

    /// The architecture's kind.
    pub fn kind(&self) -> ModelKind {
        match &self.architecture {
            Architecture::LogisticRegression { .. } => ModelKind::LogisticRegression,
            Architecture::Mlp { .. } => ModelKind::Mlp,
            Architecture::Cnn { .. } => ModelKind::Cnn,
            Architecture::Torchscript { .. } => ModelKind::Torchscript,
            Architecture::Custom { .. } => ModelKind::Custom,
        }
    }

    /// What trains it: Rust for logistic regression unless set otherwise (and
    /// for custom trainers, which bring their own), libtorch for the rest.
    pub fn engine(&self) -> Engine {
        match &self.architecture {
            Architecture::LogisticRegression { engine } => *engine,
            Architecture::Custom { .. } => Engine::Rust,
            _ => Engine::Torch,
        }
    }
}

/// The model table as written in TOML: every setting optional, checked
/// against the kind by [`RawModel::validate`] so a spec's errors are all
/// reported at once with their field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// The architecture.
    pub kind: ModelKind,
    /// Number of classes.
    pub classes: usize,
    /// Federated standardisation of the features (default true).
    #[serde(default = "default_true")]
    pub standardize: bool,
    /// logistic_regression: `rust` (default) or `torch`; others: `torch` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,
    /// mlp: widths of the hidden layers (default `[64, 32]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<usize>,
    /// cnn: output channels of the convolution layers (default `[16, 32]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<usize>,
    /// cnn: the input as `[channels, height, width]` (default `[1, 8, 8]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
    /// torchscript: the model file's name in each party's `[models]` table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torchscript: Option<String>,
    /// custom: the registered trainer's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<String>,
}

impl RawModel {
    /// The fewest values (weights and biases) a model of these settings has
    /// whatever the data's width (taken as 1 feature): exact for a CNN (its
    /// image gives the width), the hidden and output layers for an MLP;
    /// `None` for kinds whose size the spec does not give (TorchScript,
    /// custom). Saturating. A spec is checked against the limit on values
    /// with it before any party builds the model (which would allocate it).
    pub fn values_at_least(&self) -> Option<u64> {
        self.values_at_width(1)
    }

    /// The values a model of these settings has on rows of `features`
    /// features (a CNN's image gives its own width): what a party checks
    /// against its limit once it knows its width, before building the
    /// model (the spec's check counts one feature). Saturating.
    pub fn values_at_width(&self, features: u64) -> Option<u64> {
        let classes = self.classes as u64;
        let dense = |inputs: u64, outputs: u64| inputs.saturating_mul(outputs).saturating_add(outputs);
        match self.kind {
            ModelKind::LogisticRegression => Some(dense(features, classes)),
            ModelKind::Mlp => {
                let hidden = if self.hidden.is_empty() { DEFAULT_HIDDEN.to_vec() } else { self.hidden.clone() };
                let mut total = 0u64;
                let mut width = features;
                for &h in &hidden {
                    total = total.saturating_add(dense(width, h as u64));
                    width = h as u64;
                }
                Some(total.saturating_add(dense(width, classes)))
            }
            ModelKind::Cnn => {
                let [c, h, w] = self.image.unwrap_or(DEFAULT_IMAGE);
                let channels = if self.channels.is_empty() { DEFAULT_CHANNELS.to_vec() } else { self.channels.clone() };
                let (mut total, mut ch, mut hh, mut ww) = (0u64, c as u64, h as u64, w as u64);
                for &out in &channels {
                    total = total.saturating_add(dense(ch.saturating_mul(9), out as u64));
                    (ch, hh, ww) = (out as u64, hh / 2, ww / 2);
                }
                Some(total.saturating_add(dense(ch.saturating_mul(hh).saturating_mul(ww), classes)))
            }
            _ => None,
        }
    }

    /// Checks the settings against the kind; errors are `field: reason`
    /// relative to the table.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let kind = self.kind.as_str();
        if !(2..=10_000).contains(&self.classes) {
            errs.push(format!("classes: must be 2..=10000 (got {})", self.classes));
        }
        match (self.kind, self.engine) {
            (ModelKind::Custom, Some(_)) => {
                errs.push("engine: a custom trainer brings its own engine; leave engine out".into())
            }
            (ModelKind::LogisticRegression, _) | (_, None | Some(Engine::Torch)) => {}
            (_, Some(Engine::Rust)) => {
                errs.push(format!("engine: the rust engine trains only logistic_regression; {kind} needs \"torch\""))
            }
        }
        if self.kind == ModelKind::Mlp {
            if self.hidden.len() > 16 {
                errs.push(format!("hidden: at most 16 layers (got {})", self.hidden.len()));
            }
            if let Some(w) = self.hidden.iter().find(|w| !(1..=65_536).contains(*w)) {
                errs.push(format!("hidden: layer widths must be 1..=65536 (got {w})"));
            }
        } else if !self.hidden.is_empty() {
            errs.push(format!("hidden: only applies to kind \"mlp\" (kind is {kind:?})"));
        }
        if self.kind == ModelKind::Cnn {
            let [c, h, w] = self.image.unwrap_or(DEFAULT_IMAGE);
            if !(1..=64).contains(&c) || !(4..=1024).contains(&h) || !(4..=1024).contains(&w) {
                errs.push(format!("image: [channels 1..=64, height 4..=1024, width 4..=1024] (got [{c}, {h}, {w}])"));
            }
            let channels = if self.channels.is_empty() { DEFAULT_CHANNELS.to_vec() } else { self.channels.clone() };
            if channels.len() > 4 || channels.iter().any(|c| !(1..=1024).contains(c)) {
                errs.push("channels: 1 to 4 layers of 1..=1024 channels".into());
            } else if (h >> channels.len()) == 0 || (w >> channels.len()) == 0 {
                errs.push(format!("channels: {} pooling layers shrink a {h}x{w} image to nothing", channels.len()));
            }
        } else {
            if !self.channels.is_empty() {
                errs.push(format!("channels: only applies to kind \"cnn\" (kind is {kind:?})"));
            }
            if self.image.is_some() {
                errs.push(format!("image: only applies to kind \"cnn\" (kind is {kind:?})"));
            }
        }
        match (&self.torchscript, self.kind) {
            (None, ModelKind::Torchscript) => {
                errs.push("torchscript: name the model file (a key of each party's [models] table)".into())
            }
            (Some(name), ModelKind::Torchscript) => {
                if name.is_empty()
                    || name.len() > 128
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    errs.push(format!("torchscript: {name:?} is not a model name (letters, digits, '-', '_', '.')"));
                }
            }
            (Some(_), _) => errs.push(format!("torchscript: only applies to kind \"torchscript\" (kind is {kind:?})")),
            (None, _) => {}
        }
        match (&self.custom, self.kind) {
            (None, ModelKind::Custom) => errs.push("custom: name the trainer registered at the parties".into()),
            (Some(name), ModelKind::Custom) => {
                if name.is_empty()
                    || name.len() > 64
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
                {
                    errs.push(format!("custom: {name:?} is not a trainer name (letters, digits, '-', '_')"));
                }
            }
            (Some(_), _) => errs.push(format!("custom: only applies to kind \"custom\" (kind is {kind:?})")),
            (None, _) => {}
        }
        errs
    }
}

const DEFAULT_HIDDEN: [usize; 2] = [64, 32];
const DEFAULT_CHANNELS: [usize; 2] = [16, 32];
const DEFAULT_IMAGE: [usize; 3] = [1, 8, 8];

impl TryFrom<RawModel> for ModelConfig {
    type Error = String;

    /// Fails with every problem [`RawModel::validate`] finds, joined.
    fn try_from(raw: RawModel) -> Result<Self, String> {
        let errs = raw.validate();
        if !errs.is_empty() {
            return Err(errs.join("; "));
        }
        let architecture = match raw.kind {
            ModelKind::LogisticRegression => {
                Architecture::LogisticRegression { engine: raw.engine.unwrap_or(Engine::Rust) }
            }
            ModelKind::Mlp => {
                Architecture::Mlp { hidden: if raw.hidden.is_empty() { DEFAULT_HIDDEN.to_vec() } else { raw.hidden } }
            }
            ModelKind::Cnn => Architecture::Cnn {
                channels: if raw.channels.is_empty() { DEFAULT_CHANNELS.to_vec() } else { raw.channels },
                image: raw.image.unwrap_or(DEFAULT_IMAGE),
            },
            ModelKind::Torchscript => Architecture::Torchscript { file: raw.torchscript.unwrap_or_default() },
            ModelKind::Custom => Architecture::Custom { trainer: raw.custom.unwrap_or_default() },
        };
        Ok(ModelConfig { classes: raw.classes, standardize: raw.standardize, architecture })
    }
}

impl From<ModelConfig> for RawModel {
    fn from(m: ModelConfig) -> Self {
        let mut raw = RawModel {
            kind: m.kind(),
            classes: m.classes,
            standardize: m.standardize,
            engine: None,
            hidden: Vec::new(),
            channels: Vec::new(),
            image: None,
            torchscript: None,
            custom: None,
        };
        match m.architecture {
            Architecture::LogisticRegression { engine } => raw.engine = Some(engine),
            Architecture::Mlp { hidden } => raw.hidden = hidden,
            Architecture::Cnn { channels, image } => (raw.channels, raw.image) = (channels, Some(image)),
            Architecture::Torchscript { file } => raw.torchscript = Some(file),
            Architecture::Custom { trainer } => raw.custom = Some(trainer),
        }
        raw
    }
}

fn default_true() -> bool {
    true
}

/// The local optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OptimizerKind {
    /// Stochastic gradient descent, optionally with (heavy-ball) momentum.
    #[default]
    Sgd,
    /// Adam (β₁ = 0.9, β₂ = 0.999, ε = 1e-8); its moments restart each round,
    /// since they are local state the global model does not carry.
    Adam,
}

/// The training table of a job spec: local optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the local training split per round.
    #[serde(default = "default_epochs")]
    pub local_epochs: u32,
    /// Mini-batch size.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Step size.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// The optimiser.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// SGD momentum in [0, 1).
    #[serde(default)]
    pub momentum: f64,
    /// L2 penalty on the weights (weight decay).
    #[serde(default, alias = "weight_decay")]
    pub l2: f64,
    /// FedProx: μ of the proximal term μ/2·‖w − w_global‖² added to the local
    /// loss (0 = none). The `fedprox` strategy sets it.
    #[serde(default)]
    pub proximal_mu: f64,
    /// Seed of every random choice (initialisation, shuffling, splits).
    #[serde(default)]
    pub seed: u64,
    /// Fraction of each party's rows held out for federated evaluation.
    #[serde(default = "default_validation")]
    pub validation_fraction: f64,
}

fn default_epochs() -> u32 {
    1
}
fn default_batch() -> usize {
    32
}
fn default_lr() -> f64 {
    0.1
}
fn default_validation() -> f64 {
    0.2
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            local_epochs: default_epochs(),
            batch_size: default_batch(),
            learning_rate: default_lr(),
            optimizer: OptimizerKind::Sgd,
            momentum: 0.0,
            l2: 0.0,
            proximal_mu: 0.0,
            seed: 0,
            validation_fraction: default_validation(),
        }
    }
}

impl TrainConfig {
    /// Checks the ranges; errors are `field: reason` relative to the table.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if !(1..=1000).contains(&self.local_epochs) {
            errs.push(format!("local_epochs: must be 1..=1000 (got {})", self.local_epochs));
        }
        if !(1..=1_000_000).contains(&self.batch_size) {
            errs.push(format!("batch_size: must be 1..=1000000 (got {})", self.batch_size));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate <= 100.0) {
            errs.push(format!("learning_rate: must be in (0, 100] (got {})", self.learning_rate));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            errs.push(format!("momentum: must be in [0, 1) (got {})", self.momentum));
        }
        if self.optimizer == OptimizerKind::Adam && self.momentum != 0.0 {
            errs.push("momentum: applies to optimizer \"sgd\"; Adam keeps its own moments".into());
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            errs.push(format!("l2: must be finite and >= 0 (got {})", self.l2));
        }
        if !(self.proximal_mu.is_finite() && (0.0..=1000.0).contains(&self.proximal_mu)) {
            errs.push(format!("proximal_mu: must be in [0, 1000] (got {})", self.proximal_mu));
        }
        if !(self.validation_fraction.is_finite() && (0.0..0.9).contains(&self.validation_fraction)) {
            errs.push(format!("validation_fraction: must be in [0, 0.9) (got {})", self.validation_fraction));
        }
        errs
    }
}

/// What a party is told for one fit round. A strategy may change it per round
/// (learning-rate schedules, proximal terms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    /// The round, from 1.
    pub round: u32,
    /// Local optimisation settings for this round.
    pub train: TrainConfig,
}

/// Example-level differential privacy for one job's local training
/// (DP-SGD). The party derives it from the job spec it accepted, never from
/// a round's message, because it fixes what the training costs in ε: the
/// number of steps, the sampling rate and the noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdPlan {
    /// C: each row's gradient is clipped to this L2 norm.
    pub max_grad_norm: f64,
    /// z = σ / C.
    pub noise_multiplier: f64,
    /// q: each row is in a step's Poisson sample with this probability.
    pub sampling_rate: f64,
    /// The public divisor of each step's noisy gradient sum (the spec's
    /// `training.batch_size`, the expected sample size).
    pub expected_batch_size: usize,
    /// Steps per round: ⌈local_epochs / q⌉.
    pub steps_per_round: u64,
    /// The job's rounds: a trainer keeps its noise reserve (drawing ahead)
    /// only after a round before the last.
    pub rounds: u32,
}

impl DpSgdPlan {
    /// The DP-SGD noise and sampler for a model with `dim` trainable
    /// values, its noise drawn ahead on a thread of its own: taken from
    /// `reserve` (the trainer's previous round's, drawn while the party
    /// waited) where it fits, up to a round's steps ahead. Give it back with
    /// [`DpSgdPlan::reserve_after`] after the round.
    pub fn mechanism(
        &self,
        dim: usize,
        reserve: Option<confide_dp::dpsgd::NoiseReserve>,
    ) -> Result<confide_dp::dpsgd::DpSgd, Error> {
        let ahead = usize::try_from(self.steps_per_round).unwrap_or(usize::MAX);
        confide_dp::dpsgd::DpSgd::new(confide_dp::dpsgd::DpSgdConfig {
            max_grad_norm: self.max_grad_norm,
            noise_multiplier: self.noise_multiplier,
            sampling_rate: self.sampling_rate,
            expected_batch_size: self.expected_batch_size as f64,
            dim,
        })
        .map(|dp| dp.with_reserve(reserve, ahead))
        .map_err(|e| Error::InvalidInput(format!("dp: {e}")))
    }

    /// What a trainer keeps of `dp`'s noise reserve after round `round`:
    /// the reserve (which goes on drawing the next round's noise) after a
    /// round before the last; nothing after the last, so that no noise is
    /// drawn for a round that will not come (dropped, the reserve wipes its
    /// vectors and its thread ends).
    pub fn reserve_after(&self, round: u32, dp: confide_dp::dpsgd::DpSgd) -> Option<confide_dp::dpsgd::NoiseReserve> {
        if round < self.rounds { dp.into_reserve() } else { None }
    }
}

/// What a party reports after local training.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOutcome {
    /// Training examples used; the aggregation weight.
    pub num_examples: u64,
    /// Local training metrics (e.g. `train_loss`). Not `stage_…` names nor
    /// the coordinator's own (`epsilon`, `round_ms`, `num_examples`, …:
    /// `confide_proto::messages::RESERVED_METRICS`): a result carrying one
    /// is refused as malformed.
    pub metrics: Metrics,
}

/// What a party reports after evaluating the global model on its held-out rows.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOutcome {
    /// Examples evaluated; the averaging weight.
    pub num_examples: u64,
    /// Mean loss over those examples.
    pub loss: f64,
    /// Further metrics (e.g. `accuracy`); the names [`FitOutcome::metrics`]
    /// may not use, neither.
    pub metrics: Metrics,
}

/// Per-feature sums over a party's training rows. Parties send these, never
/// rows; the coordinator adds them to standardise features federatedly.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeatureStats {
    /// Rows summed.
    pub count: u64,
    /// Sum of each feature.
    pub sum: Vec<f64>,
    /// Sum of each feature's square.
    pub sum_sq: Vec<f64>,
}

impl FeatureStats {
    /// Adds another party's sums; the feature counts must agree.
    pub fn merge(&mut self, other: &FeatureStats) -> Result<(), Error> {
        if self.count == 0 && self.sum.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        if other.sum.len() != self.sum.len() || other.sum_sq.len() != self.sum_sq.len() {
            return Err(Error::InvalidInput(format!(
                "feature statistics over {} features cannot be merged with {}",
                other.sum.len(),
                self.sum.len()
            )));
        }
        self.count = self.count.checked_add(other.count).ok_or_else(|| {
            Error::InvalidInput(format!(
                "feature statistics of {} and {} rows overflow the count",
                self.count, other.count
            ))
        })?;
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.sum_sq.iter_mut().zip(&other.sum_sq) {
            *a += b;
        }
        Ok(())
    }

    /// Means and standard deviations (a constant feature gets 1, so it passes through).
    pub fn mean_std(&self) -> (Vec<f32>, Vec<f32>) {
        let n = self.count.max(1) as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let std = self
            .sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| {
                let var = (sq / n - m * m).max(0.0);
                let sd = var.sqrt();
                if sd > 1e-8 { sd as f32 } else { 1.0 }
            })
            .collect();
        (mean.into_iter().map(|m| m as f32).collect(), std)
    }
}

/// Names of the frozen tensors that carry input standardisation inside a model,
/// so that a saved model is self-contained for inference.
pub const INPUT_MEAN: &str = "input.mean";
/// See [`INPUT_MEAN`].
pub const INPUT_STD: &str = "input.std";

/// Whether tensor `name` is the input standardisation: frozen, not trained,
/// so DP noise on it would only be thrown away.
pub fn is_input_standardisation(name: &str) -> bool {
    name == INPUT_MEAN || name == INPUT_STD
}

/// Writes federated feature statistics into a model's `input.mean`/`input.std`.
pub fn apply_feature_stats(params: &mut Parameters, stats: &FeatureStats) -> Result<(), Error> {
    let (mean, std) = stats.mean_std();
    let mut set = 0;
    for (name, values) in params.values_mut() {
        let src = match name {
            INPUT_MEAN => &mean,
            INPUT_STD => &std,
            _ => continue,
        };
        if values.len() != src.len() {
            return Err(Error::InvalidInput(format!(
                "{name} holds {} features but the statistics cover {}",
                values.len(),
                src.len()
            )));
        }
        values.copy_from_slice(src);
        set += 1;
    }
    if set != 2 {
        return Err(Error::InvalidInput(format!("model lacks {INPUT_MEAN}/{INPUT_STD} tensors")));
    }
    Ok(())
}

/// The usual report of a classifier on `labels`: `accuracy`, and for two
/// classes the ROC `auc` of the positive-class scores.
pub fn classification_outcome(
    classes: usize,
    labels: &[u32],
    loss: f64,
    accuracy: f64,
    positive_scores: &[f64],
) -> EvalOutcome {
    let mut metrics = Metrics::new();
    metrics.insert("accuracy".into(), accuracy);
    if classes == 2
        && let Some(auc) = crate::logreg::roc_auc(positive_scores, labels)
    {
        metrics.insert("auc".into(), auc);
    }
    EvalOutcome { num_examples: labels.len() as u64, loss, metrics }
}

/// The number of `width`-feature rows in `features`, or an error saying why not.
pub fn row_count(features: &[f32], width: usize) -> Result<usize, Error> {
    if width == 0 || !features.len().is_multiple_of(width) {
        return Err(Error::InvalidInput(format!(
            "{} values is not a whole number of {width}-feature rows",
            features.len()
        )));
    }
    Ok(features.len() / width)
}

/// A party's local learner. Implementations own the party's private data;
/// nothing but parameters, counts and metrics leaves them.
///
/// `Send` but not necessarily `Sync`: the party runs each trainer on a
/// dedicated thread (libtorch tensors are not `Sync`).
pub trait Trainer: Send {
    /// The current parameters, in the model's fixed order. Fallible because
    /// a training library may fail to read its own tensors; the party then
    /// fails the task, naming the reason, instead of sending an empty model.
    fn parameters(&self) -> Result<Parameters, Error>;
    /// Replaces the parameters; names and shapes must match the model.
    fn set_parameters(&mut self, params: &Parameters) -> Result<(), Error>;
    /// Per-feature sums over the local training rows (for federated
    /// standardisation).
    fn feature_stats(&self) -> FeatureStats;
    /// Trains locally from the current parameters.
    fn fit(&mut self, config: &FitConfig) -> Result<FitOutcome, Error>;
    /// Whether [`Trainer::fit_private`] is implemented: the party refuses a
    /// DP-SGD job at acceptance when it is not.
    fn supports_dp_sgd(&self) -> bool {
        false
    }
    /// [`Trainer::supports_dp_sgd`] with the reason when not (e.g. which part
    /// of a TorchScript module has no per-example gradients here).
    fn dp_sgd_support(&self) -> Result<(), String> {
        if self.supports_dp_sgd() { Ok(()) } else { Err("it cannot compute per-example gradients".into()) }
    }
    /// Trains with DP-SGD: `plan.steps_per_round` steps, each on a Poisson
    /// sample, each sampled row's gradient clipped, summed and noised by
    /// [`DpSgdPlan::mechanism`]. `config` supplies only what is
    /// post-processing (learning rate, optimiser, regularisation); the
    /// steps and the sampling come from `plan`. The outcome reports no
    /// metric: a training loss would be an un-noised statistic of the rows.
    ///
    /// What an implementation owes the guarantee:
    /// - each row's clipped contribution, and the norm it is clipped by,
    ///   must be a function of that row and the model alone, bit for bit:
    ///   batched kernels that round a row differently beside other rows
    ///   let a chosen model make one row move the others' contributions
    ///   (the built-in trainers run each row's forward and backward pass
    ///   on its own, in a fixed order of sums, for this reason: see
    ///   `RowPass` in the party's `torch.rs` and its test
    ///   `a_rows_gradient_is_bit_for_bit_the_same_beside_any_other_rows`);
    /// - the norm is over every trainable value at once, biases included;
    /// - the noise goes on every trainable value at every step, an empty
    ///   sample included, and the sum is divided by the plan's expected
    ///   batch size, never the sample's own size;
    /// - no layer may mix rows (batch normalisation, for one);
    /// - the sample comes from `DpSgd::poisson_sample` (which refuses more
    ///   than `MAX_DP_ROWS` rows), and the clipped rows are summed at most
    ///   `CHUNK_ROWS` at a time in plain f64, each chunk folded into a
    ///   `CompensatedSum` (all in `confide_dp::dpsgd`): the floating-point
    ///   error bound the sensitivity rests on assumes exactly that.
    fn fit_private(&mut self, _config: &FitConfig, _plan: &DpSgdPlan) -> Result<FitOutcome, Error> {
        Err(Error::InvalidInput(
            "this trainer cannot compute per-example gradients, so it cannot train with DP-SGD".into(),
        ))
    }
    /// Evaluates the current parameters on the local held-out rows.
    fn evaluate(&mut self) -> Result<EvalOutcome, Error>;
    /// Class probabilities for `rows` rows of features (row-major), row-major
    /// `rows × classes`.
    fn predict(&self, features: &[f32]) -> Result<Vec<f32>, Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_stats_equal_pooled_stats() {
        let a = FeatureStats { count: 2, sum: vec![1.0 + 3.0], sum_sq: vec![1.0 + 9.0] };
        let b = FeatureStats { count: 1, sum: vec![5.0], sum_sq: vec![25.0] };
        let mut m = FeatureStats::default();
        m.merge(&a).unwrap();
        m.merge(&b).unwrap();
        let (mean, std) = m.mean_std();
        assert_eq!(mean, vec![3.0]);
        // population std of [1, 3, 5]
        assert!((std[0] - (8.0f32 / 3.0).sqrt()).abs() < 1e-6);
        assert!(m.merge(&FeatureStats { count: 1, sum: vec![1.0, 2.0], sum_sq: vec![1.0, 4.0] }).is_err());
    }

    #[test]
    fn train_config_validation_names_fields() {
        let c = TrainConfig { batch_size: 0, learning_rate: f64::NAN, ..TrainConfig::default() };
        let errs = c.validate();
        assert!(errs.iter().any(|e| e.starts_with("batch_size")));
        assert!(errs.iter().any(|e| e.starts_with("learning_rate")));
    }
}
